"""`sdlora tiny build`: rebuild the embedded base model from scratch."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdlora import ASSETS, tiny
from sdlora.io import refuse_to_overwrite

DURATION = f"~{tiny.BUILD_MINUTES} minutes on 2 CPU cores"


def add_command(subparsers) -> None:
    p = subparsers.add_parser("tiny", help=f"the embedded base model: rebuild it from scratch ({DURATION})",
                              description="Tools for the embedded tiny base model family.")
    sub = p.add_subparsers(dest="tiny_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help=f"regenerate the data and retrain every part from fixed seeds ({DURATION})",
                       description=f"{tiny.__doc__.rstrip()}\n\nThe whole build takes {DURATION}.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--stages", default=",".join(tiny.STAGES),
                   help=f"comma-separated stages to run, in order (default: all: {','.join(tiny.STAGES)})")
    b.add_argument("--scale", type=float, default=1.0,
                   help="multiply every image count and step count (0.01 = a smoke test in seconds)")
    b.add_argument("--assets-dir", default=str(ASSETS), help="where the finished models are written "
                   "(default: the package's own, which only --overwrite replaces)")
    b.add_argument("--work-dir", default="build/tiny", help="where intermediate data and checkpoints go")
    b.add_argument("--overwrite", action="store_true",
                   help="replace the models already in --assets-dir (by default the packaged base)")
    b.set_defaults(func=_cmd_build)


def _cmd_build(args) -> int:
    from sdlora.tiny.build import Build, build

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    assets = Path(args.assets_dir)
    if "export" in stages:  # checked before the work, not when the export comes
        packaged = assets.resolve() == ASSETS.resolve()
        refuse_to_overwrite(assets / "tiny", args.overwrite, why=" (the packaged base that `model.base = \"tiny\"` "
                            "loads)" if packaged else "", rename="build into another folder with --assets-dir DIR")
    if args.scale == 1.0:
        print(f"tiny build: stages {', '.join(stages)}; the whole build takes {DURATION}", flush=True)
    build(stages, Build(work=Path(args.work_dir), assets=assets, scale=args.scale,
                        echo=lambda line: print(line, flush=True)))
    return 0
