"""Style measurements: does an adapter move images toward the style set?

- colourfulness M of Hasler and Suesstrunk (2003): with rg = R - G and yb = (R + G)/2 - B,
  M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)   (0..~150)
- hue/saturation histogram (HSV, 18 hue x 8 saturation bins, weighted by value so dark
  pixels' noisy hues count little) and the Hellinger distance between two such histograms.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def colourfulness(image: Image.Image) -> float:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def hue_sat_histogram(images, hue_bins: int = 18, sat_bins: int = 8) -> np.ndarray:
    total = np.zeros((hue_bins, sat_bins))
    for image in images:
        hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float64) / 255.0
        h, s, v = hsv[..., 0].ravel(), hsv[..., 1].ravel(), hsv[..., 2].ravel()
        hist, _, _ = np.histogram2d(h, s, bins=(hue_bins, sat_bins), range=((0, 1), (0, 1)), weights=v)
        total += hist / max(hist.sum(), 1e-12)
    return total / max(total.sum(), 1e-12)


def hellinger(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sqrt(0.5 * np.sum((np.sqrt(p) - np.sqrt(q)) ** 2)))


def style_shift(base_images, lora_images, style_images) -> dict:
    """Figures of the acceptance check: colourfulness ratio and histogram distances to the style set."""
    style_hist = hue_sat_histogram(style_images)
    base_c = float(np.mean([colourfulness(i) for i in base_images]))
    lora_c = float(np.mean([colourfulness(i) for i in lora_images]))
    return {
        "colourfulness_base": base_c,
        "colourfulness_lora": lora_c,
        "colourfulness_style_set": float(np.mean([colourfulness(i) for i in style_images])),
        "colourfulness_ratio": lora_c / max(base_c, 1e-9),
        "hist_distance_base": hellinger(hue_sat_histogram(base_images), style_hist),
        "hist_distance_lora": hellinger(hue_sat_histogram(lora_images), style_hist),
    }
