"""Small line charts drawn with PIL (no plotting dependency): loss curves, spectra."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from sdlora.io import atomic_path

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def line_plot(series, path: str | Path, title: str = "", xlabel: str = "", ylabel: str = "",
              size=(720, 400), log_y: bool = False, labels: list[str] | None = None, smooth: int = 0) -> Path:
    """Plot one series (a list of floats) or several (a list of lists) to a PNG."""
    if series and not isinstance(series[0], (list, tuple)):
        series = [list(series)]
    if smooth:
        series = [s for raw in series for s in (raw, _smooth(raw, smooth))]
    W, H = size
    left, right, top, bottom = 70, 20, 30, 45
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    finite = [v for s in series for v in s if math.isfinite(v) and (v > 0 or not log_y)]
    if finite:
        f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
        lo, hi = f(min(finite)), f(max(finite))
        hi = hi if hi > lo else lo + 1.0
        n = max(len(s) for s in series)
        sx = lambda i: left + (W - left - right) * (i / max(n - 1, 1))  # noqa: E731
        sy = lambda v: top + (H - top - bottom) * (1 - (f(v) - lo) / (hi - lo))  # noqa: E731
        for k, s in enumerate(series):
            pts = [(sx(i), sy(v)) for i, v in enumerate(s) if math.isfinite(v) and (v > 0 or not log_y)]
            colour = COLOURS[k % len(COLOURS)]
            if smooth and k % 2 == 0:
                colour = tuple(200 + c // 5 for c in colour)  # the raw series, faded behind its average
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            elif pts:
                draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        for frac in (0.0, 0.5, 1.0):
            v = lo + (hi - lo) * frac
            label = f"{10 ** v:.3g}" if log_y else f"{v:.3g}"
            y = top + (H - top - bottom) * (1 - frac)
            draw.text((5, y - 6), label, fill="black")
            draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((left, H - bottom + 8), "0", fill="black")
        draw.text((W - right - 40, H - bottom + 8), str(n - 1), fill="black")
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    draw.text(((W - len(xlabel) * 6) // 2, H - 20), xlabel, fill="black")
    draw.text((5, top - 22), ylabel, fill="black")
    if labels:
        for k, name in enumerate(labels):
            draw.text((W - right - 150, top + 6 + 14 * k), name, fill=COLOURS[k % len(COLOURS)])
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
