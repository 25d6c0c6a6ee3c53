"""Adapter kinds and targets on SD3.x's MMDiT: kohya lora_sd3's block selection (train_block_indices over the
joint blocks, context_mod_dim = x_mod_dim = 0 as train_modulation = false) gives kohya's names and counts on
the full SD3.5 Large / SD3.5 Medium / SD3 Medium architectures (meta device), and LoRA, LoCon, LoHa, LoKr and
DoRA train on a tiny SD3.5, export in names other tools read and apply back (adapters/apply.py, the
sampler) as the trained network changed each diffusers Linear.

The expected names are those of kohya's own `networks/lora_sd3.py create_network` (sd-scripts 48d368fa, run
on `sd3_models.create_sd3_mmdit` on the meta device with these network_args, rank 4): the sha256 of the
sorted module names (joined by "\\n"), first 16 hex digits, and their count.

ComfyUI reads a `lora_transformer_<diffusers path>` module of SD3 onto the part's rows of the fused weight
(comfy/lora.py `model_lora_keys_unet` for SD3, comfy/utils.py `mmdit_to_diffusers`: to_q / add_q_proj
(0, 0, H), to_k (0, H, H), to_v (0, 2H, H), H = 64 x depth, the hidden size; the last block's norm1_context
onto the whole weight with swap_scale_shift); a LoKr on a fused qkv or on that modulation is written so (a
Kronecker product per part does not stack into one, nor exchange its halves). SD3.5 Medium's attn2.to_q/k/v
parts are mapped the same way only where ComfyUI's mmdit_to_diffusers lists attn2 (later versions).
"""

import hashlib

import pytest
import torch
from test_flux_kinds import (
    KINDS,
    assert_kind_trains_exports_and_applies_back,
    train_a_few_steps,
)
from test_sd3_train import SD3, sd3_dirs  # noqa: F401  (the tiny SD3.5 Large / Medium folders fixture)
from test_train import make_style
from test_transformer_keys import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM

from sdlora.adapters import transformer_keys
from sdlora.adapters.network import adapter_metadata, inject
from sdlora.config import NetworkConfig, load_config
from sdlora.errors import ConfigError, UserError

ARCHITECTURES = {"5-large": SD35_LARGE, "5-medium": SD35_MEDIUM, "medium": SD3_MEDIUM}
# our [network] keys -> kohya's network_args of the same selection
SELECTIONS = {"all": {}, "no modulation": {"train_modulation": False},
              "indices": {"train_block_indices": "0,1,8-12,18"},
              "indices no modulation": {"train_block_indices": "3, 20-23", "train_modulation": False}}
KOHYA = {  # (architecture, selection): (count, sha256 of kohya's sorted names)
    ("5-large", "all"): (377, "174cfdf665f8e2c4"), ("5-large", "no modulation"): (301, "d58d09740da23568"),
    ("5-large", "indices"): (80, "3acce55136e49bed"), ("5-large", "indices no modulation"): (40, "fc521a7d0ce20be1"),
    ("5-medium", "all"): (263, "360827f16dd643c9"), ("5-medium", "no modulation"): (215, "329c5725dd93e2eb"),
    ("5-medium", "indices"): (94, "3d3ab35bb6c1e900"), ("5-medium", "indices no modulation"): (39, "8b1d1413e024afb2"),
    ("medium", "all"): (237, "bf58b75ffd83bb20"), ("medium", "no modulation"): (189, "2faf5542b8b05d44"),
    ("medium", "indices"): (80, "3acce55136e49bed"), ("medium", "indices no modulation"): (37, "7831e86bf18d2bd7"),
}


@pytest.fixture(scope="module")
def full_sd3():
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return {name: SD3Transformer2DModel(**config) for name, config in ARCHITECTURES.items()}


def selected_keys(transformer, **selection) -> list[str]:
    """The Kohya modules a selection keeps: those none of whose diffusers parts it leaves out."""
    left_out = transformer_keys.unselected_paths(transformer, transformer_keys.SD3_NAMES,
                                                 NetworkConfig(**selection))
    return [k for k, m in transformer_keys.kohya_modules(transformer, transformer_keys.SD3_NAMES).items()
            if not set(m.paths) & left_out]


@pytest.mark.parametrize("architecture, name", KOHYA)
def test_block_selection_names_and_counts_equal_kohyas(full_sd3, architecture, name):
    keys = selected_keys(full_sd3[architecture], **SELECTIONS[name])
    count, digest = KOHYA[architecture, name]
    assert len(keys) == count
    assert hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16] == digest
    if name == "indices no modulation":
        assert {int(k.split("_")[4]) for k in keys} == {3, 20, 21, 22, 23}  # kohya's own index: split("_")[4]
        assert not [k for k in keys if "adaLN_modulation" in k]


def test_the_network_built_for_training_adapts_kohyas_modules(full_sd3):
    """inject (what training builds) keeps exactly the selected modules, every part of each fused one."""
    with torch.device("meta"):
        network = inject(full_sd3["5-medium"], None, NetworkConfig(train_text_encoder=False, train_modulation=False,
                                                                   train_block_indices="3, 20-23"))
    assert sorted(network.original_names) == sorted(selected_keys(full_sd3["5-medium"], **SELECTIONS[
        "indices no modulation"]))


@pytest.mark.parametrize("selection, message", [
    ({"train_block_indices": "24"}, r"train_block_indices: block 24 does not exist; .* 0 to 23"),
    ({"train_block_indices": "none"}, r"select no transformer block"),
    ({"train_double_block_indices": "0"}, r"indices = '0': SD3Transformer2DModel has no double blocks; leave it"),
    ({"train_blocks": "single"}, r"train_blocks = 'single': SD3Transformer2DModel has no such blocks \(it has joint\)"),
])
def test_selections_this_model_cannot_take_are_refused_in_one_line(full_sd3, selection, message):
    with torch.device("meta"), pytest.raises(UserError, match=message):
        inject(full_sd3["medium"], None, NetworkConfig(train_text_encoder=False, **selection))


def test_train_block_indices_is_refused_on_flux_and_on_a_unet_and_checked_when_the_config_loads(tmp_path, sd3_dirs):  # noqa: F811
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from sdlora.tiny.configs import MINI_UNET

    with torch.device("meta"):
        flux = FluxTransformer2DModel(guidance_embeds=True)
        with pytest.raises(UserError, match="train_block_indices = '0': FluxTransformer2DModel has no joint blocks"):
            inject(flux, None, NetworkConfig(train_text_encoder=False, train_block_indices="0"))
    with pytest.raises(UserError, match="train_block_indices and train_modulation choose transformer blocks"):
        inject(UNet2DConditionModel(**MINI_UNET), None, NetworkConfig(train_text_encoder=False,
                                                                      train_block_indices="1"))
    with pytest.raises(ConfigError, match=r"train_block_indices: range '9-2' runs backwards"):
        load_config(make_style(tmp_path, sd3_dirs["large"]), [*SD3, "network.train_block_indices=9-2"])


def test_the_selection_is_written_to_ss_network_args_as_lora_sd3_spells_it(tmp_path, sd3_dirs):  # noqa: F811
    import json

    cfg = load_config(make_style(tmp_path, sd3_dirs["large"]), [*SD3, "network.train_block_indices=0,1",
                                                                "network.train_modulation=false"])
    base = {"family": "sd35_large", "prediction_type": "flow", "name": "sd3", "model_hash": ""}
    meta = adapter_metadata(cfg, base, {"num_train_images": 4, "num_epochs": 1, "epoch": 1, "steps": 1})
    assert json.loads(meta["ss_network_args"]) == {"train_block_indices": "0,1", "context_mod_dim": "0",
                                                   "x_mod_dim": "0"}


def test_import_kohya_maps_lora_sd3_block_selection_and_modulation():
    import tomllib

    from sdlora.presets.kohya import import_kohya

    notes = []
    command = ('sd3_train_network.py --network_module networks.lora_sd3 --network_dim 4 --network_args '
               '"train_block_indices=0,1,8-12" "context_mod_dim=0" "x_mod_dim=0"')
    text = import_kohya([command], log=notes.append)
    network = tomllib.loads(text)["network"]
    assert network["train_block_indices"] == "0,1,8-12" and network["train_modulation"] is False
    text = import_kohya(['sd3_train_network.py --network_args "x_mod_dim=0" "context_attn_dim=8"'], log=notes.append)
    assert "train_modulation" not in text
    assert any("x_mod_dim=0: sdlora drops" in m for m in notes)
    assert any("context_attn_dim=8: no sdlora equivalent" in m for m in notes)


# ---------------------------------------------------------------------------------------------
# Kinds: train, export, apply back


# x H, comfy/utils.py mmdit_to_diffusers; the last block's norm1_context: the whole weight, swap_scale_shift
COMFY_OFFSETS = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "attn.add_q_proj": 0, "attn.add_k_proj": 1,
                 "attn.add_v_proj": 2, "attn2.to_q": 0, "attn2.to_k": 1, "attn2.to_v": 2}


@pytest.mark.parametrize("variant, kind", [*(("large", kind) for kind in KINDS), ("medium", "lokr"),
                                           ("medium", "dora")])
def test_each_kind_trains_exports_in_names_others_read_and_applies_back_exactly(tmp_path, sd3_dirs, variant, kind):  # noqa: F811
    from diffusers import SD3Transformer2DModel

    # The last block's context queries get no gradient: its context output is discarded (context_pre_only),
    # its keys and values still feed the image tokens. kohya adapts them all the same.
    def last_query(transformer):
        return {f"transformer_blocks.{len(transformer.transformer_blocks) - 1}.attn.add_q_proj"}

    # SD3's overrides are FLUX's. A LoKr of the last block's context modulation (kept in the original's (shift,
    # scale) order) is written per part under ComfyUI's names, which map norm1_context with its swap_scale_shift.
    modules, originals = assert_kind_trains_exports_and_applies_back(
        tmp_path, sd3_dirs[variant], kind, SD3Transformer2DModel, transformer_keys.SD3_NAMES,
        "lora_unet_joint_blocks_0_context_block_attn_qkv", COMFY_OFFSETS, "networks.lora_sd3", untrained=last_query)
    assert ("lora_unet_joint_blocks_0_x_block_attn2_qkv" in originals) == (variant == "medium")
    if kind == "lokr":
        assert {"lora_transformer_transformer_blocks_1_attn_add_v_proj",
                "lora_transformer_transformer_blocks_1_norm1_context_linear"} <= modules


def test_a_selection_trains_only_the_chosen_blocks_and_the_file_names_only_them(tmp_path, sd3_dirs):  # noqa: F811
    trainer = train_a_few_steps(tmp_path, sd3_dirs["large"], ["network.train_block_indices=\"1\"",
                                                              "network.train_modulation=false"], steps=1)
    keys = {k.split(".", 1)[0] for k in trainer.network.kohya_state_dict(torch.float32)}
    assert keys == {"lora_unet_joint_blocks_1_context_block_attn_qkv", "lora_unet_joint_blocks_1_x_block_attn_qkv",
                    "lora_unet_joint_blocks_1_x_block_attn_proj", "lora_unet_joint_blocks_1_x_block_mlp_fc1",
                    "lora_unet_joint_blocks_1_x_block_mlp_fc2"}  # block 1 is the last: context pre-only
