"""Single-file checkpoints in the original Stable Diffusion key layout (what A1111 and ComfyUI
load) and separate VAE files.

Reading: `read_state_dict` is the one reader of the user's file (the pickle gate, truncation
checks); the family comes from the keys (each `Family` says how to recognise its files, where it
keeps each text encoder and in which layout), the architecture from the config folder shipped in
`assets/configs/<family>/` (or, for a file sdlora wrote, from the configs it embedded in the
safetensors metadata). The U-Net and VAE load through diffusers' public single-file loader
(`from_single_file` given the tensors and that folder), the text encoders through transformers'
`from_pretrained(state_dict=...)`, converted by the layout its family names (`families/clip.py`).
Writing: the diffusers -> original mapping below, stated per block.
"""

from __future__ import annotations

import json
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from sdlora.digest import file_digest
from sdlora.errors import UserError
from sdlora.io import atomic_folder, atomic_save_file, refuse_to_overwrite
from sdlora.models.arch import CONFIGS
from sdlora.models.families import FAMILIES, detect
from sdlora.models.families.base import TextEncoderSlot
from sdlora.models.transformer_names import NAMES_BY_CLASS, state_from_original
from sdlora.quiet import quiet

CONFIG_META_KEY = "sdlora.diffusers_config"  # JSON {"unet":..., "vae":..., "text_encoder":..., "scheduler":...}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


# ---------------------------------------------------------------- reading


def read_state_dict(path: Path, allow_pickle: bool = False) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of a checkpoint file; UserError for anything else."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(f"model.base: {path} is a pickled {suffix} file, which can run code when loaded; "
                            "convert it to .safetensors, or set model.allow_pickle = true to load it "
                            "with torch.load(weights_only=True)")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise UserError(f"model.base: cannot read {path} as a torch checkpoint ({e.__class__.__name__}: {e})") from e
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict):
            raise UserError(f"model.base: {path} holds no state dict")
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, {}
    if suffix != ".safetensors":
        raise UserError(f"model.base: {path} is not a checkpoint (expected .safetensors, or .ckpt/.pt/.bin "
                        "with model.allow_pickle = true)")
    _check_safetensors_header(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise UserError(f"model.base: {path} is not a readable safetensors file ({e}); "
                        "it may be truncated: download it again") from e


def _check_safetensors_header(path: Path) -> None:
    # 8-byte little-endian header length, a JSON header, then data that must reach every
    # tensor's end offset: a truncated download fails here instead of deep inside torch.
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if len(head) < 8 or n <= 0 or n > size - 8:
            raise UserError(f"model.base: {path} is not a safetensors file (bad header); "
                            "give a .safetensors checkpoint or a diffusers folder")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise UserError(f"model.base: {path} has a corrupt safetensors header") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise UserError(f"model.base: {path} is truncated ({size} bytes, expected {8 + n + end}); download it again")


def detect_family(keys, path: Path | str = "checkpoint") -> str:
    """The name of the family in `FAMILIES` that recognises an original-layout file's keys (its text encoders'
    for SD1.x / SD2.x / SDXL; an SD2 file is named sd_v2 until its prediction type is known)."""
    keys = list(keys)
    family = detect(keys)
    if family is not None:
        return family.name
    has_unet = any(k.startswith(UNET) for k in keys)
    what = "a UNet without a text encoder" if has_unet else "no Stable Diffusion UNet or text encoder"
    raise UserError(f"model.base: {path} holds {what} (unknown model family; sdlora reads SD1.x, SD2.x and SDXL "
                    "checkpoints in the original layout, e.g. as A1111 saves them, FLUX.1 transformers in "
                    "BFL's layout and SD3.x MMDiTs in Stability's)")


@contextmanager
def _config_folder(family: str, metadata: dict):
    """The diffusers config folder (`<part>/config.json`) of a checkpoint: the shipped one of its family,
    or, for a file sdlora wrote, a temporary folder holding the configs embedded in its metadata."""
    if CONFIG_META_KEY not in metadata:
        yield CONFIGS / family
        return
    with tempfile.TemporaryDirectory() as tmp:
        for part, config in json.loads(metadata[CONFIG_META_KEY]).items():
            (Path(tmp) / part).mkdir()
            name = "scheduler_config.json" if part == "scheduler" else "config.json"
            (Path(tmp) / part / name).write_text(json.dumps(config))
        yield Path(tmp)


def load_single_file(path: Path, dtype: torch.dtype, allow_pickle: bool = False,
                     prediction_type: str | None = None, text_encoders: list[Path] = (),
                     vae_given: bool = False) -> dict:
    """The components of an original-layout checkpoint of a family in `FAMILIES` (see models.load_base).
    `prediction_type` is model.v_parameterization when set; None: the family's guess (SD2's from the
    weights, which picks the sd_v2 or sd_v2_v configs; SD1.x and SDXL base predict epsilon; FLUX.1 flow).
    `text_encoders` (model.text_encoders): separate text-encoder files and tokenizer folders, each
    recognised by what it holds, for a file that lacks them (a file's wins over the checkpoint's own);
    `vae_given`: model.vae is set, so a checkpoint without a VAE is no error (load_base loads that one)."""
    import transformers
    from diffusers import AutoencoderKL

    tensors, metadata = read_state_dict(path, allow_pickle)
    family = FAMILIES[detect_family(tensors, path)]
    if prediction_type:
        how = "model.v_parameterization"
    else:
        prediction_type, how = family.guess_prediction_type(tensors)
    family = FAMILIES[family.named_for(prediction_type)]

    def where(part: str) -> str:
        return f"model.base: the {part} in {path}"

    with _config_folder(family.name, metadata) as configs:
        separate, tokenizer_folders = read_text_encoder_files(text_encoders, family, configs)
        # Each part's tensors leave `tensors` (the text encoders' and the VAE's first: a BFL file names its
        # transformer's bare) and are cast to `dtype` as it loads, so no two whole copies are ever held.
        encoder_states = {slot.part: text_encoder_state(tensors, slot) for slot in family.text_encoders}
        vae_state = _take(tensors, family.vae_prefix)
        prefix = next((p for p in family.denoiser_prefixes if any(k.startswith(p) for k in tensors)),
                      family.denoiser_prefixes[0])
        denoiser = family.denoiser_class.removesuffix("2DConditionModel").removesuffix("2DModel")  # UNet, FluxTransformer
        unet = _load_denoiser(family, _take(tensors, prefix), prefix, configs, where(denoiser), dtype)
        if vae_state or not family.vae_file:  # (an SD file without one: its missing tensors are named)
            if family.vae_prefix != VAE:  # first_stage_model. is a layout of its own (and names a missing tensor)
                vae_state = {k.removeprefix(family.vae_prefix): v for k, v in vae_state.items()}
            vae = _load_model(AutoencoderKL, vae_state, configs, "vae", where("VAE"), dtype)
        elif vae_given:
            vae = None  # load_base loads model.vae
        else:
            raise UserError(f"model.base: {path} holds no VAE; set model.vae = \"{family.vae_file}\" ({family.title}'s "
                            "autoencoder, the file its makers publish)")
        parts = {}
        for slot in family.text_encoders:
            state, origin = separate.get(slot.part), f"model.text_encoders: the {slot.label} file"
            if state is None:
                state, origin = encoder_states[slot.part], where(slot.label)
            if not state:
                raise UserError(f"model.base: {path} holds no {slot.label} text encoder; add its file to "
                                f"model.text_encoders (the {family.title} text encoders: "
                                f"{', '.join(s.label for s in family.text_encoders)})")
            parts[slot.part] = _load_text_encoder(getattr(transformers, slot.model_class), state, configs, slot.part,
                                                  origin, dtype)
            parts[slot.tokenizer_part] = tokenizer_folders.get(slot.part) or slot.tokenizer()
        scheduler = family.single_file_scheduler(configs, prediction_type)
    parts.update(vae=vae, unet=unet, noise_scheduler=scheduler, family=family.name,
                 prediction_type=prediction_type, model_hash=file_digest(path), detected=how)
    return parts


def read_text_encoder_files(paths, family, configs: Path) -> tuple[dict, dict]:
    """({slot part: state in transformers-4 names}, {slot part: tokenizer}) of model.text_encoders: each
    .safetensors file is the family's text encoder whose layout names its tensors (bare or under the
    slot's single-file prefix) at the width of that encoder's config, the first such one not yet given;
    each folder the tokenizer of the slot whose tokenizer files it holds."""
    import transformers

    states, tokenizers = {}, {}
    for path in map(Path, paths):
        if path.is_dir():
            slot = next((s for s in family.text_encoders if any((path / f).exists() for f in s.tokenizer_files)), None)
            if slot is None:
                raise UserError(f"model.text_encoders: the folder {path} holds no tokenizer of {family.title} "
                                f"(no {' or '.join(f for s in family.text_encoders for f in s.tokenizer_files)})")
            try:
                tokenizers[slot.part] = getattr(transformers, slot.tokenizer_class).from_pretrained(
                    path, local_files_only=True)
            except (OSError, ValueError, ImportError) as e:
                raise UserError(f"model.text_encoders: cannot read the {slot.label} tokenizer in {path} "
                                f"({e.__class__.__name__}: {e}); give a folder with its tokenizer.json") from e
            continue
        if not path.is_file():
            raise UserError(f"model.text_encoders: {path} does not exist; give the text encoders' .safetensors files")
        tensors, _ = read_state_dict(path)
        for slot in family.text_encoders:
            state = {k.removeprefix(slot.prefix): v for k, v in tensors.items()}
            width = transformers.AutoConfig.from_pretrained(configs, subfolder=slot.part).hidden_size
            if slot.part not in states and slot.layout.recognises(state) and slot.layout.width(state) == width:
                states[slot.part] = slot.from_original(state)
                break
        else:
            raise UserError(f"model.text_encoders: {path} holds none of {family.title}'s text encoders "
                            f"({', '.join(s.label for s in family.text_encoders if s.part not in states)}) in the "
                            "layouts sdlora reads (transformers' names, bare or as ComfyUI saves them)")
    return states, tokenizers


def _load_denoiser(family, state: dict, prefix: str, configs: Path, where: str, dtype: torch.dtype):
    """The family's denoiser from its tensors in a single file (under `prefix`): a U-Net through diffusers'
    single-file loader; a transformer renamed by `transformer_names` (any width, where diffusers' FLUX
    converter assumes 3072) and loaded by the same loader, which takes diffusers' names as they are."""
    import diffusers

    cls = getattr(diffusers, family.denoiser_class)
    names = NAMES_BY_CLASS.get(family.denoiser_class)
    if names is None:
        return _load_model(cls, state, configs, family.denoiser_part, where, dtype)
    from diffusers.utils import logging

    with torch.device("meta"):
        model = cls.from_config(cls.load_config(configs, subfolder=family.denoiser_part, local_files_only=True))
    state = state_from_original({k[len(prefix):]: v for k, v in state.items()}, model, names)
    expected = model.state_dict().keys()
    unknown = sorted(state.keys() - expected)
    if any(k.endswith((".scale_weight", "scaled_fp8")) for k in unknown):
        raise UserError(f"{where} is stored as ComfyUI's scaled fp8 (.scale_weight tensors), which sdlora does not "
                        "read; use the plain fp8 (float8_e4m3fn), bf16 or fp16 file")
    missing = sorted(expected - state.keys())
    for what, keys in (("missing", missing), ("unexpected", unknown)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise UserError(_mismatch(where, f"{what} {keys[:3]}{more}"))
    with quiet(logging, warnings=False):  # as in _load_model
        model = cls.from_single_file(upcast_fp8(state, dtype), config=str(configs), subfolder=family.denoiser_part,
                                     local_files_only=True, torch_dtype=dtype)
    return model.eval()


def upcast_fp8(state: dict, dtype: torch.dtype) -> dict:
    """`state` with its float8 tensors (an fp8-stored file's: float8_e4m3fn, float8_e5m2) as `dtype`;
    every fp8 value is exact in bf16, fp16 and fp32."""
    return {k: v.to(dtype) if v.dtype in FP8_DTYPES else v for k, v in state.items()}


def _take(tensors: dict, prefix: str) -> dict:
    """The tensors under `prefix`, removed from `tensors`."""
    return {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}


def _load_model(cls, state: dict, configs: Path, part: str, where: str, dtype: torch.dtype):
    """A diffusers UNet2DConditionModel / AutoencoderKL from original-layout (a VAE also: diffusers-layout)
    tensors, through diffusers' public single-file loader with the config in `configs/<part>`."""
    from diffusers.utils import logging

    state = _known_tensors(cls, state, configs, part, where)
    # Quiet: from_single_file's ModelMixin.to(dtype) warns "modules ... should be kept in float32: []"
    # for every model without such modules; what else it logs (an EMA copy, unused keys) cannot
    # arise from the tensors of one part checked against its own config; a mismatch raises.
    try:
        with quiet(logging, warnings=False):
            model = cls.from_single_file(state, config=str(configs), subfolder=part, local_files_only=True,
                                         torch_dtype=dtype)
    except (KeyError, IndexError, ValueError) as e:  # what a tensor of the wrong shape raises
        text = next(iter(str(e).splitlines()), "").split(". ")[0]
        raise UserError(_mismatch(where, f"{e.__class__.__name__}: {text}")) from e
    return model.eval()


def _known_tensors(cls, state: dict, configs: Path, part: str, where: str) -> dict:
    """`state` checked against the names the part's config has: in the original layout (the names
    sdlora writes, `unet_to_original` / `vae_to_original`; a VAE file also without the
    first_stage_model. prefix) or, for a VAE, diffusers' own. A missing tensor is refused by name;
    tensors the config has no place for (a training checkpoint's loss weights, say) are left out,
    as the original -> diffusers conversion leaves them."""
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(configs, subfolder=part, local_files_only=True))
    names = model.state_dict()
    if part == "unet":
        layouts = [set(unet_to_original(names, model.config))]
    else:
        original = set(vae_to_original(names, model.config))
        layouts = [original, {k.removeprefix(VAE) for k in original}, set(names)]
    expected = max(layouts, key=lambda layout: len(layout & state.keys()))
    missing = sorted(expected - state.keys())
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(_mismatch(where, f"missing {missing[:3]}{more}"))
    return {k: v for k, v in state.items() if k in expected}


def _load_text_encoder(cls, state: dict, configs: Path, part: str, where: str, dtype: torch.dtype):
    """A CLIPTextModel(WithProjection) from tensors under transformers-4 names (`text_model.*`, as files
    name them; transformers 5 maps them onto its flat CLIPTextModel), or a T5EncoderModel, via
    `from_pretrained(state_dict=...)`."""
    from transformers.utils import logging

    config = cls.config_class.from_pretrained(configs, subfolder=part, local_files_only=True)
    with quiet(logging, warnings=False):  # its load report says what the UserError below says in one line
        model, info = cls.from_pretrained(None, config=config, state_dict=upcast_fp8(state, dtype), dtype=dtype,
                                          output_loading_info=True, ignore_mismatched_sizes=True)
    mismatched = sorted(k if isinstance(k, str) else k[0] for k in info["mismatched_keys"])  # 4.x: names; 5: tuples
    for what, keys in (("missing", sorted(info["missing_keys"])), ("unexpected", sorted(info["unexpected_keys"])),
                       ("shape mismatch at", mismatched)):
        if keys:
            raise UserError(_mismatch(where, f"{what} {keys[:3]}"))
    return model.eval()


def _mismatch(where: str, detail: str) -> str:
    return f"{where} does not match the expected architecture ({detail}); is it a complete SD checkpoint?"


def text_encoder_state(tensors: dict, slot: TextEncoderSlot) -> dict:
    """The text encoder of `slot` in transformers-4 names, its tensors taken out of `tensors`."""
    return slot.from_original({k[len(slot.prefix):]: v for k, v in _take(tensors, slot.prefix).items()})


def load_vae(path: Path, dtype: torch.dtype, family: str = "sd_v1"):
    """model.vae: a diffusers folder or a .safetensors VAE (original or diffusers key layout).
    A single file takes the base family's VAE config (SDXL's latent scaling is 0.13025, not 0.18215)."""
    from diffusers import AutoencoderKL

    if path.is_dir():
        sub = path / "vae" if (path / "vae" / "config.json").exists() else path
        try:
            return AutoencoderKL.from_pretrained(sub, local_files_only=True, torch_dtype=dtype).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"model.vae: cannot load the diffusers VAE folder {path}: {e}") from e
    if not path.is_file():
        raise UserError(f"model.vae: {path} does not exist; give a VAE .safetensors file or diffusers folder")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"model.vae: {path} is not a .safetensors file")
    tensors, metadata = read_state_dict(path)
    diffusers_layout = "encoder.conv_in.weight" in tensors and "encoder.down_blocks.0.resnets.0.conv1.weight" in tensors
    if not diffusers_layout and not any(k.startswith(("encoder.down.", VAE + "encoder.down.")) for k in tensors):
        raise UserError(f"model.vae: {path} holds no VAE weights (no encoder.down.* / first_stage_model.* keys)")
    with _config_folder(family, metadata) as configs:
        # diffusers' loader converts the original layout and takes a diffusers-layout file as it is
        return _load_model(AutoencoderKL, tensors, configs, "vae", f"model.vae: the VAE in {path}", dtype)


# ---------------------------------------------------------------- writing
#
# diffusers -> original (ldm) names. UNet, with L = layers_per_block:
#   down level i, layer j   -> input_blocks[i*(L+1) + j + 1]   .0 resnet, .1 attention
#   down level i downsample -> input_blocks[(i+1)*(L+1)].0.op
#   up level i, layer j     -> output_blocks[i*(L+1) + j]      .0 resnet, .1 attention
#   up level i upsample     -> output_blocks[i*(L+1) + L].1 (.2 after an attention).conv
#   mid resnet 0, attn, resnet 1 -> middle_block.0, .1, .2
# Resnet inside: norm1 in_layers.0, conv1 in_layers.2, time_emb_proj emb_layers.1,
# norm2 out_layers.0, conv2 out_layers.3, conv_shortcut skip_connection. Transformer blocks
# keep their names. VAE: down_blocks.i.resnets.j -> down.i.block.j, decoder up_blocks.i ->
# up.(n-1-i), mid attention to_q/k/v/to_out.0/group_norm -> q/k/v/proj_out/norm as 1x1 convs.

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_module_names(config) -> dict[str, str]:
    """diffusers module prefix -> original prefix, for a UNet2DConditionModel config."""
    names = dict(_UNET_FIXED)
    n, L = len(config.block_out_channels), config.layers_per_block
    for i in range(n):
        for j in range(L):
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{i * (L + 1) + j + 1}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{i * (L + 1) + j + 1}.1"
        if i < n - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (L + 1)}.0.op"
        has_attn = "CrossAttn" in config.up_block_types[i]
        for j in range(L + 1):
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * (L + 1) + j}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * (L + 1) + j}.1"
        if i < n - 1:
            names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (L + 1) + L}.{2 if has_attn else 1}.conv"
    names["mid_block.resnets.0"] = "middle_block.0"
    names["mid_block.attentions.0"] = "middle_block.1"
    names["mid_block.resnets.1"] = "middle_block.2"
    return names


def _rename(state: dict, modules: dict[str, str], inner: list[tuple[str, str]], what: str) -> dict:
    # Longest module prefix first, so "down_blocks.1.resnets.0" never matches "down_blocks.1".
    order = sorted(modules, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        original = _original_name(key, order, modules, inner)
        if original is None:
            raise ValueError(f"{what}: no original name for {key}")
        out[original] = value
    return out


def _original_name(key: str, order: list[str], modules: dict[str, str], inner: list[tuple[str, str]]) -> str | None:
    prefix = next((p for p in order if key.startswith(p + ".")), None)
    if prefix is None:
        return None
    rest = key[len(prefix) + 1:]
    if ".resnets." in prefix:
        rest = _replace_first(rest, inner)
    return modules[prefix] + "." + rest


def unet_original_paths(paths, config) -> dict[str, str]:
    """{diffusers module path: original (SGM) module path} for module paths of a UNet with `config`:
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`,
    `up_blocks.0.resnets.2.conv1` -> `output_blocks.2.0.in_layers.2`. Kohya's SDXL LoRA keys use these names."""
    modules = unet_module_names(config)
    order = sorted(modules, key=len, reverse=True)
    # A module path is a "prefix" of its own parameters: name it as its weight would be named.
    named = {path: _original_name(path + ".weight", order, modules, _RESNET) for path in paths}
    return {path: original.removesuffix(".weight") for path, original in named.items() if original}


def _replace_first(rest: str, pairs: list[tuple[str, str]]) -> str:
    for new, old in pairs:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_original(state: dict, config) -> dict:
    return {UNET + k: v for k, v in _rename(state, unet_module_names(config), _RESNET, "UNet").items()}


def vae_to_original(state: dict, config) -> dict:
    n = len(config.block_out_channels)
    modules = {}
    for side in ("encoder", "decoder"):
        modules.update({f"{side}.conv_in": f"{side}.conv_in", f"{side}.conv_out": f"{side}.conv_out",
                        f"{side}.conv_norm_out": f"{side}.norm_out",
                        f"{side}.mid_block.resnets.0": f"{side}.mid.block_1",
                        f"{side}.mid_block.resnets.1": f"{side}.mid.block_2",
                        f"{side}.mid_block.attentions.0": f"{side}.mid.attn_1"})
    for i in range(n):
        for j in range(config.layers_per_block):
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        modules[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        for j in range(config.layers_per_block + 1):
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        modules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    modules.update({"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"})
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in _rename(state, modules, [("conv_shortcut", "nin_shortcut")], "VAE").items():
        if ".mid.attn_1." in key:
            layer, _, param = key.rpartition(".")
            head, _, name = layer.partition(".mid.attn_1.")
            key = f"{head}.mid.attn_1.{attention[name]}.{param}"
            if value.ndim == 2:  # the original attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out[VAE + key] = value
    return out


def save_single_file(base, path, dtype: torch.dtype = torch.float16, overwrite: bool = False) -> Path:
    """One .safetensors in the original SD layout (UNet, VAE, the family's text encoders), atomically.

    The diffusers configs ride along in the metadata, so sdlora reloads non-standard sizes
    (the tiny model) exactly; A1111 and ComfyUI ignore them.
    """

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: single-file checkpoints are written as .safetensors")
    refuse_to_overwrite(path, overwrite, "pass overwrite=True")
    tensors = {}
    tensors.update(unet_to_original(base.unet.state_dict(), base.unet.config))
    tensors.update(vae_to_original(base.vae.state_dict(), base.vae.config))
    family = FAMILIES[base.family]
    first, *others = family.text_encoders
    # the first text encoder's config before the scheduler's, the others' after: the order sdlora has always written
    configs = {"unet": dict(base.unet.config), "vae": dict(base.vae.config),
               first.part: getattr(base, first.part).config.to_dict(), "scheduler": dict(base.noise_scheduler.config)}
    for slot in family.text_encoders:
        tensors.update(slot.to_original(getattr(base, slot.part).state_dict()))
    configs.update({slot.part: getattr(base, slot.part).config.to_dict() for slot in others})
    tensors = {k: v.detach().to("cpu", dtype) for k, v in tensors.items()}
    meta = {CONFIG_META_KEY: json.dumps(configs, default=str),
            "modelspec.architecture": family.architecture,
            "modelspec.prediction_type": "v" if base.prediction_type == "v_prediction" else "epsilon"}
    atomic_save_file(tensors, path, metadata=meta)
    return path


def save_diffusers(base, folder, overwrite: bool = False) -> Path:
    """A diffusers folder of the family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline),
    written to a temp folder then renamed."""

    folder = Path(folder)
    refuse_to_overwrite(folder, overwrite, "pass overwrite=True")
    with atomic_folder(folder) as tmp:
        base.pipeline().save_pretrained(tmp)
    return folder
