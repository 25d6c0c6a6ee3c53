"""`sdlora bench`: speed and memory figures (benchmarks, not tests).

Training (embedded tiny base and the SD1.5 architecture at random weights, small latents):
samples/s, peak memory, the share of step time spent in VAE encoding without and with the
latent cache, and the LoRA overhead ratio = (forward + backward with adapters) /
(forward + backward of the same frozen model, gradients flowing to its input: the work a
LoRA step cannot avoid). Plus the tagger, sampler and resize figures of their stages.
"""

from __future__ import annotations

import json
import math
import resource
import time

import torch
import torch.nn.functional as F


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def seconds_of(fn) -> float:
    """Wall time of one call, with queued GPU work included."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    return sum(seconds_of(fn) for _ in range(repeats)) / repeats


def fastest_in_turns(setups: dict, rounds: int) -> dict[str, float]:
    """{label: fastest of `rounds` calls}, the set-ups called in turns, so that a neighbour's
    load on a shared machine cannot land on one of them only."""
    best = dict.fromkeys(setups, math.inf)
    for _ in range(rounds):
        for label, fn in setups.items():
            best[label] = min(best[label], seconds_of(fn))
    return best


def _sd15_components():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pathlib import Path

    folder = Path(__file__).parent / "assets" / "configs" / "sd_v1"  # SD1.5's public configs
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    return text_encoder, vae, unet


def bench_training(arch: str = "tiny", batch: int = 4, latent: int = 16, repeats: int = 5, device: str = "cpu") -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from . import lora
    from .config import NetworkConfig
    from .tiny.configs import build_components

    if arch == "tiny":
        _, text_encoder, vae, unet, _ = build_components("tiny")
    else:
        text_encoder, vae, unet = _sd15_components()
    for m in (text_encoder, vae, unet):
        m.to(device).requires_grad_(False)
    ids = torch.randint(0, 49407, (batch, 77), device=device)
    pixels = torch.randn(batch, 3, latent * 8, latent * 8, device=device)
    latents = torch.randn(batch, 4, latent, latent, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
    network = lora.inject(unet, text_encoder, NetworkConfig())
    params = network.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    adapted = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]

    def fwd_bwd(adapters: bool):
        for m in adapted:
            m.enable_adapters(adapters)  # off: the frozen model, layer for layer
        x = latents.clone().requires_grad_(True)
        F.mse_loss(unet(x, timesteps, hidden).sample, latents).backward()
        optimizer.zero_grad(set_to_none=True)

    def lora_step():
        out = unet(latents, timesteps, text_encoder(ids)[0]).sample
        F.mse_loss(out, latents).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    fwd_bwd(True)  # warm-up
    fwd_bwd(False)
    passes = fastest_in_turns({"frozen": lambda: fwd_bwd(False), "lora": lambda: fwd_bwd(True)}, repeats)
    t_step = _timed(lora_step, repeats)
    with torch.no_grad():
        t_vae = _timed(lambda: vae.encode(pixels).latent_dist.sample(), max(1, repeats // 2))
    return {
        "arch": arch, "device": device, "batch": batch, "latent": f"{latent}x{latent}",
        "train_samples_per_s": batch / t_step,
        "train_samples_per_s_uncached": batch / (t_step + t_vae),
        "vae_share_uncached": t_vae / (t_step + t_vae),
        "vae_share_cached": 0.0,  # cached latents: no encode in the step (tests assert zero encodes)
        "lora_overhead_ratio": passes["lora"] / passes["frozen"],
        "peak_memory_mb": _peak_memory_mb(device),
    }


def run_bench(parts: list[str], device: str) -> dict:
    results = {}
    if "train" in parts:
        results["train_tiny"] = bench_training("tiny", batch=8, latent=16, device=device)
        results["train_sd15"] = bench_training("sd15", batch=1, latent=32, repeats=4, device=device)
    if "tagger" in parts:
        from .caption import bench_tagger

        results["tagger"] = bench_tagger()
    if "sampler" in parts:
        from .sample import bench_sampler

        results["sampler"] = bench_sampler()
    if "resize" in parts:
        from .lowrank import bench_resize

        results["resize"] = bench_resize()
    return results


def add_command(subparsers) -> None:
    p = subparsers.add_parser("bench", help="print speed and memory figures",
                              description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="train,tagger,sampler,resize",
                   help="comma-separated: train, tagger, sampler, resize (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    results = run_bench([s.strip() for s in args.parts.split(",")], args.device)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for name, figures in results.items():
        print(f"\n{name}")
        for key, value in figures.items():
            print(f"  {key:32s} {value:.4g}" if isinstance(value, float) else f"  {key:32s} {value}")
    return 0

