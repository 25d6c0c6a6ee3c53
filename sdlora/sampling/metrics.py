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


# ---------------------------------------------------------------------------------------------
# Artefacts of rendering far above a base's native size
#
# A denoiser run on a latent several times larger than it was trained on answers out of
# distribution with periodic diagonal hatching; tiling it (sampling/tiled.py) can leave seams.
# Both are measured against what the picture would be without the large pass.


def _luma(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def offaxis_hf_share(image: Image.Image, cycles: float = 8.0, axis_deg: float = 15.0) -> float:
    """Share of the image's spectral energy (DC left out) at frequencies of at least `cycles` per
    short side whose direction is more than `axis_deg` from both axes.

    Periods under an eighth of the short side (90 px at 1080x720) are texture, not composition.
    Natural scenes (horizons, trunks, cloud bands) put their fine energy near the axes; the
    hatching of an out-of-distribution denoiser is diagonal. A Hann window keeps the image's own
    borders from leaking a cross of energy along the axes. With this band, the renders of the
    old single-pass hires on the demo score 1.5x-20x their Lanczos reference, as measured when
    the problem was filed.
    """
    luma = _luma(image)
    h, w = luma.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2((luma - luma.mean()) * window)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")  # cycles per pixel
    radius = np.hypot(fx, fy)
    angle = np.degrees(np.arctan2(np.abs(fy), np.abs(fx)))  # 0 = horizontal frequency, 90 = vertical
    band = (radius >= cycles / min(h, w)) & (angle > axis_deg) & (angle < 90.0 - axis_deg)
    total = power.sum() - power[0, 0]
    return float(power[band].sum() / total) if total > 0 else 0.0


def artefact_ratio(image: Image.Image, reference: Image.Image) -> float:
    """offaxis_hf_share of `image` over that of `reference` (the Lanczos upscale of the native
    render, same size): 1 = no more off-axis fine texture than the upscale, hatching scores several x."""
    if image.size != reference.size:
        raise ValueError(f"artefact_ratio: sizes differ, {image.size} vs {reference.size}")
    return offaxis_hf_share(image) / max(offaxis_hf_share(reference), 1e-12)


def seam_score(image: Image.Image, xs, ys, neighbourhood: int = 16) -> float:
    """How much the picture jumps across tile borders compared with the pixels beside them.

    For a border between columns x-1 and x, g(x) = mean over rows of |I[:, x] - I[:, x-1]|; each
    border scores g(x) over the median g of the columns within `neighbourhood` px of it (content
    that changes across the picture cancels out), rows likewise with ys; the result is the mean
    over borders. Blended tiles score ~1 (a border is an ordinary column); hard seams score
    many x. Borders at 0 or at the image's edge are ignored.
    """
    luma = _luma(image)
    scores = []
    for grad, borders in ((np.abs(np.diff(luma, axis=1)).mean(axis=0), xs),
                          (np.abs(np.diff(luma, axis=0)).mean(axis=1), ys)):
        for b in borders:
            i = int(b) - 1  # grad[i] is the jump between pixels i and i + 1: the border at b
            if 0 <= i < len(grad) - 1 and b > 0:
                near = grad[max(0, i - neighbourhood):i + neighbourhood + 1]
                # Half a grey level floors the median: a flat sky has none, and 8-bit rounding alone
                # would then count as a jump.
                scores.append(float(grad[i] / max(np.median(near), 0.5)))
    return float(np.mean(scores)) if scores else 1.0
