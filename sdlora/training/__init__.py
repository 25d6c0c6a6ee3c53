"""Training: the loop, its examples and caches, guards, optimizers, statistics, resumable
state, and scoring the saved epochs."""
