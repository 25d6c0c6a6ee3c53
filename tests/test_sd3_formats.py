"""Adapter formats and tools on a tiny SD3.5 Medium (MMDiT-X block 0, a pre-only last context block):
`[output] format = "diffusers"` loads in StableDiffusion3Pipeline with no key left over and renders what the
Kohya file renders in sdlora (diffusers 0.42 has no Kohya SD3 reader: this is the format it loads); the
files other trainers write (diffusers / SimpleTuner PEFT, OneTrainer, flash-sd3's `base_model.model.`,
ComfyUI-style `diffusion_model.joint_blocks...`, SimpleTuner's LyCORIS) read through the one adapter reader
and change every weight as the Kohya file does; resize, inspect, merge, extract and convert take SD3 files."""

import pytest
import torch
from safetensors.torch import load_file
from test_flux_formats import (
    assert_convert_both_ways_keeps_the_weight_changes,
    assert_diffusers_export_loads_whole_and_renders_as_the_kohya_file,
    assert_other_trainers_files_read_back_as_the_kohya_file,
    train_both_formats,
)
from test_flux_sample import kohya_transformer_file
from test_flux_tools import (
    assert_convert_writes_diffusers_keys_and_back,
    assert_inspect_reports_the_modules,
    assert_merge_then_extract_gives_back_the_lora,
    assert_resize_is_the_truncated_svd_of_each_delta,
)
from test_sd3_sample import NEGATIVE, SD3
from test_sd3_train import sd3_dirs  # noqa: F401  (the tiny SD3.5 Large / Medium folders fixture)
from test_train import make_style

from sdlora.adapters import transformer_keys
from sdlora.adapters.keys import group_modules
from sdlora.config import config_from_dict, load_config
from sdlora.models.families import FAMILIES, unread_settings
from sdlora.training.loop import Trainer


@pytest.fixture(scope="module")
def sd3_dir(sd3_dirs):
    """The tiny SD3.5 Medium folder: MMDiT-X attn2 in block 0, the last block's context pre-only."""
    return sd3_dirs["medium"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sd3_dir):
    """A tiny SD3.5 Medium LoRA trained 3 steps and written in diffusers' format; beside it the same network as
    a Kohya file (fused qkv, alpha), written by the network itself."""
    return train_both_formats(tmp_path_factory.mktemp("trained"), sd3_dir, SD3)


def _transformer(folder):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(folder).transformer


def test_a_diffusers_format_export_loads_whole_in_sd3_pipeline_and_renders_as_the_kohya_file(trained, sd3_dir,
                                                                                              caplog, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    # The pre-only last block's context queries attend for context outputs that nothing reads: no gradient.
    names = assert_diffusers_export_loads_whole_and_renders_as_the_kohya_file(
        trained, sd3_dir, StableDiffusion3Pipeline, "5-medium", "transformer.transformer_blocks.", caplog, tmp_path,
        pipe_kwargs=dict(negative_prompt=[NEGATIVE], guidance_scale=5.0),
        settings=[*SD3, "sample.cfg_scale=5", f"sample.negative_prompt={NEGATIVE}"],
        untrained={"transformer_blocks.1.attn.add_q_proj"})
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn2.to_v",
            "transformer_blocks.1.norm1_context.linear"} <= names  # MMDiT-X attn2; the pre-only last block
    assert "transformer_blocks.1.attn.to_add_out" not in names


def _flash_sd3_style(kohya: dict[str, torch.Tensor], transformer) -> dict[str, torch.Tensor]:
    """The Kohya file in flash-sd3's style, which ComfyUI's `model_lora_keys_unet` maps for SD3 beside `_styles`':
    peft's own `base_model.model.<diffusers path>` (no component) with lora_A / lora_B, the scale baked in."""
    originals = transformer_keys.kohya_modules(transformer, transformer_keys.SD3_NAMES, outer=True)
    paths = {f"lora_unet_{p.replace('.', '_')}": p for module in originals.values() for p in module.paths}
    out = {}
    for key, t in transformer_keys.split_modules(transformer, originals, group_modules(kohya)).items():
        scale = float(t["alpha"]) / t["lora_down.weight"].shape[0]
        out[f"base_model.model.{paths[key]}.lora_A.weight"] = t["lora_down.weight"] * scale
        out[f"base_model.model.{paths[key]}.lora_B.weight"] = t["lora_up.weight"]
    return out


def test_other_trainers_sd3_files_read_through_the_one_reader_with_identical_weight_changes(trained, sd3_dir,
                                                                                            tmp_path):
    from diffusers import StableDiffusion3Pipeline

    # all but the last block's add_q_proj (untrained, zero); diffusers itself: its train_dreambooth_lora_sd3.py
    # saves through StableDiffusion3Pipeline.save_lora_weights
    styles = assert_other_trainers_files_read_back_as_the_kohya_file(
        trained, sd3_dir, StableDiffusion3Pipeline, transformer_keys.SD3_NAMES, tmp_path, untrained=1,
        more_styles=lambda kohya, transformer: {"flash_sd3_peft": _flash_sd3_style(kohya, transformer)})
    assert any(".joint_blocks.1.context_block.adaLN_modulation.1." in k for k in styles["ai_toolkit_comfy"])


def test_convert_writes_sd3_kohya_as_diffusers_and_back_with_the_same_weight_changes(trained, sd3_dir, tmp_path,
                                                                                     caplog):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    _, back = assert_convert_both_ways_keeps_the_weight_changes(trained, pipe, sd3_dir, tmp_path, caplog)
    assert load_file(back).keys() == load_file(trained["kohya"]).keys()  # fused again, kohya's names


# ---------------------------------------------------------------------------------------------
# The low-rank tools


@pytest.fixture(scope="module")
def sd3(tmp_path_factory, sd3_dir):
    """A Kohya SD3 LoRA on the tiny SD3.5 Medium (rank 4, alpha 2, fused qkv sharing one down as kohya trains)."""
    tmp = tmp_path_factory.mktemp("sd3_tools")
    transformer = _transformer(sd3_dir)
    kohya_transformer_file(tmp / "style.safetensors", transformer, transformer_keys.SD3_NAMES, rank=4, alpha=2.0)
    return {"dir": tmp, "base": sd3_dir, "lora": tmp / "style.safetensors", "transformer": transformer}


def test_resize_of_an_sd3_file_is_the_truncated_svd_of_each_fused_delta(sd3, capsys):
    assert_resize_is_the_truncated_svd_of_each_delta(sd3, "lora_unet_joint_blocks_0_x_block_attn_qkv", capsys)


def test_inspect_reports_the_sd3_modules(sd3, capsys):
    modules = assert_inspect_reports_the_modules(sd3, transformer_keys.SD3_NAMES, capsys)
    assert len(modules) == 19


def test_merge_into_an_sd3_folder_then_extract_gives_back_the_fused_lora(sd3, capsys):
    from diffusers import StableDiffusion3Pipeline

    # Kohya's joint_blocks names, fused qkv; the last block's context modulation with its halves exchanged
    meta = assert_merge_then_extract_gives_back_the_lora(sd3, StableDiffusion3Pipeline, transformer_keys.SD3_NAMES)
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["ss_base_model_version"] == "5-medium"


def test_convert_on_the_command_line_writes_sd3_diffusers_keys_and_back(sd3, capsys):
    assert_convert_writes_diffusers_keys_and_back(sd3, "transformer.transformer_blocks.", capsys)


# ---------------------------------------------------------------------------------------------
# Settings another family reads


def _noted(family, cfg, sections=("train", "sample")) -> set[str]:
    notes = unread_settings(FAMILIES[family], cfg, sections)
    assert all(n.endswith("remove it to silence this note") for n in notes)
    return {n.split(" = ")[0] for n in notes}


def test_a_setting_only_other_families_read_gets_one_note_naming_it():
    changed = config_from_dict({"name": "x", "train": {
        "guidance_scale": 1.0, "timestep_sampling": "shift", "discrete_flow_shift": 3.1582, "training_shift": 3.0,
        "min_snr_gamma": 0.0, "weighting_scheme": "logit_normal"}, "sample": {
        "cfg_scale": 5.0, "negative_prompt": "blurry", "guidance_scale": 2.0, "skip_layer_guidance_scale": 2.8,
        "sampler": "euler"}})
    assert _noted("sd35_medium", changed) == {
        "[train] guidance_scale", "[train] timestep_sampling", "[train] discrete_flow_shift", "[train] min_snr_gamma",
        "[sample] guidance_scale", "[sample] sampler"}
    assert _noted("flux1_dev", changed) == {
        "[train] training_shift", "[train] min_snr_gamma", "[sample] cfg_scale", "[sample] negative_prompt",
        "[sample] skip_layer_guidance_scale", "[sample] sampler"}
    # schnell has no guidance input
    assert _noted("flux1_schnell", changed) == _noted("flux1_dev", changed) | {"[train] guidance_scale",
                                                                              "[sample] guidance_scale"}
    assert _noted("sdxl", changed) == {
        "[train] guidance_scale", "[train] timestep_sampling", "[train] discrete_flow_shift", "[train] training_shift",
        "[train] weighting_scheme", "[sample] guidance_scale", "[sample] skip_layer_guidance_scale"}
    assert _noted("sdxl", changed, ("sample",)) == {"[sample] guidance_scale", "[sample] skip_layer_guidance_scale"}
    note = unread_settings(FAMILIES["sd35_large"], changed, ("sample",))[0]
    assert note == ("[sample] guidance_scale = 2.0 is ignored for SD3.5 Large (it applies to FLUX.1 dev); remove it to "
                    "silence this note")
    for family in FAMILIES:  # left at their defaults, nothing is noted
        assert unread_settings(FAMILIES[family], config_from_dict({"name": "x"})) == []


def test_training_and_sampling_sd3_note_flux_only_settings_once(sd3, tmp_path):
    from sdlora.sampling.sampler import run_sample

    settings = [*SD3, "train.guidance_scale=1.0", "sample.guidance_scale=2.0", "sample.steps=2", "sample.width=64",
                "sample.height=64", "sample.seeds=[1]", "sample.lora_scales=[1.0]", "sample.prompts=['clrscn, lake']"]
    cfg = load_config(make_style(tmp_path, sd3["base"]), settings)
    note = ("note: [{}] guidance_scale = {} is ignored for SD3.5 Medium (it applies to FLUX.1 dev); remove it to "
            "silence this note")
    logs = []
    Trainer(cfg, log=logs.append)
    # no previews: the [sample] keys are the sampler's to note
    assert [line for line in logs if line.startswith("note: [")] == [note.format("train", "1.0")]
    logs.clear()
    run_sample(cfg, [(sd3["lora"], None)], out_dir=tmp_path / "samples", log=logs.append)
    assert [line for line in logs if line.startswith("note: [")] == [note.format("sample", "2.0")]


def test_sdlora_run_on_sd3_writes_diffusers_files_and_notes_each_ignored_key_once(tmp_path, sd3_dir):
    """`output.format = "diffusers"` through the whole run (previews, samples, resize by energy read the
    files through the one reader); the trainer notes both tables since it previews, the samples no more."""
    from test_run import RUN_EXTRA

    from sdlora import run

    logs = []
    extra = RUN_EXTRA.replace("max_train_steps = 4", "max_train_steps = 4\nguidance_scale = 1.0") + \
        "\nevery_n_epochs = 1\npreview_steps = 1\nguidance_scale = 2.0"
    cfg = load_config(make_style(tmp_path, sd3_dir, extra=extra),
                      [*SD3, "output.format=diffusers", "output.resize_energy=0.9"])
    result = run.run(cfg, log=logs.append)
    adapter = result["paths"]["adapter"]
    assert all(k.startswith("transformer.transformer_blocks.") for k in load_file(adapter))
    resized = sorted(adapter.parent.glob("*energy*.safetensors"))
    assert resized and all(k.startswith("transformer.transformer_blocks.") for k in load_file(resized[0]))
    assert result["sample"].grids and all(g.is_file() for g in result["sample"].grids)
    notes = [line for line in logs if line.startswith("note: [")]
    assert [n.split(" = ")[0] for n in notes] == ["note: [train] guidance_scale", "note: [sample] guidance_scale"]
