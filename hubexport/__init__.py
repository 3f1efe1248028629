"""hubexport: sharded RL training checkpoints → Hugging Face models (and back)."""

__version__ = "0.1.0"
