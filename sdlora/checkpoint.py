"""Single-file checkpoints in the original Stable Diffusion key layout (what A1111 and ComfyUI
load) and separate VAE files.

Reading: the family comes from the keys, the architecture from the configs shipped in
`assets/configs/<family>/` (or, for a file sdlora wrote, from the configs it embedded in the
safetensors metadata), and the original -> diffusers key conversion from diffusers'
`single_file_utils`. Writing: the diffusers -> original mapping below, stated per block.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .errors import UserError
from .family import ARCHITECTURES

CONFIGS = Path(__file__).parent / "assets" / "configs"
CONFIG_META_KEY = "sdlora.diffusers_config"  # JSON {"unet":..., "vae":..., "text_encoder":..., "scheduler":...}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Keys whose presence says which model a file holds.
SD1_TE = "cond_stage_model.transformer."  # OpenAI CLIP-L
SD2_TE = "cond_stage_model.model.transformer.resblocks."  # OpenCLIP ViT-H
SDXL_TE1 = "conditioner.embedders.0.transformer."  # OpenAI CLIP-L
SDXL_TE2 = "conditioner.embedders.1."  # OpenCLIP ViT-bigG
UNET = "model.diffusion_model."
VAE = "first_stage_model."
# ComfyUI's SD20 check (supported_models.py): the v models' last attention block has a
# spread-out norm1 bias (std > 0.09); the epsilon 512-base models keep it near zero.
V_PROBE = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


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
    """'sd_v1' | 'sd_v2' | 'sdxl' from the text-encoder keys of an original-layout file."""
    keys = list(keys)
    if any(k.startswith(SDXL_TE2) for k in keys):
        return "sdxl"
    if any(k.startswith(SD2_TE) for k in keys):
        return "sd_v2"
    if any(k.startswith(SD1_TE) for k in keys):
        return "sd_v1"
    has_unet = any(k.startswith(UNET) for k in keys)
    what = "a UNet without a text encoder" if has_unet else "no Stable Diffusion UNet or text encoder"
    raise UserError(f"model.base: {path} holds {what} (unknown model family; sdlora reads SD1.x, SD2.x and SDXL "
                    "checkpoints in the original layout, e.g. as A1111 saves them)")


def sd2_prediction_type(tensors: dict) -> str:
    probe = tensors.get(V_PROBE)
    if probe is not None and torch.std(probe.float(), unbiased=False) > 0.09:
        return "v_prediction"
    return "epsilon"


def _configs_for(family: str, metadata: dict) -> dict:
    if CONFIG_META_KEY in metadata:
        return json.loads(metadata[CONFIG_META_KEY])
    folder = CONFIGS / family
    parts = {p.name: json.loads(next(p.glob("*.json")).read_text()) for p in folder.iterdir() if p.is_dir()}
    return parts


def load_single_file(path: Path, model_cfg, dtype: torch.dtype) -> dict:
    """The components of an original-layout SD1.x / SD2.x / SDXL checkpoint (see models.load_base)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .cache import file_digest

    tensors, metadata = read_state_dict(path, model_cfg.allow_pickle)
    family = detect_family(tensors, path)
    if family == "sd_v2":
        if model_cfg.v_parameterization != "auto":
            prediction_type = model_cfg.v_parameterization
            how = "model.v_parameterization"
        else:
            prediction_type = sd2_prediction_type(tensors)
            how = "guessed from the weights; set model.v_parameterization if wrong"
        if prediction_type == "v_prediction":
            family = "sd_v2_v"
    else:
        prediction_type, how = "epsilon", "SD1.x" if family == "sd_v1" else "SDXL base"
    configs = _configs_for(family, metadata)
    # Parameters start on the meta device (no random init of a billion weights); the file's
    # tensors are then assigned in place. Buffers (position ids) are built normally.
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**_clip_config(configs["text_encoder"])))
        if family == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_clip_config(configs["text_encoder_2"])))
    _load(unet, _unet_to_diffusers(tensors, unet.config), path, "UNet", dtype)
    _load(vae, _vae_to_diffusers(tensors, vae.config), path, "VAE", dtype)
    parts = dict(tokenizer=_tokenizer(family))
    if family == "sdxl":
        _load(text_encoder, _te_to_diffusers(tensors, text_encoder, "sd_v1", SDXL_TE1), path, "text encoder 1", dtype)
        _load(text_encoder_2, _te_to_diffusers(tensors, text_encoder_2, "sd_v2", SDXL_TE2 + "model."), path,
              "text encoder 2", dtype)
        parts.update(text_encoder_2=text_encoder_2.eval(), tokenizer_2=_tokenizer("sd_v2"))
    else:
        te_prefix = SD1_TE if family == "sd_v1" else "cond_stage_model.model."
        _load(text_encoder, _te_to_diffusers(tensors, text_encoder, family, te_prefix), path, "text encoder", dtype)
    scheduler = DDPMScheduler.from_config(configs["scheduler"], prediction_type=prediction_type)
    parts.update(text_encoder=text_encoder.eval(), vae=vae.eval(), unet=unet.eval(),
                 noise_scheduler=scheduler, family=family, prediction_type=prediction_type,
                 model_hash=file_digest(path))
    print(f"{path.name}: {family}, {prediction_type} ({how})")
    return parts


def _clip_config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "transformers_version", "dtype",
                                                      "torch_dtype", "_name_or_path")}


def _load(model: torch.nn.Module, state: dict, path: Path, what: str, dtype: torch.dtype) -> None:
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(state) - {k for k in expected if k.endswith("position_ids")})
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape mismatch at {wrong[:3]}")
        raise UserError(f"model.base: the {what} in {path} does not match the expected architecture ({detail}); "
                        "is it a complete SD checkpoint?")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items() if k in expected}, strict=False, assign=True)


def _unet_to_diffusers(tensors: dict, config) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(tensors, dict(config))


def _vae_to_diffusers(tensors: dict, config) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(tensors, dict(config))


def _te_to_diffusers(tensors: dict, text_encoder, layout: str, prefix: str) -> dict:
    """`layout` sd_v1: OpenAI CLIP keys under `prefix`; otherwise OpenCLIP keys (fused in_proj)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if layout == "sd_v1":
        state = convert_ldm_clip_checkpoint({k: v for k, v in tensors.items() if k.startswith(prefix)}, prefix)
    else:
        state = convert_open_clip_checkpoint(text_encoder, tensors, prefix=prefix)
        if not hasattr(text_encoder, "text_projection"):
            # SD2 files carry OpenCLIP's text_projection, which the UNet never sees.
            state.pop("text_projection.weight", None)
    return _match_text_model_prefix(state, text_encoder)


def _match_text_model_prefix(state: dict, text_encoder) -> dict:
    # diffusers names keys `text_model.*`; transformers 5's CLIPTextModel has no `text_model.`.
    nested = any(k.startswith("text_model.") for k in text_encoder.state_dict())
    if nested:
        return state
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def _tokenizer(family: str):
    from .tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    if family.startswith("sd_v2"):
        # OpenCLIP pads with "!" (id 0) where OpenAI CLIP pads with <|endoftext|>.
        tok.pad_token = "!"
    return tok


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
    from accelerate import init_empty_weights

    tensors, metadata = read_state_dict(path)
    with init_empty_weights(include_buffers=False):
        vae = AutoencoderKL.from_config(_configs_for(family, metadata)["vae"])
    if "encoder.conv_in.weight" in tensors and "encoder.down_blocks.0.resnets.0.conv1.weight" in tensors:
        state = tensors  # diffusers layout
    else:
        if not any(k.startswith(("encoder.down.", VAE + "encoder.down.")) for k in tensors):
            raise UserError(f"model.vae: {path} holds no VAE weights (no encoder.down.* / first_stage_model.* keys)")
        state = _vae_to_diffusers(tensors, vae.config)
    try:
        _load(vae, state, path, "VAE", dtype)
    except UserError as e:
        raise UserError(f"model.vae: {str(e).removeprefix('model.base: ')}") from None
    return vae.eval()


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


def text_encoder_to_original(state: dict, layout: str, prefix: str) -> dict:
    """A CLIPTextModel(WithProjection) state dict under `prefix`, in OpenAI CLIP names (layout
    sd_v1: SD1, SDXL's first encoder) or OpenCLIP names (SD2, SDXL's second encoder)."""
    projection = state.get("text_projection.weight")
    state = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()
             if not k.endswith("position_ids") and k != "text_projection.weight"}
    if layout == "sd_v1":
        return {prefix + k: v for k, v in state.items()}
    # OpenCLIP: fused in_proj (q, k, v stacked on dim 0), resblocks, ln_final, and
    # text_projection applied as x @ P, so P is the transposed Linear weight.
    out = {} if projection is None else {prefix + "text_projection": projection.T.contiguous()}
    simple = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
              "text_model.embeddings.position_embedding.weight": "positional_embedding",
              "text_model.final_layer_norm.weight": "ln_final.weight",
              "text_model.final_layer_norm.bias": "ln_final.bias"}
    layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
    for key, value in state.items():
        if key in simple:
            out[prefix + simple[key]] = value
            continue
        layer, rest = key.removeprefix("text_model.encoder.layers.").split(".", 1)
        module, param = rest.rsplit(".", 1)
        base = f"{prefix}transformer.resblocks.{layer}."
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if module == "self_attn.q_proj":
                parts = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out[base + f"attn.in_proj_{param}"] = torch.cat(parts, 0)
            continue
        out[base + layer_names[module] + "." + param] = value
    return out


def save_single_file(base, path, dtype: torch.dtype = torch.float16, overwrite: bool = False) -> Path:
    """One .safetensors in the original SD layout (UNet, VAE, text encoder), atomically.

    The diffusers configs ride along in the metadata, so sdlora reloads non-standard sizes
    (the tiny model) exactly; A1111 and ComfyUI ignore them.
    """
    from .io import atomic_save_file, refuse_to_overwrite

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: single-file checkpoints are written as .safetensors")
    refuse_to_overwrite(path, overwrite)
    tensors = {}
    tensors.update(unet_to_original(base.unet.state_dict(), base.unet.config))
    tensors.update(vae_to_original(base.vae.state_dict(), base.vae.config))
    configs = {"unet": dict(base.unet.config), "vae": dict(base.vae.config),
               "text_encoder": base.text_encoder.config.to_dict(), "scheduler": dict(base.noise_scheduler.config)}
    te = base.text_encoder.state_dict()
    if base.family == "sdxl":
        tensors.update(text_encoder_to_original(te, "sd_v1", SDXL_TE1))
        tensors.update(text_encoder_to_original(base.text_encoder_2.state_dict(), "sd_v2", SDXL_TE2 + "model."))
        configs["text_encoder_2"] = base.text_encoder_2.config.to_dict()
    elif base.family == "sd_v1":
        tensors.update(text_encoder_to_original(te, "sd_v1", SD1_TE))
    else:
        tensors.update(text_encoder_to_original(te, "sd_v2", "cond_stage_model.model."))
    tensors = {k: v.detach().to("cpu", dtype) for k, v in tensors.items()}
    meta = {CONFIG_META_KEY: json.dumps(configs, default=str), "modelspec.architecture": ARCHITECTURES[base.family],
            "modelspec.prediction_type": "v" if base.prediction_type == "v_prediction" else "epsilon"}
    atomic_save_file(tensors, path, metadata=meta)
    return path


def save_diffusers(base, folder, overwrite: bool = False) -> Path:
    """A diffusers StableDiffusionPipeline folder, written to a temp folder then renamed."""
    from .io import atomic_folder, refuse_to_overwrite

    folder = Path(folder)
    refuse_to_overwrite(folder, overwrite)
    with atomic_folder(folder) as tmp:
        base.pipeline().save_pretrained(tmp)
    return folder
