"""One module per subcommand: its arguments, the call into its stage, what it prints.

A module here imports only the standard library and sdlora's ground layer (config, errors, io)
at its top, so that `sdlora --help`, every `sdlora COMMAND --help` and `--version` start without
torch, numpy, diffusers or transformers (~2 s on a laptop); a command imports its stage when it
runs. `tests/test_codebase.py` checks this.
"""

from __future__ import annotations

import dataclasses
import importlib

from sdlora.config import SECTION_CLASSES

# The modules here, in the order `sdlora --help` lists their commands.
COMMAND_MODULES = ["new", "run", "dataset", "train", "sample", "lowrank", "config", "kohya_import", "tiny", "bench", "ui"]

# What every command that reads an adapter file accepts (kohya.py's one reader).
ADAPTER_FILES = ("LoRA, LoCon, LoHa, LoKr or Tucker, with or without DoRA; Kohya, LyCORIS, diffusers or "
                 "peft key names")


def config_choices(section: str, key: str) -> list:
    """The values the config schema allows for SECTION.KEY (its opt(choices=...)), for an option's choices."""

    return next(f.metadata["choices"] for f in dataclasses.fields(SECTION_CLASSES[section]) if f.name == key)


def network_types() -> str:
    """The adapter kinds `sdlora train` makes, as the config schema lists them, for help texts."""
    return (f"{', '.join(config_choices('network', 'type'))} (network.type), "
            "each lora/locon optionally DoRA (network.dora)")


def add_commands(subparsers, modules=COMMAND_MODULES) -> None:
    """Each module's subcommands onto `subparsers` (argparse's add_subparsers())."""
    for name in modules:
        importlib.import_module(f".{name}", __name__).add_command(subparsers)
