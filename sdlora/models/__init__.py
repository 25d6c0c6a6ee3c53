"""Base models: load a checkpoint (embedded tiny, diffusers folder, single file, hub id), its
architecture and family, tokenizers, long prompts and A1111 prompt syntax, quantisation."""
