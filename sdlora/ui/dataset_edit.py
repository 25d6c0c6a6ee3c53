"""The Dataset page's work: add images, run the dataset stage, edit captions across the set.

Nothing here re-implements the builder. Uploads go through `images.load_image`, the builder's
own check; captions are read and written where the builder reads and writes them
(`dataset.existing_caption`, `built_caption_path`); after an edit the dataset stage runs again
without the tagger (`build_dataset(tag=False)`), which re-reads the captions and writes the
manifest the trainer reads, so an edit reaches training the way a hand edit of a .txt does.

Every caption write is atomic. Before an edit, the previous text of every caption it changes
is saved (atomically) in `<output.dir>/.sdlora-ui-undo.json`; `undo` puts those texts back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.config import Config
from sdlora.data.dataset import (
    MANIFEST,
    build_dataset,
    built_caption_path,
    captions_beside_images,
    existing_caption,
    read_manifest,
    refuse_non_caption,
)
from sdlora.data.images import (
    IMAGE_EXTENSIONS,
    REPORT_MARKER,
    ImageRejected,
    load_image,
)
from sdlora.data.subsets import Subset, resolve_subsets
from sdlora.data.tags import format_caption, normalise_tag, parse_caption, tag_key
from sdlora.errors import UserError
from sdlora.io import (
    atomic_write_bytes,
    atomic_write_text,
    read_caption,
    safe_file_stem,
)

UNDO_FILE = ".sdlora-ui-undo.json"
BULK_OPERATIONS = ("add", "remove", "replace", "move to front")


@dataclass
class ImageItem:
    path: Path
    caption_file: Path | None
    tags: list[str]  # the training caption (the manifest's: the trigger first where the file lacks it)
    subset: Subset
    duplicate_of: Path | None = None


@dataclass
class DatasetView:
    images: list[ImageItem] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    duplicate_groups: list[list[Path]] = field(default_factory=list)
    tag_frequency: dict[str, int] = field(default_factory=dict)
    built: bool = False  # a current manifest exists


def add_images(cfg: Config, files: list[tuple[str, Path]], log=print) -> tuple[list[Path], list[tuple[str, str]]]:
    """Copy uploaded files [(the name the user gave, where the upload lies)] into the first training
    subset's folder: (added, [(name, why refused)]). Each must pass the builder's image check;
    an existing image is never replaced (a new name gets -1, -2, ...)."""
    folder = training_folder(cfg)
    d = cfg.dataset
    added, refused = [], []
    for name, upload in files:
        ext = Path(name).suffix.lower()
        if ext not in IMAGE_EXTENSIONS:
            refused.append((name, f"not an image file type ({ext or 'no extension'}); use "
                                  f"{', '.join(sorted(IMAGE_EXTENSIONS))}"))
            continue
        try:
            load_image(upload, d.max_pixels, d.min_side, d.background)
        except ImageRejected as e:
            refused.append((name, e.reason))
            continue
        stem = safe_file_stem(Path(name).stem, "image")
        target, n = folder / f"{stem}{ext}", 1
        while target.exists() or target.with_suffix(cfg.dataset.caption_extension).exists():
            target, n = folder / f"{stem}-{n}{ext}", n + 1
        atomic_write_bytes(target, Path(upload).read_bytes())
        added.append(target)
    for name, why in refused:
        log(f"not added: {name}: {why}")
    return added, refused


def training_folder(cfg: Config) -> Path:
    """Where new images go: the first subset that is trained (not regularisation, not validation)."""
    for s in resolve_subsets(cfg, log=lambda m: None) if Path(cfg.dataset.image_dir).is_dir() else []:
        if not s.is_reg and not s.validation:
            return Path(s.image_dir)
    folder = Path(cfg.dataset.image_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def build(cfg: Config, retag: bool = False, log=print) -> None:
    """The dataset stage, as `sdlora dataset CONFIG [--retag]` runs it."""
    build_dataset(cfg, retag=retag or None, log=log)


def view(cfg: Config) -> DatasetView:
    """What the page shows, from the files the dataset stage wrote (manifest and report)."""
    manifest = read_manifest(cfg)
    out = cfg.output_dir
    if manifest is None:
        return DatasetView()
    items = [ImageItem(Path(e["path"]), Path(e["caption_file"]) if e["caption_file"] else None,
                       parse_caption(e["caption"]), manifest.subsets[e["subset"]],
                       Path(e["duplicate_of"]) if e["duplicate_of"] else None) for e in manifest.images]
    report = json.loads((out / REPORT_MARKER).read_text(encoding="utf-8"))
    root = Path(report["image_dir"])
    return DatasetView(items, [(r["file"], r["reason"]) for r in report["rejected"]],
                       [[root / f for f in g] for g in report["duplicate_groups"]], report["tag_frequency"], True)


def _editable(cfg: Config, data: DatasetView) -> list[ImageItem]:
    """The images whose captions the UI edits: trained ones (regularisation captions are never written)."""
    if not data.built:
        raise UserError(f"{cfg.output_dir / MANIFEST}: no current dataset; run the builder first (Build dataset)")
    return [i for i in data.images if not i.subset.is_reg and i.duplicate_of is None]


def caption_target(cfg: Config, item: ImageItem) -> Path:
    """The caption file an edit writes: the one the trainer reads now, else where the builder would write."""
    beside = captions_beside_images(item.subset)
    found = existing_caption(item.path, item.subset, cfg, beside)[0]
    if found is not None:
        return found
    return item.path.with_suffix(item.subset.caption_extension) if beside else built_caption_path(item.path, item.subset, cfg)


def set_tags(cfg: Config, image: str | Path, text: str, log=print) -> Path:
    """One image's caption becomes `text` (tags separated by commas)."""
    data = view(cfg)
    item = next((i for i in _editable(cfg, data) if i.path == Path(image)), None)
    if item is None:
        raise UserError(f"{image}: not a trained image of this dataset; rebuild the dataset if it is new")
    tags = parse_caption(text)
    _apply(cfg, {caption_target(cfg, item): format_caption(tags)}, log)
    return item.path


def bulk_edit(cfg: Config, operation: str, tag: str, new: str = "", log=print) -> int:
    """A1111 dataset-tag-editor's batch edits over every trained image: add `tag` (at the end),
    remove it, replace it by `new`, or move it to the front (behind the trigger, which stays first).
    Returns the captions changed."""
    if operation not in BULK_OPERATIONS:
        raise UserError(f"bulk edit {operation!r}: choose one of {', '.join(BULK_OPERATIONS)}")
    tag, new = normalise_tag(tag), normalise_tag(new)
    if not tag or "," in tag or "," in new:
        raise UserError("bulk edit: give one tag (no commas), e.g. 'sunset'")
    if operation == "replace" and not new:
        raise UserError(f"bulk edit: replace {tag!r} by what? Give the new tag (or use remove)")
    key = tag_key(tag)
    changes = {}
    for item in _editable(cfg, view(cfg)):
        target = caption_target(cfg, item)
        before = parse_caption(read_caption(target, log)) if target.is_file() else []
        has = [t for t in before if tag_key(t) == key]
        rest = [t for t in before if tag_key(t) != key]
        if operation == "add":
            after = before if has else before + [tag]
        elif operation == "remove":
            after = rest
        elif operation == "replace":
            after = [new if tag_key(t) == key else t for t in before]
            after = [t for i, t in enumerate(after) if tag_key(t) not in {tag_key(u) for u in after[:i]}]
        elif not has:
            after = before
        else:  # to the front, but behind the trigger: keep_tokens counts it as the first tag
            lead = rest[:1] if rest and cfg.trigger and tag_key(rest[0]) == tag_key(cfg.trigger) else []
            after = lead + has[:1] + rest[len(lead):]
        if after != before:
            changes[target] = format_caption(after)
    if changes:
        _apply(cfg, changes, log)
    return len(changes)


def _apply(cfg: Config, changes: dict[Path, str], log) -> None:
    """Write captions (undo record first), then let the dataset stage refresh the manifest."""
    for path in changes:
        refuse_non_caption(path)
    previous = {str(p): (p.read_text(encoding="utf-8") if p.is_file() else None) for p in changes}
    atomic_write_text(cfg.output_dir / UNDO_FILE, json.dumps(previous, indent=1))
    for path, text in changes.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n")
    build_dataset(cfg, log=log, tag=False)


def can_undo(cfg: Config) -> bool:
    return (cfg.output_dir / UNDO_FILE).is_file()


def undo(cfg: Config, log=print) -> int:
    """Put back the captions of the last edit; returns how many."""
    record = cfg.output_dir / UNDO_FILE
    if not record.is_file():
        raise UserError("nothing to undo: no edit since the last undo")
    try:
        previous = json.loads(record.read_text(encoding="utf-8"))
        assert isinstance(previous, dict)
    except (ValueError, AssertionError):
        raise UserError(f"{record} is damaged; the captions are as they are now (delete it to go on)") from None
    for name, text in previous.items():
        path = Path(name)
        if text is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write_text(path, text)
    record.unlink()
    build_dataset(cfg, log=log, tag=False)
    return len(previous)


def add_folder(cfg: Config, folder: Path, log=print) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every image file directly in `folder` (with its caption sidecar, when it has one) added as uploads are."""
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [(p.name, p) for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    added, refused = add_images(cfg, images, log)
    sources = [p for _, p in images if p.name not in {n for n, _ in refused}]
    for source, target in zip(sources, added):
        caption = source.with_suffix(cfg.dataset.caption_extension)
        if caption.is_file():
            atomic_write_bytes(target.with_suffix(cfg.dataset.caption_extension), caption.read_bytes())
    return added, refused
