"""The upscale step of the hires pass: Lanczos, or an upscaler model file the user names.

Upscaler files (ESRGAN / Real-ESRGAN, SwinIR, HAT, DAT, ... as .pth or .safetensors) are state dicts
whose architecture is read from the tensors' names and shapes. ComfyUI (comfy_extras/
nodes_upscale_model.py) and Forge (modules/modelloader.load_spandrel_model) both hand them to
spandrel's ModelLoader and accept only single-image models; sdlora does the same, spandrel being
an optional extra. As A1111's Upscaler.upscale does, the model runs until both sides reach the
target (at most 3 passes: a 4x model on a native render is one) and Lanczos brings the result to
the exact size. A pickled file (.pth) is read only with `[model] allow_pickle = true`, as every pickle
sdlora reads. The model sees RGB in [0, 1] and returns it clamped to [0, 1] (spandrel pads to
its size requirements and crops back).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdlora.errors import UserError
from sdlora.models.checkpoint import PICKLE_SUFFIXES

MAX_PASSES = 3  # A1111: a 2x model is applied up to 3 times (8x); beyond, Lanczos does the rest
FIELD = "[sample] hires_upscaler"


def lanczos(images: list, width: int, height: int) -> list:
    return [im.resize((width, height), Image.LANCZOS) for im in images]


class ModelUpscaler:
    """An upscaler model file loaded with spandrel, on `device`, in float32."""

    def __init__(self, path: str | Path, device, allow_pickle: bool = False):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{FIELD} = {str(path)!r}: no such file; name an upscaler model (.pth or .safetensors) "
                            "or leave it empty for Lanczos")
        if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
            raise UserError(f"{FIELD} = {path.name!r} is a pickled {path.suffix} file, which can run code when "
                            "loaded; use the model's .safetensors release, or set [model] allow_pickle = true to "
                            "read it (through spandrel's restricted unpickler: tensors and plain containers only)")
        try:
            from spandrel import (
                ImageModelDescriptor,
                ModelLoader,
                UnsupportedModelError,
            )
        except ImportError:
            raise UserError(f"{FIELD} = {path.name!r}: reading upscaler models needs spandrel: "
                            "pip install 'sdlora[upscalers]' (or leave hires_upscaler empty for Lanczos)") from None
        try:
            model = ModelLoader(device=torch.device("cpu")).load_from_file(path)
        except UnsupportedModelError:
            raise UserError(f"{FIELD} = {path.name!r}: not an upscaler architecture spandrel knows "
                            "(ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, ...)") from None
        except (ValueError, RuntimeError, OSError) as e:  # unknown extension, corrupt or truncated file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # torch lists every mismatched tensor
            raise UserError(f"{FIELD} = {path.name!r}: cannot read it as an upscaler model ({first})") from None
        if not isinstance(model, ImageModelDescriptor):
            raise UserError(f"{FIELD} = {path.name!r}: a {model.architecture.name} model is not a single-image "
                            "upscaler (inpainting models cannot upscale)")
        self.model = model.to(device).float().eval()
        self.device = torch.device(device)
        self.name = path.stem  # what A1111 writes as "Hires upscaler"

    @torch.no_grad()
    def upscale_one(self, image: Image.Image) -> Image.Image:
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)  # (H, W, 3)
        y = self.model(x.permute(2, 0, 1)[None].to(self.device))  # (1, 3, H * scale, W * scale) in [0, 1]
        return Image.fromarray((y[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8))

    def __call__(self, images: list, width: int, height: int) -> list:
        out = []
        for image in images:
            for _ in range(MAX_PASSES):
                if image.width >= width and image.height >= height:
                    break
                image = self.upscale_one(image)
            out.append(image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS))
        return out
