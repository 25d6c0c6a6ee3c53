"""sdlora: a Stable Diffusion LoRA style trainer. Layers are folders and imports only go down
(see shared/docs/design.md): ground modules here, then models/, data/, adapters/, sampling/,
lowrank/, training/, tiny/, bench/, ui/, commands/, and the entry points cli.py and run.py."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"  # packaged models, configs, vocabularies
