"""SD3.x single files in Stability's layouts (sd3.5_large.safetensors, sd3.5_medium.safetensors,
sd3_medium*.safetensors): the MMDiT under model.diffusion_model.joint_blocks..., the VAE under
first_stage_model., with or without text_encoders.clip_l/clip_g/t5xxl.transformer.; separate CLIP-L /
CLIP-G / T5 files; fp8-stored weights. Tiny checkpoints are written from a tiny StableDiffusion3Pipeline
and loaded back."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from sdlora.config import ModelConfig
from sdlora.errors import UserError
from sdlora.models.checkpoint import CONFIG_META_KEY, vae_to_original
from sdlora.models.families import FAMILIES
from sdlora.models.load import load_base
from sdlora.models.transformer_names import SD3_NAMES, state_to_original
from sdlora.tiny.configs import (
    MINI_SD3_TRANSFORMER,
    MINI_SDXL_TEXT_ENCODER_2,
    build_sd3_pipeline,
    t5_tokenizer,
)

CLIP_L, CLIP_G, T5 = FAMILIES["sd35_large"].text_encoders
VARIANTS = {"medium": "sd3_medium", "5-medium": "sd35_medium", "5-large": "sd35_large"}


def _pipe(variant: str):
    """A tiny StableDiffusion3Pipeline of `variant` (sd-scripts' model type). CLIP-G is narrower than CLIP-L
    (24 vs 32 wide, as the real 1280 vs 768 differ) so that separate files are told apart by width, and
    CLIP-L's projection is the identity, as SD3 reads CLIP-L's pooled output unprojected."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    pipe = build_sd3_pipeline(medium=variant == "5-medium")
    torch.manual_seed(2)
    if variant == "medium":  # SD3 Medium: no qk norm
        pipe.transformer = SD3Transformer2DModel(**dict(MINI_SD3_TRANSFORMER, qk_norm=None))
    pipe.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(MINI_SDXL_TEXT_ENCODER_2, hidden_size=24,
                                                                            intermediate_size=48)))
    with torch.no_grad():
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(32))
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        getattr(pipe, name).eval()  # built in training mode: T5's dropout
    return pipe


def _configs(pipe) -> dict:
    """The tiny parts' diffusers configs, as a file sdlora wrote carries them (the real sizes are shipped)."""
    return {"transformer": dict(pipe.transformer.config), "vae": dict(pipe.vae.config),
            **{part: getattr(pipe, part).config.to_dict() for part in ("text_encoder", "text_encoder_2",
                                                                       "text_encoder_3")},
            "scheduler": dict(pipe.scheduler.config)}


def _save(tensors: dict, path, dtype=torch.float32, configs: dict | None = None):
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}
    save_file(tensors, path, metadata={CONFIG_META_KEY: json.dumps(configs, default=str)} if configs else None)
    return path


def _sai(pipe, text_encoders: bool = True) -> dict:
    """Stability's checkpoint layout: model.diffusion_model. + first_stage_model. (+ text_encoders.*)."""
    tensors = {"model.diffusion_model." + k: v
               for k, v in state_to_original(pipe.transformer.state_dict(), pipe.transformer, SD3_NAMES).items()}
    tensors |= vae_to_original(pipe.vae.state_dict(), pipe.vae.config)
    if text_encoders:
        for slot in (CLIP_L, CLIP_G, T5):
            tensors |= slot.to_original(getattr(pipe, slot.part).state_dict())
    return tensors


@pytest.fixture(scope="module")
def pipes():
    return {variant: _pipe(variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def parts(pipes, tmp_path_factory):
    """Separate files as Stability ships them beside sd3.5_large.safetensors (text_encoders/clip_l.safetensors,
    clip_g.safetensors, t5xxl_fp16.safetensors: transformers' names, bare) and T5's tokenizer folder."""
    root, pipe = tmp_path_factory.mktemp("sd3_parts"), pipes["5-large"]
    t5_tokenizer().save_pretrained(root / "t5_tokenizer")
    clip_l = CLIP_L.to_original(pipe.text_encoder.state_dict())
    # SAI's clip_l.safetensors may hold a projection: SD3 never reads it (its pooled output is unprojected)
    clip_l |= {CLIP_L.prefix + "text_projection.weight": torch.randn(32, 32)}
    return {"clip_l": _save({k.removeprefix(CLIP_L.prefix): v for k, v in clip_l.items()}, root / "clip_l.safetensors"),
            "clip_g": _save(CLIP_G.to_original(pipe.text_encoder_2.state_dict()), root / "clip_g.safetensors"),
            "t5": _save(T5.to_original(pipe.text_encoder_3.state_dict()), root / "t5xxl_fp16.safetensors",
                        torch.float16),
            "tokenizer": root / "t5_tokenizer"}


def _assert_same_weights(model, reference, round_to=None):
    """Every tensor of `model` is `reference`'s (rounded through `round_to`, as a file stored it), in its dtype."""
    theirs = {k: v if round_to is None else v.to(round_to).to(v.dtype) for k, v in reference.state_dict().items()}
    ours = model.state_dict()
    assert ours.keys() == theirs.keys()
    assert [k for k, v in theirs.items() if ours[k].dtype != v.dtype or not torch.equal(ours[k], v)] == []


def _assert_same_pipeline(base, pipe, round_to=None, text_round_to=None):
    _assert_same_weights(base.unet, pipe.transformer, round_to)
    _assert_same_weights(base.vae, pipe.vae, round_to)
    _assert_same_weights(base.text_encoder, pipe.text_encoder, text_round_to)
    _assert_same_weights(base.text_encoder_2, pipe.text_encoder_2, text_round_to)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_stability_file_with_its_text_encoders_loads_as_the_pipeline(variant, pipes, parts, tmp_path):
    """sd3.5_large.safetensors-style: everything in one file; the variant is read from the MMDiT's tensors
    (qk norms, MMDiT-X blocks) as sd-scripts' analyze_state_dict_state reads them."""
    pipe = pipes[variant]
    path = _save(_sai(pipe), tmp_path / f"{variant}.safetensors", configs=_configs(pipe))
    base = load_base(ModelConfig(base=str(path), text_encoders=[str(parts["tokenizer"])]))
    assert base.family == VARIANTS[variant] and base.prediction_type == "flow"
    assert FAMILIES[base.family].base_model_version == variant
    assert base.detected.startswith(FAMILIES[base.family].title + ": 2 joint blocks")
    assert ("qk RMS norm" in base.detected) == (variant != "medium")
    assert ("dual attention in blocks 0-0" in base.detected) == (variant == "5-medium")
    _assert_same_pipeline(base, pipe)
    _assert_same_weights(base.text_encoder_3, pipe.text_encoder_3)
    assert type(base.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert base.noise_scheduler.config.shift == 3.0
    assert base.tokenizers[2]("clrscn, lake").input_ids == pipe.tokenizer_3("clrscn, lake").input_ids
    assert base.tokenizers[1]("clrscn, lake").input_ids == pipe.tokenizer_2("clrscn, lake").input_ids


def test_a_file_without_text_encoders_takes_separate_files_told_apart_by_width(pipes, parts, tmp_path):
    """sd3.5_medium.safetensors without text encoders (and the MMDiT bare, as a transformer saved alone): CLIP-G,
    T5 and CLIP-L given in any order are recognised by layout and width; CLIP-L's own projection is not read."""
    pipe = pipes["5-large"]
    tensors = {k.removeprefix("model.diffusion_model."): v for k, v in _sai(pipe, text_encoders=False).items()}
    path = _save(tensors, tmp_path / "sd3.5_large.safetensors", torch.bfloat16, _configs(pipe))
    base = load_base(ModelConfig(base=str(path), text_encoders=[str(parts[k]) for k in ("clip_g", "tokenizer",
                                                                                           "t5", "clip_l")]))
    assert base.family == "sd35_large"
    _assert_same_weights(base.unet, pipe.transformer, round_to=torch.bfloat16)
    _assert_same_weights(base.text_encoder, pipe.text_encoder)
    assert torch.equal(base.text_encoder.text_projection.weight, torch.eye(32))
    _assert_same_weights(base.text_encoder_2, pipe.text_encoder_2)
    _assert_same_weights(base.text_encoder_3, pipe.text_encoder_3, round_to=torch.float16)


def test_fp8_stored_weights_load_upcast_to_the_training_dtype(pipes, parts, tmp_path):
    """A whole file stored as float8_e4m3fn (the fp8 checkpoints): every weight is the pipeline's rounded to
    fp8, held as float32; the separate fp16 T5 replaces the file's own."""
    pipe, fp8 = pipes["5-medium"], torch.float8_e4m3fn
    path = _save(_sai(pipe), tmp_path / "sd3.5_medium_fp8.safetensors", fp8, _configs(pipe))
    base = load_base(ModelConfig(base=str(path), text_encoders=[str(parts["t5"]), str(parts["tokenizer"])]),
                     dtype=torch.float32)
    assert base.family == "sd35_medium"
    _assert_same_pipeline(base, pipe, round_to=fp8, text_round_to=fp8)
    _assert_same_weights(base.text_encoder_3, pipes["5-large"].text_encoder_3, round_to=torch.float16)


def test_a_stability_file_renders_what_the_pipeline_renders(pipes, parts, tmp_path):
    """bf16 as Stability ships them; StableDiffusion3Pipeline over the loaded parts renders the pixels of the
    same pipeline built from the parts the file was written from."""
    pipe = pipes["5-medium"]
    path = _save(_sai(pipe), tmp_path / "sd3.5_medium.safetensors", torch.bfloat16, _configs(pipe))
    base = load_base(ModelConfig(base=str(path), text_encoders=[str(parts["tokenizer"])]))
    reference = copy.deepcopy(pipe)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        with torch.no_grad():
            for p in getattr(reference, name).state_dict().values():  # pos_embed, a buffer, too
                p.copy_(p.to(torch.bfloat16))  # the weights as the file stores them
    kwargs = dict(prompt="clrscn, mountains", height=32, width=32, num_inference_steps=2, max_sequence_length=32,
                  guidance_scale=4.0, output_type="pt")
    ours = base.pipeline()(**kwargs, generator=torch.Generator().manual_seed(0)).images
    theirs = reference(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert ours.shape == (1, 3, 32, 32) and torch.isfinite(ours).all()
    assert torch.equal(ours, theirs)


def test_missing_parts_are_one_line_errors_naming_the_field(pipes, parts, tmp_path):
    pipe = pipes["5-large"]
    transformer = {k: v for k, v in _sai(pipe, text_encoders=False).items() if k.startswith("model.diffusion_model.")}
    alone = _save(transformer, tmp_path / "mmdit.safetensors", configs=_configs(pipe))
    with pytest.raises(UserError, match=r"mmdit.safetensors holds no VAE; set model.vae = \"vae/diffusion_pytorch_model"):
        load_base(ModelConfig(base=str(alone)))
    no_te = _save(_sai(pipe, text_encoders=False), tmp_path / "sd3.5_large.safetensors", configs=_configs(pipe))
    with pytest.raises(UserError, match="holds no CLIP-L text encoder; add its file to model.text_encoders"):
        load_base(ModelConfig(base=str(no_te)))
    with pytest.raises(UserError, match="holds no CLIP-G text encoder"):
        load_base(ModelConfig(base=str(no_te), text_encoders=[str(parts["clip_l"])]))
    with pytest.raises(UserError, match="holds no T5-XXL text encoder"):
        load_base(ModelConfig(base=str(no_te), text_encoders=[str(parts["clip_l"]), str(parts["clip_g"])]))
    cut = {k: v for k, v in _sai(pipe).items() if not k.startswith("model.diffusion_model.joint_blocks.1.")}
    cut = _save(cut, tmp_path / "cut.safetensors", configs=_configs(pipe))
    with pytest.raises(UserError, match=r"SD3Transformer in .*does not match .*missing \['transformer_blocks.1"):
        load_base(ModelConfig(base=str(cut), text_encoders=[str(parts["tokenizer"])]))


# Stability's published sizes of the MMDiT (its tensors: diffusers' parameters and the pos_embed table).
@pytest.mark.parametrize("family, tensors, published", [("sd3_medium", 2_084_951_104, 2.0),
                                                         ("sd35_medium", 2_469_663_936, 2.5),
                                                         ("sd35_large", 8_146_280_768, 8.1)])
def test_the_shipped_configs_are_the_published_architectures(family, tensors, published):
    """The configs a real sd3.5_large.safetensors etc. loads with (meta device: shapes only): the MMDiT's
    tensor count is Stability's figure (8.1B, 2.5B, 2B) to its rounding, the variant is the family's, and the
    text encoders are CLIP-L (768), CLIP-G (1280) and T5-XXL's encoder (4.76 B)."""
    import transformers
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from sdlora.models.arch import CONFIGS
    from sdlora.models.families.sd3 import mmdit_type

    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(CONFIGS / family,
                                                                                          subfolder="transformer"))
        t5 = transformers.T5EncoderModel(transformers.T5Config.from_pretrained(CONFIGS / family,
                                                                                subfolder="text_encoder_3"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / family, subfolder="vae"))
    count = sum(v.numel() for v in transformer.state_dict().values())
    assert count == tensors and abs(count / 1e9 - published) < 0.1
    assert mmdit_type(transformer.config) == FAMILIES[family].base_model_version
    assert sum(p.numel() for p in t5.parameters()) == 4_762_310_656
    widths = [transformers.AutoConfig.from_pretrained(CONFIGS / family, subfolder=part).hidden_size
              for part in ("text_encoder", "text_encoder_2")]
    assert widths == [768, 1280]
    assert vae.config.latent_channels == 16 and (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)


def test_sd3_layouts_recognise_the_files_they_write(pipes):
    pipe = pipes["5-large"]
    for slot in (CLIP_L, CLIP_G, T5):
        model = getattr(pipe, slot.part)
        state = {k.removeprefix(slot.prefix): v for k, v in slot.to_original(model.state_dict()).items()}
        assert slot.layout.recognises(state) and slot.layout.width(state) == model.config.hidden_size
    assert CLIP_G.prefix + "text_projection.weight" in CLIP_G.to_original(pipe.text_encoder_2.state_dict())
