"""`sdlora import-kohya SOURCE...`: a kohya-ss config or command line as an sdlora config."""

from __future__ import annotations

import sys
from pathlib import Path

from sdlora.io import atomic_write_text, refuse_to_overwrite
from sdlora.presets.kohya import import_kohya


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "import-kohya", help="convert a kohya-ss dataset TOML and/or train_network.py arguments to an sdlora config",
        description="Reads kohya dataset configs ([general], [[datasets]], [[datasets.subsets]]), train_network.py "
                    "arguments files (.toml, flat or in sections), kohya_ss GUI configs (.json presets and saved "
                    "configs, the GUI's config.toml) and command lines of any length (quoted, or in a .sh/.bat/.ps1/"
                    ".txt file), in any combination (later ones win); --config_file, --dataset_config and the "
                    "GUI's additional_parameters are read too. Writes one sdlora config. Every mapping is printed, "
                    "and so is every argument that could not be mapped or was moved to the nearest valid value.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a kohya file, or a quoted command line such as \"train_network.py --network_dim 16\"")
    p.add_argument("-o", "--output", help="the sdlora config to write (default: print it)")
    p.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                   help="replace an existing --output file")
    p.set_defaults(func=_cmd_import)


def _cmd_import(args) -> int:
    text = import_kohya(args.sources, log=lambda m: print(m, file=sys.stderr))
    if not args.output:
        print(text, end="")
        return 0
    out = Path(args.output)
    refuse_to_overwrite(out, args.overwrite)
    atomic_write_text(out, text)
    print(f"wrote {out}; check it with `sdlora config check {out}`", file=sys.stderr)
    return 0
