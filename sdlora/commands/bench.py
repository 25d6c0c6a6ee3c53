"""`sdlora bench`: the CPU figures (bench/parts.py) or the GPU suite (bench/suite.py)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from sdlora.commands import add_commands
from sdlora.io import atomic_write_text, refuse_to_overwrite

DESCRIPTION = """\
`sdlora bench`: speed and memory figures (benchmarks, not tests).

Training (embedded tiny base and the SD1.5 architecture at random weights, small latents):
samples/s, peak memory, the share of step time spent in VAE encoding without and with the
latent cache, and the LoRA overhead ratio = (forward + backward with adapters) /
(forward + backward of the same frozen model, gradients flowing to its input: the work a
LoRA step cannot avoid). Plus the tagger, sampler and resize figures of their stages, merge's
peak memory (a default-config U-Net adapter baked into SD1.5's and SDXL's full U-Nets at random
fp16 weights: peak_over_base = (base + the most merging added) / base), and start-up: seconds until `sdlora --help`, each `sdlora COMMAND --help` and `--version` exit.
flow_memory (asked for by name, ~1 min): the GiB a FLUX.1-dev LoRA step holds on the GPU at 512/768/1024 px
in bf16, fp8 and with blocks_to_swap 16, gradient checkpointing on, computed on the meta device
(sdlora/bench/memory.py says what is counted).
"""


def add_command(subparsers) -> None:
    p = subparsers.add_parser("bench", help="print speed and memory figures",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: the --parts figures; gpu: the GPU suite (bench/suite.py; toy shapes without CUDA)")
    p.add_argument("--parts", default="train,tagger,sampler,resize,merge,first_step,startup",
                   help="cpu suite, comma-separated: train, tagger, sampler, resize, merge, first_step, startup, "
                        "flow_memory (default: all but flow_memory)")
    p.add_argument("--first-step-base", default="tiny",
                   help="first_step: model.base to train (e.g. a diffusers folder of SD1.5's architecture)")
    p.add_argument("--first-step-resolution", type=int, default=128, help="first_step: training resolution")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the figures as JSON to PATH (alone: print JSON instead of the table)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--shapes", choices=["auto", "full", "reduced"], default="auto",
                   help="gpu suite: full sizes (SD1.5 512 px, SDXL 1024 px) or toy ones; auto: full on CUDA")
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="gpu suite: rows starting after this many seconds are skipped (default 400)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="gpu suite: the GPU's dense fp16/bf16 peak for MFU (default: known GPUs' data sheets)")
    p.set_defaults(func=_cmd_bench)


def startup_argvs() -> list[list[str]]:
    """`--help`, `--version` and every command's `--help`: the start-ups the bench times."""

    sub = argparse.ArgumentParser().add_subparsers()
    add_commands(sub)
    return [["--help"], ["--version"], *[[name, "--help"] for name in sub.choices]]


def _finite(value):
    """The results with every non-finite float (a diverged fp16 loss, say) as null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _cmd_bench(args) -> int:
    import torch

    out = Path(args.json) if args.json not in (None, "-") else None
    if out is not None:
        refuse_to_overwrite(out, args.overwrite)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.suite == "gpu":
        from sdlora.bench.suite import markdown_table, run_suite

        reduced = {"auto": None, "full": False, "reduced": True}[args.shapes]
        results = run_suite(device, reduced, args.budget_s, args.peak_tflops,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
        table = markdown_table(results)
    else:
        from sdlora.bench.parts import run_bench

        parts = [s.strip() for s in args.parts.split(",")]
        results = run_bench(parts, device, args.first_step_base, args.first_step_resolution,
                            startup_argvs() if "startup" in parts else [])
        table = "\n".join(f"\n{name}\n" + "\n".join(
            f"  {key:32s} {value:.4g}" if isinstance(value, float) else f"  {key:32s} {value}"
            for key, value in figures.items()) for name, figures in results.items())
    text = json.dumps(_finite(results), indent=2, allow_nan=False)
    if args.json == "-":
        print(text)
        return 0
    if out is not None:
        atomic_write_text(out, text + "\n")
    print(table)
    if out is not None:
        print(f"\nwrote {out}")
    return 0
