"""FLUX.1 single files in the layouts people download: BFL's transformer (bare, or under ComfyUI's
model.diffusion_model.) with separate CLIP-L / T5-XXL / autoencoder files, ComfyUI's all-in-one files,
and fp8-stored weights. Tiny checkpoints are written from a tiny FluxPipeline and loaded back."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from sdlora.config import ModelConfig, config_from_dict
from sdlora.errors import UserError
from sdlora.models.checkpoint import CONFIG_META_KEY, vae_to_original
from sdlora.models.families import FAMILIES
from sdlora.models.load import load_base
from sdlora.models.transformer_names import (
    FLUX_NAMES,
    state_from_original,
    state_to_original,
)
from sdlora.tiny.configs import build_flux_pipeline, t5_tokenizer

CLIP_L, T5 = FAMILIES["flux1_dev"].text_encoders


def _configs(pipe) -> dict:
    """The tiny parts' diffusers configs, as a file sdlora wrote carries them (the real sizes are shipped)."""
    return {"transformer": dict(pipe.transformer.config), "vae": dict(pipe.vae.config),
            "text_encoder": pipe.text_encoder.config.to_dict(), "text_encoder_2": pipe.text_encoder_2.config.to_dict(),
            "scheduler": dict(pipe.scheduler.config)}


def _save(tensors: dict, path, dtype=torch.float32, configs: dict | None = None):
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}
    save_file(tensors, path, metadata={CONFIG_META_KEY: json.dumps(configs, default=str)} if configs else None)
    return path


def _bfl_transformer(pipe) -> dict:
    return state_to_original(pipe.transformer.state_dict(), pipe.transformer, FLUX_NAMES)


def _bfl_vae(pipe) -> dict:
    # ae.safetensors: the LDM autoencoder's names without first_stage_model.
    return {k.removeprefix("first_stage_model."): v for k, v in vae_to_original(pipe.vae.state_dict(),
                                                                                 pipe.vae.config).items()}


@pytest.fixture(scope="module")
def pipes():
    return {variant: build_flux_pipeline(guidance=variant == "dev") for variant in ("dev", "schnell")}


@pytest.fixture(scope="module")
def parts(pipes, tmp_path_factory):
    """Separate files as downloaded: clip_l.safetensors, t5xxl_fp16.safetensors, ae.safetensors, and the
    T5 tokenizer's folder (as ComfyUI's comfy/text_encoders/t5_tokenizer)."""
    root, pipe = tmp_path_factory.mktemp("flux_parts"), pipes["dev"]
    t5_tokenizer().save_pretrained(root / "t5_tokenizer")
    return {"clip_l": _save(CLIP_L.to_original(pipe.text_encoder.state_dict()), root / "clip_l.safetensors"),
            "t5": _save(T5.to_original(pipe.text_encoder_2.state_dict()), root / "t5xxl_fp16.safetensors", torch.float16),
            "ae": _save(_bfl_vae(pipe), root / "ae.safetensors", configs={"vae": dict(pipe.vae.config)}),
            "tokenizer": root / "t5_tokenizer"}


def _model_cfg(base, parts=None, **kw) -> ModelConfig:
    if parts is not None:
        kw = dict(vae=str(parts["ae"]), text_encoders=[str(parts[k]) for k in ("clip_l", "t5", "tokenizer")], **kw)
    return ModelConfig(base=str(base), **kw)


def _assert_same_weights(model, reference, round_to=None):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        expected = value if round_to is None else value.to(round_to).to(value.dtype)
        assert ours[key].dtype == value.dtype, key
        assert torch.equal(ours[key], expected), key


def test_the_bfl_map_reads_as_diffusers_own_single_file_converter_at_full_width():
    """At FLUX.1's real width (3072, which diffusers' converter assumes) the map lays out and reads BFL's
    tensors as convert_flux_transformer_checkpoint_to_diffusers reads them: narrow random stand-ins with
    each tensor's real row count (rows are all that fusing and swapping touch)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    with torch.device("meta"):
        flux = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    g = torch.Generator().manual_seed(0)
    ours = {k: torch.randn(v.shape[0], *([3] if v.ndim > 1 else []), generator=g) for k, v in flux.state_dict().items()}
    original = state_to_original(ours, flux, FLUX_NAMES)
    assert "double_blocks.1.img_attn.qkv.weight" in original and "single_blocks.1.linear1.weight" in original
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    back = state_from_original(original, flux, FLUX_NAMES)
    for converted in (theirs, back):
        assert converted.keys() == ours.keys()
        assert all(torch.equal(converted[k], ours[k]) for k in ours)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_a_bfl_transformer_with_separate_text_encoders_and_autoencoder_loads_as_the_pipeline(variant, pipes, parts,
                                                                                            tmp_path):
    pipe = pipes[variant]
    bfl = _save(_bfl_transformer(pipe), tmp_path / f"flux1-{variant}.safetensors", configs=_configs(pipe))
    base = load_base(_model_cfg(bfl, parts))
    assert base.family == f"flux1_{variant}" and base.prediction_type == "flow"
    assert "guidance embedding" in base.detected
    _assert_same_weights(base.unet, pipe.transformer)
    _assert_same_weights(base.vae, pipes["dev"].vae)
    _assert_same_weights(base.text_encoder, pipes["dev"].text_encoder)
    _assert_same_weights(base.text_encoder_2, pipes["dev"].text_encoder_2, round_to=torch.float16)  # stored so
    assert type(base.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert base.tokenizers[1]("clrscn, lake").input_ids == pipe.tokenizer_2("clrscn, lake").input_ids


def test_a_transformer_in_diffusers_names_loads_too(pipes, parts, tmp_path):
    """One file of diffusers' names (a FluxTransformer2DModel's state dict, as kohya also reads), dev or schnell
    by its guidance embedder."""
    for variant, pipe in pipes.items():
        single = _save(pipe.transformer.state_dict(), tmp_path / f"{variant}.safetensors", configs=_configs(pipe))
        base = load_base(_model_cfg(single, parts))
        assert base.family == f"flux1_{variant}"
        _assert_same_weights(base.unet, pipe.transformer)


def test_a_comfyui_all_in_one_file_renders_what_the_pipeline_renders(pipes, parts, tmp_path):
    """model.diffusion_model. + vae. + text_encoders.clip_l/t5xxl.transformer. in one file (ComfyUI's
    save format, its supported_models.Flux prefixes), bf16 as ComfyUI saves; only the T5 tokenizer is separate."""
    pipe = pipes["dev"]
    tensors = {"model.diffusion_model." + k: v for k, v in _bfl_transformer(pipe).items()}
    tensors |= {"vae." + k: v for k, v in _bfl_vae(pipe).items()}
    tensors |= CLIP_L.to_original(pipe.text_encoder.state_dict()) | T5.to_original(pipe.text_encoder_2.state_dict())
    # what else ComfyUI's CLIP-L part may hold: a projection FLUX never reads, CLIP's logit scale
    tensors |= {"text_encoders.clip_l.transformer.text_projection.weight": torch.eye(32),
                "text_encoders.clip_l.logit_scale": torch.tensor(4.6055)}
    assert any(k.startswith("text_encoders.clip_l.transformer.text_model.") for k in tensors)
    assert any(k.startswith("text_encoders.t5xxl.transformer.encoder.block.") for k in tensors)
    aio = _save(tensors, tmp_path / "flux1-dev-aio.safetensors", torch.bfloat16, _configs(pipe))
    base = load_base(ModelConfig(base=str(aio), text_encoders=[str(parts["tokenizer"])]))
    assert base.family == "flux1_dev"
    reference = copy.deepcopy(pipe)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(reference, name).eval()  # built in training mode: T5's dropout
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(p.to(torch.bfloat16))  # the weights as the file stores them
        _assert_same_weights(getattr(base, name if name != "transformer" else "unet"), module)
    kwargs = dict(prompt="clrscn, mountains", height=32, width=32, num_inference_steps=2, max_sequence_length=32,
                  output_type="pt")
    ours = base.pipeline()(**kwargs, generator=torch.Generator().manual_seed(0)).images
    theirs = reference(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert ours.shape == (1, 3, 32, 32) and torch.isfinite(ours).all()
    assert torch.equal(ours, theirs)


def test_fp8_stored_weights_load_upcast_to_the_training_dtype(pipes, parts, tmp_path):
    """A ComfyUI-saved transformer (model.diffusion_model.) stored as float8_e4m3fn, with an fp8 T5
    (t5xxl_fp8_e4m3fn.safetensors): every weight is the pipeline's rounded to fp8, held as float32."""
    pipe = pipes["dev"]
    fp8 = torch.float8_e4m3fn
    transformer = _save({"model.diffusion_model." + k: v for k, v in _bfl_transformer(pipe).items()},
                        tmp_path / "flux1-dev-fp8.safetensors", fp8, _configs(pipe))
    t5 = _save(T5.to_original(pipe.text_encoder_2.state_dict()), tmp_path / "t5xxl_fp8_e4m3fn.safetensors", fp8)
    cfg = _model_cfg(transformer, parts)
    cfg.text_encoders[1] = str(t5)
    base = load_base(cfg, dtype=torch.float32)
    _assert_same_weights(base.unet, pipe.transformer, round_to=fp8)
    _assert_same_weights(base.text_encoder_2, pipe.text_encoder_2, round_to=fp8)
    _assert_same_weights(base.text_encoder, pipe.text_encoder)


def test_a_training_step_runs_on_a_single_file_base(pipes, parts, tmp_path):
    pipe = pipes["schnell"]
    bfl = _save(_bfl_transformer(pipe), tmp_path / "flux1-schnell.safetensors", configs=_configs(pipe))
    base = load_base(_model_cfg(bfl, parts))
    family = FAMILIES[base.family].for_training(config_from_dict({}).train)
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    ids = [tok(["clrscn, lake"], padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in base.tokenizers]
    text = family.encode_text(base.text_encoders, ids)
    base.unet.requires_grad_(True)
    out = family.predict(base.unet, latents, torch.tensor([0.5]), text, None, torch.float32)
    out.pow(2).mean().backward()
    assert out.shape == latents.shape and base.unet.proj_out.weight.grad.abs().sum() > 0


def test_missing_parts_are_one_line_errors_naming_the_field(pipes, parts, tmp_path):
    pipe = pipes["dev"]
    bfl = _save(_bfl_transformer(pipe), tmp_path / "flux1-dev.safetensors", configs=_configs(pipe))
    with pytest.raises(UserError, match=r"flux1-dev.safetensors holds no VAE; set model.vae = \"ae.safetensors\""):
        load_base(ModelConfig(base=str(bfl)))
    with pytest.raises(UserError, match="holds no CLIP-L text encoder; add its file to model.text_encoders"):
        load_base(ModelConfig(base=str(bfl), vae=str(parts["ae"])))
    with pytest.raises(UserError, match="holds no T5-XXL text encoder"):
        load_base(ModelConfig(base=str(bfl), vae=str(parts["ae"]), text_encoders=[str(parts["clip_l"])]))
    with pytest.raises(UserError, match=r"model.text_encoders: .*ae.safetensors holds none of FLUX.1 dev's text"):
        load_base(ModelConfig(base=str(bfl), vae=str(parts["ae"]), text_encoders=[str(parts["ae"])]))
    with pytest.raises(UserError, match="model.text_encoders: .* is not a single-file checkpoint"):
        load_base(ModelConfig(base="tiny", text_encoders=[str(parts["clip_l"])]))
    scaled = _bfl_transformer(pipe) | {"scaled_fp8": torch.zeros(2), "img_in.scale_weight": torch.ones(1)}
    scaled = _save(scaled, tmp_path / "flux1-dev-scaled.safetensors", configs=_configs(pipe))
    with pytest.raises(UserError, match="scaled fp8"):
        load_base(_model_cfg(scaled, parts))
    cut = {k: v for k, v in _bfl_transformer(pipe).items() if not k.startswith("single_blocks.1.")}
    cut = _save(cut, tmp_path / "flux1-dev-cut.safetensors", configs=_configs(pipe))
    with pytest.raises(UserError, match=r"FluxTransformer in .*does not match .*missing \['single_transformer_blocks.1"):
        load_base(_model_cfg(cut, parts))


def test_text_encoders_paths_are_read_from_the_config_folder(tmp_path):
    cfg = config_from_dict({"model": {"base": "flux1-dev.safetensors", "vae": "ae.safetensors",
                                      "text_encoders": ["te/clip_l.safetensors", str(tmp_path / "t5.safetensors")]}},
                           base_dir=tmp_path / "cfg")
    assert cfg.model.text_encoders == [str(tmp_path / "cfg" / "te" / "clip_l.safetensors"),
                                       str(tmp_path / "t5.safetensors")]


def test_fp8_stored_weights_stay_as_stored_under_model_quantize_fp8(pipes, parts, tmp_path):
    """model.quantize = "fp8" holds an fp8-stored file's weights as the file stores them (scale 1), not
    rounded a second time onto a per-channel scale."""
    from sdlora.models.quantize import QuantizedLayer, quantize_frozen

    pipe = pipes["dev"]
    transformer = _save(_bfl_transformer(pipe), tmp_path / "flux1-dev-fp8.safetensors", torch.float8_e4m3fn,
                        _configs(pipe))
    base = load_base(_model_cfg(transformer, parts), dtype=torch.bfloat16)
    loaded = {name: m.weight.detach().clone() for name, m in base.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    base.unet.requires_grad_(False)
    assert quantize_frozen(base.unet, "fp8")["layers"] == len(loaded)
    for name, layer in base.unet.named_modules():
        if isinstance(layer, QuantizedLayer):
            assert layer.qweight.dtype == torch.float8_e4m3fn
            assert torch.equal(layer.dequantize(torch.bfloat16), loaded[name]), name


def test_the_sd3_map_reads_stability_files_as_diffusers_converter():
    """The same reader serves SD3.x (MMDiT-X attn2, qk norms, the context_pre_only last block, pos_embed):
    Stability's layout written by the map is what convert_sd3_transformer_checkpoint_to_diffusers reads."""
    from diffusers.loaders.single_file_utils import (
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    from sdlora.models.transformer_names import SD3_NAMES
    from sdlora.tiny.configs import build_sd3_components

    transformer = build_sd3_components(medium=True)["transformer"]
    ours = transformer.state_dict()
    original = state_to_original(ours, transformer, SD3_NAMES)
    assert "joint_blocks.0.x_block.attn2.ln_q.weight" in original and "pos_embed" in original
    for converted in (convert_sd3_transformer_checkpoint_to_diffusers(dict(original)),
                      state_from_original(original, transformer, SD3_NAMES)):
        assert converted.keys() == ours.keys()
        assert all(torch.equal(converted[k], ours[k]) for k in ours)


@pytest.mark.parametrize("family, params", [("flux1_dev", 11_901_408_320), ("flux1_schnell", 11_891_178_560)])
def test_the_shipped_configs_are_flux1s_architecture(family, params):
    """The configs a real flux1-dev/schnell.safetensors loads with (meta device: shapes only); the counts are
    BFL's (schnell lacks the guidance embedding), T5-XXL's encoder 4.76 B."""
    import transformers
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from sdlora.models.arch import CONFIGS

    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(CONFIGS / family,
                                                                                            subfolder="transformer"))
        t5 = transformers.T5EncoderModel(
            transformers.T5Config.from_pretrained(CONFIGS / family, subfolder="text_encoder_2"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / family, subfolder="vae"))
    assert sum(p.numel() for p in transformer.parameters()) == params
    assert sum(p.numel() for p in t5.parameters()) == 4_762_310_656
    assert vae.config.latent_channels == 16 and (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)


def test_t5s_tokenizer_comes_from_the_hugging_face_cache_or_a_one_line_error(tmp_path):
    """Without a tokenizer folder, T5's comes from a FLUX.1 repository's tokenizer_2 in the local cache
    (laid out as huggingface_hub stores a snapshot); nothing is downloaded."""
    from sdlora.models.tokenizer import t5_tokenizer

    with pytest.raises(UserError, match="model.text_encoders: T5-XXL's tokenizer is not on this machine; add its folder"):
        t5_tokenizer(tmp_path / "empty_cache")
    repo = tmp_path / "cache" / "models--black-forest-labs--FLUX.1-schnell"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    from sdlora.tiny.configs import t5_tokenizer as tiny_t5_tokenizer

    tiny_t5_tokenizer().save_pretrained(repo / "snapshots" / ("0" * 40) / "tokenizer_2")
    found = t5_tokenizer(tmp_path / "cache")
    assert found("clrscn, lake").input_ids == tiny_t5_tokenizer()("clrscn, lake").input_ids


def test_every_layout_recognises_the_file_it_writes():
    """model.text_encoders tells files apart by each layout's tensor names and width: every family's slot
    recognises its own encoder written in its layout, and no other layout claims it."""
    from sdlora.tiny.configs import build_sdxl_pipeline

    encoders = {"flux": (build_flux_pipeline(), FAMILIES["flux1_dev"]), "sdxl": (build_sdxl_pipeline(), FAMILIES["sdxl"])}
    layouts = {s.layout for f in FAMILIES.values() for s in f.text_encoders if s.layout is not None}  # None: no files yet
    for pipe, family in encoders.values():
        for slot in family.text_encoders:
            model = getattr(pipe, slot.part)
            state = {k.removeprefix(slot.prefix): v for k, v in slot.to_original(model.state_dict()).items()}
            assert slot.layout.recognises(state) and slot.layout.width(state) == model.config.hidden_size
            assert [layout for layout in layouts if layout.recognises(state)
                    and type(layout) is not type(slot.layout)] == []
