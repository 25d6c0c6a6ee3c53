"""Grids of sampled images: prompt rows x adapter columns, one grid per seed.

A file given without a weight is swept over `sample.lora_scales` (0 = the base); FILE:SCALE
keeps its weight in every column. With `--epochs-dir` the columns are the epoch files instead
(`epoch_files`). Cells are thumbnails; the full images, each with its infotext, sit next to
the grid. A prompt's `<lora:name:w>` tags load that adapter for its row only.

The functions here drive a `sampler.Sampler` (its `render` and its `adapters`); they never
build one.
"""

from __future__ import annotations

import itertools
import re
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.config import epoch_of_adapter
from sdlora.errors import UserError
from sdlora.io import inside
from sdlora.models.prompts import PromptLine, extract_networks, find_lora
from sdlora.sampling.infotext import parameters_for, save_png
from sdlora.sampling.render_cache import RenderCache


@dataclass
class Rendered:
    path: Path
    prompt: str
    seed: int
    scale: float  # the grid column's scale (0 = the base); epochs grid: 1
    lora: Path | None = None  # the swept (or, all fixed: first) adapter file, None for the base
    image: object = field(repr=False, default=None)  # the full PIL image


@dataclass
class SampleResult:
    folder: Path
    images: list[Rendered] = field(default_factory=list)
    grids: list[Path] = field(default_factory=list)


@dataclass
class Row:
    """One prompt row of a grid: the line as written, the text encoded, the adapters its tags name."""

    line: PromptLine
    text: str  # the prompt without its <lora:...> tags
    tags: dict[int, float | tuple[float, float]]  # id(adapter) -> multiplier (or (te, unet)), for its tags' adapters


def prompt_rows(sampler, lines: list, lora_dirs, log) -> list[Row]:
    """Rows for prompt lines; each adapter a `<lora:name:w>` tag names is loaded once (switched off
    except in the rows that name it)."""
    loaded = {a.path: a for a in sampler.adapters.adapters if a.from_prompt}  # by an earlier call
    rows = []
    for line in lines:
        line = line if isinstance(line, PromptLine) else PromptLine(line)
        text, tags, others = extract_networks(line.prompt)
        if others:
            log(f"note: {', '.join(others)} left out of the prompt (sdlora loads <lora:...> tags only)")
        row_tags = {}
        for tag in tags:
            path = find_lora(tag.name, [Path(d) for d in lora_dirs])
            if path not in loaded:
                loaded[path] = sampler.adapters.add(path, 0.0)
                loaded[path].from_prompt = True
            row_tags[id(loaded[path])] = tag.multiplier
        rows.append(Row(line, text, row_tags))
    return rows


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def render_grid(sampler, prompts: list, seeds: list[int], columns: list[tuple[str, callable]],
                folder: Path, stem: str, *, width: int, height: int, steps: int, hires: str,
                log, lora_dirs=(), cache: RenderCache | None = None) -> SampleResult:
    """Render prompts (rows) x columns for every seed; save the full images and one grid per seed.

    prompts: strings or prompt-file lines (`prompts.PromptLine`, whose options override the
    size, seed, steps, CFG scale, sampler and negative prompt of their row); `<lora:name:w>`
    tags load that adapter (searched in lora_dirs) for their row only.
    columns: (label, prepare) pairs; prepare() applies that column's adapters and returns
    (column scale, adapter file recorded with its images or None).
    cache: renders drawn before with the same settings are taken from it (`render_cache`).
    """
    s = sampler.cfg.sample
    result = SampleResult(folder=folder)
    rows = prompt_rows(sampler, prompts, lora_dirs, log)
    cells: dict[tuple[int, int, int], object] = {}  # (seed index, row, column) -> image
    pairs = [(p, seed) for p in range(len(rows)) for seed in range(len(seeds))]

    def settings(row: Row) -> tuple:
        line = row.line
        return (line.width or width, line.height or height, line.steps or steps, line.cfg_scale, line.sampler,
                s.negative_prompt if line.negative_prompt is None else line.negative_prompt,
                tuple(sorted(row.tags.items())))

    for c, (label, prepare) in enumerate(columns):
        scale, lora_file = prepare()
        column_weights = list(sampler.adapters.current)
        started, reused = time.time(), cache.hits if cache else 0
        for (w, h, n_steps, cfg_scale, sampler_name, negative, tags), group in itertools.groupby(
                pairs, key=lambda pair: settings(rows[pair[0]])):
            weights = [dict(tags).get(id(a), 0.0) if a.from_prompt else cw
                       for a, cw in zip(sampler.adapters.adapters, column_weights)]
            if weights != sampler.adapters.current:
                sampler.adapters.set_weights(weights)
            for batch in _batches(list(group), s.batch_size):
                row_seeds = [rows[p].line.seed if rows[p].line.seed is not None else seeds[i] for p, i in batch]
                call = ([rows[p].text for p, _ in batch], row_seeds, w, h, n_steps, hires, [negative] * len(batch),
                        cfg_scale, sampler_name)
                if cache is None:
                    images, shared = sampler.render(*call)
                    params = [shared] * len(images)
                else:
                    images, params = cache.render(sampler, *call)
                for (p, i), seed, image, param in zip(batch, row_seeds, images, params):
                    path = inside(folder, folder / f"{stem}_{label_slug(label)}_p{p:02d}_seed{seed}.png")
                    save_png(image, path, parameters_for(rows[p].line.prompt, seed, sampler.adapters.adapters,
                                                         weights, negative, param))
                    result.images.append(Rendered(path, rows[p].line.prompt, seed, scale, lora_file, image))
                    cells[i, p, c] = image
        reused = cache.hits - reused if cache else 0
        log(f"  {label}: {len(pairs)} images in {time.time() - started:.1f}s"
            + (f" ({reused} drawn before, from {cache.folder})" if reused else ""))
    labels = [label for label, _ in columns]
    for i, seed in enumerate(seeds):
        grid = make_grid([[cells[i, p, c] for c in range(len(columns))] for p in range(len(rows))],
                         labels, [row.line.prompt for row in rows], s.thumbnail, title=f"seed {seed}")
        path = inside(folder, folder / f"{stem}_grid_seed{seed}.png")
        save_png(grid, path, f"sdlora grid: rows = prompts, columns = {', '.join(labels)}; seed {seed}")
        result.grids.append(path)
    return result


def label_slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", label).strip("-")


def make_grid(rows: list[list], column_labels: list[str], row_labels: list[str], thumbnail: int, title: str = ""):
    """Thumbnails (longest side = thumbnail) in a labelled table: a header row and a label column."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    thumbs = []
    for row in rows:
        out = []
        for im in row:
            im = im.copy()
            im.thumbnail((thumbnail, thumbnail), Image.LANCZOS)
            out.append(im)
        thumbs.append(out)
    cell_w = max(im.width for row in thumbs for im in row)
    cell_h = max(im.height for row in thumbs for im in row)
    label_w, header_h, pad = 160, 24, 4
    width = label_w + len(column_labels) * (cell_w + pad) + pad
    height = header_h + len(rows) * (cell_h + pad) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for c, label in enumerate(column_labels):
        draw.text((label_w + c * (cell_w + pad) + pad, pad), label, fill="black", font=font)
    for r, (label, row) in enumerate(zip(row_labels, thumbs)):
        y = header_h + r * (cell_h + pad) + pad
        draw.multiline_text((pad, y), _wrap(label, 24, max_lines=max(1, cell_h // 12)), fill="black", font=font)
        for c, im in enumerate(row):
            grid.paste(im, (label_w + c * (cell_w + pad) + pad, y))
    return grid


def _wrap(text: str, width: int, max_lines: int) -> str:
    return "\n".join(textwrap.wrap(text, width)[:max_lines])


def epoch_files(folder, name: str | None = None) -> list[tuple[str, Path]]:
    """(label, path) of `NAME-0000NN.safetensors` in epoch order, then the final `NAME.safetensors`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--epochs-dir {folder}: not a folder")
    found: dict[str, list[tuple[int, Path]]] = {}
    for path in folder.glob("*.safetensors"):
        named = epoch_of_adapter(path.name)
        if named:
            found.setdefault(named[0], []).append((named[1], path))
    if name is None or name not in found:
        if len(found) != 1:
            names = ", ".join(sorted(found)) or "none"
            raise UserError(f"--epochs-dir {folder}: expected NAME-0000NN.safetensors files of one adapter "
                            f"(output name {name!r}); adapters found: {names}")
        name = next(iter(found))
    files = [(f"epoch {e}", p) for e, p in sorted(found[name])]
    final = folder / f"{name}.safetensors"
    if final.is_file():
        files.append(("final", final))
    return files


def sweep_columns(sampler, scales: list[float]) -> list[tuple[str, callable]]:
    """Grid columns over `scales`: swept files take the column's scale, fixed ones keep theirs.

    With only fixed files (every --lora FILE:SCALE) there is nothing to sweep: the columns
    are the base and the files at their weights.
    """
    adapters = sampler.adapters
    files = [a for a in adapters.adapters if not a.from_prompt]
    swept = [a for a in files if a.weight is None]

    def column(scale: float, weights: list[float], lora_file):
        def prepare():
            adapters.set_weights(weights)
            return scale, lora_file
        return prepare

    if not files:  # only the prompts' <lora:...> tags: one column, as prompted
        return [("as prompted", column(1.0, [0.0] * len(adapters.adapters), None))]
    if not swept:
        return [("base", column(0.0, [0.0] * len(adapters.adapters), None)),
                ("LoRA", column(1.0, adapters.weights_at(1.0), files[0].path))]
    fixed = len(swept) < len(files)
    return [("base" if scale == 0 and not fixed else f"LoRA x{scale:g}",
             column(scale, adapters.weights_at(scale), swept[0].path if scale else None)) for scale in scales]
