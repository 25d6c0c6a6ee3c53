"""open_clip zero-shot multi-label tagger over a tag vocabulary.

Each image is encoded once (embeddings cached on disk by model identity and file content,
so a new threshold or vocabulary re-encodes nothing), each vocabulary tag once per run,
and every (image, tag) pair gets a probability-like score in [0, 1]:

- models trained with a sigmoid loss (a `logit_bias`, SigLIP-style, like the embedded
  tiny tagger): score = sigmoid(logit_scale.exp() * cos(image, text(tag)) + logit_bias),
  the text being the bare tag, exactly as the model was trained;
- standard CLIP models (softmax-trained, no bias): per tag, a two-way softmax of the image
  against "a photo of {tag}" and the neutral "a photo", at the model's logit scale:
  score = sigmoid(logit_scale.exp() * (cos(image, "a photo of {tag}") - cos(image, "a photo"))).
  0.5 means "the tag describes the image no better than nothing"; a raw cosine has no such
  fixed point and would need a threshold per model.

Tags scoring above `threshold` are kept, most confident first, at most `max_tags`.

The embedded tiny tagger (`model = "tiny"`) was trained on a fixed tag list, stored as
`known_tags` in `assets/open_clip/tiny.json`; it scores other tags arbitrarily (measured:
318 of 319 unknown scenery tags fire on the demo set), so with it only the known tags of
the vocabulary are scored and the others are reported as unknown.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdlora import ASSETS
from sdlora.errors import UserError
from sdlora.io import atomic_path, read_caption

OPEN_CLIP = ASSETS / "open_clip"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_TEMPLATE, CLIP_NEUTRAL = "a photo of {}", "a photo"
PREPROCESS_VERSION = "v1"  # bump when preprocessing changes: old cached embeddings are then ignored

DEFAULT_VOCABULARY = ASSETS / "vocabulary" / "general.txt"


def read_vocabulary(path: str | Path) -> list[str]:
    """One tag per line; `#` starts a comment; blank lines and repeats (any case) ignored.
    An empty path is the packaged general vocabulary (DEFAULT_VOCABULARY)."""
    path = Path(path) if path else DEFAULT_VOCABULARY
    if not path.is_file():
        raise UserError(f"{path}: tag vocabulary not found; set [caption] vocabulary to a text file "
                        "with one tag per line, or leave it empty for the packaged vocabulary")
    tags, seen = [], set()

    for line in read_caption(path).splitlines():  # a tag list is read like a caption (UTF-8, reported fallback)
        tag = " ".join(line.split("#", 1)[0].split())
        if tag and tag.lower() not in seen:
            seen.add(tag.lower())
            tags.append(tag)
    if not tags:
        raise UserError(f"{path}: the tag vocabulary is empty; add one tag per line")
    return tags


@dataclass
class Tagger:
    """An open_clip model with its preprocessing, loaded lazily (a fully cached re-run never loads it)."""

    name: str
    identity: str  # what cached embeddings are keyed by: weights + preprocessing
    loader: object = field(repr=False)  # () -> (model, tokenizer, preprocess)
    known_tags: list[str] | None = None  # the tags the model can score; None = any text
    device: str = "cpu"
    min_duplicate_cosine: float = 0.0  # a floor under dedupe_threshold for coarse embeddings (tiny.json)
    _loaded: tuple | None = field(default=None, repr=False)
    images_encoded: int = 0  # by this tagger: the dataset report says it; a re-run of an unchanged folder adds none

    def _load(self):
        if self._loaded is None:
            self._loaded = self.loader()
        return self._loaded

    def embed_images(self, images: list) -> np.ndarray:
        """(N, D) unit-norm float32 image embeddings of PIL RGB images."""
        import torch

        model, _, preprocess = self._load()
        x = torch.stack([preprocess(img) for img in images]).to(self.device)  # (N, 3, S, S)
        with torch.no_grad():
            emb = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
        self.images_encoded += len(images)
        return emb.cpu().numpy().astype(np.float32)

    def score(self, image_emb: np.ndarray, tags: list[str]) -> np.ndarray:
        """(N, T) scores in [0, 1] of every image against every tag (see the module docstring)."""
        import torch

        model, tokenizer, _ = self._load()
        img = torch.from_numpy(image_emb).to(self.device)
        scale = model.logit_scale.exp().float()
        bias = getattr(model, "logit_bias", None)
        with torch.no_grad():
            def texts(strings):
                return torch.nn.functional.normalize(model.encode_text(tokenizer(strings).to(self.device)).float(), dim=-1)
            if bias is not None:
                logits = scale * img @ texts(tags).T + bias.float()
            else:
                cos = img @ texts([CLIP_TEMPLATE.format(t) for t in tags]).T  # (N, T)
                neutral = img @ texts([CLIP_NEUTRAL]).T  # (N, 1)
                logits = scale * (cos - neutral)
        return torch.sigmoid(logits).cpu().numpy()

    def scorable(self, vocabulary: list[str]) -> tuple[list[str], list[str]]:
        """(tags this model can score, tags it does not know)."""
        if self.known_tags is None:
            return list(vocabulary), []
        known = {t.lower() for t in self.known_tags}
        return [t for t in vocabulary if t.lower() in known], [t for t in vocabulary if t.lower() not in known]


def _resize_normalize(size: int):
    """The tiny tagger's preprocessing: the whole picture squashed to size x size (it was trained
    on whole square scenes; a centre crop would cut the sun or moon out of wide frames), then
    OpenAI CLIP mean/std."""
    import torch
    from PIL import Image

    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)

    def preprocess(img):
        a = np.array(img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        return (torch.from_numpy(a).permute(2, 0, 1) - mean) / std  # (3, S, S)
    return preprocess


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tiny_tagger(device: str | None = None) -> Tagger:
    """The embedded open_clip tagger: `assets/open_clip/tiny.json` + `tiny.safetensors`, fp32."""
    from sdlora.models.load import (
        compute_device,  # here: importing this module stays free of torch
    )

    cfg = json.loads((OPEN_CLIP / "tiny.json").read_text())
    known = cfg.pop("known_tags", None)
    floor = cfg.pop("min_duplicate_cosine", 0.0)
    weights = OPEN_CLIP / "tiny.safetensors"
    device = device or compute_device()
    identity = _digest(f"tiny|{_digest(weights.read_bytes())}|squash|{PREPROCESS_VERSION}".encode())[:16]

    def load():
        import open_clip
        from open_clip.model import CLIP
        from safetensors.torch import load_file

        model = CLIP(**cfg)
        model.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
        model.eval().to(device)
        return model, open_clip.get_tokenizer("ViT-B-32"), _resize_normalize(cfg["vision_cfg"]["image_size"])
    return Tagger("tiny", identity, load, known, device, floor)


def _check_arch(arch: str) -> None:
    import open_clip

    if arch not in open_clip.list_models():
        raise UserError(f"[caption] model = {arch!r} is not an open_clip architecture; use 'tiny' (embedded) "
                        f"or one of open_clip.list_models(), e.g. 'ViT-L-14'")


def open_clip_tagger(arch: str, pretrained: str = "", device: str | None = None) -> Tagger:
    """An open_clip architecture with a local checkpoint, a pretrained tag (downloads), or random
    weights (`pretrained=""`, for benchmarks only)."""
    import open_clip

    from sdlora.models.load import compute_device

    _check_arch(arch)
    device = device or compute_device()
    source = pretrained
    if pretrained:
        path = Path(pretrained)
        if path.is_file():
            st = path.stat()
            source = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        elif "/" in pretrained or path.suffix in (".safetensors", ".pt", ".pth", ".bin"):
            raise UserError(f"[caption] pretrained = {pretrained!r}: file not found; give a local open_clip "
                            f"checkpoint or a pretrained tag such as 'openai' (downloads)")
        elif pretrained not in open_clip.list_pretrained_tags_by_model(arch):
            raise UserError(f"[caption] pretrained = {pretrained!r} is not a pretrained tag of {arch}; known: "
                            f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}")
    identity = _digest(f"{arch}|{source}|{PREPROCESS_VERSION}".encode())[:16]

    def load():
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None,
                                                                         device=device)
        except (OSError, RuntimeError) as e:
            raise UserError(f"[caption] could not load open_clip {arch} with pretrained={pretrained!r}: {e}") from None
        model.eval()
        return model, open_clip.get_tokenizer(arch), preprocess
    return Tagger(arch, identity, load, None, device)


def load_tagger(caption_cfg, device: str | None = None) -> Tagger:
    if caption_cfg.model == "tiny":
        return tiny_tagger(device)
    _check_arch(caption_cfg.model)
    if not caption_cfg.pretrained:
        raise UserError(f"[caption] model = {caption_cfg.model!r} needs [caption] pretrained: a local open_clip "
                        "checkpoint file, or a pretrained tag such as 'openai' (downloads)")
    return open_clip_tagger(caption_cfg.model, caption_cfg.pretrained, device)


class EmbeddingCache:
    """Image embeddings on disk: `<folder>/<tagger identity>/<file sha256>.npy`, written atomically."""

    def __init__(self, folder: Path, tagger: Tagger, background: str, log):
        self.log = log
        key = _digest(f"{tagger.identity}|{background}".encode())[:16]  # transparency is composited on it
        self.folder = Path(folder) / key

    def get(self, digest: str) -> np.ndarray | None:
        path = self.folder / f"{digest}.npy"
        if not path.is_file():
            return None
        try:
            return np.load(path)
        except (OSError, ValueError, EOFError) as e:  # a damaged entry is recomputed, not trusted
            self.log(f"cache: {path} was damaged ({type(e).__name__}); rebuilding it")
            return None

    def put(self, digest: str, emb: np.ndarray) -> None:
        with atomic_path(self.folder / f"{digest}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, emb)


def embed_cached(tagger: Tagger, items: list[tuple[str, object]], cache: EmbeddingCache, batch_size: int,
                 progress: bool = True) -> dict[str, np.ndarray]:
    """{digest: embedding} for (digest, load_fn) items; `load_fn()` -> PIL image is called only on a miss."""
    from tqdm import tqdm

    out, missing = {}, []
    for digest, load in items:
        emb = cache.get(digest)
        if emb is None:
            missing.append((digest, load))
        else:
            out[digest] = emb
    batches = [missing[i:i + batch_size] for i in range(0, len(missing), batch_size)]
    for batch in tqdm(batches, desc="tagger: encoding images", unit="batch", disable=not (progress and batches)):
        embs = tagger.embed_images([load() for _, load in batch])
        for (digest, _), emb in zip(batch, embs):
            cache.put(digest, emb)
            out[digest] = emb
    return out


def checked_vocabulary(tagger: "Tagger", path: str | Path, log=print) -> tuple[list[str], list[str]]:
    """(the vocabulary's tags this tagger scores, those it does not know): read and checked before
    any image is encoded, so a vocabulary mistake costs no tagging time."""
    vocabulary, unknown = tagger.scorable(read_vocabulary(path))
    name = path or "the packaged vocabulary"
    # The packaged vocabulary is meant for every tagger; that a small one scores part of it is no news
    # to the user (the dataset report lists the tags). A vocabulary the user wrote is theirs to fix.
    if unknown and path:
        log(f"note: {len(unknown)} tags of {path} will never be written: the {tagger.name} tagger was not "
            f"trained on them (e.g. {', '.join(unknown[:5])}); remove them, or choose another caption.model")
    if not vocabulary:
        raise UserError(f"{name}: none of its tags is known to the {tagger.name} tagger; "
                        f"it knows: {', '.join(tagger.known_tags or [])}")
    return vocabulary, unknown


def select_tags(scores: np.ndarray, tags: list[str], threshold: float, max_tags: int) -> list[tuple[str, float]]:
    """(tag, score) above threshold, most confident first, at most max_tags (one image's row)."""
    order = np.argsort(-scores, kind="stable")
    return [(tags[i], float(scores[i])) for i in order[:max_tags] if scores[i] > threshold]
