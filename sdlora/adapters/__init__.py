"""Adapters: the kinds (LoRA, LoCon, LoHa, LoKr, Tucker, DoRA), Kohya keys and metadata, reading
and writing files, applying a file to a model, and the trainable network."""
