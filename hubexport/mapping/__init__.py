"""Name and layout mappings between training checkpoints and Hugging Face models."""
