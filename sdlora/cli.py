"""`sdlora` command line: thin subcommands onto the stage modules.

Each stage module that has a command defines `add_command(subparsers)`, which adds its
parser and sets `func(args) -> int`. User mistakes (`UserError` and its kin) print one
clear line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import USER_ERRORS

# Stage modules with a subcommand, in the order `--help` lists them.
COMMAND_MODULES = ["run", "dataset", "train", "sample", "lowrank", "config", "tiny.build", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdlora",
        description="Stable Diffusion LoRA style trainer: dataset builder, trainer, Kohya export, "
                    "sampler and low-rank tools.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f".{name}", __package__)
        module.add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from .speed import tune_cpu_allocator

    tune_cpu_allocator()  # big training buffers reused instead of re-faulted every step (speed.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"sdlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
