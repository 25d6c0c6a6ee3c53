"""`sdlora inspect`: an adapter file's metadata, ranks, alphas, norms and each module's energy
curve (singular values from the factors, `svd.module_spectrum`), optionally drawn as a PNG."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from sdlora.adapters import keys, kinds
from sdlora.adapters.file import non_finite_modules, read_adapter
from sdlora.io import atomic_path
from sdlora.lowrank.svd import energy_rank, module_spectrum
from sdlora.sampling.plot import line_plot

ENERGY_LEVELS = (0.5, 0.8, 0.9, 0.99)


@dataclass
class ModuleSpectrum:
    key: str
    part: str
    kind: str
    rank: int
    alpha: float
    norm: float  # ||scale * delta||_F, the module's effect at multiplier 1
    singular_values: list[float] = field(repr=False)
    ranks_for_energy: dict[str, int] = field(default_factory=dict)


def inspect_tensors(tensors: dict[str, torch.Tensor]) -> list[ModuleSpectrum]:
    spectra = []
    for key, parts in keys.group_modules(tensors).items():
        scale = kinds.module_scale(parts)
        S, _ = module_spectrum(parts)
        rank = kinds.module_rank(parts) or S.numel()
        S = S * abs(scale)
        spectra.append(ModuleSpectrum(
            key, keys.part_of(key), kinds.module_variant(parts), rank, scale * rank, float(S.norm()),
            [float(v) for v in S], {f"{level:.0%}": energy_rank(S, level) for level in ENERGY_LEVELS}))
    return spectra


def inspect(path, plot: Path | None = None) -> dict:
    """A JSON-ready summary of an adapter file (and optionally a PNG of its spectra)."""
    tensors, metadata = read_adapter(path, allow_non_finite=True)
    broken = non_finite_modules(tensors)  # reported, not decomposed (an SVD of NaN fails)
    spectra = inspect_tensors({k: v for k, v in tensors.items() if k.partition(".")[0] not in broken})
    counts: dict[str, int] = {}
    for m in spectra:
        counts[m.part] = counts.get(m.part, 0) + 1
    summary = {"file": str(path), "metadata": {k: _maybe_json(v) for k, v in sorted(metadata.items())},
               "modules_per_part": counts, "modules": [asdict(m) for m in spectra], "non_finite": broken}
    if plot is not None:
        plot_spectra(spectra, Path(plot), title=Path(path).name)
        summary["plot"] = str(plot)
    return summary


def _maybe_json(value: str):
    if value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


def plot_spectra(spectra: list[ModuleSpectrum], path: Path, title: str = "") -> Path:
    """One PNG: normalised singular values (log) above cumulative energy, one line per module."""
    normalised = [[v / m.singular_values[0] for v in m.singular_values] if m.singular_values and m.singular_values[0]
                  else [0.0] for m in spectra]
    cumulative = []
    for m in spectra:
        sq = torch.tensor(m.singular_values, dtype=torch.float64) ** 2
        total = float(sq.sum()) or 1.0
        cumulative.append([float(v) for v in torch.cumsum(sq, 0) / total])
    with tempfile.TemporaryDirectory() as tmp:
        top = line_plot(normalised, Path(tmp) / "s.png", title=f"{title}: singular values / largest, per module",
                        xlabel="index", ylabel="S / S[0]", log_y=True)
        bottom = line_plot(cumulative, Path(tmp) / "e.png", title="cumulative energy sum(S[:k]^2) / sum(S^2)",
                           xlabel="rank k", ylabel="energy")
        a, b = Image.open(top), Image.open(bottom)
        canvas = Image.new("RGB", (max(a.width, b.width), a.height + b.height), "white")
        canvas.paste(a, (0, 0))
        canvas.paste(b, (0, a.height))
    with atomic_path(path) as tmp_path:
        canvas.save(tmp_path, format="PNG")
    return path


