"""`sdlora run CONFIG`: the whole job of `bash train.sh NAME`."""

from __future__ import annotations

from sdlora.config import add_override_argument, load_config


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="the whole job: dataset, train, export, samples (what train.sh runs)",
        description="Build the dataset (captions and report), train and export the adapter (skipped when it is "
                    "up to date), render 1080x720 samples and grids, and print where everything is. No config "
                    "yet? `sdlora new NAME --images DIR` writes one.")
    p.add_argument("config", help="the style's TOML config, e.g. one written by `sdlora new`")
    add_override_argument(p)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    from sdlora.run import run

    run(load_config(args.config, args.overrides), log=print)
    return 0
