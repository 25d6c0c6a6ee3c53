"""The low-rank tools on adapter files: `resize`, `extract`, `merge`, `convert`, `inspect`."""

from __future__ import annotations

import json
from pathlib import Path

from sdlora.commands import ADAPTER_FILES
from sdlora.config import ADAPTER_FORMATS, SAVE_PRECISIONS
from sdlora.errors import UserError


def add_command(subparsers) -> None:
    p = subparsers.add_parser("resize", help="shrink an adapter's rank by SVD (energy or fixed rank)",
                              description="Shrink each module of an adapter to a lower rank by SVD of its weight "
                                          "change W (from the factors, never the dense W): the smallest rank keeping "
                                          "--energy BETA of sum(S^2), or a fixed --rank. LoHa, LoKr and Tucker modules "
                                          "are written as LoRA; DoRA magnitudes are kept. The scale alpha / rank is "
                                          "unchanged.")
    p.add_argument("input", metavar="IN", help=f"adapter (.safetensors): {ADAPTER_FILES}")
    p.add_argument("output", metavar="OUT", help="resized adapter to write (always a LoRA file)")
    _rank_choice(p, "the same rank R for every module")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_resize)

    p = subparsers.add_parser("extract", help="a LoRA for the difference between two checkpoints (SVD)",
                              description="Write a Kohya LoRA for the difference W_tuned - W_base of two "
                                          "checkpoints of one architecture: per module a truncated SVD (fixed --rank "
                                          "or --energy), factors clipped to a quantile as kohya does, alpha = rank.")
    p.add_argument("--base", required=True, help="the original checkpoint: diffusers folder or .safetensors file")
    p.add_argument("--tuned", required=True, help="the fine-tuned checkpoint of the same architecture")
    p.add_argument("output", metavar="OUT", help="adapter to write (.safetensors, Kohya format)")
    _rank_choice(p, "rank of every Linear / 1x1 conv module")
    p.add_argument("--conv-rank", type=int, default=0, metavar="R",
                   help="also extract the ResNet 3x3 convs (LoCon) at this rank (default 0: not extracted)")
    p.add_argument("--clamp-quantile", type=float, default=0.99,
                   help="clip the factors to this quantile of their absolute values, as kohya does (default 0.99)")
    p.add_argument("--no-clamp", action="store_true", help="do not clip the factors (exact truncated SVD)")
    p.add_argument("--te-tolerance", type=float, default=1e-4,
                   help="the text encoder is skipped when no weight changed by more than this (default 1e-4)")
    p.add_argument("--save-precision", choices=SAVE_PRECISIONS, default="fp16", help="dtype of the adapter")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_extract)

    p = subparsers.add_parser("merge", help="bake adapters into a base checkpoint",
                              usage="sdlora merge [-h] [--save-precision {fp16,bf16,fp32}] [--overwrite] "
                                    "BASE ADAPTER[:SCALE] [ADAPTER[:SCALE] ...] OUT",
                              description="Bake adapters into a base checkpoint: W += SCALE * delta W per module (DoRA: "
                                         "from the base weight), then save one .safetensors file or a diffusers "
                                         "folder. Every module must match a layer of the base.")
    p.add_argument("base", metavar="BASE", help="base checkpoint: 'tiny', a diffusers folder or a .safetensors file")
    p.add_argument("items", nargs="+", metavar="ADAPTER[:SCALE] ... OUT",
                   help=f"adapters ({ADAPTER_FILES}) with an optional multiplier "
                        "(pastel.safetensors:0.8), then OUT: a path ending .safetensors writes one checkpoint file, a path without suffix a diffusers folder")
    p.add_argument("--save-precision", choices=SAVE_PRECISIONS, default="fp16", help="dtype of the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_merge)

    p = subparsers.add_parser("convert", help="rewrite an adapter with Kohya's or diffusers' key names",
                              description="Read an adapter as every sdlora command reads it (Kohya, LyCORIS, "
                                          "diffusers, peft, OneTrainer or ai-toolkit key names; bundled embeddings "
                                          "left out) and write it with Kohya's key names, which A1111, Forge, "
                                          "ComfyUI and kohya load, or with diffusers' own (--format diffusers). "
                                          "Weight changes are kept exactly; FLUX.1's fused modules are split or "
                                          "joined as the base's transformer lays them out.")
    p.add_argument("input", metavar="IN", help=f"adapter (.safetensors): {ADAPTER_FILES}")
    p.add_argument("output", metavar="OUT", help="adapter to write (.safetensors)")
    p.add_argument("--format", choices=ADAPTER_FORMATS, default="kohya",
                   help="key style of OUT: kohya (lora_unet_*, default) or diffusers (unet. / transformer. / "
                        "text_encoder. lora_A / lora_B, the scale baked in; needs --base)")
    p.add_argument("--base", metavar="BASE",
                   help="the base the adapter is for (a diffusers folder: only its configs are read; or 'tiny', a "
                        ".safetensors checkpoint): names the modules for --format diffusers and for writing a "
                        "FLUX.1 adapter on diffusers' modules with Kohya's fused names")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_convert)

    p = subparsers.add_parser("inspect", help="metadata, ranks, norms and energy curves of an adapter",
                              description="Print an adapter's metadata, module kinds, ranks, alphas, norms and the rank "
                                          "that keeps 50/80/90/99% of each module's energy (singular values from "
                                          "the factors); --plot draws the spectra.")
    p.add_argument("file", metavar="FILE", help=f"adapter (.safetensors): {ADAPTER_FILES}. Modules holding NaN/inf are "
                                                "listed and the exit code is 1")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write the singular-value spectra and cumulative "
                                                             "energy curves to this PNG")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_inspect)


def _dtype(name: str):
    from sdlora.models.load import DTYPES

    return DTYPES[name]


def _rank_choice(p, rank_help: str) -> None:
    """--energy BETA or --rank R (one of them), and --max-rank: how resize and extract choose each rank."""
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--energy", type=float, metavar="BETA",
                     help="per module, keep the smallest rank with sum(S[:k]^2) >= BETA * sum(S^2), e.g. 0.9 "
                          "(kohya's sv_fro p corresponds to BETA = p^2)")
    how.add_argument("--rank", type=int, metavar="R", help=rank_help)
    p.add_argument("--max-rank", type=int, metavar="R", help="cap on the rank chosen by --energy")


def _cmd_resize(args) -> int:
    from sdlora.lowrank.tools import resize

    report = resize(args.input, args.output, rank=args.rank, energy=args.energy, max_rank=args.max_rank,
                    overwrite=args.overwrite)
    print(report.table())
    converted = sorted({m.kind for m in report.modules if m.converted})
    if converted:
        print(f"note: the input has {', '.join(converted)} modules; the output is a LoRA file (lora_down / lora_up)")
    if any(m.dora for m in report.modules):
        print("note: DoRA magnitudes (dora_scale) are kept as they are; only the low-rank update is resized")
    return 0


def _cmd_extract(args) -> int:
    from sdlora.lowrank.tools import extract

    report = extract(args.base, args.tuned, args.output, rank=args.rank, energy=args.energy, max_rank=args.max_rank,
                     conv_rank=args.conv_rank, clamp=None if args.no_clamp else args.clamp_quantile,
                     te_tolerance=args.te_tolerance, dtype=_dtype(args.save_precision),
                     overwrite=args.overwrite)
    print(report.table())
    return 0


def _with_default_scale(arg: tuple[Path, float | None]) -> tuple[Path, float]:
    path, scale = arg
    return path, 1.0 if scale is None else scale


def _cmd_merge(args) -> int:
    from sdlora.adapters.file import parse_adapter_arg
    from sdlora.lowrank.tools import merge

    if len(args.items) < 2:
        raise UserError("merge: usage is `sdlora merge BASE ADAPTER[:SCALE] ... OUT` (at least one adapter and OUT)")
    *adapters, out = args.items
    merged = merge(args.base, [_with_default_scale(parse_adapter_arg(a)) for a in adapters], out,
                   dtype=_dtype(args.save_precision), overwrite=args.overwrite)
    for path, n in merged.items():
        print(f"merged {n} modules of {path}")
    print(f"wrote {out}")
    return 0


def _cmd_convert(args) -> int:
    from sdlora.adapters.convert import convert

    metadata = convert(args.input, args.output, overwrite=args.overwrite, output_format=args.format, base=args.base)
    print(f"wrote {args.output} ({args.format} keys; {metadata['ss_network_module']}, "
          f"dim {metadata.get('ss_network_dim', '?')})")
    return 0


def _cmd_inspect(args) -> int:
    from sdlora.lowrank.inspect import inspect

    summary = inspect(args.file, plot=args.plot)
    print(json.dumps(summary, indent=1) if args.json else _format_inspect(summary))
    return 1 if summary["non_finite"] else 0


def _format_inspect(summary: dict) -> str:
    """`lowrank.inspect.inspect`'s summary as the lines `sdlora inspect` prints."""
    lines = [f"{summary['file']}", "metadata:"]
    for key, value in summary["metadata"].items():
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        lines.append(f"  {key}: {text if len(text) <= 200 else text[:200] + '...'}")
    lines.append("modules: " + ", ".join(f"{part} {n}" for part, n in summary["modules_per_part"].items()))
    modules = summary["modules"]
    width = max([len(m["key"]) for m in modules] + [6])
    levels = list(modules[0]["ranks_for_energy"]) if modules else []
    lines.append(f"{'module':<{width}}  kind  rank  alpha    norm  " + "  ".join(f"r@{lv:>3}" for lv in levels))
    for m in modules:
        lines.append(f"{m['key']:<{width}}  {m['kind']:<4}  {m['rank']:>4}  {m['alpha']:>5g}  {m['norm']:6.3g}  "
                     + "  ".join(f"{m['ranks_for_energy'][lv]:>5}" for lv in levels))
    if "plot" in summary:
        lines.append(f"plot: {summary['plot']}")
    broken = summary.get("non_finite") or {}
    if broken:
        lines.append(f"NON-FINITE: {len(broken)} modules hold NaN or infinite values (the training diverged; "
                     f"resize, merge and sample refuse this file):")
        lines += [f"  {key}: {', '.join(suffixes)}" for key, suffixes in broken.items()]
    return "\n".join(lines)
