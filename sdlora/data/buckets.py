"""Aspect-ratio buckets: each image trains at the bucket closest to its own aspect ratio.

Buckets tile aspect ratios at a fixed pixel area (resolution^2): sides are multiples of
`step` within [min_reso, max_reso]. An image is resized to cover its bucket (never
squashed) and centre-cropped by at most the rounding remainder. With `no_upscale`,
an image smaller than the bucket area gets a bucket of its own size (rounded down to the
step) instead of being enlarged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def make_buckets(resolution: tuple[int, int], min_reso: int, max_reso: int, step: int) -> list[Bucket]:
    """All (w, h) with w*h <= the target area, sides multiples of step, each as large as it can be."""
    max_area = resolution[0] * resolution[1]
    buckets = set()
    w = min_reso
    while w <= max_reso:
        h = min(max_reso, (max_area // w) // step * step)
        if h >= min_reso:
            buckets.add(Bucket(w, h))
            buckets.add(Bucket(h, w))
        w += step
    return sorted(buckets, key=lambda b: b.aspect)


def assign_bucket(width: int, height: int, buckets: list[Bucket], area: int, step: int,
                  no_upscale: bool = False) -> Bucket:
    if no_upscale and width * height <= area:
        w, h = max(step, width // step * step), max(step, height // step * step)
        return Bucket(w, h)
    if no_upscale:  # larger than the area: shrink to the area keeping the aspect, then round down
        scale = math.sqrt(area / (width * height))
        return Bucket(max(step, int(width * scale) // step * step), max(step, int(height * scale) // step * step))
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b.aspect) - aspect))


def covering_size(size: tuple[int, int], bucket: Bucket) -> tuple[int, int]:
    """(width, height) of an image of `size` resized to cover the bucket, aspect kept."""
    width, height = size
    scale = max(bucket.width / width, bucket.height / height)
    return max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale))


def crop_top_left(size: tuple[int, int], bucket: Bucket, flipped: bool = False) -> tuple[int, int]:
    """(top, left) of the centre crop in the resized image (SDXL's crop conditioning); the crop of
    the mirror image when `flipped`."""
    w, h = covering_size(size, bucket)
    left, top = (w - bucket.width) // 2, (h - bucket.height) // 2
    return top, (w - bucket.width - left) if flipped else left


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover the bucket, then centre-crop; returns the image and the crop's top-left."""
    w, h = covering_size(image.size, bucket)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.LANCZOS)
    top, left = crop_top_left(image.size, bucket)
    return image.crop((left, top, left + bucket.width, top + bucket.height)), (top, left)


def resolution_pair(resolution) -> tuple[int, int]:
    """Config `resolution`: an int (square) or [width, height]."""
    return (resolution, resolution) if isinstance(resolution, int) else (resolution[0], resolution[1])
