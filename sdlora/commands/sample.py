"""`sdlora sample CONFIG`: render prompts x seeds x LoRA scales and their grids."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sdlora.commands import ADAPTER_FILES, config_choices
from sdlora.config import add_override_argument, load_config
from sdlora.errors import UserError


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="render prompts x seeds x LoRA scales (PNG with A1111 parameters) and labelled grids",
        description="Render the config's [sample] prompts with one or more exported adapters, loaded from their "
                    ".safetensors files as A1111/ComfyUI load them. Writes full-size PNGs (A1111 generation "
                    "parameters in each) and one grid per seed (rows: prompts, columns: LoRA scales, 0 = the base) "
                    "to <output.dir>/samples.")
    p.add_argument("config", help="the style's TOML config")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help=f"an adapter file ({ADAPTER_FILES}); repeatable, all applied together. FILE alone is swept "
                        "over the grid's scales (--scales / [sample] lora_scales); FILE:SCALE keeps that weight in "
                        "every column (only fixed files: the columns are the base and the files). "
                        "Default: the trained <output.dir>/<output_name>.safetensors, swept")
    add_override_argument(p, "sample.cfg_scale=5")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); replaces [sample] prompts. "
                   "A1111 syntax: (word:1.2), (word), [word], BREAK, [from:to:0.5], [a|b], <lora:name:0.8>, "
                   "<lora:name:te=0.5:unet=1>")
    p.add_argument("--from-file", metavar="FILE", help="prompt file, one prompt per line with kohya's options "
                   "--n NEGATIVE --w W --h H --d SEED --s STEPS --l CFG --ss SAMPLER (sets [sample] prompt_file)")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="folder searched (recursively) for the adapters <lora:name:w> tags name, by file name or "
                        "ss_output_name; repeatable")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 1,2,3; replaces [sample] seeds")
    p.add_argument("--scales", help="comma-separated LoRA scales (grid columns), e.g. 0,0.5,1; 0 is the base")
    p.add_argument("--width", type=int, help="image width, a multiple of 8 (default [sample] width, 1080)")
    p.add_argument("--height", type=int, help="image height, a multiple of 8 (default [sample] height, 720)")
    p.add_argument("--steps", type=int, help="denoising steps (default [sample] steps)")
    p.add_argument("--sampler", choices=config_choices("sample", "sampler"), help="scheduler (default [sample] sampler)")
    p.add_argument("--hires", choices=["on", "tiled", "off", "auto"],
                   help="second pass above the base's native size: on = one img2img pass at the target size, tiled = "
                        "img2img in blended native-size tiles; auto = off up to the native area, tiled above "
                        "[sample] hires_tiled_above x it, on between (default [sample] hires)")
    p.add_argument("--fuse", action="store_true", help="merge adapters into the weights (faster; A1111's way)")
    p.add_argument("--epochs-dir", metavar="DIR",
                   help="render every NAME-0000NN.safetensors (and NAME.safetensors) in DIR side by side")
    p.add_argument("--native", action="store_true",
                   help="one pass at the base's native area with the target's aspect ratio, the size the epoch "
                        "scoring after training renders at: with --epochs-dir those renders are reused")
    p.add_argument("--out", metavar="DIR", help="output folder (default <output.dir>/samples)")
    p.set_defaults(func=_cmd_sample)


def _numbers(text: str, kind, option: str) -> list:
    try:
        return [kind(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated numbers, e.g. {option} 0,0.5,1") from None


def _cmd_sample(args) -> int:
    from sdlora.adapters.file import parse_adapter_arg
    from sdlora.sampling.sampler import run_sample

    overrides = list(args.overrides)
    for key in ("width", "height", "steps", "sampler"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"sample.{key}={json.dumps(value)}")
    if args.fuse:
        overrides.append("sample.fuse=true")
    cfg = load_config(args.config, overrides)
    changes = {}
    if args.prompt:
        changes["prompts"] = args.prompt
        changes["prompt_file"] = ""
    if args.from_file:
        changes["prompt_file"] = str(Path(args.from_file).resolve())
    if args.seeds:
        changes["seeds"] = _numbers(args.seeds, int, "--seeds")
    if args.scales:
        changes["lora_scales"] = _numbers(args.scales, float, "--scales")
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **changes))
    result = run_sample(cfg, [parse_adapter_arg(x) for x in args.lora], out_dir=args.out, epochs_dir=args.epochs_dir,
                        lora_dirs=args.lora_dir, hires=args.hires, native=args.native, log=print)
    print(f"{len(result.images)} images and {len(result.grids)} grids in {result.folder}")
    for grid in result.grids:
        print(f"  {grid}")
    return 0
