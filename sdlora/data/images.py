"""Open any training image safely: one 8-bit RGB picture out, or a short reason why not.

`load_image` reads the header first and refuses images larger than `max_pixels` before a
single pixel is decoded (decompression bombs), then decodes fully (so truncated files
fail here, not in the trainer), applies the EXIF orientation, and converts every mode
to 8-bit RGB: palette, greyscale, CMYK and 16-bit images are converted (16-bit values
scaled to 8 bits, not clipped), and transparency is composited on `background`.
Originals are only read, never modified.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from sdlora.errors import UserError
from sdlora.io import IMAGE_EXTENSIONS

ACCEPTED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "BMP", "TIFF", "GIF"}  # MPO: multi-picture JPEG (phones)

# The dataset builder's own outputs, skipped when the output folder sits inside the image folder.
REPORT_MARKER = "dataset_report.json"
CONTACT_SHEET = "dataset_contact_sheet.png"


class ImageRejected(Exception):
    """An image that cannot be used for training; `reason` is short and human-readable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def scan_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursive, sorted, extension case-insensitive).

    Hidden files and folders are skipped, and so is any folder holding a dataset report
    (our own output folder) and the contact sheet.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder not found; set [dataset] image_dir to a folder of images")
    found = []
    for root, dirs, files in os.walk(folder):
        if Path(root) != folder and REPORT_MARKER in files:
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or name == CONTACT_SHEET:
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(root) / name)
    return sorted(found)


def parse_background(colour: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(colour)[:3]
    except ValueError:
        raise UserError(f"[dataset] background = {colour!r} is not a colour; use e.g. '#ffffff' or 'white'") from None


def load_image(path: str | Path, max_pixels: int, min_side: int, background: str = "#ffffff") -> Image.Image:
    """The image at `path` as a fully decoded 8-bit RGB PIL image, or `ImageRejected(reason)`."""
    path = Path(path)
    bg = parse_background(background)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageRejected(f"cannot read: {e.strerror}") from None
    if size == 0:
        raise ImageRejected("empty file (0 bytes)")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # the user raised the limit; _check_header enforces it
    try:
        with Image.open(path) as img:
            _check_header(img, max_pixels, min_side)
            try:
                img.load()  # decode everything now: a truncated file fails here
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                raise ImageRejected(f"truncated or corrupt {img.format} ({e})") from None
            upright = ImageOps.exif_transpose(img)
            return to_rgb8(upright, bg)
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"too large, a possible decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image (unrecognised file contents)") from None
    except OSError as e:  # some plugins fail while reading the header of a broken file
        raise ImageRejected(f"unreadable image ({e})") from None


def _check_header(img: Image.Image, max_pixels: int, min_side: int) -> None:
    if img.format not in ACCEPTED_FORMATS:
        raise ImageRejected(f"unsupported format {img.format}; use PNG, JPEG, WebP, BMP, TIFF or GIF")
    w, h = img.size
    if w * h > max_pixels:
        raise ImageRejected(f"too large: {w}x{h} = {w * h:,} pixels > max_pixels {max_pixels:,}")
    if min(w, h) < min_side:
        raise ImageRejected(f"too small: {w}x{h}, shorter side < min_side {min_side}")


def to_rgb8(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; alpha (or a transparent palette entry) composited on `background`."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = Image.fromarray(_high_depth_to_uint8(img), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """16-bit (and 32-bit int / float) greyscale -> uint8 by scaling the full range, not clipping.

    16-bit modes and "I" (how some plugins hold 16-bit data) map 0..65535 to 0..255;
    float images map 0..1 to 0..255 when they lie in [0, 1], else their own min..max.
    """
    a = np.asarray(img)
    if img.mode == "F":
        lo, hi = (0.0, 1.0) if a.min() >= 0 and a.max() <= 1 else (float(a.min()), float(a.max()) or 1.0)
        a = (a - lo) / max(hi - lo, 1e-12) * 255.0
    else:
        a = a.astype(np.float64) / 257.0  # 65535 / 257 = 255 exactly
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)
