"""scalelab: the ChatGPT-class recipe, end to end, from a laptop CPU to many GPUs."""

__version__ = "0.1.0"
