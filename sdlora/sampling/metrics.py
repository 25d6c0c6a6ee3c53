"""Style measurements: does an adapter move images toward the style set?

- colourfulness M of Hasler and Suesstrunk (2003): with rg = R - G and yb = (R + G)/2 - B,
  M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)   (0..~150)
- hue/saturation histogram (HSV, 18 hue x 8 saturation bins, weighted by value so dark
  pixels' noisy hues count little) and the Hellinger distance between two such histograms.
- palette distance in CIELAB (`palette_distance`): how far, in delta-E units, the colours of one
  set of images lie from another's, as an optimal-transport distance (see there).
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
    """Figures of the acceptance check: colourfulness ratio, palette distances to the style set (CIELAB
    delta-E with the lightness and chroma it is made of; and the hue/saturation histograms' Hellinger)."""
    style_hist = hue_sat_histogram(style_images)
    base_c = float(np.mean([colourfulness(i) for i in base_images]))
    lora_c = float(np.mean([colourfulness(i) for i in lora_images]))
    return {
        "palette_distance_base": palette_distance(base_images, style_images),
        "palette_distance_lora": palette_distance(lora_images, style_images),
        "lab_base": lab_summary(base_images),
        "lab_lora": lab_summary(lora_images),
        "lab_style_set": lab_summary(style_images),
        "colourfulness_base": base_c,
        "colourfulness_lora": lora_c,
        "colourfulness_style_set": float(np.mean([colourfulness(i) for i in style_images])),
        "colourfulness_ratio": lora_c / max(base_c, 1e-9),
        "hist_distance_base": hellinger(hue_sat_histogram(base_images), style_hist),
        "hist_distance_lora": hellinger(hue_sat_histogram(lora_images), style_hist),
    }


# ---------------------------------------------------------------------------------------------
# Palette distance in CIELAB
#
# The hue/saturation histogram above compares bins one by one: it has no notion of how far apart
# two bins are, so when two palettes barely overlap (renders at chroma ~15, a style set at ~45)
# it sits near its ceiling of 1 and moves little or the wrong way as a palette approaches the
# other; nor does it see lightness. A transport distance in CIELAB has a ground distance a person
# can read: delta-E 76, where ~2.3 is a just-noticeable difference.

PALETTE_PIXELS = 4096  # pixels drawn per image: the distance is over colour distributions, not pictures
PALETTE_QUANTILES = 256  # quantile levels per projection


def lab(image: Image.Image) -> np.ndarray:
    """An image -> (H*W, 3) CIELAB (L*, a*, b*) of its sRGB pixels, D65 white (IEC 61966-2-1, CIE 15)."""
    c = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805],
                             [0.2126, 0.7152, 0.0722],
                             [0.0193, 0.1192, 0.9505]]).T / np.array([0.95047, 1.0, 1.08883])
    d = 6 / 29
    f = np.where(xyz > d ** 3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def lab_pixels(images) -> np.ndarray:
    """(N, 3) CIELAB pixels of a set of images, PALETTE_PIXELS per image at evenly spaced indices (every
    image counts the same whatever its size; deterministic)."""
    out = []
    for image in images:
        pixels = lab(image)
        out.append(pixels[np.linspace(0, len(pixels) - 1, min(PALETTE_PIXELS, len(pixels))).astype(int)])
    return np.concatenate(out)


def _directions(count: int = 64) -> np.ndarray:
    """`count` unit vectors spread evenly over the sphere (Fibonacci lattice): fixed, so a distance
    never changes between runs."""
    i = np.arange(count) + 0.5
    z = 1 - 2 * i / count
    phi = np.pi * (1 + 5 ** 0.5) * i
    r = np.sqrt(1 - z * z)
    return np.stack([z, r * np.cos(phi), r * np.sin(phi)], axis=1)  # (count, 3): (L, a, b)


def palette_distance(images, reference) -> float:
    """Sliced 1-Wasserstein distance between the CIELAB pixel distributions of two image sets, in
    delta-E units.

    For a unit direction u the distributions project to 1-D, where W1 = integral over q in (0, 1) of
    |F^-1(q) - G^-1(q)| (quantile functions): the mean colour change, along u, that turns one set's
    pixels into the other's. Averaged over directions evenly spread on the sphere, a shift of every
    pixel by a vector v scores |v| * E|cos| = |v| / 2, so the mean is doubled: a palette moved by
    delta-E d everywhere is d away. 0 = the same colours in the same proportions; it falls steadily as
    a palette moves toward the reference, and it counts lightness as well as hue and chroma.
    """
    a, b = lab_pixels(images), lab_pixels(reference)
    q = (np.arange(PALETTE_QUANTILES) + 0.5) / PALETTE_QUANTILES
    u = _directions()
    qa, qb = np.quantile(a @ u.T, q, axis=0), np.quantile(b @ u.T, q, axis=0)  # (quantiles, directions)
    return float(2 * np.abs(qa - qb).mean())


def lab_summary(images) -> dict:
    """What a palette distance is made of: mean and spread of lightness L* (0-100) and mean chroma
    C* = sqrt(a*^2 + b*^2) (0 = grey; the demo's style set sits near 45)."""
    p = lab_pixels(images)
    return {"lightness": float(p[:, 0].mean()), "lightness_std": float(p[:, 0].std()),
            "chroma": float(np.hypot(p[:, 1], p[:, 2]).mean())}


# ---------------------------------------------------------------------------------------------
# Artefacts of rendering far above a base's native size
#
# A denoiser run on a latent several times larger than it was trained on answers out of
# distribution with periodic diagonal hatching; tiling it (sampling/tiled.py) can leave seams.
# Both are measured against what the picture would be without the large pass.


def _luma(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


VISIBLE_ENERGY = 1.0  # grey levels^2: fine texture of RMS amplitude under one 8-bit step is not seen


def offaxis_hf_power(image: Image.Image, cycles: float = 8.0, axis_deg: float = 15.0) -> tuple[float, float]:
    """(mean power per pixel in the off-axis fine band, in the whole spectrum without DC), in grey
    levels^2 of the image's luma (Parseval, the Hann window's mean square divided out).

    The band: frequencies of at least `cycles` per short side whose direction is more than
    `axis_deg` from both axes. Periods under an eighth of the short side (90 px at 1080x720) are
    texture, not composition. Natural scenes (horizons, trunks, cloud bands) put their fine energy
    near the axes; the hatching of an out-of-distribution denoiser is diagonal. A Hann window keeps
    the image's own borders from leaking a cross of energy along the axes.
    """
    luma = _luma(image)
    h, w = luma.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2((luma - luma.mean()) * window)) ** 2 / (h * w) ** 2 / (window ** 2).mean()
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")  # cycles per pixel
    radius = np.hypot(fx, fy)
    angle = np.degrees(np.arctan2(np.abs(fy), np.abs(fx)))  # 0 = horizontal frequency, 90 = vertical
    band = (radius >= cycles / min(h, w)) & (angle > axis_deg) & (angle < 90.0 - axis_deg)
    return float(power[band].sum()), float(power.sum() - power[0, 0])


def artefact_ratio(image: Image.Image, reference: Image.Image) -> float:
    """Off-axis fine texture of `image` over that of `reference` (the Lanczos upscale of the native
    render, same size), each as energy per pixel plus VISIBLE_ENERGY: 1 = no more than the upscale,
    hatching scores several x.

    Energies, not shares of each image's own energy (the first form of this measure): a nearly
    featureless render (a night sea) has almost no energy of its own, so a share made its invisible
    grain (under one grey level RMS) many times the reference's; the floor counts only texture one
    could see. The old single-pass hires at denoise 0.6 still scores up to 6x on the demo."""
    if image.size != reference.size:
        raise ValueError(f"artefact_ratio: sizes differ, {image.size} vs {reference.size}")
    return (offaxis_hf_power(image)[0] + VISIBLE_ENERGY) / (offaxis_hf_power(reference)[0] + VISIBLE_ENERGY)


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
