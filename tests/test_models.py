"""Base model loading and saving: the embedded tiny model, diffusers folders, clip_skip."""

import pytest
import torch

from sdlora import models
from sdlora.config import ModelConfig
from sdlora.errors import UserError


@pytest.fixture(scope="module")
def tiny():
    return models.load_base(ModelConfig(base="tiny"))


def test_tiny_loads_as_fp32_sd1(tiny):
    assert (tiny.family, tiny.prediction_type, tiny.resolution, tiny.name) == ("sd_v1", "epsilon", 128, "tiny")
    assert tiny.unet.dtype == torch.float32 and tiny.text_encoder.dtype == torch.float32
    assert len(tiny.model_hash) == 64 and tiny.noise_scheduler.config.num_train_timesteps == 1000
    assert tiny["family"] == "sd_v1"  # adapter_metadata's dict access


def test_mini_folder_loads_and_samples(mini_base_dir):
    base = models.load_base(ModelConfig(base=str(mini_base_dir)))
    assert base.family == "sd_v1" and base.name == mini_base_dir.name
    assert base.model_hash == models.sha256_file(mini_base_dir / "unet" / "diffusion_pytorch_model.safetensors")
    out = base.pipeline()("a hill", num_inference_steps=2, height=64, width=64, output_type="np",
                          generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)


def test_v_parameterization_override(mini_base_dir):
    base = models.load_base(ModelConfig(base=str(mini_base_dir), v_parameterization="v_prediction"))
    assert base.prediction_type == "v_prediction"
    assert base.noise_scheduler.config.prediction_type == "v_prediction"


def test_clip_skip_is_penultimate_layer_through_final_norm(tiny):
    ids = tiny.tokenizer(["a red sky over hills"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        last = models.encode_prompt(tiny.text_encoder, ids, 1)
        skip2 = models.encode_prompt(tiny.text_encoder, ids, 2)
        hs = tiny.text_encoder(ids, output_hidden_states=True).hidden_states
        assert len(hs) == tiny.text_encoder.config.num_hidden_layers + 1
        expected = models.final_layer_norm(tiny.text_encoder)(hs[-2])
    assert torch.equal(last, tiny.text_encoder(ids).last_hidden_state)
    assert not torch.allclose(last, skip2)
    assert torch.equal(skip2, expected)


def test_folder_without_model_index_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        models.load_base(ModelConfig(base=str(tmp_path)))
