"""Base models: load the embedded tiny model, a diffusers folder, a single-file checkpoint or a
hub id into diffusers components; save them back as one original-layout file or a folder.

Nothing is downloaded unless the user names a hub id. The family of a base (`models/families/`:
sd_v1, sd_v2, sd_v2_v, sdxl) says its text encoders and pipeline and decides the Kohya metadata and
the training target.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdlora import ASSETS
from sdlora.config import ModelConfig
from sdlora.digest import file_digest
from sdlora.errors import UserError
from sdlora.models import arch
from sdlora.models.checkpoint import load_single_file, load_vae
from sdlora.models.families import FAMILIES, folder_family, folder_layout
from sdlora.models.tokenizer import clip_tokenizer
from sdlora.quiet import quiet

# Config names of float precisions (train.mixed_precision, save_precision, --save-precision).
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TINY_DIR = ASSETS / "tiny"


def compute_device() -> str:
    """Where every stage computes: a CUDA GPU, else Apple's GPU (MPS), else the CPU (the order
    accelerate picks the trainer's device in)."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


@dataclass
class BaseModel:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any  # DDPMScheduler, the training noise schedule
    family: str  # a key of models.families.FAMILIES: "sd_v1" | "sd_v2" | "sd_v2_v" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    resolution: int  # native pixels (the VAE's sample_size)
    name: str  # folder or file name without suffix (ss_sd_model_name)
    model_hash: str  # sha256 hex of the checkpoint file (a folder: of its unet weights)
    source: str  # what the user gave as model.base
    detected: str = ""  # a single file: how its family and prediction type were told (`info` says it)
    text_encoder_2: Any = None  # SDXL: OpenCLIP bigG (CLIPTextModelWithProjection); FLUX.1: T5; SD3.x: CLIP-G
    tokenizer_2: Any = None
    text_encoder_3: Any = None  # SD3.x: T5-XXL
    tokenizer_3: Any = None

    def pipeline(self, scheduler=None):
        """The family's diffusers pipeline over these same components: a StableDiffusionPipeline (no
        safety checker), a StableDiffusionXLPipeline for an SDXL base."""
        return FAMILIES[self.family].pipeline(self, scheduler if scheduler is not None else self.noise_scheduler)

    @property
    def text_encoders(self) -> list:
        """The text encoder(s) in conditioning order: [CLIP] or, for SDXL, [CLIP-L, OpenCLIP bigG]."""
        return [getattr(self, slot.part) for slot in FAMILIES[self.family].text_encoders]

    @property
    def tokenizers(self) -> list:
        return [getattr(self, slot.tokenizer_part) for slot in FAMILIES[self.family].text_encoders]

    def info(self) -> str:
        return (f"{self.name}: {self.family}, {self.prediction_type}{f' ({self.detected})' if self.detected else ''}, "
                f"{self.resolution} px, sha256 {self.model_hash[:12]} ({self.source})")


def load_base(model_cfg, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load model.base (and model.vae when set) as float `dtype` components."""
    source = model_cfg.base
    text_encoders = [Path(p).expanduser() for p in model_cfg.text_encoders]
    if text_encoders and not Path(source).expanduser().is_file():
        raise UserError(f"model.text_encoders: {source} is not a single-file checkpoint; a diffusers folder or hub id "
                        "brings its own text encoders, so leave model.text_encoders empty")
    # model.v_parameterization overrides what the base says (or, for a single file, what its weights suggest)
    forced_prediction = None if model_cfg.v_parameterization == "auto" else model_cfg.v_parameterization
    if source == "tiny":
        parts = _load_folder(TINY_DIR, dtype)
        name = "tiny"
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise UserError(f"model.base: {path} is a folder without model_index.json; give a diffusers "
                                "folder (saved by save_pretrained) or a .safetensors checkpoint")
            parts = _load_folder(path, dtype)
            name = path.name
        elif path.is_file():
            parts = load_single_file(path, dtype, model_cfg.allow_pickle, forced_prediction, text_encoders,
                                     bool(model_cfg.vae))
            name = path.stem
        else:
            parts = load_hub(source, dtype)
            name = source.split("/")[-1]
    if model_cfg.vae:
        parts["vae"] = load_vae(Path(model_cfg.vae).expanduser(), dtype, parts["family"])
    family, prediction_type = parts.pop("family"), parts.pop("prediction_type")
    if forced_prediction:
        prediction_type = forced_prediction
        family = FAMILIES[family].named_for(prediction_type)
    scheduler = parts["noise_scheduler"]
    if FAMILIES[family].folder_prediction_type(scheduler) != prediction_type:
        from diffusers import DDPMScheduler

        parts["noise_scheduler"] = DDPMScheduler.from_config(scheduler.config, prediction_type=prediction_type)
    return BaseModel(**parts, family=family, prediction_type=prediction_type,
                     resolution=_native_resolution(parts["vae"], parts["unet"]), name=name,
                     source=source)


def _native_resolution(vae, unet) -> int:
    # The VAE's sample_size is the training resolution in the public configs (tiny: 128);
    # the unet's sample_size (latents) times the VAE's downscale is the fallback.
    size = vae.config.sample_size
    if isinstance(size, (list, tuple)):
        size = size[0]
    if size:
        return int(size)
    return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)


def random_base(family: str = "sd_v1", device=None) -> BaseModel:
    """A BaseModel of an SD1.x-tokenizer family (sd_v1) at random weights, full size, built from the
    shipped configs (arch): what `save_diffusers` writes as a folder that `model.base` loads like a real
    checkpoint."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(arch.part_config(family, "scheduler"))
    vae = arch.build_vae(family, device)
    return BaseModel(tokenizer=clip_tokenizer(), text_encoder=arch.build_text_encoder(family, device=device), vae=vae,
                     unet=arch.build_unet(family, device=device), noise_scheduler=scheduler, family=family,
                     prediction_type=scheduler.config.prediction_type, resolution=vae.config.sample_size,
                     name=f"random-{family}", model_hash="", source="random")


def base_weights_file(model_cfg) -> Path | None:
    """The file whose sha256 is a base's `model_hash` (ss_new_sd_model_hash), found without loading
    the base: a checkpoint file itself, a diffusers folder's U-Net weights; None for a hub id."""
    if model_cfg.base == "tiny":
        return _folder_unet_weights(TINY_DIR)
    path = Path(model_cfg.base).expanduser()
    if path.is_dir():
        return _folder_unet_weights(path)
    return path if path.is_file() else None


# safetensors' names of the floating dtypes
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def stored_dtypes(model_cfg) -> set[torch.dtype] | None:
    """The floating dtypes a local base's weights are stored in, read from its safetensors headers
    without loading a tensor; None when unknown (a hub id, pickled weights)."""
    if model_cfg.base == "tiny":
        path = TINY_DIR
    else:
        path = Path(model_cfg.base).expanduser()
    if path.is_dir():
        files = [f for part in (*_denoiser_parts(), "text_encoder", "text_encoder_2", "vae") for f in (path / part).glob("*")
                 if f.name.startswith(("diffusion_pytorch_model", "model")) and f.suffix in (".safetensors", ".bin")]
    else:
        files = [path] if path.is_file() else []
    if not files or any(f.suffix != ".safetensors" for f in files):
        return None
    found = set()
    for file in files:
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        found |= {_SAFETENSORS_DTYPES[entry["dtype"]] for name, entry in header.items()
                  if name != "__metadata__" and entry["dtype"] in _SAFETENSORS_DTYPES}
    return found


def _denoiser_parts() -> list[str]:
    """The folders a family keeps its denoiser in: unet, transformer."""
    return list(dict.fromkeys(f.denoiser_part for f in FAMILIES.values()))


def _folder_unet_weights(folder: Path) -> Path:
    """The denoiser's weights (the U-Net's, or the transformer's) of a diffusers folder. A transformer saved in
    shards (SD3.5 Large, FLUX.1 on the Hub) is named by its shard index, whose sha256 then stands for the
    weights: hashing every shard of a 16 GB model would cost minutes per load."""
    for part in _denoiser_parts():
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                     "diffusion_pytorch_model.safetensors.index.json"):
            if (folder / part / name).exists():
                return folder / part / name
    raise UserError(f"model.base: {folder} has no {' or '.join(_denoiser_parts())}/diffusion_pytorch_model.safetensors; "
                    "the diffusers folder is incomplete")


def _load_folder(folder: Path, dtype: torch.dtype) -> dict:
    """A local diffusers folder of a family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline),
    without network."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    index = json.loads((folder / "model_index.json").read_text())
    layout = folder_layout(index)
    subfolders = (layout.denoiser_part, "vae", *(part for slot in layout.text_encoders for part in (slot.part, slot.tokenizer_part)),
                  "scheduler")
    missing = [p for p in subfolders if not (folder / p).is_dir()]
    if missing:
        raise UserError(f"model.base: {folder} lacks the subfolder(s) {', '.join(missing)}; "
                        "save the pipeline with save_pretrained or give a complete diffusers folder")
    kw = dict(local_files_only=True, torch_dtype=dtype)  # diffusers' name; transformers 4.56+ says dtype
    te_kw = dict(local_files_only=True, dtype=dtype)
    try:
        with quiet(diffusers_logging, transformers_logging):  # a "Loading weights" bar per model otherwise
            unet = getattr(diffusers, layout.denoiser_class).from_pretrained(folder, subfolder=layout.denoiser_part,
                                                                             **kw)
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
            encoders = {}
            for slot in layout.text_encoders:
                encoders[slot.part] = getattr(transformers, slot.model_class).from_pretrained(
                    folder, subfolder=slot.part, **te_kw).eval()
                encoders[slot.tokenizer_part] = getattr(transformers, slot.tokenizer_class).from_pretrained(
                    folder, subfolder=slot.tokenizer_part, local_files_only=True)
            noise_scheduler = getattr(diffusers, layout.scheduler_class).from_pretrained(
                folder, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise UserError(f"model.base: cannot load the diffusers folder {folder}: {e}") from e
    prediction_type = layout.folder_prediction_type(noise_scheduler)
    widths = {encoders[layout.text_encoders[0].part].config.hidden_size,
              getattr(unet.config, "cross_attention_dim", None)}
    family = folder_family(layout, unet, widths, prediction_type)
    return dict(vae=vae.eval(), unet=unet.eval(), noise_scheduler=noise_scheduler, family=family,
                prediction_type=prediction_type, model_hash=file_digest(_folder_unet_weights(folder)), **encoders)


def model_skeleton(source) -> tuple[Any, str]:
    """(the denoiser and text encoders of a base as attributes `unet` / `transformer`, `text_encoder(_2)`,
    the denoiser's pipeline component): what names and shapes the modules of `source` have, for tools that
    map adapter keys without touching a weight. A diffusers folder's models are built from their configs on
    the meta device (no weight is read: FLUX.1's 12B parameters cost nothing); other bases load whole."""
    from types import SimpleNamespace

    import diffusers
    import transformers
    from accelerate import init_empty_weights

    folder = Path(str(source)).expanduser()
    if not (folder / "model_index.json").is_file():
        base = load_base(ModelConfig(base=str(source)))
        return base, FAMILIES[base.family].denoiser_part
    layout = folder_layout(json.loads((folder / "model_index.json").read_text()))
    try:
        with init_empty_weights():
            denoiser_class = getattr(diffusers, layout.denoiser_class)
            models = {layout.denoiser_part: denoiser_class.from_config(
                denoiser_class.load_config(folder, subfolder=layout.denoiser_part))}
            for slot in layout.text_encoders:
                model_class = getattr(transformers, slot.model_class)
                models[slot.part] = model_class(model_class.config_class.from_pretrained(folder / slot.part))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: cannot read the diffusers folder's model configs: {e}") from e
    return SimpleNamespace(**models), layout.denoiser_part


def load_hub(source: str, dtype: torch.dtype) -> dict:
    """A hub id the user named: the local HF cache first, then a download; fails fast offline."""
    looks_like_id = source.count("/") == 1 and not source.startswith((".", "/", "~")) and " " not in source
    if not looks_like_id:
        raise UserError(f"model.base: {source} does not exist; give 'tiny', a diffusers folder, a .safetensors "
                        "checkpoint or a Hugging Face hub id (user/model)")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/config.json", "*/scheduler_config.json", "tokenizer/*",
                "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors"]
    try:
        folder = snapshot_download(source, allow_patterns=patterns, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache: try the network, briefly
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise UserError(f"model.base: hub id {source} is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                            "is set; download it first (huggingface-cli download) or give a local path") from None
        if not _hub_reachable():
            raise UserError(f"model.base: hub id {source} is not in the local Hugging Face cache and "
                            "huggingface.co cannot be reached; download it first or give a local path") from None
        try:
            folder = snapshot_download(source, allow_patterns=patterns)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"model.base: cannot download hub id {source}: {e}") from e
    parts = _load_folder(Path(folder), dtype)
    return parts


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Can huggingface.co be reached? Bounded by `timeout`, DNS look-up included."""
    import socket
    import threading

    result = []

    def probe():
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)
