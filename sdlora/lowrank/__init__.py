"""Low-rank maths on adapters and checkpoints: resize by energy, extract, merge, inspect."""
