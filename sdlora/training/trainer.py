"""The training loop: LoRA on the U-Net (and text encoder), one readable `step()`.

Data flow: images + captions -> buckets -> cached VAE latents -> batches of one bucket
-> step() -> optimizer -> Kohya-format adapters every `save_every_n_epochs`.

Every random draw of a sample (flip, caption shuffle/dropout, latent sample, noise,
timestep) comes from a generator seeded by (seed, epoch, position in the epoch), so
the run is the same whether one process or several share each batch, and a resumed run
continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sdlora.config import Config
from sdlora.data.buckets import Bucket, crop_top_left
from sdlora.data.subsets import Subset
from sdlora.errors import UserError
from sdlora.models.family import (
    TextConditioning,
    clip_skip_note,
    is_sdxl,
    time_ids,
    unet_conditioning,
    unread_text_layers,
)

STATE_FILE = "training_state.safetensors"
OLD_STATE_FILE = "training_state.pt"  # sdlora before 0.2: a pickle, never read


# ----------------------------------------------------------------------------- data

@dataclass
class Example:
    image: Path
    digest: str  # sha256 of the file: the cache key
    tags: list[str]  # the training caption (the trigger first where it was missing)
    bucket: Bucket
    caption_source: str  # "sidecar", "builder", "class_tokens" or "none" (dataset._caption_source)
    size: tuple[int, int]  # the image's (width, height) before bucketing: SDXL's original size
    subset: Subset = None  # its caption rules, repeats and whether it is regularisation
    repeats: int = 1  # per epoch: the subset's num_repeats; regularisation images: kohya's balance
    held_out: bool = False  # kept aside for the validation loss (dataset.validation_split)


def collect_examples(cfg: Config, log=print, manifest=None) -> list[Example]:
    """The examples, from the dataset manifest: no folder scan, no image decode. Near-duplicates the
    dataset stage excluded are left out; validation images (`held_out`) come last; regularisation
    images get kohya's balanced repeats (`subsets.balanced_repeats`) against the training images.
    manifest: the command's `dataset.Manifest`; None resolves it here (`dataset.current_manifest`)."""
    from sdlora.data.dataset import REPORT_MD, current_manifest
    from sdlora.data.subsets import balanced_repeats
    from sdlora.data.tags import parse_caption

    if manifest is None:
        manifest = current_manifest(cfg, log)
    subsets = manifest.subsets
    entries = [e for e in manifest.images if not e["duplicate_of"]]
    excluded = len(manifest.images) - len(entries)
    if excluded:
        log(f"skipping {excluded} near-duplicate image(s) the dataset builder excluded "
            f"(see {cfg.output_dir / REPORT_MD}; `sdlora dataset --keep-duplicates` keeps them)")
    by_subset = [[e for e in entries if e["subset"] == i] for i in range(len(subsets))]
    held = [set(range(len(b))) if s.validation else set() if s.is_reg else
            validation_indices(len(b), cfg.dataset.validation_split, cfg.train.seed, s.name)
            for s, b in zip(subsets, by_subset)]
    training = [[e for j, e in enumerate(b) if j not in h] for b, h in zip(by_subset, held)]
    repeats = balanced_repeats([len(b) for b in training], [s.num_repeats for s in subsets],
                               [s.is_reg for s in subsets])
    examples = [Example(Path(e["path"]), e["digest"], parse_caption(e["caption"]), Bucket(*e["bucket"]),
                        e["caption_source"], tuple(e["size"]), subsets[i], n)
                for i, group in enumerate(training) for e, n in zip(group, repeats[i]) if n]
    examples += [Example(Path(e["path"]), e["digest"], parse_caption(e["caption"]), Bucket(*e["bucket"]),
                         e["caption_source"], tuple(e["size"]), subsets[i], 0, held_out=True)
                 for i, group in enumerate(by_subset) for j, e in enumerate(group) if j in held[i]]
    if len(subsets) > 1:
        log("subsets: " + "; ".join(
            f"{s.name}: {len(b)} {'regularisation ' if s.is_reg else ''}images x "
            f"{s.num_repeats if not s.is_reg else 'balanced'} repeats" for s, b in zip(subsets, by_subset)))
    uncaptioned = [ex.image.name for ex in examples if ex.caption_source == "none"]
    if uncaptioned:
        what = f"the trigger '{cfg.trigger}'" if cfg.trigger else "an empty caption"
        log(f"warning: {len(uncaptioned)} image(s) have no caption ({', '.join(uncaptioned[:5])}"
            f"{', ...' if len(uncaptioned) > 5 else ''}); training them with {what}. "
            f"Run `sdlora dataset {cfg.source}` to auto-tag them.")
    added = sum(e["trigger_added"] for e in entries if e["caption_source"] != "none")
    if added:
        log(f"{added} caption(s) lack the trigger '{cfg.trigger}': trained with it first (keep_tokens counts it)")
    if not any(not ex.subset.is_reg and not ex.held_out for ex in examples):
        raise UserError(f"{cfg.source}: no usable training image in "
                        f"{', '.join(str(s.image_dir) for s in subsets if not s.is_reg) or 'any subset'} "
                        "(see the dataset report); add PNG/JPEG/WebP images to [dataset] image_dir")
    return examples


def make_caption(tags: list[str], keep_tokens: int, shuffle: bool, tag_dropout: float, caption_dropout: float,
                 rng: random.Random) -> str:
    """kohya's caption augmentation: the first keep_tokens tags stay in place, the rest shuffle/drop."""
    if caption_dropout and rng.random() < caption_dropout:
        return ""
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout:
        rest = [t for t in rest if rng.random() >= tag_dropout]
    if shuffle:
        rest = rest[:]
        rng.shuffle(rest)
    return ", ".join(kept + rest)


def epoch_order(examples: list[Example], batch_size: int, seed: int, epoch: int) -> tuple[list[int], list[list[int]]]:
    """(order, batches): each example `ex.repeats` times, shuffled per bucket, batched within a bucket,
    batches shuffled. `batches` hold positions into `order`."""
    rng = random.Random(f"{seed}-{epoch}")
    by_bucket: dict[Bucket, list[int]] = {}
    for i, ex in enumerate(examples):
        by_bucket.setdefault(ex.bucket, []).extend([i] * ex.repeats)
    order, batches = [], []
    for bucket in sorted(by_bucket, key=str):
        items = by_bucket[bucket]
        rng.shuffle(items)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batches.append(list(range(len(order), len(order) + len(chunk))))
            order.extend(chunk)
    rng.shuffle(batches)
    return order, batches


def steps_per_epoch(examples: list[Example], batch_size: int) -> int:
    """Micro-batches per epoch, kohya's count: the sum over buckets of ceil(images x repeats / batch),
    regularisation images (with their balanced repeats) sharing the buckets of the training images."""
    counts: dict[Bucket, int] = {}
    for ex in examples:
        counts[ex.bucket] = counts.get(ex.bucket, 0) + ex.repeats
    return sum(math.ceil(n / batch_size) for n in counts.values())


def planned_steps(tc, examples: list[Example]) -> tuple[int, int, int]:
    """(optimizer steps per epoch, total steps, epochs) of a training: train.max_train_steps, when set,
    decides the total and the epochs follow from it."""
    per_epoch = math.ceil(steps_per_epoch(examples, tc.batch_size) / tc.gradient_accumulation_steps)
    total = tc.max_train_steps or per_epoch * tc.epochs
    return per_epoch, total, math.ceil(total / per_epoch)


class EpochBatches(torch.utils.data.Sampler):
    """The batches of one epoch at a time (`epoch_order`), as (epoch, position) keys.

    The DataLoader is prepared once; `start_epoch` chooses the epoch its next pass yields (named
    so that accelerate's own per-pass `set_epoch` counter never reaches it: a resumed run starts
    mid-way). accelerate reads `batch_size` to split each batch across processes."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order, self.batches = epoch_order(self.examples, self.batch_size, self.seed, epoch)

    def __iter__(self):
        return iter([[(self.epoch, pos) for pos in batch] for batch in self.batches])

    def __len__(self):
        return steps_per_epoch(self.examples, self.batch_size)


class TrainingSamples(torch.utils.data.Dataset):
    """(epoch e, position p) -> one training sample, every random draw seeded by (seed, e, p)."""

    def __init__(self, trainer: "Trainer", batches: EpochBatches):
        self.t, self.batches = trainer, batches

    def __len__(self):
        return len(self.batches.order)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        t, cfg = self.t, self.t.cfg
        epoch, pos = key
        if epoch != self.batches.epoch:
            raise ValueError(f"sample {key} asked for while EpochBatches yields epoch {self.batches.epoch}")
        ex = t.examples[self.batches.order[pos]]
        seed = int(hashlib.sha256(f"{cfg.train.seed}-{epoch}-{pos}".encode()).hexdigest()[:15], 16)
        g = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        entry = t.latents[ex.digest, ex.bucket]
        d = ex.subset
        flip = d.flip_aug and rng.random() < 0.5
        mean, std = (entry["flip_mean"], entry["flip_std"]) if flip else (entry["mean"], entry["std"])
        latents = mean + std * torch.randn(mean.shape, generator=g)  # (4, h, w)
        caption = make_caption(ex.tags, d.keep_tokens, d.shuffle_caption, d.caption_tag_dropout_rate,
                               d.caption_dropout_rate, rng)
        sample = {
            "latents": latents,
            "noise": torch.randn(latents.shape, generator=g),
            "offset": torch.randn((latents.shape[0], 1, 1), generator=g),
            "timesteps": torch.randint(0, t.num_timesteps, (), generator=g),
            "loss_weight": torch.tensor(cfg.train.prior_loss_weight if d.is_reg else 1.0),
        }
        if cfg.train.multires_noise_iterations:  # drawn last: the draws above stay those of a run without it
            sample["pyramid"] = pyramid_noise(latents.shape, cfg.train.multires_noise_iterations,
                                              cfg.train.multires_noise_discount, g)
        if t.te_cache is not None:
            sample["text"] = t.te_cache.get(caption).to_dict()  # {"hidden"(, "pooled")}
        else:
            sample["input_ids"] = t.tokenize(caption)  # one (77,) per text encoder
        if is_sdxl(t.base.family):
            sample["time_ids"] = example_time_ids(ex, flip)
        return sample


def pyramid_noise(shape: tuple[int, int, int], iterations: int, discount: float,
                  generator: torch.Generator) -> torch.Tensor:
    """The multi-resolution part of kohya's pyramid noise (custom_train_functions.pyramid_noise_like,
    after Whitaker's multires noise) for one latent (C, H, W):

        P = sum_i upsample(randn(C, H // r_i^i, W // r_i^i)) * discount^i,   r_i ~ U[2, 4), i < iterations

    bilinear upsampling back to (H, W); it stops after the first level that is 1 pixel high or wide.
    `add_pyramid` adds P to the noise and rescales the sum to unit variance."""
    c, h, w = shape
    pyramid = torch.zeros(shape)
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = torch.randn((1, c, hn, wn), generator=generator)
        pyramid += F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False)[0] * discount**i
        if hn == 1 or wn == 1:
            break
    return pyramid


def add_pyramid(noise: torch.Tensor, pyramid: torch.Tensor) -> torch.Tensor:
    """(noise + pyramid) / std, the std taken per example (B, C, H, W): kohya divides by the whole
    batch's, the same for one example; per example, an example's noise does not depend on which
    examples share its batch or process."""
    noise = noise + pyramid
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


def example_time_ids(ex: Example, flipped: bool) -> torch.Tensor:
    """SDXL's size conditioning of one example, (6,): its original size, the crop of its bucket
    (of the mirror image when flipped) and the bucket, as (height, width) / (top, left) pairs."""
    return time_ids((ex.size[1], ex.size[0]), crop_top_left(ex.size, ex.bucket, flipped),
                    (ex.bucket.height, ex.bucket.width))


# ----------------------------------------------------------------------------- trainer

def snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """min-SNR-gamma (Hang et al. 2023): w = min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v),
    SNR = alpha_bar / (1 - alpha_bar) from diffusers' `compute_snr`."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    return torch.clamp(snr, max=gamma) / (snr + 1 if v_prediction else snr)


def noise_offset_strength(tc, latents: torch.Tensor) -> torch.Tensor | float:
    """train.noise_offset, plus adaptive_noise_scale x |mean of each latent channel| (kohya's adaptive
    noise offset, (B, C, 1, 1), clamped at 0 for a negative scale); latents already scaled."""
    if not tc.adaptive_noise_scale:
        return tc.noise_offset
    channel_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
    return torch.clamp(tc.noise_offset + tc.adaptive_noise_scale * channel_mean, min=0.0)


@dataclass
class TrainResult:
    adapter: Path
    adapters: list[Path] = field(default_factory=list)
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    report: Path | None = None
    vae_encodes: int = 0  # latents this training encoded (the rest came from the cache)
    te_encodes: int = 0  # captions whose frozen text-encoder outputs it encoded


@dataclass
class Progress:
    """Wall-clock bookkeeping that spans sessions: a resumed run reports the whole training."""

    started_at: float  # unix time the training (not this session) began
    seconds_before: float  # training time of earlier sessions
    session_started: float
    adapters: list[Path]  # every adapter file written, in order

    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.session_started

    def resumed(self, state: dict, out: Path) -> None:
        self.started_at = float(state.get("training_started_at", self.started_at))
        self.seconds_before = float(state.get("seconds", 0.0))
        self.adapters[:0] = [out / name for name in state.get("adapters", []) if (out / name).is_file()]


class TrainingStopped(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM, honoured at a step boundary after the state was saved."""

    def __init__(self, signum: int, step: int, cfg: Config):
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        where = f" {cfg.source}" if cfg.source else " CONFIG"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; the training state is saved "
                         f"in {cfg.output_dir / 'state' / STATE_FILE}: continue with `sdlora train{where} --resume` "
                         "(and the same --set options)")


class StopRequest:
    """SIGINT / SIGTERM handlers for the training loop.

    Once the loop runs (`armed`), a signal only sets a flag that the loop reads at its next step
    boundary, where it saves the state and stops (`TrainingStopped`); a second signal, or one
    before the loop starts, stops at once. Several processes stop at the same step: the loop
    takes the largest flag over all of them.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.armed, self.previous = 0, False, {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if not self.armed or self.signum:
            raise KeyboardInterrupt(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving the training state at the end of this step, then "
              "stopping (press Ctrl-C again to stop at once, without saving)", file=sys.stderr)

    def requested(self, accelerator) -> int:
        """The signal to stop for (0: none), the same in every process."""
        if accelerator.num_processes == 1:
            return self.signum
        flags = accelerator.gather(torch.tensor([self.signum], device=accelerator.device))
        return int(flags.max())


class TrainingDiverged(UserError):
    """A non-finite loss or gradient: nothing of the step was applied or written."""


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """||concat(tensors)||_2, what clip_grad_norm_ returns (torch.nn.utils.get_total_norm from torch 2.6)."""
    if not tensors:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


def check_finite(cfg: Config, step: int, epoch: int, loss: float, grad_norm: float, losses: list[float],
                 overflow_skips: bool) -> None:
    """Stop training on a NaN/inf loss or gradient norm, saying where, why and what to change.

    overflow_skips: fp16's gradient scaler skips steps whose gradients overflow and lowers its
    scale, so an infinite gradient is expected there now and then; a non-finite loss is not.
    """
    if math.isfinite(loss) and (math.isfinite(grad_norm) or overflow_skips):
        return
    from sdlora.adapters.network import network_ranks

    tc = cfg.train
    dim, alpha, _, _ = network_ranks(cfg.network)
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
    last = f"last finite loss {losses[-1]:.4f} at step {step - 1}" if losses else "no step had finished"
    if tc.mixed_precision == "fp16":
        cause = ("fp16 overflowed: set train.mixed_precision = \"bf16\" (or \"no\"), or lower the learning rates "
                 f"(unet_lr {tc.unet_lr:g}, text_encoder_lr {tc.text_encoder_lr})")
    else:
        cause = (f"the learning rates are too high for this network (unet_lr {tc.unet_lr:g}, text_encoder_lr "
                 f"{tc.text_encoder_lr}; 1e-4 to 1e-3 is usual for AdamW), or network.alpha / network.dim "
                 f"({alpha:g} / {dim}) scales the adapters too strongly: lower them, "
                 f"keep train.max_grad_norm at 1.0")
    raise TrainingDiverged(
        f"{cfg.source or 'training'}: training stopped at step {step} (epoch {epoch}): {what} ({last}). "
        f"Likely cause: {cause}; then train again without --resume. Nothing of this step was saved: the "
        f"adapters and state already in {cfg.output_dir} are from before it.")


class Trainer:
    def __init__(self, cfg: Config, log=print, manifest=None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, is_initialized
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

        from sdlora.adapters import network as lora
        from sdlora.models import load as models

        self.cfg, self.log = cfg, log
        self.bar = None  # the progress bar while the loop runs
        if cfg.sample.every_n_epochs:  # previews sample these: refuse what they cannot render before training
            from sdlora.models.prompts import check_prompt

            for prompt in cfg.sample.prompts:
                check_prompt(prompt, f"{cfg.source or 'config'}: [sample] prompts")
        tc = cfg.train
        out = cfg.output_dir
        # With no GPU, accelerate only goes multi-process (gloo) when told to use the CPU.
        no_gpu = models.compute_device() == "cpu"
        # accelerate keeps one AcceleratorState per process, its mixed precision fixed by the first
        # Accelerator, and has no public way to start over: a second training in one process (a
        # notebook, a sweep) in another precision is refused here, in words, before accelerate's own.
        fixed = AcceleratorState().mixed_precision if is_initialized() else tc.mixed_precision
        if fixed != tc.mixed_precision:
            raise UserError(
                f"{cfg.source or 'training'}: [train] mixed_precision = {tc.mixed_precision!r}, but this Python "
                f"process already trained with {fixed!r}, and accelerate fixes the mixed precision once per "
                f"process. Train in a new process (a new `sdlora train` command, or restart the notebook "
                f"kernel), or keep mixed_precision = {fixed!r} in this one.")
        self.accelerator = Accelerator(
            cpu=no_gpu,
            mixed_precision=tc.mixed_precision,
            gradient_accumulation_steps=tc.gradient_accumulation_steps,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
            dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=torch.cuda.is_available()),
        )
        acc = self.accelerator
        if tc.batch_size % acc.num_processes:
            raise UserError(f"{cfg.source}: [train] batch_size = {tc.batch_size} must be divisible by the "
                            f"number of processes ({acc.num_processes}): each process takes an equal share")
        self.weight_dtype = models.DTYPES[tc.mixed_precision]  # the frozen base; adapters train in fp32
        self.base = models.load_base(cfg.model, dtype=self.weight_dtype)
        note = clip_skip_note(self.base.family, cfg.model.clip_skip)
        if note:
            self._main_log(f"warning: {note}")
        self.text_encoder_lrs = lora.text_encoder_lrs(cfg, self.base)  # checks a pair against the encoders
        self.v_prediction = self.base.prediction_type == "v_prediction"
        self.num_timesteps = self.base.noise_scheduler.config.num_train_timesteps
        with self.accelerator.main_process_first():  # one process rebuilds a stale manifest, the others read it
            self.dataset = collect_examples(cfg, log=self._main_log, manifest=manifest)  # what config_hash covers
        self.examples = [ex for ex in self.dataset if not ex.held_out]
        self.validation = [ex for ex in self.dataset if ex.held_out]
        self.validation_losses: list[tuple[int, float]] = []  # (epoch, loss) of the held-out images
        if self.validation:
            self._main_log(f"validation: {len(self.validation)} image(s) held out (dataset.validation_split = "
                           f"{cfg.dataset.validation_split:g}); their loss is logged every epoch")
        self._warn_cut_captions()
        # Made by setup(), which needs the accelerator's device and the dataset above:
        self.te_cache = None  # cached text-encoder outputs (frozen encoders, fixed captions)
        self.text_encoders: list = []  # the prepared text encoder(s): [CLIP] or SDXL's [CLIP-L, OpenCLIP bigG]
        self.unet = None  # the prepared (DDP-wrapped when multi-process) U-Net
        self.network = None  # lora.Network: the adapters, seen through Kohya's names
        self.train_te = False  # text-encoder adapters are trained (not frozen and not 0-rate)
        self.te_learning = False  # ... and still learning (train.stop_text_encoder_training not reached)
        self.latents = None  # cache.LazyLatents: (digest, bucket) -> cached latent distribution
        self.optimizer = self.lr_scheduler = None
        self.trainable: list = []  # the adapter parameters the optimizer updates
        self.steps_per_epoch = self.total_steps = self.epochs = 0
        self.batches = self.loader = None  # EpochBatches and its prepared DataLoader
        self.stop = self.progress = None  # run(): the signal handlers and the wall-clock bookkeeping

    # -- helpers
    def _main_log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            self.log(msg)

    def _warn_cut_captions(self) -> None:
        from sdlora.models.longprompt import LENGTHS, count_cut

        limit = self.cfg.dataset.max_token_length
        cut = count_cut(self.base.tokenizers[0], (", ".join(ex.tags) for ex in self.examples), limit)
        if cut:
            longer = [n for n in LENGTHS if n > limit]
            fix = f"; set dataset.max_token_length = {longer[0]} to keep more" if longer else ""
            self._main_log(f"warning: {cut} caption(s) are longer than dataset.max_token_length = {limit} tokens "
                           f"and are cut{fix}")

    def tokenize(self, caption: str) -> list[torch.Tensor]:
        """One (77,) tensor of input ids per text encoder; (n, 77) chunks with max_token_length > 75."""
        from sdlora.models.longprompt import tokenize_long

        return [ids[0] for ids in tokenize_long(self.base.tokenizers, [caption], self.cfg.dataset.max_token_length)]

    def encode_text(self, input_ids: list[torch.Tensor]) -> TextConditioning:
        from sdlora.models.longprompt import encode_long

        # The prepared (DDP-wrapped when multi-process) encoders, so their adapter gradients are all-reduced.
        device = self.accelerator.device
        return encode_long(self.base.family, self.text_encoders, [ids.to(device) for ids in input_ids],
                           self.cfg.model.clip_skip)

    # -- setup
    def prepare_latents(self) -> None:
        """Cached latents of every example (`cache.LazyLatents`: stored ones now, the rest as the
        first epoch reaches them); the VAE leaves the device once all are in memory."""
        from sdlora.data.images import load_image
        from sdlora.training.cache import LatentCache, LazyLatents

        d = self.cfg.dataset
        # Latents are encoded in fp32 whatever the mixed precision: SDXL's VAE overflows in fp16
        # (kohya's --no_half_vae), and an fp16-fix VAE gives the same latents in fp32.
        if self.weight_dtype != torch.float32:
            self._main_log("encoding latents with the VAE in fp32 (the frozen U-Net and text encoders stay in "
                           f"{self.cfg.train.mixed_precision})")
        # .float(), not .to(dtype): diffusers' ModelMixin.to warns on every dtype cast.
        vae = self.base.vae.to(self.accelerator.device).float()
        cache = LatentCache(self.cfg.output_dir / "cache" / "latents", vae, self.accelerator.device)
        load = lambda p: load_image(p, d.max_pixels, d.min_side, d.background)  # noqa: E731
        # Each process encodes the examples of its own batches (entries are written atomically).
        self.latents = LazyLatents(cache, self.examples + self.validation, load,
                                   on_complete=lambda: self.base.vae.to("meta"))
        if self.latents.missing:
            self._main_log(f"latents: {len(self.latents.entries)} cached, {self.latents.missing} encoded as the "
                           "first epoch reaches them")

    def setup(self) -> None:
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params

        from sdlora.adapters import network as lora
        from sdlora.training.cache import TextEmbeddingCache

        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        base = self.base
        encoders = base.text_encoders
        for m in (base.unet, base.vae, *encoders):
            m.requires_grad_(False)
        train_te = any(lr > 0 for lr in self.text_encoder_lrs)
        set_seed(tc.seed)  # the adapters' initial weights: the same in every process and every run
        self.network = lora.inject(base.unet, encoders if train_te else None, cfg.network, log=self._main_log)
        cast_training_params([base.unet, *encoders], dtype=torch.float32)  # adapters train in fp32 under fp16/bf16
        if cfg.network.init_weights:
            self.load_init_weights(cfg.network.init_weights)
        if train_te:
            layers = [te.config.num_hidden_layers for te in encoders]
            for part, unread in unread_text_layers(base.family, cfg.model.clip_skip, layers).items():
                self.network.freeze_text_layers(part, unread)
        self.apply_speed_settings()
        if tc.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            if train_te:
                for te in encoders:
                    te.gradient_checkpointing_enable()
        self.train_te = self.te_learning = train_te
        if tc.stop_text_encoder_training and not train_te:
            self._main_log(f"warning: [train] stop_text_encoder_training = {tc.stop_text_encoder_training} has no "
                           "effect: the text encoder is not trained")
        captions_fixed = not any(ex.subset.shuffle_caption or ex.subset.caption_dropout_rate
                                 or ex.subset.caption_tag_dropout_rate for ex in self.examples)
        self.text_encoders = [te.to(acc.device) for te in encoders]
        if not train_te and captions_fixed:
            # Every caption is known now: encode them all once, then the encoders leave the accelerator.
            tokens = "" if cfg.dataset.max_token_length == 75 else f"_tok{cfg.dataset.max_token_length}"
            self.te_cache = TextEmbeddingCache(cfg.output_dir / "cache" / "text", encoders,
                                               f"{base.family}_skip{cfg.model.clip_skip}{tokens}", self.encode_captions)
            self.te_cache.fill(", ".join(ex.tags) for ex in self.examples + self.validation)
            for te in encoders:  # never run again: drop their weights (the meta device keeps their configs)
                te.to("meta")
        self.prepare_latents()

        groups = self.network.param_groups(tc.unet_lr, self.text_encoder_lrs)
        self.optimizer = make_optimizer(tc, groups, cfg.source, fused=acc.device.type == "cuda")
        self.steps_per_epoch, self.total_steps, self.epochs = planned_steps(tc, self.examples)
        self.lr_scheduler = get_scheduler(
            tc.lr_scheduler, self.optimizer, num_warmup_steps=warmup_steps(tc, self.total_steps),
            num_training_steps=self.total_steps, num_cycles=tc.lr_scheduler_num_cycles)
        models_to_train = [base.unet] + (encoders if train_te else [])
        prepared = acc.prepare(*models_to_train, self.optimizer, self.lr_scheduler)
        self.unet = prepared[0]
        if train_te:
            self.text_encoders = list(prepared[1:1 + len(encoders)])
        self.optimizer, self.lr_scheduler = prepared[-2], prepared[-1]
        self.trainable = list(self.network.trainable_parameters())
        self.batches = EpochBatches(self.examples, tc.batch_size, tc.seed)
        self.loader = acc.prepare(torch.utils.data.DataLoader(
            TrainingSamples(self, self.batches), batch_sampler=self.batches, pin_memory=acc.device.type == "cuda"))

    def stop_text_encoder(self, step: int) -> None:
        """train.stop_text_encoder_training (kohya's): once that many optimizer steps are done, the
        text-encoder adapters keep their values: they leave autograd (the encoders then run without
        it, see step()), get no gradient, and optimizers skip parameters without one. They stay in
        the saved adapters and state."""
        stop = self.cfg.train.stop_text_encoder_training
        if not (stop and self.te_learning and step >= stop):
            return
        for part in self.network.models:
            if part != "unet":
                for p in self.network.parameters_of(part):
                    p.requires_grad_(False)
                    p.grad = None
        self.te_learning = False
        self._main_log(f"step {step}: the text-encoder adapters stop training (train.stop_text_encoder_training)")

    def apply_speed_settings(self) -> None:
        """model.quantize on the frozen base (after injection: adapters stay full precision), then
        the U-Net's [train] attention / tf32 / channels_last / compile (speed.py)."""
        from sdlora.models import quantize
        from sdlora.training import speed

        base = self.base
        for model in (base.unet, *base.text_encoders):
            quantize.quantize_frozen(model, self.cfg.model.quantize)
        done = speed.apply(self.cfg.train, base.unet, self.accelerator.device)
        if done:
            self._main_log(f"speed: {', '.join(done)}")

    def load_init_weights(self, path: str) -> None:
        """network.init_weights: continue from an existing adapter (kohya's network_weights)."""
        from sdlora.adapters.file import read_adapter

        try:
            self.network.load_kohya_state_dict(read_adapter(path)[0])
        except UserError as e:
            raise UserError(f"{self.cfg.source}: [network] init_weights = {path}: {e}") from None
        self._main_log(f"adapters start from {path}")

    def encode_captions(self, captions: list[str]) -> TextConditioning:
        from sdlora.models.longprompt import tokenize_long

        return self.encode_text(tokenize_long(self.base.tokenizers, captions, self.cfg.dataset.max_token_length))

    # -- the step
    def step(self, batch: dict) -> torch.Tensor:
        """One micro-batch: noise the latents at random timesteps, predict, weighted MSE.

        The batch's random draws (latent sample, noise, offset, timesteps) were made by
        `TrainingSamples` from a generator seeded by (seed, epoch, position in the epoch), not here:
        each example's draws are then the same whichever process takes it and whether or not the
        run was resumed, so one process equals several and a resumed run equals an unbroken one.
        """
        cfg, base = self.cfg, self.base
        latents = batch["latents"] * base.vae.config.scaling_factor  # (B, 4, h, w)
        noise = batch["noise"]
        if cfg.train.noise_offset:  # shifts the mean colour: learns brighter darks and darker lights
            noise = noise + noise_offset_strength(cfg.train, latents) * batch["offset"]  # (B, 4, 1, 1) per channel
        if "pyramid" in batch:  # multires noise: low frequencies too (after the offset, as kohya)
            noise = add_pyramid(noise, batch["pyramid"])
        timesteps = batch["timesteps"]  # (B,)
        noisy_latents = base.noise_scheduler.add_noise(latents, noise, timesteps)
        if "text" in batch:  # cached outputs of the frozen text encoder(s)
            text = TextConditioning.from_dict({k: v.to(self.accelerator.device) for k, v in batch["text"].items()})
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.te_learning):
                text = self.encode_text(batch["input_ids"])  # (B, 77, d) hidden states (+ SDXL's pooled (B, 1280))
        conditioning = unet_conditioning(text, batch.get("time_ids"), self.weight_dtype)
        noise_pred = self.unet(noisy_latents.to(self.weight_dtype), timesteps, **conditioning).sample
        target = base.noise_scheduler.get_velocity(latents, noise, timesteps) if self.v_prediction else noise
        loss = F.mse_loss(noise_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if cfg.train.min_snr_gamma:
            loss = loss * snr_weights(base.noise_scheduler, timesteps, cfg.train.min_snr_gamma,
                                      self.v_prediction)
        return (loss * batch["loss_weight"]).mean()  # regularisation images: train.prior_loss_weight

    # -- saving
    def adapter_path(self, epoch: int | None) -> Path:
        return self.cfg.adapter_path(epoch)

    def save_adapter(self, path: Path, epoch: int, step: int, started: float) -> None:
        from sdlora.adapters import network as lora
        from sdlora.adapters.file import save_adapter

        tc = self.cfg.train
        from sdlora.models.load import DTYPES

        dtype = DTYPES[tc.save_precision]
        stats = {"epoch": epoch, "num_epochs": self.epochs, "steps": step, "max_train_steps": self.total_steps,
                 "num_batches_per_epoch": self.steps_per_epoch, "training_started_at": started,
                 "training_finished_at": time.time(), "config_hash": config_hash(self.cfg, self.dataset),
                 "lr_warmup_steps": warmup_steps(self.cfg.train, self.total_steps),
                 "total_batch_size": self.cfg.train.batch_size * self.cfg.train.gradient_accumulation_steps,
                 **dataset_stats(self.examples)}
        metadata = lora.adapter_metadata(self.cfg, self.base, stats, tag_frequency(self.examples),
                                         dataset_dirs(self.examples, reg=False))
        metadata["sdlora_config_hash"] = stats["config_hash"]  # `sdlora run` skips retraining on a match
        save_adapter(path, self.network.kohya_state_dict(dtype), metadata, overwrite=True)

    def save_state(self, epoch: int, batch_in_epoch: int, step: int, losses: list[float]) -> None:
        """Everything --resume needs to continue bit for bit, as data (`state.py`): no pickle."""
        from sdlora.training import state as training_state

        out = self.cfg.output_dir
        progress = self.progress
        state = {
            "adapter": self.network.kohya_state_dict(torch.float32),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step, "losses": losses,
            "config_hash": config_hash(self.cfg, self.dataset),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            # for the report and the metadata of a resumed run: the whole training, not the last session
            "training_started_at": progress.started_at, "seconds": progress.seconds(),
            "adapters": [str(p.relative_to(out)) for p in progress.adapters],
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        training_state.save_state(state, out / "state" / STATE_FILE)

    def load_state(self) -> dict:
        from sdlora.training import state as training_state

        folder = self.cfg.output_dir / "state"
        path = folder / STATE_FILE
        if not path.is_file():
            if (folder / OLD_STATE_FILE).is_file():
                raise UserError(f"--resume: {folder / OLD_STATE_FILE} is an older sdlora's pickled state, which is "
                                "not read (a pickle can run code); start again without --resume")
            raise UserError(f"--resume: no training state at {path}; start without --resume")
        fix = ("delete it and start again without --resume (the adapters saved so far are kept; "
               "set train.overwrite = true or another output.output_name)")
        try:
            state = training_state.load_state(path)
        except training_state.DamagedState as e:
            raise UserError(f"--resume: {path} is damaged ({e}); {fix}") from None
        if state.get("config_hash") != config_hash(self.cfg, self.dataset):
            raise UserError(f"--resume: {path} was written for a different config or dataset; "
                            "resume with the same settings, or start a new run without --resume")
        try:
            self.network.load_kohya_state_dict(state["adapter"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
            if "cuda" in state["rng"] and torch.cuda.device_count() == len(state["rng"]["cuda"]):
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            state["epoch"], state["batch_in_epoch"], state["step"] = (int(state[k]) for k in
                                                                      ("epoch", "batch_in_epoch", "step"))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"--resume: {path} is damaged ({type(e).__name__}: {e}); {fix}") from None
        return state

    # -- the loop
    def run(self, resume: bool = False) -> TrainResult:
        """Train holding the output folder's lock; SIGINT / SIGTERM stop at the next step boundary
        with the state saved for --resume (`StopRequest`)."""
        import contextlib

        from sdlora.io import output_lock, remove_stale_temps

        out = self.cfg.output_dir
        with contextlib.ExitStack() as stack:
            if self.accelerator.is_main_process:  # the other processes belong to the same training
                stack.enter_context(output_lock(out, log=self.log))
                remove_stale_temps(out, log=self.log)
            self.stop = stack.enter_context(StopRequest())
            stack.callback(lambda: self.bar and self.bar.close())  # an error's line starts on a line of its own
            return self._run(resume)

    def _run(self, resume: bool) -> TrainResult:
        from tqdm import tqdm

        from sdlora.io import refuse_to_overwrite

        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        final = self.adapter_path(None)
        # every process stops, none waits for the others
        refuse_to_overwrite(final, tc.overwrite or resume, "set train.overwrite = true (or --set train.overwrite=true)")
        self.setup()
        start_epoch, skip, step, losses = 0, 0, 0, []
        result = TrainResult(adapter=final, losses=losses)
        self.progress = Progress(time.time(), 0.0, time.time(), result.adapters)
        if resume:
            state = self.load_state()
            start_epoch, skip, step, losses = state["epoch"], state["batch_in_epoch"], state["step"], state["losses"]
            result.losses = losses
            self.progress.resumed(state, cfg.output_dir)
            self._main_log(f"resumed at epoch {start_epoch + 1}, step {step}")
        if acc.is_main_process:
            acc.init_trackers("sdlora")
            self.log(f"training {describe_examples(self.examples)}, "
                     f"{self.epochs} epochs, {self.steps_per_epoch} steps/epoch, {self.total_steps} steps "
                     f"({acc.num_processes} process(es), {self.cfg.network.type} on {len(self.network.exported_keys())} modules)")
        started = self.progress.started_at
        bar = self.bar = tqdm(total=self.total_steps, initial=step, disable=not acc.is_main_process, desc="train")
        models = [self.unet] + (self.text_encoders if self.train_te else [])
        for epoch in range(start_epoch, self.epochs):
            for m in models:
                m.train()
            self.optimizer.train()  # schedule-free optimizers: the training weights (a no-op for others)
            self.batches.start_epoch(epoch)
            loader = acc.skip_first_batches(self.loader, skip) if skip else self.loader
            self.stop.armed = True
            for i, batch in enumerate(loader, start=skip):
                self.stop_text_encoder(step)
                with acc.accumulate(*models):
                    loss = self.step(batch)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        if tc.max_grad_norm:
                            grad_norm = acc.clip_grad_norm_(self.trainable, tc.max_grad_norm)
                        else:
                            grad_norm = total_norm([p.grad for p in self.trainable if p.grad is not None])
                        loss_value = acc.gather(loss.detach()).mean().item()
                        # before the update: a non-finite step never reaches the weights or a file
                        check_finite(cfg, step + 1, epoch + 1, loss_value, float(grad_norm), losses,
                                     overflow_skips=acc.scaler is not None)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    step += 1
                    losses.append(loss_value)
                    lrs = self.lr_scheduler.get_last_lr()
                    logs = {"loss": loss_value}
                    logs.update({f"lr/{group['name']}": lr for group, lr in zip(self.optimizer.param_groups, lrs)})
                    if tc.scale_weight_norms:  # kohya's max-norm regularisation, on the updated weights
                        keys_scaled, mean_norm, max_key_norm = self.network.apply_max_norm(tc.scale_weight_norms)
                        logs.update({"max_norm/keys_scaled": keys_scaled, "max_norm/max_key_norm": max_key_norm,
                                     "norm/avg_key_norm": mean_norm})  # kohya's names
                    acc.log(logs, step=step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lrs[0]:.2e}")
                    every_steps = tc.save_every_n_steps
                    if every_steps and step % every_steps == 0 and step < self.total_steps:
                        if acc.is_main_process:
                            path = self.cfg.adapter_path(step=step)
                            self.save_adapter(path, epoch + 1, step, started)
                            result.adapters.append(path)
                            self.save_state(epoch, i + 1, step, losses)
                        acc.wait_for_everyone()
                    signum = self.stop.requested(acc)
                    if signum:
                        if acc.is_main_process:
                            self.save_state(epoch, i + 1, step, losses)
                        acc.wait_for_everyone()
                        raise TrainingStopped(signum, step, self.cfg)
                    if step >= self.total_steps:
                        break
            skip = 0
            self.optimizer.eval()  # schedule-free optimizers: validate and save the averaged weights
            self.validate(epoch + 1, step)
            last = epoch + 1 == self.epochs
            every = tc.save_every_n_epochs
            if acc.is_main_process:
                if every and (epoch + 1) % every == 0 and not last:
                    path = self.adapter_path(epoch + 1)
                    self.save_adapter(path, epoch + 1, step, started)
                    result.adapters.append(path)
                    self.save_state(epoch + 1, 0, step, losses)
                self.maybe_preview(epoch + 1, step, started, last)
            acc.wait_for_everyone()
        bar.close()
        result.vae_encodes = self.latents.cache.encodes
        result.te_encodes = self.te_cache.encodes if self.te_cache is not None else 0
        if acc.is_main_process:
            self.save_adapter(final, self.epochs, step, started)
            self.save_state(self.epochs, 0, step, losses)
            result.adapters.append(final)
            result.steps, result.seconds = step, self.progress.seconds()
            result.report = write_report(self, result)
        acc.end_training()
        return result

    @torch.no_grad()
    def validate(self, epoch: int, step: int) -> None:
        """The held-out images' loss: `validation_batch` (fixed noise, fixed timesteps, full captions)
        through the same `step()`; every process computes it alike, the main one logs it."""
        if not self.validation:
            return
        from accelerate.utils import send_to_device

        models = [self.unet] + (self.text_encoders if self.train_te else [])
        for m in models:
            m.eval()
        with self.accelerator.autocast():
            losses = [self.step(send_to_device(validation_batch(self, ex, i), self.accelerator.device)).item()
                      for i, ex in enumerate(self.validation)]
        value = sum(losses) / len(losses)
        self.validation_losses.append((epoch, value))
        self.accelerator.log({"loss/validation": value}, step=step)
        self._main_log(f"epoch {epoch}: validation loss {value:.4f}")

    def maybe_preview(self, epoch: int, step: int, started: float, last: bool) -> None:
        every = self.cfg.sample.every_n_epochs
        if not every or epoch % every or last or not self.cfg.sample.prompts:
            return
        from sdlora.sampling import sampler

        path = self.adapter_path(epoch)
        if not path.exists():
            self.save_adapter(path, epoch, step, started)
        grid = sampler.preview(self.cfg, path, epoch, self.cfg.output_dir / "previews")
        self.log(f"preview: {grid}")


# optimizer name -> (module, class, the sdlora extra that installs it, defaults kohya users expect)
OPTIMIZERS = {
    "adamw": ("torch.optim", "AdamW", None, {}),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bnb", {}),
    "lion": ("lion_pytorch", "Lion", "lion", {}),
    # Adafactor with the given learning rates (kohya_ss's preset); relative_step=True would ignore them.
    "adafactor": ("transformers.optimization", "Adafactor", None,
                  {"scale_parameter": False, "relative_step": False, "warmup_init": False}),
    # Prodigy estimates the step size itself: learning rates of ~1.0 are its convention.
    "prodigy": ("prodigyopt", "Prodigy", "prodigy", {}),
    # Schedule-free AdamW: the trainer switches it to eval() (averaged weights) before validating and saving.
    "adamw_schedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree", {}),
}


def make_optimizer(tc, groups: list[dict], source, fused: bool = False) -> torch.optim.Optimizer:
    """train.optimizer over the adapter groups, with weight_decay and train.optimizer_args passed through.
    fused: AdamW's one-CUDA-kernel update (PyTorch's fastest implementation)."""
    import importlib

    module, name, extra, defaults = OPTIMIZERS[tc.optimizer]
    if fused and tc.optimizer == "adamw":
        defaults = {**defaults, "fused": True}
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError:
        package = module.split(".")[0]
        raise UserError(f"{source}: [train] optimizer = '{tc.optimizer}' needs {package}"
                        f"{' (and a CUDA GPU)' if extra == 'bnb' else ''}: pip install 'sdlora[{extra}]', "
                        "or use optimizer = 'adamw'") from None
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in tc.optimizer_args.items()}
    try:
        return cls(groups, **{"weight_decay": tc.weight_decay, **defaults, **args})
    except TypeError as e:
        raise UserError(f"{source}: [train] optimizer_args {tc.optimizer_args} do not fit {name}: {e}") from None


def warmup_steps(tc, total_steps: int) -> int:
    """train.lr_warmup_steps, or lr_warmup_ratio x total steps."""
    return tc.lr_warmup_steps or round(tc.lr_warmup_ratio * total_steps)


def _by_subset(examples: list[Example]) -> dict:
    groups: dict = {}
    for ex in examples:
        groups.setdefault(ex.subset, []).append(ex)
    return groups


VALIDATION_TIMESTEPS = 4  # per held-out image, spread evenly over (0, num_timesteps)


def validation_indices(count: int, fraction: float, seed: int, name: str) -> set[int]:
    """Indices of a training subset's `count` images held out for validation: kohya's
    validation_split (the images shuffled by a seeded generator; the first ceil(count x (1 -
    fraction)) train, the rest validate)."""
    if not fraction:
        return set()
    order = list(range(count))
    random.Random(f"{seed}-validation-{name}").shuffle(order)
    return set(order[math.ceil(count * (1 - fraction)):])


def validation_batch(trainer: Trainer, ex: Example, index: int) -> dict:
    """One held-out image at VALIDATION_TIMESTEPS fixed timesteps with fixed noise (seeded by its
    position), its latent mean, its whole caption and no noise offset: the same numbers every
    epoch, so only the adapter changes the loss."""
    k, t = VALIDATION_TIMESTEPS, trainer.num_timesteps
    seed = int(hashlib.sha256(f"{trainer.cfg.train.seed}-validation-{index}".encode()).hexdigest()[:15], 16)
    mean = trainer.latents[ex.digest, ex.bucket]["mean"]  # (4, h, w)
    batch = {
        "latents": mean.expand(k, *mean.shape),
        "noise": torch.randn((k, *mean.shape), generator=torch.Generator().manual_seed(seed)),
        "offset": torch.zeros((k, mean.shape[0], 1, 1)),
        "timesteps": torch.tensor([(i + 1) * t // (k + 1) for i in range(k)]),
        "loss_weight": torch.ones(k),
    }
    caption = ", ".join(ex.tags)
    if trainer.te_cache is not None:
        batch["text"] = {name: v.expand(k, *v.shape) for name, v in trainer.te_cache.get(caption).to_dict().items()}
    else:
        batch["input_ids"] = [ids.expand(k, *ids.shape) for ids in trainer.tokenize(caption)]
    if is_sdxl(trainer.base.family):
        ids = example_time_ids(ex, flipped=False)
        batch["time_ids"] = ids.expand(k, *ids.shape)
    return batch


def tag_frequency(examples: list[Example]) -> dict[str, dict[str, int]]:
    """ss_tag_frequency: {subset folder basename: {tag: images carrying it}} (not x repeats), as kohya."""
    from sdlora.data.tags import tag_frequency as freq

    return {s.name: freq([", ".join(ex.tags) for ex in group]) for s, group in _by_subset(examples).items()}


def dataset_dirs(examples: list[Example], reg: bool) -> dict[str, dict[str, int]]:
    """ss_dataset_dirs (reg=False) / ss_reg_dataset_dirs (reg=True): {basename: {n_repeats, img_count}}."""
    return {s.name: {"n_repeats": s.num_repeats, "img_count": len(group)}
            for s, group in _by_subset(examples).items() if s.is_reg == reg}


def dataset_stats(examples: list[Example]) -> dict:
    """kohya's image counts: ss_num_train_images is training images x repeats; ss_num_reg_images the
    regularisation images x their subset's repeats (before balancing)."""
    train = [ex for ex in examples if not ex.subset.is_reg]
    reg = [ex for ex in examples if ex.subset.is_reg]
    return {"num_train_images": sum(ex.repeats for ex in train),
            "num_reg_images": sum(ex.subset.num_repeats for ex in reg),
            "reg_dataset_dirs": dataset_dirs(examples, reg=True),
            "bucket_info": bucket_info(examples)}


def bucket_info(examples: list[Example]) -> dict:
    """ss_bucket_info as kohya writes it: {"buckets": {i: {"resolution": [w, h], "count": images x
    repeats}}, "mean_img_ar_error": mean |bucket aspect - image aspect| over the images}."""
    counts: dict[Bucket, int] = {}
    for ex in examples:
        counts[ex.bucket] = counts.get(ex.bucket, 0) + ex.repeats
    buckets = sorted(counts, key=lambda b: (b.aspect, b.width))
    errors = [abs(ex.bucket.aspect - ex.size[0] / ex.size[1]) for ex in examples if ex.size[1]]
    return {"buckets": {str(i): {"resolution": [b.width, b.height], "count": counts[b]} for i, b in enumerate(buckets)},
            "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def describe_examples(examples: list[Example]) -> str:
    """'12 images x 10 repeats' or, with several subsets, '3 x 5 (5_a) + 2 x 1 (1_reg, regularisation)'."""
    groups = _by_subset(examples)
    if len(groups) == 1:
        (s, group), = groups.items()
        return f"{len(group)} images x {s.num_repeats} repeats"
    return " + ".join(f"{len(g)} x {sum(ex.repeats for ex in g) / len(g):g} ({s.name}"
                      f"{', regularisation' if s.is_reg else ''})" for s, g in groups.items())


def config_hash(cfg: Config, examples: list[Example]) -> str:
    """What the adapter depends on: training settings, base, images and captions."""
    d = cfg.to_dict()
    relevant = {k: d[k] for k in ("model", "dataset", "network", "train")}
    for key in ("overwrite", "save_every_n_epochs"):
        relevant["train"].pop(key, None)
    relevant["examples"] = [(ex.digest, ex.tags, ex.repeats, ex.subset.to_dict(), ex.held_out) for ex in examples]
    relevant["trigger"] = cfg.trigger
    if cfg.network.init_weights:  # the starting adapter's content, not only its name
        from sdlora.digest import file_digest

        relevant["init_weights"] = file_digest(Path(cfg.network.init_weights))
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def validation_lines(trainer: Trainer) -> list[str]:
    """The report's validation-loss line: one figure per epoch (held-out images, fixed noise)."""
    if not trainer.validation_losses:
        return []
    figures = ", ".join(f"{epoch}: {value:.4f}" for epoch, value in trainer.validation_losses)
    return [f"- validation loss per epoch ({len(trainer.validation)} held-out images, fixed noise and "
            f"timesteps): {figures}"]


def write_report(trainer: Trainer, result: TrainResult) -> Path:
    from sdlora.adapters.network import network_ranks
    from sdlora.io import atomic_write_text
    from sdlora.sampling.plot import line_plot

    cfg = trainer.cfg
    dim, alpha, _, _ = network_ranks(cfg.network)
    out = cfg.output_dir
    curve = out / "loss_curve.png"
    line_plot(result.losses, curve, title=f"{cfg.output_name}: training loss", xlabel="step", ylabel="loss")
    last = result.losses[-20:] or [float("nan")]
    lines = [
        f"# {cfg.output_name}: training report", "",
        f"- base: {trainer.base.name} ({trainer.base.family}, {trainer.base.prediction_type})",
        f"- images: {describe_examples(trainer.examples)}, {trainer.epochs} epochs, "
        f"batch {cfg.train.batch_size} x {cfg.train.gradient_accumulation_steps} accumulation",
        f"- network: {cfg.network.type}, dim {dim}, alpha {alpha:g}, "
        f"targets {cfg.network.unet_targets}, text encoder {'trained' if trainer.train_te else 'frozen'}",
        f"- learning rates: unet {cfg.train.unet_lr}, text encoder {cfg.train.text_encoder_lr}, "
        f"{cfg.train.lr_scheduler}, optimizer {cfg.train.optimizer}",
        f"- steps: {result.steps} in {result.seconds:.0f} s ({result.steps / max(result.seconds, 1e-9):.2f} steps/s)",
        f"- final loss (mean of last {len(last)} steps): {sum(last) / len(last):.4f}",
        *validation_lines(trainer),
        "", "## Files", "",
        *[f"- `{p.relative_to(out)}`" for p in result.adapters],
        f"- `loss_curve.png`, TensorBoard logs in `logs/`, resumable state in `state/{STATE_FILE}`",
        "", "![loss](loss_curve.png)", "",
    ]
    path = cfg.report_path
    atomic_write_text(path, "\n".join(lines))
    return path


def train(cfg: Config, resume: bool = False, log=print, manifest=None) -> TrainResult:
    """manifest: the command's `dataset.Manifest` (None: resolved by the trainer)."""
    return Trainer(cfg, log=log, manifest=manifest).run(resume=resume)
