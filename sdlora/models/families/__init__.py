"""The base-model families, one registry: `FAMILIES`, keyed by `BaseModel.family`. The interface is
`base.Family`; each family lives in its own module (sd.py: SD1.x and SD2.x, sdxl.py, flux.py, sd3.py). Adding a
family is its module and an entry here; the loaders, the trainer and the samplers ask the registry.
"""

from __future__ import annotations

import dataclasses
import json

from sdlora.models.families.base import Family
from sdlora.models.families.flux import FLUX_DEV, FLUX_SCHNELL
from sdlora.models.families.sd import SD1, SD2, SD2_V
from sdlora.models.families.sd3 import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM
from sdlora.models.families.sdxl import SDXL

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SD2_V, SDXL, FLUX_DEV, FLUX_SCHNELL, SD3_MEDIUM,
                                                   SD35_MEDIUM, SD35_LARGE)}


def detect(keys) -> Family | None:
    """The family of a single file from its tensor names; None when none recognises them. A family
    with more text encoders is asked first (an SDXL file holds a CLIP-L as SD1.x files do)."""
    keys = list(keys)
    by_encoders = sorted(FAMILIES.values(), key=lambda f: -len(f.text_encoders))
    return next((f for f in by_encoders if f.detects(keys)), None)


def _parts(family: Family) -> list[str]:
    """The pipeline components that set the family's folders apart: its denoiser and text encoders."""
    return [family.denoiser_part, *(slot.part for slot in family.text_encoders)]


def folder_layout(index: dict) -> Family:
    """The family whose denoiser and text encoders a diffusers folder's model_index.json names (the one
    with the most, where several fit); of families with the same components (SD1.x, SD2.x; FLUX.1 dev
    and schnell) the first, whose
    components load alike and which `folder_family` then tells apart."""
    fitting = [f for f in FAMILIES.values() if all(part in index for part in _parts(f))]
    return max(fitting or [SD1], key=lambda f: len(f.text_encoders))


def folder_family(layout: Family, denoiser, widths: set[int], prediction_type: str) -> str:
    """The family name of a loaded folder with `layout`'s components, from its denoiser, its text widths
    (the text encoder's hidden size, the U-Net's cross attention) and prediction type: a family with the
    same components that `fits_folder`, else the first of them (SD1.x for any other width, the tiny
    model's included; FLUX.1 dev unless the transformer has no guidance embedding)."""
    alike = [f for f in FAMILIES.values() if _parts(f) == _parts(layout)]
    found = next((f for f in alike[1:] if f.fits_folder(denoiser, widths)), alike[0])
    return found.named_for(prediction_type)


def by_base_model_version(version: str) -> Family | None:
    """The family an adapter's ss_base_model_version names; None for one sdlora does not know."""
    return next((f for f in FAMILIES.values() if f.base_model_version == version), None)


def unread_settings(family: Family, cfg, sections: tuple[str, ...] = ("train", "sample")) -> list[str]:
    """One note per key of `cfg`'s `sections` that some family reads and `family` does not (`Family.reads`), set
    away from its default: FLUX.1's guidance_scale or timestep_sampling on SD3.x, SD3's training_shift or
    skip-layer guidance on FLUX.1, cfg_scale on FLUX.1, min_snr_gamma on either. Such a key changes nothing."""
    family_keys = frozenset().union(*(f.reads() for f in FAMILIES.values()))
    reads = family.reads()
    notes = []
    for section in sections:
        table = getattr(cfg, section)
        for field in dataclasses.fields(table):
            key = f"{section}.{field.name}"
            if key not in family_keys or key in reads:
                continue
            value = getattr(table, field.name)
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            if value == default:
                continue
            readers = ", ".join(dict.fromkeys(f.title for f in FAMILIES.values() if key in f.reads()))
            notes.append(f"[{section}] {field.name} = {json.dumps(value)} is ignored for {family.title} (it applies to "
                         f"{readers}); remove it to silence this note")
    return notes
