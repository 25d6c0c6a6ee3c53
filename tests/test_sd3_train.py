"""Training LoRA on a tiny SD3.5 base from a diffusers folder: `sdlora train` exports Kohya's SD3 names
(`lora_unet_joint_blocks_N_...`, fused qkv as sd-scripts' lora_sd3.py writes them) with sd-scripts' SD3
metadata, whose weights equal the trained network's; the loss of a repeated batch falls; a resumed run
ends where an uninterrupted one ends.

diffusers 0.42 has no Kohya SD3 converter (StableDiffusion3Pipeline.load_lora_weights applies nothing from a
`lora_unet_joint_blocks_` file), so the file is checked by splitting it back into diffusers' modules
(`transformer_keys.split`) and loading that in diffusers' own format, with no key left over."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_flux_train import (
    assert_loads_in_diffusers_as_trained,
    assert_loss_falls_and_the_file_reads_back,
)
from test_train import assert_resume_ends_where_an_uninterrupted_run_ends, make_style

from sdlora.adapters import transformer_keys
from sdlora.cli import main
from sdlora.config import load_config
from sdlora.errors import UserError
from sdlora.tiny.configs import build_sd3_pipeline
from sdlora.training.loop import Trainer

SD3 = ["network.train_text_encoder=false", "dataset.shuffle_caption=false"]


@pytest.fixture(scope="module")
def sd3_dirs(tmp_path_factory):
    """{"large": folder, "medium": folder} saved by StableDiffusion3Pipeline.save_pretrained."""
    folders = {}
    for variant in ("large", "medium"):
        folders[variant] = tmp_path_factory.mktemp(f"sd35_{variant}")
        build_sd3_pipeline(medium=variant == "medium").save_pretrained(folders[variant])
    return folders


@pytest.mark.parametrize("variant, architecture, version", [
    ("large", "stable-diffusion-3-5-large/lora", "5-large"),
    ("medium", "stable-diffusion-3-5-medium/lora", "5-medium")])
def test_sdlora_train_exports_kohya_sd3_names_that_hold_the_trained_weights(tmp_path, sd3_dirs, variant,
                                                                            architecture, version):
    from diffusers import StableDiffusion3Pipeline

    path = make_style(tmp_path, sd3_dirs[variant], extra="max_train_steps = 2\nweighting_scheme = \"logit_normal\"")
    assert main(["train", str(path), *[a for o in SD3 for a in ("--set", o)]]) == 0
    adapter = load_config(path).output_dir / "style.safetensors"
    tensors = load_file(adapter)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dirs[variant])
    transformer = pipe.transformer
    originals = transformer_keys.kohya_modules(transformer, transformer_keys.SD3_NAMES)
    modules = {k.split(".", 1)[0] for k in tensors}
    # kohya's defaults: every Linear of both joint blocks; the last context block (pre-only) has qkv and
    # its modulation alone; Medium's MMDiT-X block 0 adds attn2: 10 + 7 (+ 2)
    assert modules == set(originals) and len(modules) == (19 if variant == "medium" else 17)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in modules
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1" in modules
    assert "lora_unet_joint_blocks_1_context_block_attn_proj" not in modules
    assert ("lora_unet_joint_blocks_0_x_block_attn2_qkv" in modules) == (variant == "medium")
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    # q, k, v trained apart: one block-diagonal module of rank 3 x dim, alpha 3 x alpha (the same scale)
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape == (3 * 4, 32)
    assert float(tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"]) == 3 * 2
    with safe_open(adapter, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == architecture and meta["ss_base_model_version"] == version
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["ss_network_module"] == "networks.lora_sd3" and meta["ss_weighting_scheme"] == "logit_normal"
    assert (meta["ss_apply_lg_attn_mask"], meta["ss_apply_t5_attn_mask"]) == ("False", "False")
    assert (meta["ss_logit_mean"], meta["ss_logit_std"], meta["ss_mode_scale"]) == ("0.0", "1.0", "1.29")

    # The file, split back into diffusers' modules, loads whole in diffusers with the trained weights.
    assert_loads_in_diffusers_as_trained(pipe, tensors, transformer_keys.SD3_NAMES)


def test_the_loss_of_a_repeated_batch_falls_and_the_file_reads_back_into_the_network(tmp_path, sd3_dirs):
    cfg = load_config(make_style(tmp_path, sd3_dirs["large"], extra="max_train_steps = 20\nunet_lr = 3e-2"), SD3)
    trainer = Trainer(cfg, log=lambda m: None)
    batch = next(iter(trainer.loader))
    # each frozen encoder's own outputs, cached: the CLIPs' 77 states and pooled projections, T5's 256 states
    assert {k: v.shape[1:] for k, v in batch["text"].items()} == {
        "0.hidden": (77, 32), "0.pooled": (32,), "1.hidden": (77, 32), "1.pooled": (16,), "2.hidden": (256, 64)}
    assert_loss_falls_and_the_file_reads_back(trainer, batch, 16, lambda: dict(
        hidden_states=torch.randn(1, 16, 8, 8), encoder_hidden_states=torch.randn(1, 40, 64),
        pooled_projections=torch.randn(1, 48), timestep=torch.tensor([500.0])))


def test_sd3_resume_ends_where_an_uninterrupted_run_ends(tmp_path, sd3_dirs, interrupt_at_step):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    extra = "max_train_steps = 4\nweighting_scheme = \"logit_normal\"\ntraining_shift = 3.0"
    a, b = (load_config(make_style(tmp_path / x, sd3_dirs["medium"], extra=extra), SD3) for x in "ab")
    assert_resume_ends_where_an_uninterrupted_run_ends(a, b, interrupt_at_step)


def test_buckets_off_the_16_px_grid_are_refused_in_one_line(tmp_path, sd3_dirs):
    cfg = load_config(make_style(tmp_path, sd3_dirs["large"]), [*SD3, "dataset.bucket_reso_steps=8",
                                                               "dataset.resolution=72"])  # 72 x 72 buckets
    with pytest.raises(UserError, match="multiples of 16 px, and bucket"):
        Trainer(cfg, log=lambda m: None)
