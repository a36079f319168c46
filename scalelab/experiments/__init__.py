"""End-to-end studies built from the pretraining and post-training stages."""
