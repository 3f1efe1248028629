"""One file per architecture: a table of Megatron ↔ Hugging Face mappings."""
