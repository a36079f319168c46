"""Post-training: instruction tuning (SFT), reward models, PPO and DPO (see docs/posttrain.md)."""
