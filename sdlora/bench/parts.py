"""`sdlora bench`: speed and memory figures (benchmarks, not tests); what each figure means is
the command's help (`sdlora/commands/bench.py`)."""

from __future__ import annotations

import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from sdlora.adapters.apply import merge_files
from sdlora.adapters.file import save_adapter
from sdlora.adapters.keys import kohya_key, module_keys
from sdlora.adapters.network import (
    adapter_metadata,
    inject,
    text_encoder_target_paths,
    unet_target_paths,
)
from sdlora.bench.memory import (
    GIB,
    FlowStep,
    FullTransformer,
    bench_memory,
    frozen_bytes,
)
from sdlora.config import NetworkConfig, config_from_dict
from sdlora.data.caption import open_clip_tagger, tiny_tagger
from sdlora.lowrank.tools import resize_tensors
from sdlora.models.arch import build_text_encoder, build_unet, build_vae
from sdlora.models.blockswap import tensor_bytes
from sdlora.models.load import compute_device, load_base
from sdlora.sampling.sampler import Sampler
from sdlora.tiny.configs import build_components
from sdlora.tiny.scenery import make_scene_image
from sdlora.training.loop import Trainer


def peak_memory_mb(device: str) -> float:
    """CUDA: the most memory torch allocated; otherwise the process's peak resident set."""
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


def bench_training(arch: str = "tiny", batch: int = 4, latent: int = 16, repeats: int = 5, device: str = "cpu") -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if arch == "tiny":
        _, text_encoder, vae, unet, _ = build_components("tiny")
    else:  # SD1.5's architecture from the shipped configs, random weights
        text_encoder, vae, unet = build_text_encoder("sd_v1"), build_vae("sd_v1"), build_unet("sd_v1")
    for m in (text_encoder, vae, unet):
        m.to(device).requires_grad_(False)
    ids = torch.randint(0, 49407, (batch, 77), device=device)
    pixels = torch.randn(batch, 3, latent * 8, latent * 8, device=device)
    latents = torch.randn(batch, 4, latent, latent, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
    network = inject(unet, text_encoder, NetworkConfig())
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
        "lora_overhead_ratio": passes["lora"] / passes["frozen"],
        "peak_memory_mb": peak_memory_mb(device),
    }


def bench_tagger(n_tiny: int = 64, n_large: int = 2, batch_size: int = 16) -> dict:
    """Images per second of the embedded tagger and of ViT-L-14 (random weights: the cost of a
    real large tagger, without downloading one), preprocessing included."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (256, 384, 3), dtype=np.uint8)) for _ in range(max(n_tiny, n_large))]
    result = {"device": compute_device(), "torch_threads": torch.get_num_threads()}
    for key, tagger, n in (("tiny", tiny_tagger(), n_tiny), ("ViT-L-14", open_clip_tagger("ViT-L-14"), n_large)):
        tagger._load()
        tagger.embed_images(images[:1])  # warm-up
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            tagger.embed_images(images[i:min(i + batch_size, n)])
        if tagger.device == "cuda":
            torch.cuda.synchronize()
        result[f"{key}_images_per_s"] = n / (time.perf_counter() - start)
    return result


def bench_sampler(steps: int = 4, width: int = 1080, height: int = 720, repeats: int = 3,
                  unet_repeats: int = 9, model: str = "tiny") -> dict:
    """Seconds per one-pass image at 1080x720 with `model` (model.base; default the embedded base):
    alone, a LoRA fused, a LoRA unfused.

    Targets: fused within 2% of the base (merged weights cost nothing per step), unfused within
    10% (two low-rank matmuls per adapted layer). Whole images vary by more than 2% from round
    to round on a shared machine (1080x720 buffers, allocator and page faults), so the ratios
    come from the one part an adapter changes, the U-Net call of a denoising step at this size
    (CFG batch of 2), timed `unet_repeats` times per set-up in turns, fastest of each. The rest
    of an image (text encoder, VAE decode, scheduler) is the same for all three, so an image
    with the adapter takes `steps` x the extra U-Net time longer: `*_over_base` is that per-image
    ratio, `*_over_base_unet_call` the U-Net call's own (an upper bound of it).
    """
    cfg = config_from_dict({"model": {"base": model},
                            "sample": {"prompts": ["bench"], "width": width, "height": height, "steps": steps}})
    with tempfile.TemporaryDirectory() as tmp:
        # A random adapter on the default targets, saved and read back like a trained one.
        scratch = load_base(cfg.model)
        network = inject(scratch.unet, scratch.text_encoder, cfg.network)
        with torch.no_grad():
            for p in network.trainable_parameters():
                p.normal_(0, 0.02)
        path = Path(tmp) / "bench.safetensors"
        stats = {"num_train_images": 0, "num_epochs": 0, "epoch": 0, "steps": 0}
        save_adapter(path, network.kohya_state_dict(torch.float32), adapter_metadata(cfg, scratch, stats))
        del scratch, network
        samplers = {}
        for label, fuse, with_lora in (("base", True, False), ("fused", True, True), ("unfused", False, True)):
            sampler = samplers[label] = Sampler(cfg, fuse=fuse)
            if with_lora:
                sampler.adapters.add(path)
                sampler.adapters.set_scale(1.0)
            sampler.render(["bench"], [0], 64, 64, 1)  # warm-up
        seconds = fastest_in_turns({label: lambda s=sampler: s.render(["bench"], [1], width, height, steps)
                                    for label, sampler in samplers.items()}, repeats)
        base = samplers["base"]
        latents = torch.randn(2, base.pipe.unet.config.in_channels, height // 8, width // 8, device=base.device,
                              dtype=base.pipe.unet.dtype)
        embeds = torch.cat([base.encode(["bench"]).hidden, base.encode([""]).hidden])
        timestep = torch.tensor(500, device=base.device)
        with torch.no_grad():
            unet_seconds = fastest_in_turns({label: lambda s=sampler: s.pipe.unet(latents, timestep, embeds)
                                             for label, sampler in samplers.items()}, unet_repeats)
    results = {f"{label}_s_per_image": t for label, t in seconds.items()}
    results.update({f"{label}_unet_call_s": t for label, t in unet_seconds.items()})
    for label in ("fused", "unfused"):
        extra = unet_seconds[label] - unet_seconds["base"]  # per denoising step (one U-Net call with CFG)
        results[f"{label}_over_base_unet_call"] = unet_seconds[label] / unet_seconds["base"]
        results[f"{label}_over_base"] = 1 + steps * extra / seconds["base"]  # per image: the targets
    results.update(steps=steps, size=f"{width}x{height}", repeats=repeats, device=str(samplers["base"].device),
                   lora_dim=cfg.network.dim)
    return results


def bench_first_step(model: str = "tiny", images: int = 4, resolution: int = 128, steps: int = 4) -> dict:
    """`sdlora train` from a cold start on `images` generated scenery images at `resolution`
    (fresh output folder: latents and text outputs encoded, as in a first run): seconds to the
    first optimizer step, steps/s after it, peak memory. model: model.base (default the
    embedded base; a diffusers folder of SD1.5's architecture measures the 512 px case)."""
    step_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i in range(images):
            image, tags = make_scene_image(i, "colorful", resolution)
            image.save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(", ".join(["clrscn", *tags[:5]]))
        cfg = config_from_dict({
            "name": "bench", "trigger": "clrscn", "model": {"base": model},
            "dataset": {"image_dir": str(folder), "resolution": resolution, "num_repeats": 1, "enable_bucket": False},
            "train": {"max_train_steps": steps, "batch_size": 1, "save_every_n_epochs": 0},
            "output": {"dir": str(Path(tmp) / "out")}})
        hook = register_optimizer_step_post_hook(lambda *_: step_times.append(time.perf_counter()))
        start = time.perf_counter()
        try:
            Trainer(cfg, log=lambda m: None).run()
        finally:
            hook.remove()
    after = step_times[-1] - step_times[0]
    return {"model": model, "images": images, "resolution": resolution,
            "time_to_first_step_s": step_times[0] - start,
            "steps_per_s": (len(step_times) - 1) / after if after > 0 else None,
            "peak_memory_mb": peak_memory_mb(compute_device())}


def bench_startup(argvs: list[list[str]], repeats: int = 3) -> dict:
    """Seconds from starting `python -m sdlora.cli ARGV` to its exit, the fastest of `repeats`, per
    argv (each `--help` and `--version`): what a user waits for before anything happens."""
    figures = {}
    for argv in argvs:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "sdlora.cli", *argv], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        figures[" ".join(argv) + "_s"] = min(times)
    return figures


class ResidentPeak:
    """The process's peak resident memory over a block, above what was resident when it began.

    Read from the kernel's own high-water mark (VmHWM, reset through /proc/self/clear_refs), so no
    short peak falls between samples; tracemalloc cannot see torch's CPU tensors. Linux only.
    """

    @staticmethod
    def _kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field}")

    def __enter__(self) -> ResidentPeak:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set to the current one
        self.start = self._kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.extra_bytes = (self._kib("VmHWM") - self.start) * 1024


def measured_cpu_step(full: FullTransformer, resolution: int, reduced: bool = False) -> dict:
    """One FlowStep on the CPU: its weights, and the peak resident memory the step adds above them (GiB)."""
    trainee = FlowStep(full, "cpu", resolution, reduced)
    weights = frozen_bytes(trainee.model) + tensor_bytes(trainee.network.trainable_parameters())
    with ResidentPeak() as peak:
        loss = float(trainee.step())
    return {"weights_gib": weights / GIB, "step_extra_gib": peak.extra_bytes / GIB, "loss": loss}


def random_unet(family: str, dtype: torch.dtype = torch.float16, seed: int = 0) -> torch.nn.Module:
    """The family's full U-Net at random weights, allocated once in `dtype` (never an fp32 copy first)."""
    unet = torch.nn.Module.to(build_unet(family, device="meta"), dtype).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in unet.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    return unet.requires_grad_(False)


def unet_adapter_shapes(unet: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{kohya key: weight shape} of the default [network] targets (`transformer`) of a U-Net."""
    paths = unet_target_paths(unet, "transformer")
    return {key: tuple(unet.get_submodule(path).weight.shape)
            for key, path in module_keys(unet, "unet", paths).items()}


def bench_merge(family: str, dim: int = 16, alpha: float = 8) -> dict:
    """Peak memory of merging a default-config U-Net adapter (dim 16, alpha 8, random) into the
    family's full U-Net (fp16, random weights): `peak_over_base` = (base + the most merging added) / base."""
    unet = random_unet(family)
    base_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.safetensors"
        save_file(random_adapter(unet_adapter_shapes(unet), dim, alpha), str(path))
        start = time.perf_counter()
        with ResidentPeak() as peak:
            merged = merge_files({"unet": unet}, [(path, 1.0)])
        seconds = time.perf_counter() - start
    return {"base_mb": round(base_bytes / 2**20), "merge_extra_mb": round(peak.extra_bytes / 2**20),
            "peak_over_base": round((base_bytes + peak.extra_bytes) / base_bytes, 3),
            "modules": merged[str(path)], "seconds": round(seconds, 1)}


def sd15_module_shapes() -> dict[str, tuple[int, ...]]:
    """{kohya key: weight shape} of Kohya's default targets on SD1.5 (192 U-Net + 72 text encoder)."""
    unet = build_unet("sd_v1", device="meta")  # shapes only, no weights
    text_encoder = build_text_encoder("sd_v1", device="meta")
    shapes = {kohya_key("unet", p): tuple(unet.get_submodule(p).weight.shape)
              for p in unet_target_paths(unet, "transformer")}
    shapes.update({kohya_key("te", p): tuple(text_encoder.get_submodule(p).weight.shape)
                   for p in text_encoder_target_paths(text_encoder)})
    return shapes


def random_adapter(shapes: dict[str, tuple[int, ...]], dim: int, alpha: float, seed: int = 0,
                   dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A Kohya LoRA state dict of random factors with a decaying spectrum (trained adapters look so)."""
    generator = torch.Generator().manual_seed(seed)
    decay = torch.exp(-torch.arange(dim, dtype=torch.float32) / (dim / 8))  # per-rank magnitude
    tensors = {}
    for key, shape in shapes.items():
        down = torch.randn(dim, *shape[1:], generator=generator) / math.sqrt(math.prod(shape[1:]))
        up = torch.randn(shape[0], dim, *([1, 1] if len(shape) == 4 else []), generator=generator)
        up = up * decay.reshape(1, dim, *([1, 1] if len(shape) == 4 else []))
        tensors[f"{key}.lora_down.weight"] = down.to(dtype)
        tensors[f"{key}.lora_up.weight"] = (up * 0.01).to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors


def bench_resize(dim: int = 128, energy: float = 0.9) -> dict:
    """Time resizing a dim-128 SD1.5-shaped adapter (192 U-Net + 72 text-encoder modules) at energy 0.9."""
    shapes = sd15_module_shapes()
    tensors = random_adapter(shapes, dim, alpha=dim / 2)
    start = time.perf_counter()
    _, records = resize_tensors(tensors, energy=energy)
    seconds = time.perf_counter() - start
    ranks = [r.new_rank for r in records]
    return {"resize_seconds": round(seconds, 3), "modules": len(records), "dim": dim, "energy": energy,
            "new_rank_min": min(ranks), "new_rank_max": max(ranks),
            "new_rank_mean": round(sum(ranks) / len(ranks), 1), "threads": torch.get_num_threads()}


def run_bench(parts: list[str], device: str, first_step_model: str = "tiny", first_step_resolution: int = 128,
              startup_argvs: list[list[str]] = ()) -> dict:
    results = {}
    if "startup" in parts:
        results["startup"] = bench_startup(list(startup_argvs))
    if "train" in parts:
        results["train_tiny"] = bench_training("tiny", batch=8, latent=16, device=device)
        results["train_sd15"] = bench_training("sd15", batch=1, latent=32, repeats=4, device=device)
    if "tagger" in parts:
        results["tagger"] = bench_tagger()
    if "sampler" in parts:
        results["sampler"] = bench_sampler()
    if "resize" in parts:
        results["resize"] = bench_resize()
    if "merge" in parts:
        results["merge_sd15"] = bench_merge("sd_v1")
        results["merge_sdxl"] = bench_merge("sdxl")
    if "flow_memory" in parts:
        results.update(bench_memory())
    if "first_step" in parts:
        results["first_step"] = bench_first_step(first_step_model, resolution=first_step_resolution)
    return results
