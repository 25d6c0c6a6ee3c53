"""The FLUX.1 family: its conditioning and transformer call as diffusers' FluxPipeline makes them, its
objective from [train], its export ids as sd-scripts writes them, and tiny dev / schnell bases loaded
from diffusers folders."""

from types import SimpleNamespace

import pytest
import torch

from sdlora.adapters.network import network_metadata
from sdlora.config import Config
from sdlora.models.families import FAMILIES
from sdlora.models.families.base import (
    DiffusionObjective,
    LatentFormat,
    TextConditioning,
)
from sdlora.models.flow import FlowObjective
from sdlora.models.load import load_base
from sdlora.tiny.configs import build_flux_pipeline


@pytest.fixture(scope="module")
def flux_folders(tmp_path_factory):
    """{"dev": folder, "schnell": folder} saved by FluxPipeline.save_pretrained."""
    root = tmp_path_factory.mktemp("flux")
    folders = {}
    for variant, guidance in (("dev", True), ("schnell", False)):
        folders[variant] = root / f"tiny-flux-{variant}"
        build_flux_pipeline(guidance=guidance).save_pretrained(folders[variant])
    return folders


def _model_cfg(folder):
    return SimpleNamespace(base=str(folder), v_parameterization="auto", allow_pickle=False, vae="", text_encoders=[])


def test_a_flux_folder_loads_as_dev_or_schnell_by_its_guidance_embedding(flux_folders):
    dev, schnell = (load_base(_model_cfg(flux_folders[v])) for v in ("dev", "schnell"))
    assert (dev.family, schnell.family) == ("flux1_dev", "flux1_schnell")
    assert dev.prediction_type == "flow"
    assert type(dev.unet).__name__ == "FluxTransformer2DModel"
    assert [type(te).__name__ for te in dev.text_encoders] == ["CLIPTextModel", "T5EncoderModel"]
    assert dev.tokenizers[1]("clrscn, lake").input_ids[-1] == dev.tokenizers[1].eos_token_id
    assert type(dev.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert dev.model_hash and dev.model_hash != schnell.model_hash  # the transformer's weights
    assert type(dev.pipeline()).__name__ == "FluxPipeline"


def assert_latent_format_read_from_vae_config(folder, scaling_factor, shift_factor) -> None:
    """The family of the base in `folder` reads its VAE config's scaling and shift; `scale` is (z - shift) x scale."""
    base = load_base(_model_cfg(folder))
    fmt = FAMILIES[base.family].latent_format(base.vae)
    assert fmt == LatentFormat(scaling_factor, shift_factor)
    z = torch.randn(1, 16, 8, 8)
    assert torch.allclose(fmt.scale(z), (z - shift_factor) * scaling_factor)


def test_the_latent_format_is_read_from_flux_vae_config(flux_folders):
    assert_latent_format_read_from_vae_config(flux_folders["dev"], 0.3611, 0.1159)


def test_text_conditioning_is_t5_hidden_states_and_clip_pooled_output():
    pipe = build_flux_pipeline()
    pipe.text_encoder_2.eval()  # T5's dropout
    captions = ["clrscn, mountains, lake", "a sunset"]
    ids = [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in (pipe.tokenizer, pipe.tokenizer_2)]
    with torch.no_grad():
        text = FAMILIES["flux1_dev"].encode_text([pipe.text_encoder, pipe.text_encoder_2], ids)
        prompt_embeds, pooled, _ = pipe.encode_prompt(captions, captions, max_sequence_length=32)
    assert torch.equal(text.hidden, prompt_embeds) and torch.equal(text.pooled, pooled)


def family_prediction(family, transformer, text_tokens: int, pooled_dim: int):
    """`family.predict` on seeded inputs: latents (2, 16, 8, 6) (B, C, h, w), h != w; text states (2,
    `text_tokens`, 64); pooled (2, `pooled_dim`); sigmas 0.3, 0.8. Returns (prediction, latents, hidden, pooled,
    sigmas) for the caller to call the transformer as its pipeline does."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 16, 8, 6), generator=g)
    hidden, pooled = torch.randn((2, text_tokens, 64), generator=g), torch.randn((2, pooled_dim), generator=g)
    sigmas = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        got = family.predict(transformer, latents, sigmas, TextConditioning(hidden, pooled), None, torch.float32)
    return got, latents, hidden, pooled, sigmas


@pytest.mark.parametrize("guidance", [True, False])
def test_predict_calls_the_transformer_as_flux_pipeline_does(guidance):
    pipe = build_flux_pipeline(guidance=guidance)
    family = FAMILIES["flux1_dev" if guidance else "flux1_schnell"].for_training(Config().train)
    got, latents, hidden, pooled, sigmas = family_prediction(family, pipe.transformer, text_tokens=32, pooled_dim=32)
    with torch.no_grad():
        packed = pipe._pack_latents(latents, 2, 16, 8, 6)
        kwargs = {"guidance": torch.full((2,), 3.5)} if guidance else {}
        want = pipe.transformer(hidden_states=packed, timestep=sigmas, pooled_projections=pooled,
                                encoder_hidden_states=hidden, txt_ids=torch.zeros(32, 3),
                                img_ids=pipe._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32),
                                **kwargs).sample
    # the pipeline unpacks from pixels: vae_scale_factor 8 here, latents 8 x 6 -> 64 x 48 px
    pipe.vae_scale_factor = 8
    assert torch.equal(got, pipe._unpack_latents(want, 64, 48, 8))


def test_the_objective_is_rectified_flow_with_the_train_options():
    train = Config().train
    train.timestep_sampling, train.discrete_flow_shift, train.model_prediction_type = "shift", 3.1582, "sigma_scaled"
    objective = FAMILIES["flux1_dev"].for_training(train).objective(None)
    assert isinstance(objective, FlowObjective)
    assert (objective.timestep_sampling, objective.discrete_flow_shift, objective.model_prediction_type) == (
        "shift", 3.1582, "sigma_scaled")
    # min_snr_gamma (5 by default) is a DDPM weighting: the flow's loss weights are its scheme's alone
    sigma = torch.tensor([0.2, 0.7])
    assert torch.equal(objective.loss_weights(sigma, train.min_snr_gamma), torch.ones(2))


def test_sd_objective_hooks_leave_its_loss_as_it_was():
    """prediction is the U-Net's output itself, loss_weights the min-SNR weights (none without gamma)."""
    from diffusers import DDPMScheduler

    objective = DiffusionObjective(DDPMScheduler())
    out, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert objective.prediction(out, torch.randn(2, 4, 8, 8), t) is out
    assert torch.equal(objective.loss_weights(t, 5.0), objective.snr_weights(t, 5.0))
    assert objective.loss_weights(t, 0.0) is None


@pytest.mark.parametrize("family, architecture", [("flux1_dev", "flux-1-dev/lora"),
                                                  ("flux1_schnell", "flux-1-schnell/lora")])
def test_export_ids_are_sd_scripts(family, architecture):
    meta = network_metadata({"family": family, "prediction_type": "flow", "name": "flux1-dev", "model_hash": ""},
                            "style", {}, "a style")
    assert meta["modelspec.architecture"] == architecture
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert "modelspec.prediction_type" not in meta  # sai_model_spec writes it for non-FLUX models only
