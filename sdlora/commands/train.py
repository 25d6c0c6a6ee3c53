"""`sdlora train CONFIG`: train and export the adapter."""

from __future__ import annotations

from sdlora.commands import config_choices, network_types
from sdlora.config import add_override_argument, load_config


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help=f"train an adapter ({', '.join(config_choices('network', 'type'))}; DoRA) from a config",
        description=f"Train an adapter: {network_types()}, on the images and .txt captions of [dataset] "
                    "image_dir, and export Kohya-format .safetensors adapters into [output] dir. Runs unchanged under "
                    "`accelerate launch --num_processes N -m sdlora.cli train CONFIG`.")
    p.add_argument("config", help="the style's TOML config (`sdlora new NAME --images DIR` writes one)")
    add_override_argument(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the training state saved in <output dir>/state/ (same config and images)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from sdlora.training.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume, log=print)
    if result.report:
        print(f"adapter: {result.adapter}\nreport: {result.report}")
    return 0
