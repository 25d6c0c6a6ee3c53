"""`sdlora bench --suite gpu`: every GPU-only figure in one run of a few minutes.

Rows (each guarded: a failing row is recorded with its one-line error and the rest run on):

- sd15:   SD1.5's U-Net (random weights from the shipped config), 512 px (64x64 latents,
          cached: no VAE in the step), LoRA on Kohya's default targets, batch 1/4/8, fp16 and
          bf16 autocast over fp16/bf16 weights with fp32 adapters (as the trainer runs),
          sdpa and xformers: samples/s, MFU, LoRA overhead ratio, peak memory;
- sdxl:   SDXL's U-Net at 1024 px (128x128 latents, text_embeds (B, 1280) and time_ids (B, 6)),
          batch 1 and 4, bf16, gradient checkpointing off and on;
- flux1_dev (sd35_medium once its family is registered): the full transformer at random bf16
          weights, one LoRA step at 1024 px with gradient checkpointing: bf16, fp8, fp8 +
          blocks_to_swap 16 (bench/memory.py): samples/s, peak memory;
- sampler: one-pass images at 1080x720 from an SD1.5-architecture folder: base, LoRA fused,
          LoRA unfused;
- optimizer / quantize: an 8-bit AdamW step, fp8 and nf4 frozen bases: they run and train
          (loss on one fixed batch falls), memory saved and loss difference against the
          unquantised base from the same seed;
- levers: TF32 for fp32, channels-last, torch.compile of the transformer blocks, fused vs
          foreach AdamW, pinned vs pageable host->device copies, a host-device sync per step.

Timing: CUDA-synchronised wall time of `steps` consecutive steps after warm-up steps, the
fastest of `rounds` (bench.fastest_in_turns). FLOPs: torch.utils.flop_counter.FlopCounterMode
over one adapted forward + backward at batch 1 on the meta device (matmuls, convolutions and
attention of the architecture: the frozen weights get no weight gradient, so backward is about
one forward, the adapters' few extra). MFU = FLOPs per sample x samples/s / the GPU's dense fp16/bf16 peak
(the vendor's figure for the named GPU, or --peak-tflops).

On a machine without CUDA the same rows run at toy sizes (the families' block structure at
32-64 channels, 8x8 latents, batch 1 and 2, fp32): what the default test tier runs so the suite
cannot rot before a GPU arrives. Those figures are smoke, not measurements.
"""

from __future__ import annotations

import datetime
import gc
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sdlora.adapters import network
from sdlora.bench import memory
from sdlora.bench.parts import bench_sampler, fastest_in_turns, peak_memory_mb
from sdlora.config import NetworkConfig, TrainConfig
from sdlora.models import arch
from sdlora.models.checkpoint import save_diffusers
from sdlora.models.load import DTYPES, random_base
from sdlora.models.quantize import quantize_frozen
from sdlora.training import speed
from sdlora.training.optimizers import make_optimizer as trainer_optimizer

# Dense (no sparsity) fp16/bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
               "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0}


def peak_tflops(device_name: str) -> float | None:
    for name, tflops in PEAK_TFLOPS.items():  # most specific first
        if name in device_name:
            return tflops
    return None


@dataclass
class Shapes:
    """What a suite run measures at: full on a GPU, toy sizes on the CPU."""
    reduced: bool
    dtypes: tuple = ("fp16", "bf16")  # of the SD1.5 rows; the other rows train in `dtype`
    dtype: str = "bf16"
    sd15_latent: int = 64
    sd15_batches: tuple = (1, 4, 8)
    sdxl_latent: int = 128
    sdxl_batches: tuple = (1, 4)
    sampler: dict = field(default_factory=lambda: {"steps": 10, "width": 1080, "height": 720, "repeats": 2,
                                                   "unet_repeats": 5})
    steps: int = 10  # timed steps per round
    rounds: int = 2
    train_steps: int = 20  # steps of the "it trains" rows

    @classmethod
    def for_device(cls, reduced: bool) -> "Shapes":
        if not reduced:
            return cls(reduced=False)
        # fp32: this CPU has no fast fp16/bf16 convolutions (a toy bf16 step is ~50x slower)
        return cls(reduced=True, dtypes=("fp32",), dtype="fp32", sd15_latent=8, sd15_batches=(1, 2),
                   sdxl_latent=8, sdxl_batches=(1,),
                   sampler={"steps": 1, "width": 64, "height": 64, "repeats": 1, "unet_repeats": 1},
                   steps=1, rounds=1, train_steps=4)


class Trainee:
    """A U-Net with LoRA adapters on Kohya's default targets, set up as the trainer sets it up
    (frozen weights in `dtype`, fp32 adapters, autocast), and one fixed batch of cached latents."""

    def __init__(self, family: str, shapes: Shapes, device: str, dtype: torch.dtype, batch: int, latent: int,
                 quantize: str = "none", attention: str = "sdpa", checkpointing: bool = False, seed: int = 0,
                 optimizer: str = "adamw"):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import cast_training_params
        from peft.tuners.tuners_utils import BaseTunerLayer

        speed.require_attention(attention, where="attention")  # before building anything
        torch.manual_seed(seed)
        self.device, self.dtype, self.batch = device, dtype, batch
        self.unet = arch.build_unet(family, reduced=shapes.reduced, device=device, dtype=dtype)
        self.unet.requires_grad_(False)
        self.network = network.inject(self.unet, None, NetworkConfig(train_text_encoder=False))
        cast_training_params(self.unet, dtype=torch.float32)  # fp32 adapters over the frozen dtype, as trained
        self.params = self.network.trainable_parameters()
        self.quantized = quantize_frozen(self.unet, quantize)
        speed.set_attention(self.unet, attention, where="attention")
        if checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.adapted = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        self.optimizer = make_optimizer(optimizer, self.params, device)
        g = torch.Generator(device).manual_seed(seed)
        channels = self.unet.config.in_channels
        self.latents = torch.randn(batch, channels, latent, latent, device=device, generator=g)
        self.noise = torch.randn(batch, channels, latent, latent, device=device, generator=g)
        self.timesteps = torch.randint(0, 1000, (batch,), device=device, generator=g)
        self.cond = arch.unet_conditioning(self.unet, batch, device=device, dtype=dtype, generator=g)
        scheduler = DDPMScheduler.from_config(arch.part_config(family, "scheduler"))  # the family's own schedule
        self.noisy = scheduler.add_noise(self.latents, self.noise, self.timesteps).to(dtype)

    def loss(self) -> torch.Tensor:
        with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32):
            pred = self.unet(self.noisy, self.timesteps, **self.cond).sample
        return F.mse_loss(pred.float(), self.noise)

    def step(self) -> torch.Tensor:
        """One training step: forward, backward, optimizer; returns the loss (no host sync)."""
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def forward_backward(self, adapters: bool) -> None:
        """Forward + backward to the input with the adapters on or off (off: the frozen model,
        layer for layer): the two sides of the LoRA overhead ratio."""
        for m in self.adapted:
            m.enable_adapters(adapters)
        x = self.noisy.detach().requires_grad_(True)
        with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.unet(x, self.timesteps, **self.cond).sample
        out.float().square().mean().backward()
        self.optimizer.zero_grad(set_to_none=True)
        for m in self.adapted:
            m.enable_adapters(True)

    def train(self, steps: int) -> list[float]:
        """Losses of `steps` steps on the fixed batch: an adapter that learns drives them down."""
        return [float(self.step()) for _ in range(steps)]


def make_optimizer(name: str, params, device: str):
    """The trainer's optimizer `name` (train.make_optimizer, fused AdamW on CUDA as it trains) over
    `params` at lr 1e-3; "adamw_foreach": the multi-tensor AdamW the fused-AdamW lever compares with."""
    if name == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    return trainer_optimizer(TrainConfig(optimizer=name), [{"params": params, "lr": 1e-3}], "sdlora bench",
                             fused=device == "cuda")


def count_flops(fn) -> int:
    """FLOPs dispatched by one call of fn (torch.utils.flop_counter: mm/bmm/addmm, convolutions,
    scaled-dot-product attention, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def training_flops(family: str, latent: int, reduced: bool = False) -> int:
    """FLOPs of one LoRA training sample (forward + backward, batch 1) of the family's U-Net at
    `latent` x `latent`, counted on the meta device: the architecture's arithmetic, no compute.
    SD1.5 at 512 px (64x64): ~1.75 TFLOP; SDXL at 1024 px (128x128): ~14.3 TFLOP."""
    unet = arch.build_unet(family, reduced=reduced, device="meta").requires_grad_(False)
    network.inject(unet, None, NetworkConfig(train_text_encoder=False))
    x = torch.randn(1, unet.config.in_channels, latent, latent, device="meta")
    cond = arch.unet_conditioning(unet, 1, device="meta")
    return count_flops(lambda: F.mse_loss(unet(x, torch.tensor([500], device="meta"), **cond).sample, x).backward())


class Suite:
    def __init__(self, device: str, reduced: bool, budget_s: float, peak: float | None, log):
        self.device, self.shapes, self.budget_s, self.log = device, Shapes.for_device(reduced), budget_s, log
        self.started = time.perf_counter()
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        self.peak = peak if peak is not None else peak_tflops(name)
        self.flops: dict[str, float] = {}
        self.result = {
            "suite": "gpu", "reduced": reduced, "device": name, "date": datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "peak_tflops": self.peak,
            "timing": "CUDA-synchronised wall time, fastest of rounds, after warm-up",
            "flop_counting": "torch.utils.flop_counter.FlopCounterMode over one adapted forward+backward at batch 1 "
                             "on the meta device",
            "flops_per_sample": self.flops, "rows": []}

    # -- guards
    def row(self, name: str, fn, needs_s: float = 0.0, **params) -> dict | None:
        """Run one row; a failure is recorded as one line and the suite goes on. A row is skipped
        when fewer than `needs_s` seconds of the budget are left (none at all: always)."""
        entry = {"name": name, "params": params}
        if time.perf_counter() - self.started + needs_s > self.budget_s:
            entry.update(status="skipped", error=f"time budget of {self.budget_s:.0f} s spent")
        else:
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                entry.update(status="ok", figures=fn())
            except Exception as e:  # noqa: BLE001 - one failing row must not end the suite
                first = (str(e).strip().splitlines() or [""])[0][:300]
                entry.update(status="error", error=f"{type(e).__name__}: {first}")
            entry["seconds"] = time.perf_counter() - start
        self.result["rows"].append(entry)
        self.log(f"{name}: {entry['status']}" + (f" ({entry['error']})" if "error" in entry else ""))
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return entry.get("figures")

    # -- measurements
    def step_rate(self, fn) -> float:
        """Seconds per call of fn: warm-up, then the fastest of `rounds` runs of `steps` calls."""
        s = self.shapes
        for _ in range(s.rounds):
            fn()
        best = fastest_in_turns({"run": lambda: [fn() for _ in range(s.steps)]}, s.rounds)["run"]
        return best / s.steps

    def flops_per_sample(self, key: str, family: str, latent: int) -> float:
        if key not in self.flops:
            self.flops[key] = training_flops(family, latent, self.shapes.reduced)
        return self.flops[key]

    def train_figures(self, t: Trainee, flops_key: str, family: str, latent: int, overhead: bool = True) -> dict:
        seconds = self.step_rate(t.step)
        figures = {"samples_per_s": t.batch / seconds, "seconds_per_step": seconds}
        per_sample = self.flops_per_sample(flops_key, family, latent)
        if self.peak:
            figures["mfu"] = per_sample * figures["samples_per_s"] / (self.peak * 1e12)
        if overhead:
            t.forward_backward(True), t.forward_backward(False)
            passes = fastest_in_turns({"lora": lambda: t.forward_backward(True),
                                       "frozen": lambda: t.forward_backward(False)}, max(2, self.shapes.rounds))
            figures["lora_overhead_ratio"] = passes["lora"] / passes["frozen"]
        figures["peak_memory_mb"] = peak_memory_mb(self.device)
        return figures

    # -- the rows
    def sd15_rows(self) -> None:
        s = self.shapes
        for dtype in s.dtypes:
            for attention in ("sdpa", "xformers"):
                for batch in s.sd15_batches:
                    def run(dtype=dtype, attention=attention, batch=batch):
                        t = Trainee("sd_v1", s, self.device, DTYPES[dtype], batch, s.sd15_latent,
                                    attention=attention)
                        return self.train_figures(t, "sd15", "sd_v1", s.sd15_latent)
                    self.row(f"sd15 {dtype} {attention} b{batch}", run, family="sd_v1", latent=s.sd15_latent,
                             batch=batch, dtype=dtype, attention=attention)

    def sdxl_rows(self) -> None:
        s = self.shapes
        for batch in s.sdxl_batches:
            for checkpointing in (False, True):
                def run(batch=batch, checkpointing=checkpointing):
                    t = Trainee("sdxl", s, self.device, DTYPES[s.dtype], batch, s.sdxl_latent,
                                checkpointing=checkpointing)
                    return self.train_figures(t, "sdxl", "sdxl", s.sdxl_latent, overhead=False)
                self.row(f"sdxl {s.dtype} b{batch} checkpointing {'on' if checkpointing else 'off'}", run,
                         family="sdxl", latent=s.sdxl_latent, batch=batch, dtype=s.dtype,
                         gradient_checkpointing=checkpointing)

    def sampler_row(self) -> None:
        def run():
            if self.shapes.reduced:
                return bench_sampler(model="tiny", **self.shapes.sampler)
            with tempfile.TemporaryDirectory() as tmp:
                folder = save_diffusers(random_base("sd_v1"), Path(tmp) / "sd15")
                return bench_sampler(model=str(folder), **self.shapes.sampler)
        self.row("sampler " + "x".join(str(self.shapes.sampler[k]) for k in ("width", "height")), run,
                 model="tiny" if self.shapes.reduced else "sd_v1 architecture", **self.shapes.sampler)

    def trains_rows(self) -> None:
        """8-bit AdamW and the quantised bases: they run, they train, what they save."""
        s = self.shapes
        batch = s.sd15_batches[len(s.sd15_batches) // 2]
        reference = {}

        def trained(label, **kw):
            t = Trainee("sd_v1", s, self.device, DTYPES[s.dtype], batch, s.sd15_latent, **kw)
            losses = t.train(s.train_steps)
            figures = {"samples_per_s": batch / self.step_rate(t.step), "loss_first": losses[0],
                       "loss_last": losses[-1], "peak_memory_mb": peak_memory_mb(self.device)}
            if t.quantized["layers"]:
                figures.update(frozen_weight_mb=t.quantized["bytes_after"] / 2**20,
                               frozen_weight_mb_unquantized=t.quantized["bytes_before"] / 2**20)
            if label == "reference":
                reference.update(figures, losses=losses)
            elif t.quantized["layers"] and reference:  # same seed: same adapters, batch and noise
                figures["loss_mean_abs_diff_vs_unquantized"] = (
                    sum(abs(a - b) for a, b in zip(losses, reference["losses"])) / len(losses))
                if self.device == "cuda":  # the CPU figure is the process's peak, not the row's
                    figures["peak_memory_saved_mb"] = reference["peak_memory_mb"] - figures["peak_memory_mb"]
            return figures

        params = dict(family="sd_v1", latent=s.sd15_latent, batch=batch, dtype=s.dtype, steps=s.train_steps)
        self.row(f"sd15 {s.dtype} b{batch} adamw, unquantized (reference)", lambda: trained("reference"), **params)
        self.row(f"sd15 {s.dtype} b{batch} adamw8bit", lambda: trained("8bit", optimizer="adamw8bit"), **params)
        for fmt in ("fp8", "nf4"):
            self.row(f"sd15 {s.dtype} b{batch} quantize {fmt}", lambda fmt=fmt: trained(fmt, quantize=fmt), quantize=fmt,
                     **params)

    def lever_rows(self) -> None:
        s = self.shapes
        batch = s.sd15_batches[-1]
        params = dict(family="sd_v1", latent=s.sd15_latent, batch=batch)

        def tf32():
            figures = {}
            for enabled in (False, True):
                speed.set_tf32(enabled)
                t = Trainee("sd_v1", s, self.device, torch.float32, batch, s.sd15_latent)
                figures[f"samples_per_s_tf32_{'on' if enabled else 'off'}"] = batch / self.step_rate(t.step)
            speed.set_tf32(False)
            return figures
        self.row(f"lever tf32 (fp32 b{batch})", tf32, dtype="fp32", **params)

        dtype = DTYPES[s.dtype]

        def channels_last():
            t = Trainee("sd_v1", s, self.device, dtype, batch, s.sd15_latent)
            plain = t.batch / self.step_rate(t.step)
            t.unet.to(memory_format=torch.channels_last)
            t.noisy = t.noisy.contiguous(memory_format=torch.channels_last)
            return {"samples_per_s_plain": plain, "samples_per_s_channels_last": t.batch / self.step_rate(t.step)}
        self.row(f"lever channels_last ({s.dtype} b{batch})", channels_last, dtype=s.dtype, **params)

        def optimizers():
            figures = {}
            for name in ("adamw_foreach", "adamw"):
                t = Trainee("sd_v1", s, self.device, dtype, 1, s.sd15_latent, optimizer=name)
                t.loss().backward()
                figures[f"optimizer_step_ms_{'fused' if name == 'adamw' else 'foreach'}"] = (
                    1e3 * self.step_rate(t.optimizer.step))
            return figures
        self.row("lever fused AdamW (adapter parameters)", optimizers, family="sd_v1")

        def copies():
            host = torch.randn(batch, 4, s.sd15_latent, s.sd15_latent)
            pinned = host.pin_memory() if self.device == "cuda" else host
            figures = {}
            for label, tensor in (("pageable", host), ("pinned", pinned)):
                seconds = self.step_rate(lambda tensor=tensor: tensor.to(self.device, non_blocking=True))
                figures[f"copy_mb_per_s_{label}"] = tensor.numel() * tensor.element_size() / 2**20 / seconds
            return figures
        self.row(f"lever pinned latents (b{batch})", copies, **params)

        def sync_per_step():
            t = Trainee("sd_v1", s, self.device, dtype, batch, s.sd15_latent)
            synced = self.step_rate(lambda: t.step().item())
            unsynced = self.step_rate(t.step)
            return {"samples_per_s_loss_item_every_step": batch / synced, "samples_per_s_no_sync": batch / unsynced}
        self.row(f"lever no host sync per step ({s.dtype} b{batch})", sync_per_step, dtype=s.dtype, **params)
        if s.reduced:  # compiling takes ~15 s even at toy sizes on this CPU; test_speed covers compile_blocks
            return

        def compiled():
            t = Trainee("sd_v1", s, self.device, dtype, batch, s.sd15_latent)
            plain = t.batch / self.step_rate(t.step)
            speed.compile_blocks(t.unet)
            start = time.perf_counter()
            t.step()  # compiles
            compile_s = time.perf_counter() - start
            return {"samples_per_s_plain": plain, "samples_per_s_compiled": t.batch / self.step_rate(t.step),
                    "compile_seconds": compile_s}
        self.row(f"lever torch.compile transformer blocks ({s.dtype} b{batch})", compiled, needs_s=120,
                 dtype=s.dtype, **params)

    def flow_rows(self) -> None:
        """The transformer families whose family sdlora has (FLUX.1 dev; SD3.5 Medium once registered):
        one LoRA step at 1024 px (toy sizes: 64 px) with gradient checkpointing, bf16 / fp8 / fp8 +
        blocks_to_swap: samples/s and the measured peak, beside README's computed memory table."""
        s = self.shapes
        resolution, swap = (64, 2) if s.reduced else (1024, 16)
        for full in memory.registered():
            for quantize, blocks in (("none", 0), ("fp8", 0), ("fp8", swap)):
                def run(full=full, quantize=quantize, blocks=blocks):
                    t = memory.FlowStep(full, self.device, resolution, s.reduced, quantize, blocks)
                    if self.device == "cuda":  # the step's peak, not the random initialisation's
                        torch.cuda.reset_peak_memory_stats()
                    seconds = self.step_rate(t.step)
                    return {"samples_per_s": 1 / seconds, "seconds_per_step": seconds,
                            "peak_memory_mb": peak_memory_mb(self.device)}
                label = ("bf16" if quantize == "none" else quantize) + (f" + blocks_to_swap {blocks}" if blocks else "")
                self.row(f"{full.family} {label} {resolution}px checkpointing", run, needs_s=0 if s.reduced else 90,
                         family=full.family, resolution=resolution, quantize=quantize, blocks_to_swap=blocks,
                         gradient_checkpointing=True)

    def matmul_row(self) -> None:
        """The achievable bf16 matmul rate, the ceiling MFU is read against in practice."""
        n = 8192 if self.device == "cuda" else 256

        def run():
            a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
            b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
            seconds = self.step_rate(lambda: a @ b)
            return {"bf16_matmul_tflops": 2 * n**3 / seconds / 1e12}
        self.row(f"bf16 matmul {n}^3", run)

    def run(self) -> dict:
        self.matmul_row()
        self.sd15_rows()
        self.sdxl_rows()
        self.flow_rows()
        self.trains_rows()
        self.sampler_row()
        self.lever_rows()  # compile last: the slowest to start
        self.result["seconds"] = time.perf_counter() - self.started
        return self.result


def run_suite(device: str | None = None, reduced: bool | None = None, budget_s: float = 400.0,
              peak: float | None = None, *, log) -> dict:
    """The suite's JSON-ready results (see the module docstring). reduced: default = no CUDA.
    log: called with each row's progress line."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    reduced = device != "cuda" if reduced is None else reduced
    return Suite(device, reduced, budget_s, peak, log=log).run()


FIGURE_COLUMNS = ("samples_per_s", "mfu", "lora_overhead_ratio", "peak_memory_mb")


def markdown_table(result: dict) -> str:
    """One line per row: the main figures in columns, the row's other figures after them."""
    def fmt(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = [f"GPU suite on {result['device']} (torch {result['torch']}, CUDA {result['cuda']}), {result['date']}"
             f"{', reduced shapes (CPU smoke run)' if result['reduced'] else ''}; peak {result['peak_tflops']} TFLOP/s; "
             f"FLOPs per sample: " + ", ".join(f"{k} {v / 1e12:.3g} T" for k, v in result["flops_per_sample"].items()),
             "", "| row | status | samples/s | MFU | LoRA overhead | peak MB | other |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        figures = row.get("figures", {})
        cells = [fmt(figures[c]) if c in figures else "" for c in FIGURE_COLUMNS]
        other = "; ".join(f"{k} {fmt(v)}" for k, v in figures.items()
                          if k not in FIGURE_COLUMNS and isinstance(v, (int, float)))
        if row["status"] != "ok":
            other = row.get("error", "")
        lines.append(f"| {row['name']} | {row['status']} | " + " | ".join(cells) + f" | {other} |")
    return "\n".join(lines)
