"""The data side of a training: examples from the dataset manifest, kohya's caption augmentation
and epoch order, and `TrainingData` (the examples with their cached latents and text-encoder
outputs) whose `TrainingSamples` make each sample.

Every random draw of a sample (flip, caption shuffle/dropout, latent sample, noise, timestep)
comes from a generator seeded by (seed, epoch, position in the epoch), so the run is the same
whether one process or several share each batch, and a resumed run continues exactly where the
interrupted one stopped.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora.config import Config
from sdlora.data import images
from sdlora.data.buckets import Bucket, crop_top_left
from sdlora.data.dataset import REPORT_MD, current_manifest
from sdlora.data.subsets import Subset, balanced_repeats
from sdlora.data.tags import parse_caption
from sdlora.errors import UserError
from sdlora.models.families.base import DiffusionObjective, Family
from sdlora.models.load import DTYPES
from sdlora.models.longprompt import LENGTHS, count_cut, tokenize_long
from sdlora.training.cache import LatentCache, LazyLatents, TextEmbeddingCache
from sdlora.training.loss import pyramid_noise


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


def validation_indices(count: int, fraction: float, seed: int, name: str) -> set[int]:
    """Indices of a training subset's `count` images held out for validation: kohya's
    validation_split (the images shuffled by a seeded generator; the first ceil(count x (1 -
    fraction)) train, the rest validate)."""
    if not fraction:
        return set()
    order = list(range(count))
    random.Random(f"{seed}-validation-{name}").shuffle(order)
    return set(order[math.ceil(count * (1 - fraction)):])


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


class TrainingData:
    """The examples of a training and what each sample is made from: the trained examples and the
    held-out ones (`dataset.validation_split`), their cached latent distributions, the frozen text
    encoders' cached outputs (None while a text encoder trains or captions change), and the
    batches of the current epoch (`EpochBatches`)."""

    def __init__(self, cfg: Config, dataset: list[Example], latents: LazyLatents,
                 te_cache: TextEmbeddingCache | None, tokenizers: list, family: Family,
                 objective: DiffusionObjective, text_dropout_rates: tuple[float, ...] = ()):
        self.cfg, self.dataset = cfg, dataset  # dataset: every example, held-out ones too (config_hash covers it)
        self.examples, self.validation = split_held_out(dataset)
        self.latents, self.te_cache = latents, te_cache
        self.tokenizers, self.family, self.objective = tokenizers, family, objective
        self.text_dropout_rates = text_dropout_rates  # per text encoder (`network.text_dropout_rates`)
        self.batches = EpochBatches(self.examples, cfg.train.batch_size, cfg.train.seed)

    def tokenize(self, caption: str) -> list[torch.Tensor]:
        """One (77,) tensor of input ids per text encoder (T5: (t5_max_length,)); (n, 77) chunks with
        max_token_length > 75."""
        return [ids[0] for ids in tokenize_long(self.tokenizers, [caption], self.cfg.dataset.max_token_length,
                                                self.family.token_lengths(self.tokenizers))]

    def size_conditioning(self, ex: Example, flipped: bool) -> torch.Tensor | None:
        """The family's size conditioning of one example (SDXL's time_ids, (6,)): its original size, the
        crop of its bucket (of the mirror image when flipped) and the bucket, as (height, width) /
        (top, left) pairs; None for a family without one."""
        return self.family.size_conditioning((ex.size[1], ex.size[0]), crop_top_left(ex.size, ex.bucket, flipped),
                                             (ex.bucket.height, ex.bucket.width))

    def validation_batch(self, ex: Example, index: int) -> dict:
        """One held-out image at VALIDATION_TIMESTEPS fixed timesteps with fixed noise (seeded by its
        position), its latent mean, its whole caption and no noise offset: the same numbers every
        epoch, so only the adapter changes the loss."""
        k = VALIDATION_TIMESTEPS
        seed = int(hashlib.sha256(f"{self.cfg.train.seed}-validation-{index}".encode()).hexdigest()[:15], 16)
        mean = self.latents[ex.digest, ex.bucket]["mean"]  # (4, h, w)
        batch = {
            "latents": mean.expand(k, *mean.shape),
            "noise": torch.randn((k, *mean.shape), generator=torch.Generator().manual_seed(seed)),
            "offset": torch.zeros((k, mean.shape[0], 1, 1)),
            "timesteps": self.objective.fixed_timesteps(k),
            "loss_weight": torch.ones(k),
        }
        caption = ", ".join(ex.tags)
        if self.te_cache is not None:
            batch["text"] = {name: v.expand(k, *v.shape) for name, v in self.te_cache.get(caption).items()}
        if self.te_cache is None or self.family.per_encoder_text:  # the encoders not cached run
            batch["input_ids"] = [ids.expand(k, *ids.shape) for ids in self.tokenize(caption)]
        ids = self.size_conditioning(ex, flipped=False)
        if ids is not None:
            batch["time_ids"] = ids.expand(k, *ids.shape)
        return batch


class TrainingSamples(torch.utils.data.Dataset):
    """(epoch e, position p) -> one training sample, every random draw seeded by (seed, e, p)."""

    def __init__(self, data: TrainingData, batches: EpochBatches):
        self.data, self.batches = data, batches

    def __len__(self):
        return len(self.batches.order)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        data, tc = self.data, self.data.cfg.train
        epoch, pos = key
        if epoch != self.batches.epoch:
            raise ValueError(f"sample {key} asked for while EpochBatches yields epoch {self.batches.epoch}")
        ex = data.examples[self.batches.order[pos]]
        seed = int(hashlib.sha256(f"{tc.seed}-{epoch}-{pos}".encode()).hexdigest()[:15], 16)
        g = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        entry = data.latents[ex.digest, ex.bucket]
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
            "timesteps": data.objective.sample_timesteps(g, tuple(latents.shape[-2:])),
            "loss_weight": torch.tensor(tc.prior_loss_weight if d.is_reg else 1.0),
        }
        if tc.multires_noise_iterations:  # drawn last: the draws above stay those of a run without it
            sample["pyramid"] = pyramid_noise(latents.shape, tc.multires_noise_iterations,
                                              tc.multires_noise_discount, g)
        if data.te_cache is not None:
            sample["text"] = data.te_cache.get(caption)  # {"hidden"(, "pooled")}; per encoder: {"1.hidden", ...}
        if data.te_cache is None or data.family.per_encoder_text:  # the encoders not cached run
            sample["input_ids"] = data.tokenize(caption)  # one (77,) per text encoder
        ids = data.size_conditioning(ex, flip)
        if ids is not None:
            sample["time_ids"] = ids
        if any(data.text_dropout_rates):  # drawn last: the draws above stay those of a run without it
            # kohya's sd3 caption dropout per encoder: 1 = this example's outputs of that encoder are zeros
            sample["text_dropout"] = torch.tensor([float(rate > 0 and rng.random() < rate)
                                                   for rate in data.text_dropout_rates])
        return sample


VALIDATION_TIMESTEPS = 4  # per held-out image, spread evenly over (0, num_timesteps)


def split_held_out(dataset: list[Example]) -> tuple[list[Example], list[Example]]:
    """(trained examples, held-out examples) in the dataset's order."""
    return [ex for ex in dataset if not ex.held_out], [ex for ex in dataset if ex.held_out]


def captions_fixed(examples: list[Example]) -> bool:
    """No caption augmentation anywhere: each example's caption is the same every step."""
    return not any(ex.subset.shuffle_caption or ex.subset.caption_dropout_rate or ex.subset.caption_tag_dropout_rate
                   for ex in examples)


def example_latents(cfg: Config, vae, device, examples: list[Example], log=print) -> LazyLatents:
    """Cached latents of every example (`cache.LazyLatents`: stored ones now, the rest as the first
    epoch reaches them); the VAE leaves the device once all are in memory."""
    d = cfg.dataset
    # Latents are encoded in fp32 whatever the mixed precision: SDXL's VAE overflows in fp16
    # (kohya's --no_half_vae), and an fp16-fix VAE gives the same latents in fp32.
    if DTYPES[cfg.train.mixed_precision] != torch.float32:
        log("encoding latents with the VAE in fp32 (the frozen U-Net and text encoders stay in "
            f"{cfg.train.mixed_precision})")
    # .float(), not .to(dtype): diffusers' ModelMixin.to warns on every dtype cast.
    on_device = vae.to(device).float()
    cache = LatentCache(cfg.output_dir / "cache" / "latents", on_device, device)
    load = lambda p: images.load_image(p, d.max_pixels, d.min_side, d.background)  # noqa: E731
    # Each process encodes the examples of its own batches (entries are written atomically).
    latents = LazyLatents(cache, examples, load, on_complete=lambda: vae.to("meta"))
    if latents.missing:
        log(f"latents: {len(latents.entries)} cached, {latents.missing} encoded as the first epoch reaches them")
    return latents


def warn_cut_captions(tokenizer, examples: list[Example], limit: int, log=print) -> None:
    """A warning when captions are longer than dataset.max_token_length and get cut."""
    cut = count_cut(tokenizer, (", ".join(ex.tags) for ex in examples), limit)
    if cut:
        longer = [n for n in LENGTHS if n > limit]
        fix = f"; set dataset.max_token_length = {longer[0]} to keep more" if longer else ""
        log(f"warning: {cut} caption(s) are longer than dataset.max_token_length = {limit} tokens "
            f"and are cut{fix}")
