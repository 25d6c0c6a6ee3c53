"""`sdlora import-kohya` on what kohya users actually have: kohya_ss GUI presets and saved configs (flat
.json, the GUI's sectioned config.toml), sd-scripts argument TOMLs, dataset TOMLs and command lines.

The corpus is written here, modelled on the shapes of kohya_ss's presets/lora/*.json, its test/config
files and sd-scripts' docs (empty strings and zeros for "unset", float-typed integers, numbers as
strings, additional_parameters, nested sections, several [[datasets]]). Every converted file is read
back through sdlora's own config loader, the `sdlora config check` path.
"""

import json
import math
from pathlib import Path

import pytest

from sdlora.cli import main
from sdlora.config import describe, load_config
from sdlora.errors import UserError
from sdlora.presets.kohya import import_kohya


def gui_preset(**changes) -> dict:
    """A kohya_ss GUI LoRA preset as the GUI saves it: unset fields are "" or 0, some numbers are strings,
    some integers floats."""
    preset = {
        "LoRA_type": "Standard", "adaptive_noise_scale": 0, "additional_parameters": "", "block_alphas": "",
        "block_dims": "", "block_lr_zero_threshold": "", "bucket_no_upscale": True, "bucket_reso_steps": 64,
        "cache_latents": True, "cache_latents_to_disk": True, "caption_dropout_every_n_epochs": 0.0,
        "caption_dropout_rate": 0.05, "caption_extension": ".txt", "clip_skip": "1", "color_aug": False,
        "conv_alpha": 1, "conv_block_alphas": "", "conv_block_dims": "", "conv_dim": 1, "down_lr_weight": "",
        "enable_bucket": True, "epoch": 8, "factor": -1, "flip_aug": False, "full_bf16": False,
        "gradient_accumulation_steps": 1.0, "gradient_checkpointing": True, "keep_tokens": "0",
        "learning_rate": 0.0001, "lora_network_weights": "", "lr_scheduler": "cosine", "lr_scheduler_num_cycles": "",
        "lr_scheduler_power": "", "lr_warmup": 0, "max_bucket_reso": 2048, "max_data_loader_n_workers": "0",
        "max_resolution": "1024,1024", "max_timestep": 1000, "max_token_length": "75", "max_train_epochs": "",
        "max_train_steps": "", "mem_eff_attn": False, "mid_lr_weight": "", "min_bucket_reso": 256,
        "min_snr_gamma": 5, "mixed_precision": "bf16", "multires_noise_discount": 0.2,
        "multires_noise_iterations": 8, "network_alpha": 16, "network_dim": 32, "network_dropout": 0,
        "noise_offset": 0.0357, "noise_offset_type": "Multires", "optimizer": "AdamW8bit", "optimizer_args": "",
        "persistent_data_loader_workers": False, "prior_loss_weight": 1.0, "reg_data_dir": "", "sample_prompts": "",
        "sample_sampler": "euler_a", "save_every_n_epochs": 1, "save_every_n_steps": 0, "save_precision": "fp16",
        "scale_weight_norms": 0, "sdxl": True, "seed": "", "shuffle_caption": False, "stop_text_encoder_training": 0,
        "text_encoder_lr": 0.0001, "train_batch_size": 2, "train_data_dir": "", "unet_lr": 0.0001,
        "up_lr_weight": "", "v2": False, "v_parameterization": False, "vae": "", "wandb_api_key": "",
        "xformers": "xformers",
    }
    preset.update(changes)
    return preset


def write(path, content):
    path.write_text(json.dumps(content) if path.suffix == ".json" and not isinstance(content, str) else content)
    return str(path)


def convert(tmp_path, capsys, *sources):
    """(exit code, the written config read back by sdlora's loader or None, stderr)."""
    out = tmp_path / "imported.toml"
    code = main(["import-kohya", *map(str, sources), "-o", str(out), "--overwrite"])
    err = capsys.readouterr().err
    return code, (load_config(out) if code == 0 else None), err


def refused(code, err) -> str:
    """The one line a refusal prints (and that it is one line, exit 2, no traceback)."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("sdlora: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# Numbers keep their values


@pytest.mark.parametrize("value, expected", [
    (1e-4, 1e-4), (5e-06, 5e-06), ("0.0001", 1e-4), ("5e-5", 5e-5), (1, 1.0), ("1.0", 1.0), (4e-07, 4e-07),
])
def test_every_learning_rate_form_reaches_the_output_unchanged(tmp_path, capsys, value, expected):
    gui = write(tmp_path / "gui.json", {"learning_rate": value, "unet_lr": "", "text_encoder_lr": "",
                                        "network_dim": 8, "LoRA_type": "Standard"})
    args = write(tmp_path / "args.toml", f"learning_rate = {json.dumps(value)}\nnetwork_dim = 8\n"
                                         f"unet_lr = {json.dumps(value)}\n")
    command = f"accelerate launch train_network.py --network_dim 8 --learning_rate={value} --text_encoder_lr {value}"
    for source in (gui, args, command):
        code, cfg, err = convert(tmp_path, capsys, source)
        assert code == 0, err
        assert cfg.train.unet_lr == expected and cfg.train.text_encoder_lr == expected, (source, err)


def test_the_sdxl_docs_example_keeps_its_learning_rate(tmp_path, capsys):
    """sd-scripts' train_SDXL-en.md arguments TOML: learning_rate = 4e-7 became 0 (int(4e-7)) before."""
    source = write(tmp_path / "sdxl.toml", 'optimizer_type = "adafactor"\noptimizer_args = [ "scale_parameter=False", '
                   '"relative_step=False", "warmup_init=False" ]\nlr_scheduler = "constant_with_warmup"\n'
                   "lr_warmup_steps = 100\nlearning_rate = 4e-7\n")
    code, cfg, err = convert(tmp_path, capsys, source)
    assert code == 0, err
    assert cfg.train.unet_lr == 4e-7 and cfg.train.text_encoder_lr == 4e-7
    assert cfg.train.optimizer_args == {"scale_parameter": False, "relative_step": False, "warmup_init": False}


def test_sdxl_text_encoder_rates_become_the_pair(tmp_path, capsys):
    command = ("accelerate launch sdxl_train_network.py --network_dim=32 --learning_rate=1e-4 --unet_lr=2e-4 "
               "--text_encoder_lr1=1e-5 --text_encoder_lr2=5e-06")
    code, cfg, err = convert(tmp_path, capsys, command)
    assert code == 0, err
    assert cfg.train.unet_lr == 2e-4 and cfg.train.text_encoder_lr == [1e-5, 5e-06]
    # one of the two given: the other takes text_encoder_lr, then learning_rate (kohya's fallback)
    code, cfg, err = convert(tmp_path, capsys, "train_network.py --learning_rate 3e-4 --text_encoder_lr2 1e-6")
    assert cfg.train.text_encoder_lr == [3e-4, 1e-6] and cfg.train.unet_lr == 3e-4
    # kohya's own list form, and the same rate twice (one rate: right for a one-encoder base too)
    code, cfg, err = convert(tmp_path, capsys, "train_network.py --network_dim 4 --text_encoder_lr 1e-5 2e-5")
    assert cfg.train.text_encoder_lr == [1e-5, 2e-5]
    code, cfg, err = convert(tmp_path, capsys, "train_network.py --network_dim 4 --text_encoder_lr1 1e-5 "
                                               "--text_encoder_lr2 1e-5")
    assert cfg.train.text_encoder_lr == 1e-5


def test_whole_number_floats_are_integers_and_other_floats_are_refused(tmp_path, capsys):
    source = write(tmp_path / "gui.json", gui_preset(gradient_accumulation_steps=4.0, bucket_reso_steps=64.0,
                                                     network_dim=32.0, train_batch_size="2", epoch="6.0"))
    code, cfg, err = convert(tmp_path, capsys, source)
    assert code == 0, err
    assert (cfg.train.gradient_accumulation_steps, cfg.dataset.bucket_reso_steps, cfg.network.dim,
            cfg.train.batch_size, cfg.train.epochs) == (4, 64, 32, 2, 6)
    assert isinstance(cfg.network.dim, int)
    write(tmp_path / "gui.json", gui_preset(network_dim=16.5))
    line = refused(*convert(tmp_path, capsys, source)[::2])
    assert "network_dim" in line and "whole number" in line and "16.5" in line


# ---------------------------------------------------------------------------------------------------------
# The GUI's "unset"


def test_gui_unset_values_leave_sdlora_defaults(tmp_path, capsys):
    defaults = load_config(write(tmp_path / "default.toml", ""))
    source = write(tmp_path / "gui.json", gui_preset(epoch=7, max_train_epochs="", seed="", clip_skip="",
                                                     lr_scheduler_num_cycles="", vae="", max_train_steps=0))
    code, cfg, err = convert(tmp_path, capsys, source)
    assert code == 0, err
    assert cfg.train.epochs == 7  # "" does not override epoch
    assert (cfg.train.seed, cfg.model.clip_skip, cfg.train.lr_scheduler_num_cycles, cfg.model.vae,
            cfg.train.max_train_steps) == (defaults.train.seed, defaults.model.clip_skip,
                                           defaults.train.lr_scheduler_num_cycles, "", 0)
    assert "note: unset in the source" in err and "train.seed (seed)" in err
    for unset in (0, "0"):
        write(tmp_path / "gui.json", gui_preset(epoch=7, max_train_epochs=unset, seed=0))
        assert convert(tmp_path, capsys, source)[1].train.epochs == 7
    write(tmp_path / "gui.json", gui_preset(epoch=7, max_train_epochs="12", seed="1234"))
    code, cfg, err = convert(tmp_path, capsys, source)
    assert (cfg.train.epochs, cfg.train.seed) == (12, 1234)
    assert "--epoch 7: replaced by --max_train_epochs 12" in err
    # On a command line, seed 0 is a seed.
    assert convert(tmp_path, capsys, "train_network.py --network_dim 4 --seed 0")[1].train.seed == 0


def test_noise_offset_type_picks_the_noise_the_gui_trains_with(tmp_path, capsys):
    source = tmp_path / "gui.json"
    write(source, gui_preset(noise_offset_type="Multires", noise_offset=0.0357))
    code, cfg, err = convert(tmp_path, capsys, source)
    assert cfg.train.noise_offset == 0.0 and "noise_offset = 0.0357 not used" in err
    write(source, gui_preset(noise_offset_type="Original", noise_offset=0.0357))
    assert convert(tmp_path, capsys, source)[1].train.noise_offset == 0.0357


# ---------------------------------------------------------------------------------------------------------
# Sources: command lines, nested configs, further sources


def test_long_command_lines_with_continuations_are_read(tmp_path, capsys):
    folder = tmp_path / "a folder with spaces"
    parts = [f'--output_name="run {"x" * 300}"', f'--output_dir="{folder}"', "--network_dim=16",
             "--network_args \"conv_dim=8\" \"conv_alpha=4\"", "--learning_rate=5e-06", "--max_train_epochs=3"]
    for joiner in (" \\\n  ", " ^\n  ", " `\n  ", "\n "):
        command = "accelerate launch --num_cpu_threads_per_process 1 train_network.py" + joiner + joiner.join(parts)
        assert len(command) > 300
        code, cfg, err = convert(tmp_path, capsys, command)
        assert code == 0, err
        assert (cfg.network.dim, cfg.network.conv_dim, cfg.train.unet_lr, cfg.train.epochs) == (16, 8, 5e-06, 3)
        assert cfg.output.output_name == f"run {'x' * 300}" and cfg.output.dir == str(folder)
    script = write(tmp_path / "train.bat", "accelerate launch train_network.py ^\n --network_dim 12 ^\n "
                                           '--train_data_dir "C:\\data\\img"\n')
    code, cfg, err = convert(tmp_path, capsys, script)
    assert cfg.network.dim == 12 and cfg.dataset.image_dir.endswith("C:\\data\\img")  # backslashes kept
    line = refused(*convert(tmp_path, capsys, 'train_network.py --output_name "unclosed')[::2])
    assert "quotes" in line


def test_family_lora_modules_dora_and_settings_sdlora_decides_itself(tmp_path, capsys):
    """sd-scripts' networks.lora_flux / lora_sd3 are its LoRA for those families; caching text-encoder
    outputs and an fp32 VAE are what sdlora does anyway, so they are "not needed", not "no equivalent"."""
    command = ("accelerate launch flux_train_network.py --network_module=networks.lora_flux --network_dim=16 "
               "--cache_text_encoder_outputs --sdxl_no_half_vae")
    code, cfg, err = convert(tmp_path, capsys, command)
    assert code == 0, err
    assert cfg.network.type == "lora" and 'network.type = "lora"' in err
    assert "not mapped: --cache_text_encoder_outputs: not needed (text-encoder outputs are cached" in err
    assert "not mapped: --sdxl_no_half_vae: not needed" in err
    # LyCORIS's DoRA (dora_wd) is sdlora's network.dora, which peft has for lora and locon only
    code, cfg, err = convert(tmp_path, capsys, 'train_network.py --network_module lycoris.kohya --network_dim 8 '
                                               '--network_args "algo=loha" "dora_wd=True"')
    assert (cfg.network.type, cfg.network.dora) == ("loha", False) and "sdlora's DoRA is for lora and locon" in err
    code, cfg, err = convert(tmp_path, capsys, 'train_network.py --network_module lycoris.kohya --network_dim 8 '
                                               '--network_args "algo=lora" "conv_dim=4" "dora_wd=True"')
    assert (cfg.network.type, cfg.network.dora) == ("locon", True)


def test_command_line_names_its_config_file_and_dataset_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # kohya reads relative paths from the current folder
    write(tmp_path / "args.toml", "network_dim = 8\nnetwork_alpha = 4\nmax_train_epochs = 2\n")
    write(tmp_path / "data.toml", '[[datasets]]\nresolution = 768\nbatch_size = 3\n'
                                  '[[datasets.subsets]]\nimage_dir = "img/5_style"\nnum_repeats = 5\n')
    command = ("accelerate launch train_network.py --config_file args --dataset_config=data.toml "
               "--max_train_epochs 4 --resolution 512 --train_data_dir elsewhere")
    code, cfg, err = convert(tmp_path, capsys, command)
    assert code == 0, err
    assert (cfg.network.dim, cfg.network.alpha) == (8, 4.0)  # from --config_file (kohya adds .toml)
    assert cfg.train.epochs == 4  # the command line beats its --config_file
    assert (cfg.dataset.resolution, cfg.train.batch_size) == (768, 3)  # the dataset config beats arguments
    assert [(s.image_dir, s.num_repeats) for s in cfg.dataset.subsets] == [(str(tmp_path / "img/5_style"), 5)]
    assert "the dataset config's 768 applies" in err and "--train_data_dir elsewhere: not used" in err
    line = refused(*convert(tmp_path, capsys, "train_network.py --dataset_config missing.toml")[::2])
    assert "missing.toml: file not found" in line


def test_gui_additional_parameters_are_a_command_line(tmp_path, capsys):
    source = write(tmp_path / "gui.json", gui_preset(
        additional_parameters='--network_train_unet_only --max_grad_norm=0 --network_args "block_lr_zero_threshold=0.1"'
                              ' --lr_scheduler_type "CosineAnnealingLR"'))
    code, cfg, err = convert(tmp_path, capsys, source)
    assert code == 0, err
    assert cfg.network.train_text_encoder is False and cfg.train.max_grad_norm == 0.0
    assert "--lr_scheduler_type = 'CosineAnnealingLR': no sdlora equivalent" in err


def test_the_gui_config_toml_sections_are_read_and_other_tabs_left_out(tmp_path, capsys):
    source = write(tmp_path / "config.toml", """
[model]
output_name = "my style"
[folders]
output_dir = "out"
[basic]
epoch = 5
learning_rate = 0.0002
learning_rate_te1 = 0.00001
learning_rate_te2 = 0.00002
train_batch_size = 3
max_train_epochs = 0
stop_text_encoder_training = 0
[advanced]
bucket_reso_steps = 32
keep_tokens = 2
[wd14_caption]
batch_size = 8
caption_extension = ".wd14.txt"
train_data_dir = ""
[huggingface]
huggingface_token = ""
""")
    code, cfg, err = convert(tmp_path, capsys, source)
    assert code == 0, err
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.dataset.bucket_reso_steps, cfg.dataset.keep_tokens) == (
        5, 3, 32, 2)
    assert cfg.train.unet_lr == 2e-4 and cfg.train.text_encoder_lr == [1e-5, 2e-5]
    assert cfg.dataset.caption_extension == ".txt" and "[wd14_caption]: the kohya_ss GUI's wd14_caption tab" in err
    # sd-scripts' --config_file in sections (kohya flattens them)
    source = write(tmp_path / "args.toml", '[model_arguments]\npretrained_model_name_or_path = "tiny"\n'
                                           "[additional_network_arguments]\nnetwork_dim = 6\n"
                                           "[optimizer_arguments]\nlearning_rate = 5e-06\n")
    code, cfg, err = convert(tmp_path, capsys, source)
    assert (cfg.network.dim, cfg.train.unet_lr, cfg.model.base) == (6, 5e-06, "tiny")


def test_sample_prompts_file_or_the_guis_prompt_text(tmp_path, capsys):
    prompts = write(tmp_path / "prompts.txt", "a house --n blurry --w 512\n")
    code, cfg, err = convert(tmp_path, capsys, f"train_network.py --network_dim 4 --sample_prompts {prompts} "
                                               "--save_every_n_steps 50")
    assert cfg.sample.prompt_file == prompts and cfg.train.save_every_n_steps == 50
    source = write(tmp_path / "gui.json", gui_preset(sample_prompts="a painting of a lake\n\na castle, by moonlight"))
    code, cfg, err = convert(tmp_path, capsys, source)
    assert cfg.sample.prompts == ["a painting of a lake", "a castle, by moonlight"]


# ---------------------------------------------------------------------------------------------------------
# Dataset configs


def test_subsets_without_datasets_are_refused_in_one_line(tmp_path, capsys):
    source = write(tmp_path / "data.toml", '[[datasets.subsets]]\nimage_dir = "img"\n')
    line = refused(*convert(tmp_path, capsys, source)[::2])
    assert "[[datasets.subsets]] without a [[datasets]]" in line and "add a line [[datasets]]" in line


def test_two_datasets_the_note_and_the_output_agree(tmp_path, capsys):
    source = write(tmp_path / "data.toml", f"""
[general]
keep_tokens = 1
caption_extension = ".txt"
[[datasets]]
resolution = [1024, 1024]
batch_size = 2
enable_bucket = true
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'a'}"
  num_repeats = 4
[[datasets]]
resolution = 768
batch_size = 5
keep_tokens = 3
validation_split = 0.2
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'b'}"
[[datasets]]
validation_split = 1.0
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'held_out'}"
""")
    code, cfg, err = convert(tmp_path, capsys, source)
    assert code == 0, err
    assert (cfg.dataset.resolution, cfg.train.batch_size, cfg.dataset.enable_bucket) == (1024, 2, True)
    assert "[[datasets]] 2: resolution = 768, batch_size = 5, validation_split = 0.2 not used" in err
    assert cfg.dataset.validation_split == 0.0
    assert "[[datasets]] 1's settings apply to every subset" in err
    subsets = {s.image_dir.rsplit("/", 1)[1]: s for s in cfg.dataset.subsets}
    assert (subsets["a"].num_repeats, subsets["a"].keep_tokens, subsets["b"].keep_tokens) == (4, 1, 3)
    assert subsets["held_out"].validation and not subsets["a"].validation  # validation_split = 1: held out whole


@pytest.mark.parametrize("name, text", [
    ("meta_lat.json", json.dumps({"img\\10_style\\a.jpg": {"caption": "a painting",
                                  "train_resolution": [1024, 1024]}})),
    ("leco_prompts.toml", '[[prompts]]\ntarget = "van gogh"\npositive = "van gogh"\naction = "erase"\n'),
    ("list.json", "[1, 2, 3]"),
    ("other.toml", 'title = "my notes"\n[owner]\nname = "me"\n'),
    ("empty.toml", ""),
    ("bad.toml", "[[datasets]\n"),
    ("bad.json", "{'single': 'quotes'}"),
    ("binary.toml", b"\x89PNG\r\n\x1a\n\x00\xff"),
    ("datasets.toml", 'datasets = "img"\n'),
    ("general_only.toml", '[general]\ntitle = "notes"\n'),
])
def test_files_that_are_not_training_configs_are_refused(tmp_path, capsys, name, text):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = refused(*convert(tmp_path, capsys, path)[::2])
    assert str(path) in line
    assert not (tmp_path / "imported.toml").exists()


# ---------------------------------------------------------------------------------------------------------
# Nearest valid values


def test_values_sdlora_cannot_take_become_the_nearest_and_a_note_says_so(tmp_path, capsys):
    source = write(tmp_path / "gui.json", gui_preset(
        LoRA_type="LyCORIS/LoKr", network_dim=100000, bucket_reso_steps=1, max_resolution="512,650",
        caption_extension=".none-use-foldername", optimizer="DAdaptAdam", learning_rate=1.0, unet_lr=1.0,
        text_encoder_lr=1.0, lr_scheduler="adafactor", lr_warmup=10))
    code, cfg, err = convert(tmp_path, capsys, source)
    assert code == 0, err
    assert (cfg.network.type, cfg.network.dim, cfg.dataset.bucket_reso_steps, cfg.dataset.resolution) == (
        "lokr", 1024, 8, [512, 648])
    assert cfg.dataset.caption_extension == ".none_use_foldername"
    assert (cfg.train.optimizer, cfg.train.unet_lr, cfg.train.lr_scheduler) == ("prodigy", 1.0, "constant")
    assert cfg.train.lr_warmup_ratio == 0.1
    for note in ("--network_dim = 100000: sdlora's network.dim takes 1 to 1024; the nearest, 1024, is used",
                 "--bucket_reso_steps = 1: sdlora's dataset.bucket_reso_steps takes multiples of 8; the nearest, 8",
                 "--max_resolution = 512,650: sdlora's sides are multiples of 8, at least 64; the nearest, [512, 648]",
                 "--optimizer = DAdaptAdam: sdlora has no DAdaptAdam; the nearest, prodigy",
                 "--lr_scheduler = adafactor: sdlora has no adafactor schedule; the nearest, constant"):
        assert f"note: {note}" in err


# ---------------------------------------------------------------------------------------------------------
# kohya's training options and block weights


def test_multires_and_adaptive_noise_map_by_noise_offset_type(tmp_path, capsys):
    source = tmp_path / "gui.json"
    write(source, gui_preset(noise_offset_type="Multires", multires_noise_iterations=6, multires_noise_discount=0.3,
                             adaptive_noise_scale=0.00357))
    code, cfg, err = convert(tmp_path, capsys, source)
    assert (cfg.train.multires_noise_iterations, cfg.train.multires_noise_discount) == (6, 0.3)
    assert cfg.train.adaptive_noise_scale == 0.0 and cfg.train.noise_offset == 0.0
    write(source, gui_preset(noise_offset_type="Original", noise_offset=0.05, adaptive_noise_scale=0.00357,
                             multires_noise_iterations=6))
    code, cfg, err = convert(tmp_path, capsys, source)
    assert (cfg.train.noise_offset, cfg.train.adaptive_noise_scale, cfg.train.multires_noise_iterations) == (
        0.05, 0.00357, 0)


def test_scale_weight_norms_and_stop_text_encoder_training(tmp_path, capsys):
    code, cfg, err = convert(tmp_path, capsys, "train_network.py --network_dim 4 --scale_weight_norms 1.0 "
                                               "--stop_text_encoder_training 120")
    assert (cfg.train.scale_weight_norms, cfg.train.stop_text_encoder_training) == (1.0, 120)
    source = tmp_path / "gui.json"  # the GUI's percent, which its LoRA tab ignores (kohya_gui/lora_gui.py)
    for steps in ("1000", ""):
        write(source, gui_preset(stop_text_encoder_training=25, max_train_steps=steps))
        code, cfg, err = convert(tmp_path, capsys, source)
        assert cfg.train.stop_text_encoder_training == 0 and "the kohya_ss LoRA tab ignores it" in err


def test_block_weights_from_network_args_and_gui_fields(tmp_path, capsys):
    """kohya's comma strings and preset names give what the same values written in sdlora's own form give."""
    from sdlora.config import config_from_dict

    dims = ",".join(["4"] * 25)
    command = (f'train_network.py --network_dim 4 --network_args "block_dims={dims}" "block_alphas={dims}" '
               '"down_lr_weight=sine+.5" "mid_lr_weight=2.0" "up_lr_weight=0,0,0,0,0,0,0,0,0,0,0,1" '
               '"block_lr_zero_threshold=0.1"')
    code, cfg, err = convert(tmp_path, capsys, command)
    assert code == 0, err
    by_hand = config_from_dict({"network": {
        "dim": 4, "block_dims": [4] * 25, "block_alphas": [4.0] * 25, "down_lr_weight": "sine+.5",
        "mid_lr_weight": 2.0, "up_lr_weight": [0.0] * 11 + [1.0], "block_lr_zero_threshold": 0.1}}).network
    for key in ("block_dims", "block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
                "block_lr_zero_threshold"):
        assert getattr(cfg.network, key) == getattr(by_hand, key), key
    assert cfg.network.block_dims == [4] * 25 and cfg.network.down_lr_weight == "sine+.5"
    source = write(tmp_path / "gui.json", gui_preset(conv_block_dims=dims, conv_block_alphas=dims,
                                                     up_lr_weight="cosine"))
    code, cfg, err = convert(tmp_path, capsys, source)
    by_hand = config_from_dict({"network": {"conv_block_dims": [4] * 25, "conv_block_alphas": [4.0] * 25,
                                            "up_lr_weight": "cosine"}}).network
    assert (cfg.network.conv_block_dims, cfg.network.conv_block_alphas, cfg.network.up_lr_weight) == (
        by_hand.conv_block_dims, by_hand.conv_block_alphas, by_hand.up_lr_weight)


def test_empty_entries_of_block_values_keep_their_place(tmp_path, capsys):
    """kohya reads "1,,0.5,2" as four lr weights, the empty one 0: the blocks after it keep their place.
    An empty rank is no rank: refused by key, as sdlora's config refuses it."""
    command = ('train_network.py --network_dim 4 --network_args "up_lr_weight=1,,0.5,2,1,1,1,1,1,1,1,1" '
               '"down_lr_weight=1,1,1,1,1,1,1,1,1,1,1,"')
    code, cfg, err = convert(tmp_path, capsys, command)
    assert code == 0, err
    assert cfg.network.up_lr_weight == [1.0, 0.0, 0.5, 2.0] + [1.0] * 8
    assert cfg.network.down_lr_weight == [1.0] * 11 + [0.0]
    source = write(tmp_path / "gui.json", gui_preset(block_dims="4,,4"))
    code, cfg, err = convert(tmp_path, capsys, source)
    assert code == 2 and "block_dims" in err and "Traceback" not in err


def test_every_kohya_name_points_to_an_sdlora_key():
    """One table names kohya's keys for the importer and the config's did-you-mean; each must exist."""
    from sdlora.kohya_names import KOHYA_KEYS

    known = {key for key, _, _ in describe()}
    missing = {k: t for k, t in KOHYA_KEYS.items() if t not in known and t.replace("subsets[].", "") not in known}
    assert not missing


# ---------------------------------------------------------------------------------------------------------
# Real preset shapes, and fuzzing


PRESETS = {  # modelled on kohya_ss presets/lora/*.json and test/config/*.json (values changed)
    "sdxl prodigy": (gui_preset(optimizer="Prodigy", learning_rate=1.0, unet_lr=1.0, text_encoder_lr=1.0,
                                optimizer_args="weight_decay=0.01 decouple=True d0=0.0001 use_bias_correction=True",
                                epoch=160, scale_weight_norms=5, noise_offset_type="Original", noise_offset=0),
                     {"train.optimizer": "prodigy", "train.unet_lr": 1.0, "train.epochs": 160}),
    "sd15 loha": (gui_preset(LoRA_type="LyCORIS/LoHa", bucket_reso_steps=1, caption_extension=".none-use-foldername",
                             sdxl=False, max_resolution="512,512", conv_dim=8, conv_alpha=4, xformers=True),
                  {"network.type": "loha", "dataset.bucket_reso_steps": 8, "train.attention": "xformers"}),
    "sd15 lokr full": (gui_preset(LoRA_type="LyCORIS/LoKr", network_dim=100000, conv_dim=100000, factor=8,
                                  network_alpha=1, keep_tokens=1),
                       {"network.type": "lokr", "network.dim": 1024, "dataset.keep_tokens": 1}),
    "locon dora": (gui_preset(LoRA_type="LyCORIS/LoCon", dora_wd=True, conv_dim=8, conv_alpha=4),
                   {"network.type": "locon", "network.dora": True}),
    "loha dora": (gui_preset(LoRA_type="LyCORIS/LoHa", dora_wd=True), {"network.type": "loha", "network.dora": False}),
    "ia3": (gui_preset(LoRA_type="LyCORIS/iA3", learning_rate=1.0, optimizer="Prodigy", network_dim=32),
            {"network.type": "lora", "train.optimizer": "prodigy"}),
    "dadaptation": (gui_preset(optimizer="DAdaptAdam", learning_rate=1, unet_lr=1, text_encoder_lr=0.5,
                               optimizer_args='"decouple=True" "weight_decay=0.2" "betas=0.9,0.99"'),
                    {"train.optimizer": "prodigy", "train.text_encoder_lr": 0.5,
                     "train.optimizer_args": {"decouple": True, "weight_decay": 0.2, "betas": [0.9, 0.99]}}),
    "adafactor": (gui_preset(optimizer="Adafactor", lr_scheduler="adafactor", learning_rate=4e-07, unet_lr=4e-07,
                             text_encoder_lr=4e-07,
                             optimizer_args="scale_parameter=False relative_step=False warmup_init=False"),
                  {"train.optimizer": "adafactor", "train.unet_lr": 4e-07, "train.lr_scheduler": "constant"}),
    "edg locon": (gui_preset(LoRA_type="Kohya LoCon", bucket_reso_steps=64.0, gradient_accumulation_steps=1.0,
                             conv_dim=16, conv_alpha=8, max_train_epochs="16", clip_skip=2, lr_warmup=5),
                  {"network.type": "locon", "network.conv_dim": 16, "train.epochs": 16, "model.clip_skip": 2,
                   "train.lr_warmup_ratio": 0.05}),
    "unet only": (gui_preset(text_encoder_lr=0.0, unet_lr="0.0001", seed="1337", min_snr_gamma=0),
                  {"train.text_encoder_lr": 0.0, "train.unet_lr": 1e-4, "train.seed": 1337}),
    "prodigy, both rates 0": (gui_preset(optimizer="Prodigy", learning_rate=1.0, unet_lr=0.0, text_encoder_lr=0.0),
                              {"train.unet_lr": 1.0, "train.text_encoder_lr": 1.0}),  # the GUI: learning_rate
    "saved with additional parameters": (
        gui_preset(additional_parameters="--network_train_unet_only --max_grad_norm=1", output_name="style_v2",
                   lr_scheduler_num_cycles="3", lr_scheduler="cosine_with_restarts", max_token_length="225"),
        {"network.train_text_encoder": False, "train.lr_scheduler_num_cycles": 3, "dataset.max_token_length": 225}),
    "flux": (gui_preset(LoRA_type="Flux1", max_train_epochs=0, epoch=1, t5xxl="", clip_l="", sdxl=False),
             {"train.epochs": 1}),
    "sd15 zero strings": (gui_preset(keep_tokens="0", clip_skip="1", max_resolution="768,768", save_every_n_epochs=0,
                                     sample_every_n_epochs=0, lr_warmup="0", noise_offset=""),
                          {"dataset.keep_tokens": 0, "dataset.resolution": 768, "train.save_every_n_epochs": 0}),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_of_the_gui_convert_to_configs_that_pass_config_check(tmp_path, capsys, name):
    preset, expected = PRESETS[name]
    code, cfg, err = convert(tmp_path, capsys, write(tmp_path / f"{name}.json", preset))
    assert code == 0, err
    assert main(["config", "check", str(tmp_path / "imported.toml")]) == 0
    for key, value in expected.items():
        section, name_ = key.split(".")
        assert getattr(getattr(cfg, section), name_) == value, key


ODD_VALUES = [[1, 2], {"a": 1}, None, "True", "false", "", "abc", 1e309, -1, True, "1e-4", 0, "0.5", [], "  "]
FUZZED = ["learning_rate", "unet_lr", "text_encoder_lr", "network_dim", "network_alpha", "epoch", "max_train_epochs",
          "max_resolution", "bucket_reso_steps", "optimizer", "optimizer_args", "LoRA_type", "xformers", "seed",
          "caption_extension", "lr_warmup", "sample_prompts", "additional_parameters", "noise_offset_type",
          "shuffle_caption", "train_data_dir", "lr_scheduler", "stop_text_encoder_training", "block_dims"]


@pytest.mark.parametrize("key", FUZZED)
def test_odd_values_convert_or_are_refused_in_one_line(tmp_path, key):
    """Never a traceback: each odd value either converts to a config sdlora's loader accepts, or is
    refused with a UserError of one line that names the key."""
    for value in ODD_VALUES:
        path = tmp_path / "gui.json"
        path.write_text(json.dumps(gui_preset(**{key: value})))  # 1e309 is written as Infinity
        try:
            text = import_kohya([str(path)], log=lambda m: None)
        except UserError as e:
            message = str(e)
            assert "\n" not in message and (key in message or "additional_parameters" in message), (value, message)
            continue
        out = tmp_path / "out.toml"
        out.write_text(text)
        cfg = load_config(out)
        assert all(math.isfinite(v) for v in (cfg.train.unet_lr, cfg.network.alpha, cfg.train.noise_offset))


@pytest.mark.parametrize("command", [
    "train_network.py --network_dim", "train_network.py --network_dim=abc", "train_network.py --learning_rate nan",
    "train_network.py -- --", "train_network.py --network_args", "train_network.py --network_args novalue",
    "train_network.py --resolution 1,2,3", "train_network.py --optimizer_args =1", "--a --b",
])
def test_odd_command_lines_never_reach_the_user_as_a_traceback(tmp_path, capsys, command):
    code, cfg, err = convert(tmp_path, capsys, command)
    assert code in (0, 2) and "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        refused(code, err)


def test_options_at_the_value_sdlora_trains_with_are_not_lost_settings(tmp_path, capsys):
    """The GUI saves LyCORIS's and kohya's defaults (unit 1, factor -1, train_on_input, max_timestep 1000) in
    every preset: at those values nothing is lost, so they are not listed as settings sdlora lacks; another
    value is."""
    source = write(tmp_path / "gui.json", gui_preset(unit=1, factor=-1, train_on_input=True, max_timestep=1000,
                                                     num_cpu_threads_per_process=2))
    code, _, err = convert(tmp_path, capsys, source)
    assert code == 0, err
    assert not [line for line in err.splitlines() if "no sdlora equivalent" in line], err
    source = write(tmp_path / "gui.json", gui_preset(factor=16, max_timestep=900))
    code, _, err = convert(tmp_path, capsys, source)
    assert "--factor = 16: no sdlora equivalent" in err and "--max_timestep = 900: no sdlora equivalent" in err


def test_block_alphas_and_conv_blocks_alone_are_left_out_as_kohya_ignores_them(tmp_path, capsys):
    """kohya's create_network reads block_alphas and conv_block_dims/alphas only with block_dims or a block lr
    weight: alone they train nothing different there, so they are not imported (sdlora would apply them)."""
    dims = ",".join(["2"] * 25)
    code, cfg, err = convert(tmp_path, capsys, f'train_network.py --network_dim 4 --network_args '
                                               f'"block_alphas={dims}" "conv_block_dims={dims}"')
    assert code == 0, err
    assert (cfg.network.block_alphas, cfg.network.conv_block_dims) == ([], [])
    assert "block_alphas" in err and "kohya ignores it without block_dims" in err
    code, cfg, err = convert(tmp_path, capsys, f'train_network.py --network_dim 4 --network_args '
                                               f'"block_alphas={dims}" "up_lr_weight=1,1,1,1,1,1,1,1,1,1,1,1"')
    assert code == 0 and cfg.network.block_alphas == [2.0] * 25


# ---------------------------------------------------------------------------------------------------------
# FLUX.1 and SD3 (flux_train_network.py, sd3_train_network.py, the kohya_ss GUI's Flux1 / SD3 fields)

KOHYA_SS_PRESETS = Path(__file__).parent / "data" / "kohya_ss"  # verbatim from bmaltais/kohya_ss @ 45088f04
# sd-scripts docs/flux_train_network.md's example command (its paths made plain file names)
FLUX_DOCS_COMMAND = (
    'accelerate launch --num_cpu_threads_per_process 1 flux_train_network.py '
    '--pretrained_model_name_or_path="flux1-dev.safetensors" --clip_l="clip_l.safetensors" '
    '--t5xxl="t5xxl_fp16.safetensors" --ae="ae.safetensors" --output_dir="out" --output_name="my_flux_lora" '
    '--save_model_as=safetensors --network_module=networks.lora_flux --network_dim=16 --network_alpha=1 '
    '--learning_rate=1e-4 --optimizer_type="AdamW8bit" --lr_scheduler="constant" --sdpa --max_train_epochs=10 '
    '--save_every_n_epochs=1 --mixed_precision="fp16" --gradient_checkpointing --guidance_scale=1.0 '
    '--timestep_sampling="flux_shift" --model_prediction_type="raw" --blocks_to_swap=18 '
    '--cache_text_encoder_outputs --cache_latents')
# sd-scripts docs/sd3_train_network.md's example command
SD3_DOCS_COMMAND = (
    'accelerate launch --num_cpu_threads_per_process 1 sd3_train_network.py '
    '--pretrained_model_name_or_path="sd3.5_medium.safetensors" --clip_l="clip_l.safetensors" '
    '--clip_g="clip_g.safetensors" --t5xxl="t5xxl_fp16.safetensors" --output_dir="out" --output_name="my_sd3_lora" '
    '--save_model_as=safetensors --network_module=networks.lora --network_dim=16 --network_alpha=1 '
    '--learning_rate=1e-4 --optimizer_type="AdamW8bit" --lr_scheduler="constant" --sdpa --max_train_epochs=10 '
    '--save_every_n_epochs=1 --mixed_precision="fp16" --gradient_checkpointing --weighting_scheme="uniform" '
    '--blocks_to_swap=32')


def has_key(target: str) -> bool:
    """Whether this sdlora's config has `target` ("section.name"): the keys other parts of issue 22 add."""
    return target in {key for key, _, _ in describe()}


def needs_key(*targets):
    missing = [t for t in targets if not has_key(t)]
    return pytest.mark.skipif(bool(missing), reason=f"sdlora's config has no {', '.join(missing)} yet")


def test_flux_docs_command_maps_the_flow_options(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, cfg, err = convert(tmp_path, capsys, FLUX_DOCS_COMMAND)
    assert code == 0, err
    train = cfg.train
    assert (train.timestep_sampling, train.model_prediction_type, train.guidance_scale) == ("flux_shift", "raw", 1.0)
    assert cfg.model.vae == str(tmp_path / "ae.safetensors")  # FLUX's autoencoder file
    assert cfg.model.base == "flux1-dev.safetensors" and cfg.network.type == "lora"
    assert "kohya's default" not in err  # every flow option was given
    if not has_key("train.blocks_to_swap"):
        assert "not mapped: --blocks_to_swap = 18: needs sdlora's train.blocks_to_swap" in err
    if not has_key("model.text_encoders"):
        assert "not mapped: --clip_l/t5xxl = ['clip_l.safetensors', 't5xxl_fp16.safetensors']: needs" in err


def test_flux_options_left_unset_take_kohyas_defaults_not_sdloras(tmp_path, capsys):
    """flux_train_network.py trains with model_prediction_type sigma_scaled and guidance 3.5 when they are not
    given; sdlora's defaults differ (raw), so the config says kohya's."""
    code, cfg, err = convert(tmp_path, capsys, "flux_train_network.py --network_module networks.lora_flux "
                                               "--timestep_sampling shift --discrete_flow_shift 3.1582")
    assert code == 0, err
    assert (cfg.train.model_prediction_type, cfg.train.guidance_scale) == ("sigma_scaled", 3.5)
    assert (cfg.train.timestep_sampling, cfg.train.discrete_flow_shift) == ("shift", 3.1582)
    assert "--model_prediction_type is not set: kohya's default for this family, sigma_scaled" in err
    # the network module alone says FLUX too; an SDXL command line gets no FLUX defaults
    code, cfg, err = convert(tmp_path, capsys, "train_network.py --network_module networks.lora_flux")
    assert cfg.train.model_prediction_type == "sigma_scaled"
    code, cfg, err = convert(tmp_path, capsys, "sdxl_train_network.py --network_dim 8")
    assert cfg.train.model_prediction_type == "raw" and "kohya's default" not in err


@pytest.mark.parametrize("value, expected", [("uniform", "none"), ("none", "none"), ("logit_normal", "logit_normal"),
                                             ("mode", "mode"), ("cosmap", "cosmap"), ("sigma_sqrt", "sigma_sqrt")])
def test_every_kohya_weighting_scheme_maps(tmp_path, capsys, value, expected):
    code, cfg, err = convert(tmp_path, capsys, f"flux_train_network.py --weighting_scheme {value} "
                                               "--logit_mean -0.5 --logit_std 1.2 --mode_scale 1.1")
    assert code == 0, err
    assert cfg.train.weighting_scheme == expected
    assert (cfg.train.logit_mean, cfg.train.logit_std, cfg.train.mode_scale) == (-0.5, 1.2, 1.1)


def test_flow_choices_sdlora_lacks_are_refused_in_one_line(tmp_path, capsys):
    code, cfg, err = convert(tmp_path, capsys, "flux_train_network.py --timestep_sampling qinglong "
                                               "--model_prediction_type raw")
    assert code == 0, err
    assert cfg.train.timestep_sampling == "sigma"
    assert ("not mapped: --timestep_sampling = 'qinglong': sdlora offers sigma, uniform, sigmoid, shift, flux_shift; "
            "its default applies") in err


def test_sd3_docs_command(tmp_path, capsys):
    code, cfg, err = convert(tmp_path, capsys, SD3_DOCS_COMMAND + " --training_shift 3.0")
    assert code == 0, err
    assert cfg.train.weighting_scheme == "none"  # kohya's "uniform"
    assert cfg.train.model_prediction_type == "raw"  # no FLUX defaults for SD3: its objective is fixed
    if not has_key("train.training_shift"):
        assert "not mapped: --training_shift = 3.0: needs sdlora's train.training_shift" in err
    if not has_key("model.text_encoders"):
        assert "--clip_l/clip_g/t5xxl = ['clip_l.safetensors', 'clip_g.safetensors', 't5xxl_fp16.safetensors']" in err


def test_flux_settings_that_do_not_apply_say_why(tmp_path, capsys):
    code, cfg, err = convert(tmp_path, capsys, "flux_train_network.py --apply_t5_attn_mask --model_type chroma "
                                               "--v_parameterization --fp8_base --network_train_unet_only")
    assert code == 0, err
    assert "--apply_t5_attn_mask = True: sdlora encodes T5 without its attention mask" in err
    assert "--model_type = 'chroma': sdlora trains FLUX.1 dev and schnell" in err
    assert "--v_parameterization = True: FLUX.1 and SD3 predict the flow velocity" in err
    assert cfg.model.v_parameterization == "auto" and cfg.model.quantize == "fp8"
    assert cfg.network.train_text_encoder is False


def test_lycoris_on_flux(tmp_path, capsys):
    code, cfg, err = convert(tmp_path, capsys, 'flux_train_network.py --network_module lycoris.kohya '
                                               '--network_dim 8 --network_args "algo=lokr" "factor=8"')
    assert code == 0, err
    assert cfg.network.type == "lokr" and cfg.train.model_prediction_type == "sigma_scaled"


def test_the_kohya_ss_flux_preset(tmp_path, capsys):
    """bmaltais/kohya_ss presets/lora/flux1D - adamw8bit fp8.json, as shipped."""
    code, cfg, err = convert(tmp_path, capsys, KOHYA_SS_PRESETS / "flux1D - adamw8bit fp8.json")
    assert code == 0, err
    assert main(["config", "check", str(tmp_path / "imported.toml")]) == 0
    train = cfg.train
    assert (train.timestep_sampling, train.model_prediction_type, train.guidance_scale) == ("sigmoid", "raw", 1.0)
    assert (train.discrete_flow_shift, train.unet_lr, train.optimizer) == (3.0, 3e-4, "adamw8bit")
    assert cfg.model.quantize == "fp8" and cfg.model.vae.endswith("put the full path to ae.sft here")
    assert cfg.model.v_parameterization == "auto"  # the GUI's v_parameterization false is no setting for FLUX
    assert "--flux1_checkbox: not needed" in err and "--apply_t5_attn_mask = True: sdlora encodes T5" in err
    if not has_key("network.train_blocks"):
        assert "--network_args train_blocks = all: needs sdlora's network.train_blocks" in err


def test_the_kohya_ss_sd3_preset(tmp_path, capsys):
    """bmaltais/kohya_ss presets/dreambooth/sd3_bdsqlsz_v2.json, as shipped."""
    code, cfg, err = convert(tmp_path, capsys, KOHYA_SS_PRESETS / "sd3_bdsqlsz_v2.json")
    assert code == 0, err
    assert (cfg.train.weighting_scheme, cfg.train.logit_mean, cfg.train.mode_scale) == ("logit_normal", 0.0, 1.29)
    assert cfg.train.text_encoder_lr == 1e-5 and cfg.model.v_parameterization == "auto"
    assert cfg.train.model_prediction_type == "raw"


def test_gui_flux_fields_with_the_checkbox_off_are_not_settings(tmp_path, capsys):
    """The GUI saves its FLUX/SD3 fields in every config, at their defaults, but passes them only with the
    family's checkbox on: an SDXL config keeps sdlora's flow defaults."""
    preset = gui_preset(flux1_checkbox=False, sd3_checkbox=False, guidance_scale=3.5, timestep_sampling="sigmoid",
                        model_prediction_type="sigma_scaled", discrete_flow_shift=3.1582, weighting_scheme="mode",
                        sigmoid_scale=2.0, t5xxl_max_token_length=512, apply_t5_attn_mask=True, ae="ae.sft")
    code, cfg, err = convert(tmp_path, capsys, write(tmp_path / "sdxl.json", preset))
    assert code == 0, err
    defaults = load_config_defaults()
    for name in ("timestep_sampling", "model_prediction_type", "discrete_flow_shift", "weighting_scheme",
                 "sigmoid_scale"):
        assert getattr(cfg.train, name) == getattr(defaults.train, name), name
    assert cfg.model.vae == ""
    assert "the kohya_ss GUI passes these only with its FLUX.1 / SD3 checkbox on" in err
    # with the checkbox on they are (but sigmoid_scale, which the GUI never passes for FLUX)
    code, cfg, err = convert(tmp_path, capsys, write(tmp_path / "flux.json", {**preset, "flux1_checkbox": True,
                                                                              "LoRA_type": "Flux1"}))
    assert (cfg.train.timestep_sampling, cfg.train.discrete_flow_shift, cfg.train.sigmoid_scale) == \
        ("sigmoid", 3.1582, defaults.train.sigmoid_scale)
    assert cfg.train.weighting_scheme == "none"  # an SD3 field


def load_config_defaults():
    from sdlora.config import config_from_dict

    return config_from_dict({})


@needs_key("model.text_encoders", "train.t5_max_length", "train.blocks_to_swap")
def test_flux_text_encoder_files_length_and_block_swap(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, cfg, err = convert(tmp_path, capsys, FLUX_DOCS_COMMAND + " --t5xxl_max_token_length 256")
    assert code == 0, err
    assert cfg.model.text_encoders == [str(tmp_path / "clip_l.safetensors"), str(tmp_path / "t5xxl_fp16.safetensors")]
    assert (cfg.train.t5_max_length, cfg.train.blocks_to_swap) == (256, 18)


@needs_key("model.text_encoders", "train.clip_l_dropout_rate", "train.clip_g_dropout_rate", "train.t5_dropout_rate")
def test_sd3_text_encoder_files_and_dropout(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, cfg, err = convert(tmp_path, capsys, SD3_DOCS_COMMAND + " --clip_l_dropout_rate 0.1 "
                                               "--clip_g_dropout_rate 0.2 --t5_dropout_rate 0.3")
    assert code == 0, err
    assert [p.rpartition("/")[2] for p in cfg.model.text_encoders] == ["clip_l.safetensors", "clip_g.safetensors",
                                                                        "t5xxl_fp16.safetensors"]
    assert (cfg.train.clip_l_dropout_rate, cfg.train.clip_g_dropout_rate, cfg.train.t5_dropout_rate) == \
        (0.1, 0.2, 0.3)


@needs_key("network.train_t5", "network.train_blocks", "network.train_double_block_indices",
           "network.train_single_block_indices", "network.train_modulation")
def test_lora_flux_network_args(tmp_path, capsys):
    code, cfg, err = convert(tmp_path, capsys, 'flux_train_network.py --network_module networks.lora_flux '
                                               '--network_args "train_t5xxl=True" "train_blocks=single" '
                                               '"train_double_block_indices=none" "train_single_block_indices=0,1,8-12" '
                                               '"img_mod_dim=0" "txt_mod_dim=0" "single_mod_dim=0"')
    assert code == 0, err
    net = cfg.network
    assert (net.train_t5, net.train_blocks, net.train_modulation) == (True, "single", False)
    assert (net.train_double_block_indices, net.train_single_block_indices) == ("none", "0,1,8-12")


def test_some_modulation_dims_zero_is_not_mapped(tmp_path, capsys):
    code, cfg, err = convert(tmp_path, capsys, 'flux_train_network.py --network_args "img_mod_dim=0" '
                                               '"img_attn_dim=8"')
    assert code == 0, err
    assert "--network_args img_mod_dim=0: sdlora drops the modulation linears only all together" in err
    assert "--network_args img_attn_dim=8: no sdlora equivalent" in err


def test_gui_t5xxl_rate_is_the_second_text_encoder_rate(tmp_path, capsys):
    """kohya_ss passes --text_encoder_lr TE T5 when its T5-XXL rate is set (and TE > 0)."""
    preset = gui_preset(flux1_checkbox=True, LoRA_type="Flux1", sdxl=False, text_encoder_lr=1e-5, t5xxl_lr=2e-5)
    code, cfg, err = convert(tmp_path, capsys, write(tmp_path / "flux.json", preset))
    assert code == 0, err
    assert cfg.train.text_encoder_lr == [1e-5, 2e-5]
    code, cfg, err = convert(tmp_path, capsys, write(tmp_path / "flux.json", {**preset, "t5xxl_lr": 0}))
    assert cfg.train.text_encoder_lr == 1e-5


FLUX_FUZZED = ["timestep_sampling", "model_prediction_type", "guidance_scale", "discrete_flow_shift", "fp8_base",
               "t5xxl_lr", "text_encoder_lr", "train_blocks", "t5xxl_max_token_length", "clip_l", "ae",
               "flux1_checkbox", "sd3_checkbox", "img_mod_dim", "train_double_block_indices", "weighting_scheme",
               "apply_t5_attn_mask", "blocks_to_swap"]


@pytest.mark.parametrize("key", FLUX_FUZZED)
def test_odd_flux_values_convert_or_are_refused_in_one_line(tmp_path, key):
    for value in ODD_VALUES:
        path = tmp_path / "gui.json"
        preset = gui_preset(**{"flux1_checkbox": True, "LoRA_type": "Flux1", "sdxl": False, "t5xxl_lr": 2e-5,
                               key: value})
        path.write_text(json.dumps(preset))
        try:
            text = import_kohya([str(path)], log=lambda m: None)
        except UserError as e:
            assert "\n" not in str(e) and key in str(e), (value, str(e))
            continue
        out = tmp_path / "out.toml"
        out.write_text(text)
        load_config(out)
