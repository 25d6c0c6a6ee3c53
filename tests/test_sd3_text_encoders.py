"""Adapters on SD3.x's text encoders, on a tiny SD3.5 Large folder: CLIP-L (`lora_te1_text_model_...`) and
CLIP-G (`lora_te2_text_model_...`) with network.train_text_encoder, T5 (`lora_te3_encoder_block_...`) with
network.train_t5, as sd-scripts' lora_sd3.py names them; one rate per encoder; frozen encoders cached while
trained ones run; the file applied to a StableDiffusion3Pipeline by the one engine, every key matched."""

import torch
from test_flux_text_encoders import kohya_text_names
from test_sd3_train import sd3_dirs  # noqa: F401  (the tiny SD3.5 folders, a fixture)
from test_train import make_style, repeat_batch

from sdlora.adapters import apply, keys
from sdlora.adapters.file import read_adapter
from sdlora.config import load_config
from sdlora.models.families import FAMILIES
from sdlora.tiny.configs import build_sd3_pipeline
from sdlora.training.loop import Trainer, train


def trainer(tmp_path, folder, extra: str, overrides=()) -> Trainer:
    path = make_style(tmp_path, folder, extra=f"max_train_steps = 3\nt5_max_length = 16\n{extra}")
    return Trainer(load_config(path, ["dataset.shuffle_caption=false", *overrides]), log=lambda m: None)


def test_sd3_text_encoder_names_equal_kohyas_and_train_with_their_own_rates(tmp_path, sd3_dirs):  # noqa: F811
    t = trainer(tmp_path, sd3_dirs["large"], "unet_lr = 1e-2\ntext_encoder_lr = [1e-2, 2e-2, 0]")
    assert keys.text_parts(FAMILIES["sd35_large"].text_encoders) == ["te1", "te2", "te3"]
    assert set(t.network.models) == {"unet", "te1", "te2"}  # no T5 adapters without train_t5, as kohya
    assert [(g["name"], g["lr"]) for g in t.optimizer.param_groups] == [
        ("unet", 1e-2), ("text_encoder_1", 1e-2), ("text_encoder_2", 2e-2)]
    pipe = build_sd3_pipeline()  # the same tiny architecture, before any adapter is injected
    want = kohya_text_names("lora_te1", pipe.text_encoder) | kohya_text_names("lora_te2", pipe.text_encoder_2)
    assert {k for k in t.network.modules if k.startswith("lora_te")} == want  # CLIPTextModelWithProjection nests text_model.
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in want
    batch = next(iter(t.loader))
    assert set(batch["text"]) == {"2.hidden"}  # T5's outputs, encoded once; both CLIPs run each step
    ups = [p for k in t.network.modules if k.startswith("lora_te")
           for s, p in t.network._adapter_params(k).items() if s == "lora_up.weight"]
    losses = repeat_batch(t, batch, 8)
    assert all(torch.isfinite(torch.tensor(losses))) and all(p.any() for p in ups)  # both CLIPs' adapters learned


def test_sd3_t5_lora_with_train_t5_applies_to_the_pipeline_with_every_key_matched(tmp_path, sd3_dirs):  # noqa: F811
    t = trainer(tmp_path, sd3_dirs["large"], "", ["network.train_t5=true"])
    assert set(t.network.models) == {"unet", "te1", "te2", "te3"} and t.data.te_cache is None
    t5_keys = [k for k in t.network.modules if k.startswith("lora_te3_")]
    assert "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0" in t5_keys
    assert len(t5_keys) == 7 * t.base.text_encoders[2].config.num_layers
    train(t.cfg, log=lambda m: None)
    tensors, _ = read_adapter(t.cfg.adapter_path())
    assert {k for k in keys.group_modules(tensors) if k.startswith("lora_te3_")} == set(t5_keys)
    pipe = build_sd3_pipeline()
    matched, _ = apply.read_for_model(t.cfg.adapter_path(), keys.model_parts(pipe))  # refuses any unmatched key
    assert {k.split("_")[1] for k in matched} == {"unet", "te1", "te2", "te3"}
