"""What a training reports about itself: kohya's `ss_*` statistics of the examples, the config
hash that `sdlora run` and --resume compare, and the report (`report.md`, the loss curve)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.config import Config
from sdlora.data.buckets import Bucket
from sdlora.data.tags import tag_frequency as freq
from sdlora.digest import file_digest
from sdlora.io import atomic_write_text
from sdlora.sampling.plot import line_plot
from sdlora.training.examples import Example
from sdlora.training.state import STATE_FILE


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


def _by_subset(examples: list[Example]) -> dict:
    groups: dict = {}
    for ex in examples:
        groups.setdefault(ex.subset, []).append(ex)
    return groups


def tag_frequency(examples: list[Example]) -> dict[str, dict[str, int]]:
    """ss_tag_frequency: {subset folder basename: {tag: images carrying it}} (not x repeats), as kohya."""
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
    # blocks_to_swap moves weights, never a number: a run may resume with more or fewer blocks swapped
    for key in ("overwrite", "save_every_n_epochs", "blocks_to_swap"):
        relevant["train"].pop(key, None)
    relevant["examples"] = [(ex.digest, ex.tags, ex.repeats, ex.subset.to_dict(), ex.held_out) for ex in examples]
    relevant["trigger"] = cfg.trigger
    if cfg.network.init_weights:  # the starting adapter's content, not only its name
        relevant["init_weights"] = file_digest(Path(cfg.network.init_weights))
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def validation_lines(trainer) -> list[str]:
    """The report's validation-loss line: one figure per epoch (held-out images, fixed noise)."""
    if not trainer.validation_losses:
        return []
    figures = ", ".join(f"{epoch}: {value:.4f}" for epoch, value in trainer.validation_losses)
    return [f"- validation loss per epoch ({len(trainer.data.validation)} held-out images, fixed noise and "
            f"timesteps): {figures}"]


def write_report(trainer, result: TrainResult) -> Path:
    """report.md and loss_curve.png in output.dir, from the trainer (loop.Trainer) and its result."""
    cfg = trainer.cfg
    dim, alpha = trainer.settings.dim, trainer.settings.alpha
    out = cfg.output_dir
    curve = out / "loss_curve.png"
    line_plot(result.losses, curve, title=f"{cfg.output_name}: training loss", xlabel="step", ylabel="loss")
    last = result.losses[-20:] or [float("nan")]
    lines = [
        f"# {cfg.output_name}: training report", "",
        f"- base: {trainer.base.name} ({trainer.base.family}, {trainer.base.prediction_type})",
        f"- images: {describe_examples(trainer.data.examples)}, {trainer.epochs} epochs, "
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
