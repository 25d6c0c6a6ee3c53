"""Kohya key names <-> module paths (adapters/keys.py)."""

import pytest
import torch
from torch import nn

from sdlora.adapters import keys
from sdlora.errors import UserError


@pytest.fixture(scope="module")
def mini():
    from sdlora.tiny.configs import build_components

    _, text_encoder, _, unet, _ = build_components("mini")
    return unet, text_encoder


def test_unet_keys_follow_the_diffusers_path():
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert keys.kohya_key("unet", path) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert keys.kohya_key("unet", "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0") == \
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0"


@pytest.mark.parametrize("path", ["encoder.layers.3.self_attn.q_proj", "text_model.encoder.layers.3.self_attn.q_proj"])
def test_text_encoder_keys_contain_text_model_whatever_the_transformers_version(path):
    assert keys.kohya_key("te", path) == "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
    assert keys.kohya_key("te2", path) == "lora_te2_text_model_encoder_layers_3_self_attn_q_proj"
    # SDXL's second encoder has a projection outside text_model; it must not gain the prefix.
    assert keys.kohya_key("te2", "text_projection") == "lora_te2_text_projection"


def test_module_map_round_trips_key_and_path(mini):
    unet, text_encoder = mini
    for part, model in (("unet", unet), ("te", text_encoder)):
        mapping = keys.kohya_module_map(model, part)
        modules = dict(model.named_modules())
        layers = {p for p, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
        assert set(mapping.values()) == layers
        for key, path in mapping.items():
            assert keys.kohya_key(part, path) == key
            assert keys.part_of(key) == part
    te_map = keys.kohya_module_map(text_encoder, "te")
    assert te_map["lora_te_text_model_encoder_layers_1_mlp_fc2"] in dict(text_encoder.named_modules())
    assert not [k for k in te_map if k.startswith("lora_te_encoder")]


def test_module_map_is_unchanged_by_peft_injection(mini):
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    unet = copy.deepcopy(mini[0])
    before = keys.kohya_module_map(unet, "unet")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_k", "proj_in"]), unet)
    assert keys.kohya_module_map(unet, "unet") == before


def test_part_of_distinguishes_sdxl_encoders():
    assert keys.part_of("lora_te1_text_model_encoder_layers_0_mlp_fc1") == "te1"
    assert keys.part_of("lora_te_text_model_encoder_layers_0_mlp_fc1") == "te"
    assert keys.part_of("lora_unet_mid_block_attentions_0_proj_in") == "unet"
    with pytest.raises(UserError, match="lora_unet_"):
        keys.part_of("unet.mid_block.attentions.0.proj_in.lora_A.weight")


def test_group_modules_splits_at_the_first_dot():
    t = {"lora_unet_a_b.lora_down.weight": torch.zeros(2, 3), "lora_unet_a_b.lora_up.weight": torch.zeros(4, 2),
         "lora_unet_a_b.alpha": torch.tensor(1.0), "lora_te_text_model_x.hada_w1_a": torch.zeros(1)}
    groups = keys.group_modules(t)
    assert set(groups) == {"lora_unet_a_b", "lora_te_text_model_x"}
    assert set(groups["lora_unet_a_b"]) == {"lora_down.weight", "lora_up.weight", "alpha"}
    with pytest.raises(UserError, match="not a Kohya adapter tensor"):
        keys.group_modules({"__metadata_junk": torch.zeros(1)})
