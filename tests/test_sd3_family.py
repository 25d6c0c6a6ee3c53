"""The SD3.x family: its conditioning and transformer call as diffusers' StableDiffusion3Pipeline makes them,
its objective from [train] as sd-scripts' SD3 training, its export ids as sd-scripts writes them, the variants
told apart as sd-scripts does, and tiny SD3.5 bases loaded from diffusers folders."""

import pytest
import torch
from test_flux_family import (
    _model_cfg,
    assert_latent_format_read_from_vae_config,
    family_prediction,
)
from test_transformer_keys import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM

from sdlora.adapters.network import inject, network_metadata
from sdlora.config import Config, NetworkConfig
from sdlora.models.families import FAMILIES, folder_family, folder_layout
from sdlora.models.families.base import tokenize
from sdlora.models.flow import SD3Objective
from sdlora.models.load import load_base
from sdlora.tiny.configs import MINI_SD3_TRANSFORMER, build_sd3_pipeline

CAPTIONS = ["clrscn, mountains, lake", "a sunset"]


@pytest.fixture(scope="module")
def sd3_folders(tmp_path_factory):
    """{"large": folder, "medium": folder, "sd3": folder (no qk norm: SD3 Medium 3.0)}."""
    from diffusers import SD3Transformer2DModel

    root = tmp_path_factory.mktemp("sd3")
    folders = {}
    for variant in ("large", "medium", "sd3"):
        pipe = build_sd3_pipeline(medium=variant == "medium")
        if variant == "sd3":
            pipe.transformer = SD3Transformer2DModel(**dict(MINI_SD3_TRANSFORMER, qk_norm=None))
        folders[variant] = root / f"tiny-sd3-{variant}"
        pipe.save_pretrained(folders[variant])
    return folders


def test_an_sd3_folder_loads_as_its_variant(sd3_folders):
    large, medium, sd3 = (load_base(_model_cfg(sd3_folders[v])) for v in ("large", "medium", "sd3"))
    assert (large.family, medium.family, sd3.family) == ("sd35_large", "sd35_medium", "sd3_medium")
    assert large.prediction_type == "flow"
    assert type(large.unet).__name__ == "SD3Transformer2DModel"
    assert [type(te).__name__ for te in large.text_encoders] == ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"]
    # T5 reads 256 tokens as the pipeline's max_sequence_length, whatever the folder's tokenizer says (32 here)
    assert FAMILIES[large.family].token_lengths(large.tokenizers) == [77, 77, 256]
    assert type(large.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert large.model_hash and large.model_hash != medium.model_hash  # the transformer's weights
    assert type(large.pipeline()).__name__ == "StableDiffusion3Pipeline"


@pytest.mark.parametrize("config, family, modules", [(SD35_LARGE, "sd35_large", 377), (SD35_MEDIUM, "sd35_medium", 263),
                                                     (SD3_MEDIUM, "sd3_medium", 237)])
def test_the_full_architectures_are_told_apart_and_get_kohyas_module_count(config, family, modules):
    """The real transformers on the meta device (no weights): sd-scripts' model type, and as many adapted Kohya
    modules as lora_sd3.py creates on them."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        mmdit = SD3Transformer2DModel(**config)
        network = inject(mmdit, None, NetworkConfig())
    index = {part: ["", ""] for part in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")}
    assert folder_family(folder_layout(index), mmdit, {768}, "flow") == family
    assert len(network.original_names) == modules


def test_the_latent_format_is_read_from_sd3_vae_config(sd3_folders):
    assert_latent_format_read_from_vae_config(sd3_folders["large"], 1.5305, 0.0609)


def test_text_conditioning_is_the_pipelines_encode_prompt():
    """Both CLIPs' penultimate states side by side, zero-padded to T5's width, then T5's 256 states; pooled
    the two projections side by side."""
    pipe = build_sd3_pipeline()
    pipe.text_encoder_3.eval()  # T5's dropout
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
    ids = tokenize(tokenizers, CAPTIONS, FAMILIES["sd35_large"].token_lengths(tokenizers))  # T5: 256
    with torch.no_grad():
        text = FAMILIES["sd35_large"].encode_text([pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3], ids)
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, do_classifier_free_guidance=False)
    assert text.hidden.shape == (2, 77 + 256, 64) and text.pooled.shape == (2, 32 + 16)
    assert torch.equal(text.hidden, prompt_embeds) and torch.equal(text.pooled, pooled)
    assert not text.hidden[:, :77, 32 + 32:].any()  # the padding


def test_predict_calls_the_transformer_as_the_pipeline_does():
    pipe = build_sd3_pipeline(medium=True)
    family = FAMILIES["sd35_medium"].for_training(Config().train)
    got, latents, hidden, pooled, _ = family_prediction(family, pipe.transformer, text_tokens=40, pooled_dim=48)
    with torch.no_grad():
        # the pipeline's timestep is the scheduler's, 1000 sigma
        want = pipe.transformer(hidden_states=latents, timestep=torch.tensor([300.0, 800.0]),
                                encoder_hidden_states=hidden, pooled_projections=pooled).sample
    assert torch.equal(got, want)


def test_the_objective_is_kohyas_sd3_with_the_train_options():
    train = Config().train
    train.weighting_scheme, train.logit_std, train.training_shift = "logit_normal", 1.5, 3.0
    train.timestep_sampling, train.model_prediction_type = "flux_shift", "raw"  # FLUX's: no effect on SD3
    objective = FAMILIES["sd35_large"].for_training(train).objective(None)
    assert isinstance(objective, SD3Objective)
    assert (objective.weighting_scheme, objective.logit_std, objective.training_shift) == ("logit_normal", 1.5, 3.0)
    assert objective.model_prediction_type == "sigma_scaled"
    # sigma = floor(1000 S u / (1 + (S - 1) u)) / 1000, u = sigmoid(logit_mean + logit_std z): kohya's draw
    g, h = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sigma = objective.sample_timesteps(g)
    u = torch.sigmoid(torch.normal(0.0, 1.5, size=(1,), generator=h))[0]
    assert sigma == torch.floor(1000 * (3 * u / (1 + 2 * u))) / 1000
    latents, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    assert torch.equal(objective.target(latents, noise, torch.tensor([0.2, 0.7])), latents)


@pytest.mark.parametrize("family, architecture, version", [
    ("sd35_large", "stable-diffusion-3-5-large/lora", "5-large"),
    ("sd35_medium", "stable-diffusion-3-5-medium/lora", "5-medium"),
    ("sd3_medium", "stable-diffusion-3-medium/lora", "medium")])
def test_export_ids_are_sd_scripts(family, architecture, version):
    meta = network_metadata({"family": family, "prediction_type": "flow", "name": "sd3.5", "model_hash": ""},
                            "style", {}, "a style")
    assert meta["modelspec.architecture"] == architecture
    assert meta["ss_base_model_version"] == version
    # sd-scripts' sai_model_spec: SD3 falls through to "diffusers" and, as every non-FLUX model, "epsilon"
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.prediction_type"] == "epsilon"


def test_clip_skip_is_ignored_with_a_note():
    assert FAMILIES["sd35_large"].clip_skip_note(1) is None
    assert "ignored for SD3.5 Large" in FAMILIES["sd35_large"].clip_skip_note(2)


def test_a_folder_with_a_sharded_transformer_loads(tmp_path):
    """The Hub's SD3.5 Large keeps its transformer in shards with an index."""
    build_sd3_pipeline().save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    base = load_base(_model_cfg(tmp_path))
    assert base.family == "sd35_large" and base.model_hash
