"""`sdlora dataset CONFIG`: build the training set from a folder of images.

1. scan and validate every image (rejects are reported with their reason; the rest go on);
2. near-duplicates: tagger image embeddings with cosine > dedupe_threshold, or a 64-bit
   difference hash (dHash) differing in at most DHASH_MAX_BITS bits; by default only the
   first image of each group (in path order) is kept, the others are `excluded`;
3. captions: an existing `.txt` sidecar is kept unless --retag (then the old one is backed
   up as `NAME.txt.bak-<timestamp>` before it is replaced); images without one are tagged
   by the open_clip tagger, and the tags pruned (tags.prune, then tags.drop_rare);
4. sidecars are written next to the images (atomically, only when the text changes), or
   into `<output.dir>/captions/` when the image folder is read-only (the trainer reads both);
5. `dataset_report.md`, `dataset_report.json` and `dataset_contact_sheet.png` in output.dir;
6. `dataset_manifest.json` in output.dir: the hand-off to the trainer and to `sdlora run`'s
   up-to-date check (per image: path, content digest, size, training caption, subset,
   bucket). Nothing downstream scans the folders or decodes an image again. Each command
   resolves it once at its entry point (`current_manifest`: read when current, else rebuilt by
   `build_dataset(cfg, tag=False)`) and hands the `Manifest` down.

The dataset is a list of subsets (`subsets.resolve_subsets`: `[[dataset.subsets]]`, kohya's
`N_words` folders). Regularisation subsets are never auto-tagged, never written to and never
given the trigger; an image without a caption file trains with its subset's class tokens.
Where `trigger` is set and a training caption lacks it, the manifest's caption has it first
(so `keep_tokens` counts it).

Re-running on an unchanged folder writes no caption and encodes no image (embeddings are
cached by file content under `<output.dir>/cache/tagger/`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdlora.config import Config, Subset
from sdlora.data import caption as captioner
from sdlora.data.buckets import Bucket, assign_bucket, make_buckets, resolution_pair
from sdlora.data.images import (
    CONTACT_SHEET,
    REPORT_MARKER,
    ImageRejected,
    load_image,
    scan_images,
)
from sdlora.data.subsets import resolve_subsets
from sdlora.data.tags import (
    drop_rare,
    format_caption,
    parse_caption,
    prune,
    tag_frequency,
    tag_key,
)
from sdlora.digest import file_digest
from sdlora.errors import UserError
from sdlora.io import (
    IMAGE_EXTENSIONS,
    atomic_path,
    atomic_write_text,
    read_caption,
    remove_stale_temps,
)

REPORT_MD = "dataset_report.md"
MANIFEST = "dataset_manifest.json"
MANIFEST_VERSION = 2  # bump when the manifest's fields change: older ones are rebuilt
SHEET_CELL = 160  # contact-sheet cell side (pixels)
SHEET_LAYOUT = 2  # bump when the contact sheet's drawing changes, so cached sheets are redrawn
DHASH_MAX_BITS = 3  # of 64; measured: distinct demo scenes differ in >= 11 bits, a resized JPEG copy in 2
# dHash sees only brightness gradients: every flat image hashes to zero. Pictures also need the
# same colours (mean absolute difference of 8x8 RGB thumbnails, 0..255) to count as duplicates.
COLOUR_MAX_DIFF = 12.0


@dataclass
class ImageRecord:
    path: Path
    digest: str
    size: tuple[int, int]
    dhash: np.ndarray = field(repr=False)
    colours: np.ndarray = field(repr=False)  # (8, 8, 3) thumbnail
    tags: list[str] = field(default_factory=list)
    caption_path: Path | None = None
    source: str = "none"  # "kept" (an existing caption), "tagged", "none" (no caption, no tagger)
    scores: dict[str, float] = field(default_factory=dict)
    duplicate_of: Path | None = None
    subset: int = 0
    thumb: object = field(default=None, repr=False)  # a contact-sheet thumbnail (PIL), made in the one decode
    trigger_added: bool = False


@dataclass
class DatasetReport:
    image_dir: Path
    images: list[ImageRecord]  # every valid image, excluded duplicates included
    rejected: list[tuple[Path, str]]
    duplicate_groups: list[list[Path]]
    caption_dir: Path  # where new captions went: image_dir, or <output.dir>/captions
    settings: dict
    unknown_tags: list[str] = field(default_factory=list)
    dropped_rare: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    backups: list[Path] = field(default_factory=list)
    images_encoded: int = 0
    subsets: list = field(default_factory=list)  # config.Subset, indexed by ImageRecord.subset
    manifest: Manifest | None = None  # what write_manifest wrote: the hand-off to the next stage

    @property
    def kept(self) -> list[ImageRecord]:
        return [r for r in self.images if r.duplicate_of is None]

    @property
    def excluded(self) -> list[ImageRecord]:
        return [r for r in self.images if r.duplicate_of is not None]

    @property
    def tag_frequency(self) -> dict[str, int]:
        return tag_frequency(format_caption(r.tags) for r in self.kept)


@dataclass(frozen=True)
class Manifest:
    """`dataset_manifest.json` as values, resolved once per command (`current_manifest`) and handed
    to the trainer, the results and the run's style figures."""
    subsets: list[Subset]
    # per image: path, digest, size, subset (an index into subsets), caption, caption_file,
    # caption_source, trigger_added, bucket, duplicate_of
    images: list[dict]
    captions_beside: list[bool]  # per subset: the builder writes its captions beside its images (else OUTPUT/captions)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        return cls([Subset.from_dict(s) for s in data["subsets"]], data["images"], data["captions_beside"])

    def style_images(self) -> list:
        """The training set's images (no duplicates, no regularisation images)."""
        from PIL import Image

        return [Image.open(e["path"]) for e in self.images
                if not e["duplicate_of"] and not self.subsets[e["subset"]].is_reg]


def dhash(img) -> np.ndarray:
    """64-bit difference hash: is each pixel of a 9x8 greyscale thumbnail brighter than its left neighbour."""
    from PIL import Image

    a = np.asarray(img.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    return (a[:, 1:] > a[:, :-1]).ravel()


def colour_thumbnail(img) -> np.ndarray:
    from PIL import Image

    return np.asarray(img.resize((8, 8), Image.BILINEAR), dtype=np.float32)


def _duplicate_groups(records: list[ImageRecord], embeddings: np.ndarray | None, cos_threshold: float) -> list[list[int]]:
    """Groups (index lists, in path order) of near-duplicates, by union-find over similar pairs."""
    n = len(records)
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    hashes = np.stack([r.dhash for r in records])  # (N, 64)
    bits = (hashes[:, None, :] != hashes[None, :, :]).sum(-1)  # (N, N) Hamming distances
    colours = np.stack([r.colours for r in records]).reshape(n, -1)  # (N, 192)
    colour_diff = np.abs(colours[:, None, :] - colours[None, :, :]).mean(-1)  # (N, N)
    similar = (bits <= DHASH_MAX_BITS) & (colour_diff <= COLOUR_MAX_DIFF)
    if embeddings is not None:
        similar |= embeddings @ embeddings.T > cos_threshold
    for i, j in zip(*np.nonzero(np.triu(similar, 1))):
        parent[max(root(i), root(j))] = min(root(i), root(j))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _folder_writable(folder: Path) -> bool:
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def refuse_non_caption(path: Path) -> None:
    """Stop before a caption is written over a file that is not a caption: an image, a binary, a big file."""
    if not path.exists():
        return
    head = path.read_bytes()[:65536] if path.is_file() else b""
    text = path.is_file() and path.stat().st_size <= 65536 and b"\0" not in head
    if path.suffix.lower() in IMAGE_EXTENSIONS or not text:
        raise UserError(f"{path}: exists and is not a caption file; it is not overwritten. Move it away, or set "
                        f"[dataset] caption_extension to a caption type such as \".txt\"")


def built_caption_path(image: Path, subset, cfg: Config) -> Path:
    """Where the builder writes a caption when the image folder is read-only: OUTPUT/captions,
    mirroring the image's subfolders (under [dataset] image_dir, else under the subset's folder
    name) so that a/x.png and b/x.png keep separate captions."""
    for root, prefix in ((Path(cfg.dataset.image_dir), Path()), (Path(subset.image_dir), Path(subset.name))):
        try:
            relative = prefix / image.relative_to(root)
            break
        except ValueError:
            relative = prefix / image.name
    return cfg.output_dir / "captions" / relative.with_suffix(subset.caption_extension)


def captions_beside_images(subset) -> bool:
    """True when the builder writes captions beside the subset's images, False when into OUTPUT/captions.
    A writer's check: readers take the builder's answer from the manifest (`Manifest.captions_beside`)."""
    return not subset.is_reg and _folder_writable(Path(subset.image_dir))


def existing_caption(image: Path, subset, cfg: Config, beside_images: bool) -> tuple[Path | None, str]:
    """(caption file, "sidecar" | "builder"), or (None, "none").

    The reader looks first where the builder writes (`captions_beside_images`), so a `--retag`
    of a read-only folder is what trains, not the older sidecar next to the image.
    """
    sidecar, built = image.with_suffix(subset.caption_extension), built_caption_path(image, subset, cfg)
    order = [(sidecar, "sidecar"), (built, "builder")]
    if not beside_images:
        order.reverse()
    for path, source in order:
        if path.is_file():
            return path, source
    return None, "none"


def _scan_subsets(cfg: Config, log) -> tuple[list, list[tuple[Path, int]]]:
    """(resolved subsets, [(image path, subset index)]) in subset order, then path order."""
    subsets = resolve_subsets(cfg, log)
    return subsets, [(path, i) for i, s in enumerate(subsets) for path in scan_images(s.image_dir)]


def _root(subsets) -> Path:
    """The folder the report names files relative to: the common parent of the subsets' folders."""
    import os

    return Path(os.path.commonpath([str(s.image_dir) for s in subsets]))


def build_dataset(cfg: Config, retag: bool | None = None, keep_duplicates: bool | None = None,
                  log=print, tag: bool = True) -> DatasetReport:
    """The dataset stage: scan, validate, dedupe, caption, prune, write (each a function below, in
    that order). `tag=False` (the rebuild of a stale manifest) loads no tagger."""
    c = cfg.caption
    retag = c.retag if retag is None else retag
    subsets, found = _scan_subsets(cfg, log)
    folder = _root(subsets)
    for written_to in (*{s.image_dir for s in subsets if not s.is_reg}, cfg.output_dir):  # captions, reports, caches of a killed run
        remove_stale_temps(written_to, log=log)
    tagger, vocabulary, unknown = None, [], []
    if tag and c.tagger == "open_clip":  # vocabulary problems surface before any image is encoded
        tagger = captioner.load_tagger(c)
        vocabulary, unknown = captioner.checked_vocabulary(tagger, c.vocabulary, log)
    cos_threshold = cfg.dataset.dedupe_threshold
    if tagger is not None:
        cos_threshold = max(cos_threshold, tagger.min_duplicate_cosine)

    records, rejected, by_digest = _scan(cfg, found, tagger, log)
    _validate(records, rejected, folder, log)
    embeddings = np.stack([by_digest[r.digest] for r in records]) if tagger is not None else None
    groups = _dedupe(records, embeddings, cos_threshold, folder, cfg.dataset.dedupe and not keep_duplicates, log)
    kept = [r for r in records if r.duplicate_of is None]
    beside, caption_dir = _caption_places(cfg, subsets, kept, folder, log)
    _caption(cfg, kept, subsets, beside, retag, tagger, vocabulary, by_digest, log)
    dropped = _prune_rare(cfg, kept)
    written, backups = _write_captions(cfg, kept, subsets, beside, caption_dir, log)
    _training_captions(cfg, kept, subsets, log)

    report = DatasetReport(folder, records, rejected, [[records[i].path for i in g] for g in groups], caption_dir,
                           _settings(cfg, cos_threshold, tagger), unknown, dropped, written, backups,
                           tagger.images_encoded if tagger else 0, subsets)
    write_report(cfg, report, log)
    report.manifest = write_manifest(cfg, report, found, beside)
    return report


def _scan(cfg: Config, found: list[tuple[Path, int]], tagger, log) -> tuple[list[ImageRecord], list, dict]:
    """Scan: the one decode of each image, a batch at a time. Its digest, hashes, thumbnail and (on a
    tagger-cache miss) tagger embedding all come from it. Returns (records, [(path, reason)] of the
    rejected, {digest: embedding} when there is a tagger)."""
    from tqdm import tqdm

    d, c = cfg.dataset, cfg.caption
    records, rejected, by_digest = [], [], {}
    if tagger is not None:
        cache = captioner.EmbeddingCache(cfg.output_dir / "cache" / "tagger", tagger, d.background, log)
    chunks = [found[i:i + c.batch_size] for i in range(0, len(found), c.batch_size)]
    for chunk in tqdm(chunks, desc="dataset: reading images", unit="batch", disable=len(chunks) < 2):
        decoded = []
        for path, index in chunk:
            try:
                img = load_image(path, d.max_pixels, d.min_side, d.background)
            except ImageRejected as e:
                rejected.append((path, e.reason))
                continue
            thumb = img.copy()
            thumb.thumbnail((SHEET_CELL, SHEET_CELL))
            records.append(ImageRecord(path, file_digest(path), img.size, dhash(img), colour_thumbnail(img),
                                       subset=index, thumb=thumb))
            decoded.append((records[-1].digest, lambda img=img: img))
        if tagger is not None:
            by_digest.update(captioner.embed_cached(tagger, decoded, cache, c.batch_size, progress=False))
    return records, rejected, by_digest


def _validate(records: list[ImageRecord], rejected: list[tuple[Path, str]], folder: Path, log) -> None:
    """Validate: each reject is said with its reason; a folder without one usable image is refused."""
    for path, reason in rejected:
        log(f"rejected {path.relative_to(folder)}: {reason}")
    if not records:
        why = "; ".join(f"{p.name}: {r}" for p, r in rejected[:5]) or "no image files found"
        raise UserError(f"{folder}: no usable image ({why}); put PNG, JPEG, WebP, BMP, TIFF or GIF images "
                        "there, or point [dataset] image_dir at your image folder")


def _dedupe(records: list[ImageRecord], embeddings: np.ndarray | None, cos_threshold: float, folder: Path,
            exclude: bool, log) -> list[list[int]]:
    """Dedupe: the near-duplicate groups (indices into records), each said; with `exclude`, all but the
    first of a group get `duplicate_of`."""
    groups = _duplicate_groups(records, embeddings, cos_threshold)
    for g in groups:
        first = records[g[0]]
        names = ", ".join(str(records[i].path.relative_to(folder)) for i in g[1:])
        log(f"near-duplicates: {first.path.relative_to(folder)} ~ {names}"
            f"{' (keeping the first only; --keep-duplicates keeps all)' if exclude else ''}")
        if exclude:
            for i in g[1:]:
                records[i].duplicate_of = first.path
    return groups


def _caption_places(cfg: Config, subsets, kept: list[ImageRecord], folder: Path, log) -> tuple[list[bool], Path]:
    """(per subset: captions beside its images, the folder the report names for captions). The one
    writability check of an image folder, made here where the stage writes captions."""
    out = cfg.output_dir
    stems: dict[Path, Path] = {}
    for r in kept:
        other = stems.setdefault(r.path.with_suffix(""), r.path)
        if other != r.path:
            log(f"warning: {other.name} and {r.path.name} share one caption file "
                f"{r.path.with_suffix(subsets[r.subset].caption_extension).name}; rename one of them")
    beside = [captions_beside_images(s) for s in subsets]
    for s, ok in zip(subsets, beside):
        if not ok and not s.is_reg:
            log(f"{s.image_dir} is not writable: captions go to {out / 'captions'} (the trainer reads them there)")
    caption_dir = folder if all(beside[r.subset] for r in kept if not subsets[r.subset].is_reg) else out / "captions"
    return beside, caption_dir


def _caption(cfg: Config, kept: list[ImageRecord], subsets, beside: list[bool], retag: bool, tagger,
             vocabulary: list[str], by_digest: dict, log) -> None:
    """Caption: keep an existing caption unless retagging; tag the rest (regularisation images: never),
    each image's picked tags pruned (`tags.prune`: blacklist, replace, style tags, trigger first)."""
    c = cfg.caption
    to_tag = []
    for r in kept:
        subset = subsets[r.subset]
        existing = existing_caption(r.path, subset, cfg, beside[r.subset])[0]
        if existing and not (retag and not subset.is_reg):
            r.tags, r.caption_path, r.source = parse_caption(read_caption(existing, log)), existing, "kept"
        elif not subset.is_reg:
            to_tag.append(r)
    if to_tag and tagger is not None:
        scores = tagger.score(np.stack([by_digest[r.digest] for r in to_tag]), vocabulary)
        for r, row in zip(to_tag, scores):
            picked = captioner.select_tags(row, vocabulary, c.threshold, c.max_tags)
            r.scores = {t: round(s, 4) for t, s in picked}
            r.tags = prune([t for t, _ in picked], cfg.trigger, c.blacklist, c.replace, c.style_tags)
            r.source = "tagged"


def _prune_rare(cfg: Config, kept: list[ImageRecord]) -> list[str]:
    """Prune: tags rarer than min_tag_count, counted over the whole set, leave the new captions (only
    those are changed). Returns the dropped tags."""
    if not any(r.source == "tagged" for r in kept):
        return []
    pruned, dropped = drop_rare([r.tags for r in kept], cfg.caption.min_tag_count,
                                keep=[cfg.trigger] if cfg.trigger else [])
    for r, tags in zip(kept, pruned):
        if r.source == "tagged":
            r.tags = tags
    return dropped


def _write_captions(cfg: Config, kept: list[ImageRecord], subsets, beside: list[bool], caption_dir: Path,
                    log) -> tuple[list[Path], list[Path]]:
    """Write: the new captions, only where the text changes (a re-run touches nothing); a replaced
    caption is backed up first. Returns (written, backups)."""
    written, backups = [], []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for r in kept:
        if r.source != "tagged":
            continue
        subset, writable = subsets[r.subset], beside[r.subset]
        target = r.path.with_suffix(subset.caption_extension) if writable else built_caption_path(r.path, subset, cfg)
        old = existing_caption(r.path, subset, cfg, writable)[0]
        text = format_caption(r.tags) + "\n"
        r.caption_path = target
        if old is not None and old.read_bytes() == text.encode("utf-8") and old == target:
            continue
        refuse_non_caption(target)
        if old is not None and old.parent == target.parent:
            backup, n = old.with_name(f"{old.name}.bak-{stamp}"), 1
            while backup.exists():  # two --retag runs within a second: never replace a backup
                backup, n = old.with_name(f"{old.name}.bak-{stamp}-{n}"), n + 1
            with atomic_path(backup) as tmp:  # a full disk leaves no half backup under its name
                shutil.copy2(old, tmp)
            backups.append(backup)
        atomic_write_text(target, text)
        written.append(target)
    if backups:
        log(f"--retag: {len(backups)} previous captions backed up as *.bak-{stamp}")
    if written:
        log(f"wrote {len(written)} captions in {caption_dir}")
    return written, backups


def _training_captions(cfg: Config, kept: list[ImageRecord], subsets, log) -> None:
    """The training captions (what the manifest hands on): class tokens for an image without a
    caption; the trigger first where a training caption lacks it."""
    for r in kept:
        subset = subsets[r.subset]
        if r.source == "none" and subset.class_tokens:
            r.tags, r.source = parse_caption(subset.class_tokens), "class_tokens"
        r.tags, r.trigger_added = with_trigger(r.tags, cfg.trigger, subset.is_reg)
    added = sum(r.trigger_added for r in kept)
    if added:
        log(f"{added} caption(s) lack the trigger '{cfg.trigger}': training puts it first (keep_tokens counts it)")


def with_trigger(tags: list[str], trigger: str, is_reg: bool) -> tuple[list[str], bool]:
    """(training tags, whether the trigger was added): the trigger first when a training caption
    lacks it; regularisation captions never get it."""

    if not trigger or is_reg or any(tag_key(t) == tag_key(trigger) for t in tags):
        return tags, False
    return [trigger, *tags], True


def _settings(cfg: Config, cos_threshold: float, tagger) -> dict:
    d, c = cfg.dataset, cfg.caption
    return {
        "trigger": cfg.trigger, "max_pixels": d.max_pixels, "min_side": d.min_side, "background": d.background,
        "dedupe": d.dedupe, "dedupe_threshold": d.dedupe_threshold, "dedupe_cosine_used": cos_threshold,
        "dhash_max_bits": DHASH_MAX_BITS, "tagger": c.tagger, "model": c.model, "pretrained": c.pretrained,
        "vocabulary": c.vocabulary, "threshold": c.threshold, "max_tags": c.max_tags, "blacklist": c.blacklist,
        "replace": c.replace, "style_tags": c.style_tags, "min_tag_count": c.min_tag_count,
        "tagger_identity": tagger.identity if tagger else None,
    }


def report_dict(report: DatasetReport) -> dict:
    def rel(p: Path) -> str:
        return p.relative_to(report.image_dir).as_posix()

    return {
        "image_dir": str(report.image_dir),
        "caption_dir": str(report.caption_dir),
        "settings": report.settings,
        "counts": {"valid": len(report.images), "kept": len(report.kept), "rejected": len(report.rejected),
                   "excluded": len(report.excluded)},
        "kept": [{"file": rel(r.path), "digest": r.digest, "size": list(r.size), "caption": format_caption(r.tags),
                  "caption_file": str(r.caption_path) if r.caption_path else None, "source": r.source,
                  "subset": report.subsets[r.subset].name if report.subsets else None,
                  "trigger_added": r.trigger_added, "scores": r.scores} for r in report.kept],
        "rejected": [{"file": rel(p), "reason": reason} for p, reason in report.rejected],
        "duplicate_groups": [[rel(p) for p in g] for g in report.duplicate_groups],
        "excluded": [{"file": rel(r.path), "digest": r.digest, "duplicate_of": rel(r.duplicate_of)}
                     for r in report.excluded],
        "subsets": [{**sub.to_dict(), "images": sum(r.subset == i for r in report.kept)}
                    for i, sub in enumerate(report.subsets)],
        "tag_frequency": report.tag_frequency,
        "unknown_tags": report.unknown_tags,
        "dropped_rare_tags": report.dropped_rare,
    }


def report_markdown(data: dict) -> str:
    s = data["settings"]
    lines = [f"# Dataset report: {data['image_dir']}", "",
             f"{data['counts']['kept']} images kept, {data['counts']['rejected']} rejected, "
             f"{data['counts']['excluded']} excluded as near-duplicates. Captions in {data['caption_dir']}.", "",
             "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in s.items()]
    lines += ["", "## Subsets", "", "| folder | images | repeats | class tokens | kind |", "|---|---|---|---|---|"]
    lines += [f"| {sub['image_dir']} | {sub['images']} | {sub['num_repeats']} | {sub['class_tokens']} | "
              f"{'regularisation' if sub['is_reg'] else 'validation' if sub['validation'] else 'training'} |"
              for sub in data["subsets"]]
    lines += ["", "## Kept images", "", "| image | size | source | caption |", "|---|---|---|---|"]
    lines += [f"| {r['file']} | {r['size'][0]}x{r['size'][1]} | {r['source']} | {r['caption']} |" for r in data["kept"]]
    if data["rejected"]:
        lines += ["", "## Rejected", "", "| file | reason |", "|---|---|"]
        lines += [f"| {r['file']} | {r['reason']} |" for r in data["rejected"]]
    if data["duplicate_groups"]:
        lines += ["", "## Near-duplicate groups (the first of each is kept)", ""]
        lines += [f"- {', '.join(g)}" for g in data["duplicate_groups"]]
        if data["excluded"]:
            lines += ["", "Excluded from training: " + ", ".join(e["file"] for e in data["excluded"])]
    lines += ["", "## Tag frequency (images carrying each tag)", "", "| tag | images |", "|---|---|"]
    lines += [f"| {t} | {n} |" for t, n in data["tag_frequency"].items()]
    added = sum(r["trigger_added"] for r in data["kept"])
    if added:
        trigger = data["settings"]["trigger"]
        lines += ["", f"{added} caption(s) lack the trigger '{trigger}': training puts it first (keep_tokens counts it)."]
    if data["unknown_tags"]:
        lines += ["", f"{len(data['unknown_tags'])} vocabulary tags are unknown to this tagger and were not scored."]
    if data["dropped_rare_tags"]:
        lines += ["", f"Dropped as rarer than min_tag_count: {', '.join(data['dropped_rare_tags'])}"]
    return "\n".join(lines) + "\n"


def contact_sheet(report: DatasetReport, cfg: Config, columns: int = 5, cell: int = SHEET_CELL):
    """Thumbnails of the kept (and excluded) images, each with its final caption underneath."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    max_lines, line_h = 6, 11
    text_h = max_lines * line_h + 4
    rows = (len(report.images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(report.images):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        thumb = r.thumb
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        if r.duplicate_of is not None:
            text, colour = f"EXCLUDED: duplicate of {r.duplicate_of.name}", (200, 0, 0)
        else:
            text, colour = f"{r.path.name}: {format_caption(r.tags) or '(no caption)'}", (0, 0, 0)
        lines = textwrap.wrap(text, width=cell // 6)
        if len(lines) > max_lines:
            lines = lines[:max_lines - 1] + [lines[max_lines - 1] + " ..."]
        for k, line in enumerate(lines):
            draw.text((x + 2, y + cell + k * line_h), line, fill=colour, font=font)
    return sheet


def _write_if_changed(path: Path, data: bytes) -> None:
    if not (path.is_file() and path.read_bytes() == data):
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)


def write_report(cfg: Config, report: DatasetReport, log=print) -> None:
    import io

    out = cfg.output_dir
    data = report_dict(report)
    _write_if_changed(out / REPORT_MARKER, (json.dumps(data, indent=1) + "\n").encode())
    _write_if_changed(out / REPORT_MD, report_markdown(data).encode())
    # The sheet shows image contents and captions only: keyed by those, re-rendered when they change.
    from PIL import Image, PngImagePlugin

    key = hashlib.sha256(json.dumps([SHEET_LAYOUT] + [(r.digest, r.tags, str(r.duplicate_of)) for r in report.images]).encode()).hexdigest()
    sheet_path = out / CONTACT_SHEET
    try:
        with Image.open(sheet_path) as old:
            current = old.text.get("sdlora-key") == key
    except (OSError, AttributeError):
        current = False
    if not current:
        info = PngImagePlugin.PngInfo()
        info.add_text("sdlora-key", key)
        buf = io.BytesIO()
        contact_sheet(report, cfg).save(buf, "PNG", pnginfo=info)
        _write_if_changed(sheet_path, buf.getvalue())
    tagged = (f"{report.images_encoded} images encoded by the tagger (the rest cached); "
              if report.settings["tagger_identity"] else "")
    log(f"dataset: {len(report.kept)} kept, {len(report.rejected)} rejected, {len(report.excluded)} excluded, "
        f"{tagged}"
        f"report {out / REPORT_MD}, contact sheet {out / CONTACT_SHEET}")


def _source_stats(cfg: Config, subsets, found: list[tuple[Path, int]], beside: list[bool]) -> dict[str, list]:
    """What a manifest was built from, by file stat only (no hashing, no decoding): every scanned
    image's size and mtime, and the caption file the trainer would read for it with its stat.
    beside: per subset, whether the builder writes captions beside the images (where the reader looks first)."""
    import os

    def stat(path: Path | None):
        if path is None:
            return None
        st = os.stat(path)
        return [str(path), st.st_size, st.st_mtime_ns]

    return {str(path): [stat(path)[1:], stat(existing_caption(path, subsets[i], cfg, beside[i])[0])]
            for path, i in found}


def _manifest_key(cfg: Config, subsets) -> str:
    """The settings a manifest depends on: subsets, trigger, image checks, de-duplication, buckets."""
    d = cfg.dataset
    keys = ("max_pixels", "min_side", "background", "dedupe", "dedupe_threshold", "resolution", "enable_bucket",
            "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
    data = [MANIFEST_VERSION, cfg.trigger, [s.to_dict() for s in subsets], {k: getattr(d, k) for k in keys}]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def image_bucket(size: tuple[int, int], cfg: Config):
    """The training bucket of an image of `size` under the [dataset] bucket settings."""

    d = cfg.dataset
    reso = resolution_pair(d.resolution)
    if not d.enable_bucket:
        return Bucket(*reso)
    buckets = make_buckets(reso, d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps)
    return assign_bucket(*size, buckets, reso[0] * reso[1], d.bucket_reso_steps, d.bucket_no_upscale)


def _caption_source(r: ImageRecord, cfg: Config) -> str:
    """Where a training caption comes from: "sidecar" (beside the image), "builder" (OUTPUT/captions),
    "class_tokens" (its subset's), or "none" (no caption: the trigger alone)."""
    if r.caption_path is None:
        return "class_tokens" if r.source == "class_tokens" else "none"
    return "builder" if (cfg.output_dir / "captions") in r.caption_path.parents else "sidecar"


def write_manifest(cfg: Config, report: DatasetReport, found: list[tuple[Path, int]], beside: list[bool]) -> Manifest:
    """`dataset_manifest.json`: the one hand-off to the trainer and the up-to-date check; returns it as read."""
    images = []
    for r in report.images:
        bucket = image_bucket(r.size, cfg)
        images.append({
            "path": str(r.path), "digest": r.digest, "size": list(r.size), "subset": r.subset,
            "caption": format_caption(r.tags), "caption_file": str(r.caption_path) if r.caption_path else None,
            "caption_source": _caption_source(r, cfg), "trigger_added": r.trigger_added, "bucket": [bucket.width, bucket.height],
            "duplicate_of": str(r.duplicate_of) if r.duplicate_of else None})
    data = {"version": MANIFEST_VERSION, "key": _manifest_key(cfg, report.subsets),
            "subsets": [s.to_dict() for s in report.subsets], "captions_beside": beside, "images": images,
            "sources": _source_stats(cfg, report.subsets, found, beside)}
    text = json.dumps(data, indent=1) + "\n"
    _write_if_changed(cfg.output_dir / MANIFEST, text.encode())
    return Manifest.from_dict(json.loads(text))  # as a reader gets it (tuples become lists)


def read_manifest(cfg: Config, log=lambda m: None) -> Manifest | None:
    """The manifest when it is current for this config and these files (stat-checked), else None
    (a damaged one is said). Reads only: nothing is written, no folder probed for writability."""
    path = cfg.output_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
            return None
        [(e["path"], e["digest"], e["subset"], e["caption"], e["bucket"]) for e in data["images"]]
        manifest = Manifest.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(f"warning: {path} is damaged ({type(e).__name__}); the dataset stage writes it again")
        return None
    subsets, found = _scan_subsets(cfg, log)
    if data.get("key") != _manifest_key(cfg, subsets) or len(manifest.captions_beside) != len(subsets):
        return None
    try:
        current = _source_stats(cfg, subsets, found, manifest.captions_beside)
    except OSError:
        return None
    return manifest if json.loads(json.dumps(current)) == data.get("sources") else None


def current_manifest(cfg: Config, log=print) -> Manifest:
    """The freshness step of a command's entry point: the manifest, rebuilt by the dataset stage
    (without tagging) when missing or stale. Called once per command; the result is handed down."""
    manifest = read_manifest(cfg, log)
    if manifest is None:
        log(f"{cfg.output_dir / MANIFEST} is missing or out of date: reading the dataset "
            f"(`sdlora dataset {cfg.source}` also auto-tags)")
        manifest = build_dataset(cfg, log=log, tag=False).manifest
    return manifest
