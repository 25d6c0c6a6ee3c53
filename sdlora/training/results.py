"""After training: which epoch to ship, and what a smaller file costs.

Best epoch. Every saved epoch (and the base, scale 0) renders the config's prompts x seeds at
the base's native area with the target's aspect ratio (one pass: the figures compare adapters,
and the native size is where the denoiser answers in distribution), and is scored:

    style       palette distance to the training set in CIELAB (metrics.palette_distance: delta-E,
                lower = closer; lightness and chroma shown beside it so a person sees which part
                is off) and the colourfulness ratio over the base
    adherence   the tagger's agreement with the prompt's content tags (those it scores, trigger
                and style tags left out): how often each ranks above the vocabulary's other tags
                (AUC, 0.5 = chance), averaged over the images: is what was asked for still drawn. An over-fitted adapter paints its training set whatever the
                prompt says, so its adherence falls below the base's.

The recommended epoch is the closest to the style set among those that keep at least
ADHERENCE_KEEP of the base's adherence above chance (0.5); if every epoch loses the prompt, the
one that keeps the most. A style adapter lowers adherence a little by design (its palette reads
as another time of day to the tagger); an over-fitted one draws its training images whatever is
asked, and falls to chance or below.

Rank by energy. `output.resize_energy = beta` also writes `NAME-energyNN.safetensors`, every
module resized to the smallest rank keeping beta of its energy (lowrank.resize), and reports
its size and the style figures of both files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdlora.config import Config
from sdlora.data.caption import load_tagger, read_vocabulary
from sdlora.data.dataset import Manifest
from sdlora.data.tags import parse_caption, tag_key
from sdlora.errors import UserError
from sdlora.io import atomic_path, atomic_write_text, inside
from sdlora.lowrank.tools import resize
from sdlora.models.prompts import extract_networks
from sdlora.sampling.grids import epoch_files, make_grid
from sdlora.sampling.infotext import save_png
from sdlora.sampling.metrics import colourfulness, lab_summary, palette_distance
from sdlora.sampling.render_cache import RenderCache
from sdlora.sampling.sampler import Sampler, first_pass_size

ADHERENCE_KEEP = 0.5  # share of the base's adherence above chance an epoch must keep not to count as over-fitted


@dataclass
class EpochScore:
    label: str  # "base", "epoch 2", ..., "final"
    path: Path | None  # None for the base
    adherence: float
    palette_distance: float  # delta-E to the training set's colours (metrics.palette_distance)
    colourfulness_ratio: float
    lab: dict  # metrics.lab_summary: lightness, lightness_std, chroma
    images: list = field(default_factory=list, repr=False)


@dataclass
class EpochRanking:
    scores: list[EpochScore]  # the base first, then the epochs in order
    best: EpochScore
    reason: str
    style_lab: dict = field(default_factory=dict)  # lab_summary of the training set
    size: tuple[int, int] = (0, 0)  # (width, height) the epochs rendered at: the first pass's


def content_tags(cfg: Config, prompt: str, tagger) -> list[str]:
    """The prompt's tags the tagger can score, without the trigger and the style tags."""

    skip = {tag_key(t) for t in [cfg.trigger, *cfg.caption.style_tags] if t}
    tags = [t for t in parse_caption(extract_networks(prompt)[0]) if tag_key(t) not in skip]
    return tagger.scorable(tags)[0]


def adherence(images: list, tags_per_image: list[list[str]], tagger, vocabulary: list[str]) -> float:
    """The tagger's agreement with the prompts, as a ranking AUC: for each of an image's prompt tags,
    the share of the vocabulary's other tags that the tagger scores lower; the mean over tags and
    images (images with no scorable tag left out). 1 = everything asked for ranks above everything
    else, 0.5 = the picture no longer says what was asked (chance), whatever the tagger's absolute
    probabilities."""
    values = []
    for image, tags in zip(images, tags_per_image):
        others = [t for t in vocabulary if t not in tags]
        if tags and others:
            scores = tagger.score(tagger.embed_images([image.convert("RGB")]), [*tags, *others])[0]
            asked, rest = scores[:len(tags)], scores[len(tags):]
            values.append(float((asked[:, None] > rest[None, :]).mean()))
    return float(np.mean(values)) if values else float("nan")


def score_epochs(cfg: Config, files: list[tuple[str, Path]], style: list, log=print, sampler=None,
                 tagger=None) -> EpochRanking:
    """Render and score the base and each (label, adapter file); rank them (see the module docstring).
    style: the images the palette is compared with (the training set: `Manifest.style_images`)."""

    s = cfg.sample
    sampler = sampler or Sampler(cfg, fuse=True)  # one adapter at a time: merging is the fast path
    tagger = tagger or load_tagger(cfg.caption)
    prompts = [extract_networks(p)[0] for p in s.prompts]
    pairs = [(p, seed) for p in prompts for seed in s.seeds]
    tags = [content_tags(cfg, p, tagger) for p, _ in pairs]
    skip = {tag_key(t) for t in [cfg.trigger, *cfg.caption.style_tags, *cfg.caption.blacklist] if t}
    vocabulary = [t for t in tagger.scorable(read_vocabulary(cfg.caption.vocabulary))[0] if tag_key(t) not in skip]
    w, h = first_pass_size(s.width, s.height, sampler.native)
    cache = RenderCache.of(cfg)  # `sdlora sample --epochs-dir --native` finds these renders there

    def render() -> list:
        return cache.render(sampler, [p for p, _ in pairs], [seed for _, seed in pairs], w, h, s.steps, "off")[0]

    scores = []
    try:
        for label, path in [("base", None), *files]:
            for a in list(sampler.adapters.adapters):
                sampler.adapters.remove(a)
            if path is not None:
                sampler.adapters.add(path, 1.0)
                sampler.adapters.set_scale(1.0)
            images = render()
            base_c = np.mean([colourfulness(i) for i in scores[0].images]) if scores else None
            c = np.mean([colourfulness(i) for i in images])
            scores.append(EpochScore(label, path, adherence(images, tags, tagger, vocabulary),
                                     palette_distance(images, style),
                                     float(c / max(base_c, 1e-9)) if base_c is not None else 1.0,
                                     lab_summary(images), images))
            e = scores[-1]
            log(f"  {label}: adherence {e.adherence:.2f}, palette distance {e.palette_distance:.1f} delta-E "
                f"(lightness {lab_text(e.lab)}, chroma {e.lab['chroma']:.0f}), colourfulness {e.colourfulness_ratio:.2f}x")
    finally:
        sampler.adapters.close()
    best, reason = recommend(scores)
    return EpochRanking(scores, best, reason, lab_summary(style), (w, h))


def lab_text(lab: dict) -> str:
    """Lightness as 'mean +- spread' (L*, 0-100)."""
    return f"{lab['lightness']:.0f} +- {lab['lightness_std']:.0f}"


def adherence_floor(base: EpochScore) -> float:
    return 0.5 + ADHERENCE_KEEP * (base.adherence - 0.5)


def recommend(scores: list[EpochScore]) -> tuple[EpochScore, str]:
    """(recommended epoch, why): scores[0] is the base."""
    base, epochs = scores[0], scores[1:]
    floor = adherence_floor(base)
    keep = [e for e in epochs if e.adherence >= floor]
    lost = [e for e in epochs if e.adherence < floor]
    if keep:
        best = min(keep, key=lambda e: e.palette_distance)
        reason = (f"{best.label} has the palette closest to the training set (delta-E {best.palette_distance:.1f}, "
                  f"base {base.palette_distance:.1f}) among the epochs that still draw the prompt (adherence "
                  f"{best.adherence:.2f}, base {base.adherence:.2f})")
    else:
        best = max(epochs, key=lambda e: e.adherence)
        reason = f"every epoch loses the prompt; {best.label} keeps the most of it (adherence {best.adherence:.2f})"
    if min(e.palette_distance for e in epochs) >= base.palette_distance:
        reason += ("; no epoch's palette is closer to the training set than the base's: the adapter does not carry "
                   "the style's colours (the lightness and chroma columns show what it misses)")
    if lost:
        reason += (f"; {', '.join(e.label for e in lost)} lost the prompt (adherence "
                   f"{', '.join(f'{e.adherence:.2f}' for e in lost)} < {floor:.2f}, which keeps {ADHERENCE_KEEP:.0%} of "
                   f"the base's {base.adherence:.2f} above chance): "
                   f"over-fitted, they paint the training set whatever is asked")
    return best, reason


def epochs_grid(cfg: Config, ranking: EpochRanking) -> Path:
    """The scoring renders as a grid (rows: prompt x seed, columns: base and epochs), each column
    labelled with its scores and the recommended one marked."""

    s = cfg.sample
    pairs = [f"{p} (seed {seed})" for p in s.prompts for seed in s.seeds]
    labels = [f"{'* ' if e is ranking.best else ''}{e.label}: adh {e.adherence:.2f} dE {e.palette_distance:.1f} "
              f"col {e.colourfulness_ratio:.2f}x" for e in ranking.scores]
    rows = [[e.images[i] for e in ranking.scores] for i in range(len(pairs))]
    grid = make_grid(rows, labels, pairs, max(s.thumbnail, 192), title="epochs (* = recommended)")
    path = cfg.output_dir / "epochs_scored_grid.png"
    save_png(grid, path, "sdlora epoch scores: " + "; ".join(labels))
    return path


def set_report_section(cfg: Config, heading: str, lines: list[str]) -> None:
    """Write `## heading` with `lines` into report.md, replacing an earlier section of that heading."""
    report = cfg.report_path
    text = report.read_text() if report.exists() else f"# {cfg.output_name}\n"
    marker = f"\n## {heading}"
    if marker in text:
        start = text.index(marker)
        end = text.find("\n## ", start + len(marker))
        text = text[:start].rstrip() + "\n" + (text[end:] if end >= 0 else "")
    atomic_write_text(report, text.rstrip() + "\n" + marker + "\n\n" + "\n".join(lines) + "\n")


def report_epochs(cfg: Config, ranking: EpochRanking, grid: Path | None) -> None:
    rows = [f"| epoch | prompt adherence | {PALETTE_COLUMNS} | colourfulness vs base |", "|---|---|---|---|---|---|"]
    for e in sorted(ranking.scores[1:], key=lambda e: (e.adherence < adherence_floor(ranking.scores[0]),
                                                        e.palette_distance)):
        mark = " **(recommended)**" if e is ranking.best else ""
        rows.append(f"| {e.label}{mark} | {e.adherence:.2f} | {palette_cells(e)} | {e.colourfulness_ratio:.2f}x |")
    base, style = ranking.scores[0], ranking.style_lab
    rows.append(f"| base (scale 0) | {base.adherence:.2f} | {palette_cells(base)} | 1.00x |")
    rows.append(f"| training set | | 0 | {lab_text(style)} | {style['chroma']:.0f} | |")
    w, h = ranking.size
    lines = [f"Each saved epoch rendered the sample prompts x seeds at {w}x{h}, the first pass's size "
             "(`[sample] first_pass_resolution`, or the base's native size). "
             f"Recommended: **{ranking.best.label}** (`{ranking.best.path.name}`): {ranking.reason}.", "", *rows,
             "", PALETTE_NOTE]
    if cfg.output.keep == "best":
        lines += ["", f"`output.keep = \"best\"`: {ranking.best.path.name} was copied to {cfg.adapter_path().name}."]
    if grid is not None:
        lines += ["", f"![epochs]({grid.name})"]
    set_report_section(cfg, "Epochs ranked (best epoch)", lines)


PALETTE_COLUMNS = "palette distance to the training set (delta-E) | lightness L* | chroma C*"
PALETTE_NOTE = ("Palette distance: the mean CIELAB colour change (delta-E; about 2.3 is just noticeable) that turns "
                "the renders' colours into the training set's, lightness included; lightness (mean +- spread) and "
                "chroma (0 = grey) show which part of it is off.")


def palette_cells(e: EpochScore) -> str:
    return f"{e.palette_distance:.1f} | {lab_text(e.lab)} | {e.lab['chroma']:.0f}"


def keep_best(cfg: Config, ranking: EpochRanking) -> Path | None:
    """output.keep = "best": the recommended epoch's file becomes the final adapter (atomic copy)."""
    final = cfg.adapter_path()
    if cfg.output.keep != "best" or ranking.best.path is None or ranking.best.path == final:
        return None
    with atomic_path(final) as tmp:
        shutil.copyfile(ranking.best.path, tmp)
    return final


def resized_path(cfg: Config) -> Path:
    return inside(cfg.output_dir, cfg.output_dir / f"{cfg.output_name}-energy{round(cfg.output.resize_energy * 100)}"
                                                   ".safetensors", "adapter")


def export_resized(cfg: Config, *, style: list, log=print, sampler=None, tagger=None) -> dict:
    """output.resize_energy: write the energy-resized adapter and compare it with the full one
    (style: the training set's images, `Manifest.style_images`)."""

    final, dst = cfg.adapter_path(), resized_path(cfg)
    # A derived file of this run, rewritten with the adapter it comes from (like the samples).
    report = resize(final, dst, energy=cfg.output.resize_energy, overwrite=True)
    ranking = score_epochs(cfg, [("full", final), ("resized", dst)], style, log=log, sampler=sampler,
                           tagger=tagger)
    full, small = ranking.scores[1], ranking.scores[2]
    ranks = [m.new_rank for m in report.modules]
    lines = [f"`{dst.name}` keeps {cfg.output.resize_energy:.0%} of each module's energy (sum of squared singular "
             f"values): ranks {min(ranks)}..{max(ranks)} (was {max(m.old_rank for m in report.modules)}), "
             f"{report.size_before / 1024:.0f} KiB -> {report.size_after / 1024:.0f} KiB.", "",
             f"| file | colourfulness vs base | {PALETTE_COLUMNS} | prompt adherence |",
             "|---|---|---|---|---|---|",
             f"| {final.name} | {full.colourfulness_ratio:.2f}x | {palette_cells(full)} | {full.adherence:.2f} |",
             f"| {dst.name} | {small.colourfulness_ratio:.2f}x | {palette_cells(small)} | {small.adherence:.2f} |",
             "", PALETTE_NOTE]
    set_report_section(cfg, "Resized by energy", lines)
    log(f"resized: {dst} ({report.size_before / 1024:.0f} -> {report.size_after / 1024:.0f} KiB), colourfulness "
        f"{full.colourfulness_ratio:.2f}x -> {small.colourfulness_ratio:.2f}x")
    return {"path": dst, "size_before": report.size_before, "size_after": report.size_after,
            "full": full, "resized": small}


def after_training(cfg: Config, manifest: Manifest, log=print, trained: bool = True) -> dict:
    """`sdlora run`'s steps after a training: rank the epochs (keep the best when asked), resize by
    energy. Without a new training (the adapter was up to date) only a missing or older resized
    file is written. manifest: the run's `dataset.Manifest` (its style images are the palette reference)."""

    out = {}
    files = []
    resize = cfg.output.resize_energy > 0 and (trained or not resized_path(cfg).is_file() or
                                               resized_path(cfg).stat().st_mtime < cfg.adapter_path().stat().st_mtime)
    if cfg.output.score_epochs and trained:
        try:
            files = epoch_files(cfg.output_dir, cfg.output_name)
        except UserError:  # no saved epochs of this adapter (save_every_n_epochs beyond the run): nothing to rank
            pass
    if len(files) < 2 and not resize:
        return out
    sampler, tagger = Sampler(cfg, fuse=True), load_tagger(cfg.caption)
    style = manifest.style_images()
    if len(files) >= 2:
        log(f"== epochs: scoring {len(files)} saved adapters on {len(cfg.sample.prompts)} prompts x "
            f"{len(cfg.sample.seeds)} seeds at the native size")
        ranking = score_epochs(cfg, files, style, log=log, sampler=sampler, tagger=tagger)
        kept = keep_best(cfg, ranking)
        report_epochs(cfg, ranking, epochs_grid(cfg, ranking))
        log(f"recommended: {ranking.best.label} ({ranking.best.path.name}): {ranking.reason}"
            + (f"; copied to {kept.name}" if kept else ""))
        out["epochs"] = ranking
    if resize:
        out["resized"] = export_resized(cfg, style=style, log=log, sampler=sampler, tagger=tagger)
    return out
