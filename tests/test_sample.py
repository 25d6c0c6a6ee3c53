import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdlora.adapters import network as lora
from sdlora.adapters.file import read_adapter, save_adapter, short_hash
from sdlora.config import config_from_dict
from sdlora.errors import UserError
from sdlora.models.load import TINY_DIR, load_base
from sdlora.sampling import grids, infotext
from sdlora.sampling import sampler as sample

STATS = {"num_train_images": 1, "num_epochs": 1, "epoch": 1, "steps": 1}


def make_cfg(base_dir, out_dir, **sample_cfg):
    return config_from_dict({
        "name": "style", "model": {"base": str(base_dir)}, "output": {"dir": str(out_dir)},
        "sample": {"prompts": ["a red house", "a blue lake"], "width": 64, "height": 64, "steps": 3,
                   "seeds": [5], "lora_scales": [0.0, 1.0], "thumbnail": 32, "hires": "off", **sample_cfg}})


def write_adapter(cfg, path, type="lora", seed=0, name=None):
    """Export a random adapter for the config's base with the real Kohya exporter."""
    base = load_base(cfg.model)
    net_cfg = config_from_dict({"network": {"type": type, "dim": 4, "alpha": 4}}).network
    network = lora.inject(base.unet, base.text_encoder, net_cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if type == "lora" else 0.5))
    meta = lora.adapter_metadata(cfg, base, STATS)
    meta["ss_output_name"] = name or path.stem
    save_adapter(path, network.kohya_state_dict(torch.float32), meta)
    return path


def pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def mini_base_dir(tmp_path_factory):
    # One mini base and one adapter for the whole module: building them is most of a test's set-up.
    from sdlora.tiny.configs import build_pipeline

    folder = tmp_path_factory.mktemp("mini_base")
    build_pipeline("mini", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def cfg(mini_base_dir, tmp_path):
    return make_cfg(mini_base_dir, tmp_path / "out")


@pytest.fixture(scope="module")
def adapter(mini_base_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    return write_adapter(make_cfg(mini_base_dir, folder), folder / "style.safetensors")


def render(cfg, loras, scale, prompt="a red house", seed=5, **kw):
    sampler = sample.Sampler(cfg, **kw)
    for path, weight in loras:
        sampler.adapters.add(path, weight)
    sampler.adapters.set_scale(scale)
    images, _ = sampler.render([prompt], [seed], cfg.sample.width, cfg.sample.height, cfg.sample.steps)
    return pixels(images[0])


def test_png_parameters_parse_back_to_the_settings(cfg, adapter):
    result = sample.run_sample(cfg, [(adapter, 0.8)], log=lambda m: None)
    record = next(r for r in result.images if r.scale == 1.0 and r.prompt == "a blue lake")
    text = Image.open(record.path).info["parameters"]
    info = infotext.parse_infotext(text)
    base = load_base(cfg.model)
    assert info["Prompt"] == "a blue lake <lora:style:0.8>"
    assert info["Steps"] == "3" and info["Sampler"] == "DPM++ 2M" and info["Schedule type"] == "Karras"
    assert info["CFG scale"] == "7.0" and info["Version"] == "sdlora"
    assert info["Seed"] == "5" and info["Size"] == "64x64"
    assert info["Model hash"] == base.model_hash[:10] and info["Model"] == base.name
    assert info["Lora hashes"] == f"style: {short_hash(adapter)}"
    # A1111's exact line layout: prompt, then the parameters line (no negative prompt given).
    assert text.splitlines()[1].startswith("Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, "
                                           "Seed: 5, Size: 64x64, Model hash: ")
    assert text.endswith(f'Lora hashes: "style: {short_hash(adapter)}", Version: sdlora')
    assert record.lora == adapter
    base_record = next(r for r in result.images if r.scale == 0.0)
    base_info = infotext.parse_infotext(Image.open(base_record.path).info["parameters"])
    assert "Lora hashes" not in base_info and "<lora:" not in base_info["Prompt"]


def test_infotext_round_trip_with_negative_prompt_and_hires():
    params = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 5.5, "Seed": 3, "Size": "104x72",
              "Denoising strength": 0.45, "Hires resize": "1080x720", "Hires upscaler": "Lanczos",
              "Lora hashes": "a: 0123456789ab, b: ba9876543210"}
    text = infotext.infotext("mountains, lake\nsecond line", "blurry, low quality", params)
    info = infotext.parse_infotext(text)
    assert info["Prompt"] == "mountains, lake\nsecond line"
    assert info["Negative prompt"] == "blurry, low quality"
    assert info["CFG scale"] == "5.5" and info["Hires resize"] == "1080x720"
    assert info["Lora hashes"] == "a: 0123456789ab, b: ba9876543210"


def test_grid_has_a_row_per_prompt_and_a_column_per_scale(mini_base_dir, tmp_path, adapter):
    cfg = make_cfg(mini_base_dir, tmp_path / "out", lora_scales=[0.0, 0.5, 1.0], seeds=[5, 6])
    result = sample.run_sample(cfg, [(adapter, None)], log=lambda m: None)
    assert len(result.images) == 2 * 2 * 3 and len(result.grids) == 2
    grid = Image.open(result.grids[0])
    # label column 160, header 24, 32 px cells with 4 px padding
    assert grid.size == (160 + 3 * 36 + 4, 24 + 2 * 36 + 4)
    cells = [pixels(grid.crop((160 + c * 36 + 4, 28, 160 + c * 36 + 36, 60))) for c in range(3)]
    assert np.abs(cells[0] - cells[2]).mean() > 1 and np.abs(cells[1] - cells[2]).mean() > 0.5
    for record in result.images:
        assert Image.open(record.path).size == (64, 64)


def test_scale_zero_is_the_base_exactly(cfg, adapter):
    base = render(cfg, [], 0.0)
    assert np.array_equal(render(cfg, [(adapter, None)], 0.0), base)
    assert np.array_equal(render(cfg, [(adapter, None)], 0.0, fuse=True), base)
    assert np.abs(render(cfg, [(adapter, None)], 1.0) - base).mean() > 1


def test_fused_matches_unfused(cfg, adapter):
    unfused = render(cfg, [(adapter, 0.7)], 1.0)
    fused = render(cfg, [(adapter, 0.7)], 1.0, fuse=True)
    assert np.abs(unfused - fused).max() <= 2


def test_two_adapters_with_separate_scales(cfg, tmp_path, adapter):
    other = write_adapter(cfg, tmp_path / "other.safetensors", seed=1)
    both = render(cfg, [(adapter, 1.0), (other, 0.5)], 1.0)
    first = render(cfg, [(adapter, 1.0)], 1.0)
    second = render(cfg, [(other, 0.5)], 1.0)
    second_full = render(cfg, [(other, 1.0)], 1.0)
    assert np.abs(both - first).mean() > 0.5 and np.abs(both - second).mean() > 0.5
    assert np.abs(second - second_full).mean() > 0.5  # the per-file weight is applied
    # A swept file at column scale 0 next to a fixed one: only the fixed one is applied.
    assert np.abs(render(cfg, [(adapter, None), (other, 0.5)], 0.0) - second).max() <= 1


def test_same_seed_same_image_whatever_the_batch(mini_base_dir, tmp_path):
    cfg = make_cfg(mini_base_dir, tmp_path / "out", sampler="euler_a")
    sampler = sample.Sampler(cfg)
    alone, _ = sampler.render(["a red house"], [7], 64, 64, 3)
    batch, _ = sampler.render(["a blue lake", "a red house"], [3, 7], 64, 64, 3)
    assert np.abs(pixels(alone[0]) - pixels(batch[1])).max() <= 1


def test_not_a_lora_file_is_refused(cfg, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    random = tmp_path / "random.safetensors"
    save_file({"weight": torch.zeros(3)}, str(random))
    for path in (text, random, tmp_path / "missing.safetensors"):
        with pytest.raises(UserError, match=path.name):
            sample.run_sample(cfg, [(path, None)], log=lambda m: None)


def test_lora_for_another_architecture_is_refused(cfg, tmp_path):
    path = tmp_path / "sdxl.safetensors"
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 640), f"{key}.lora_up.weight": torch.zeros(640, 4),
               f"{key}.alpha": torch.tensor(4.0)}, str(path))
    with pytest.raises(UserError, match="sdxl.safetensors.*another architecture"):
        sample.run_sample(cfg, [(path, None)], log=lambda m: None)


def test_wrong_shapes_are_refused(cfg, tmp_path, adapter):
    tensors, meta = read_adapter(adapter)
    key = next(k for k in tensors if k.endswith("attn2_to_k.lora_down.weight"))
    tensors[key] = torch.zeros(4, 768)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(UserError, match="bad.safetensors.*different base"):
        sample.Sampler(cfg).adapters.add(bad)


def test_hires_renders_at_the_target_size(mini_base_dir, tmp_path, adapter):
    cfg = make_cfg(mini_base_dir, tmp_path / "out", width=96, height=64, hires="auto", hires_steps=2,
                   lora_scales=[1.0], prompts=["a red house"])
    result = sample.run_sample(cfg, [(adapter, None)], log=lambda m: None)
    image = Image.open(result.images[0].path)
    assert image.size == (96, 64)
    info = infotext.parse_infotext(image.info["parameters"])
    assert info["Size"] == "80x56" and info["Hires resize"] == "96x64" and info["Denoising strength"] == "0.45"
    assert sample.first_pass_size(1080, 720, 512) == (624, 416)
    # [sample] first_pass_resolution: the first pass at an adapter's training size, above the base's native one
    trained = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, first_pass_resolution=72))
    image = Image.open(sample.run_sample(trained, [(adapter, None)], log=lambda m: None).images[0].path)
    info = infotext.parse_infotext(image.info["parameters"])
    assert image.size == (96, 64) and info["Size"] == "88x56" and info["Hires resize"] == "96x64"
    for steps, strength in ((29, 0.29), (20, 0.45), (1, 0.05), (7, 1.0)):  # ceil(29 / 0.29) * 0.29 < 29
        assert int(sample.img2img_steps(steps, strength) * strength) == steps
    assert sample.hires_mode("auto", 64, 64, 64, 4.0) == "off" and sample.hires_mode("auto", 1080, 720, 512, 4.0) != "off"


def test_loha_renders_and_differs_from_base(cfg, tmp_path):
    loha = write_adapter(cfg, tmp_path / "loha.safetensors", type="loha")
    assert any(".hada_w1_a" in k for k in read_adapter(loha)[0])
    assert np.abs(render(cfg, [(loha, 1.0)], 1.0) - render(cfg, [], 0.0)).mean() > 1
    assert np.array_equal(render(cfg, [(loha, None)], 0.0), render(cfg, [], 0.0))


def test_epochs_grid_and_preview(mini_base_dir, tmp_path):
    cfg = make_cfg(mini_base_dir, tmp_path / "out", prompts=["a red house"], steps=2, preview_steps=2)
    folder = tmp_path / "adapters"
    folder.mkdir()
    for epoch, seed in ((2, 1), (4, 2)):
        write_adapter(cfg, folder / f"style-{epoch:06d}.safetensors", seed=seed, name="style")
    write_adapter(cfg, folder / "style.safetensors", seed=3)
    files = grids.epoch_files(folder, "style")
    assert [label for label, _ in files] == ["epoch 2", "epoch 4", "final"]
    result = sample.run_sample(cfg, epochs_dir=folder, log=lambda m: None)
    assert len(result.images) == 3 and Image.open(result.grids[0]).width == 160 + 3 * 36 + 4
    assert [r.path.name.split("_")[1] for r in result.images] == ["epoch-2", "epoch-4", "final"]
    grid = sample.preview(cfg, folder / "style.safetensors", 4, tmp_path / "previews")
    assert grid.is_file() and Image.open(grid).size == (160 + 2 * 36 + 4, 24 + 36 + 4)


def test_cli_sample(cfg, adapter, tmp_path, capsys):
    from sdlora.cli import main

    config = tmp_path / "style.toml"
    config.write_text(f'[model]\nbase = "{cfg.model.base}"\n[output]\ndir = "{tmp_path / "out"}"\n'
                      '[sample]\nprompts = ["a red house"]\nthumbnail = 32\n')
    rc = main(["sample", str(config), "--lora", f"{adapter}:0.5", "--seeds", "3", "--scales", "0,1",
               "--width", "64", "--height", "64", "--steps", "2", "--hires", "off", "--out", str(tmp_path / "s")])
    assert rc == 0
    pngs = sorted((tmp_path / "s").glob("style_LoRA*_p00_seed3.png"))
    assert len(pngs) == 1 and "<lora:style:0.5>" in Image.open(pngs[0]).info["parameters"]
    assert main(["sample", str(config), "--lora", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_default_size_render_with_hires(cfg):
    # 1080x720 (the default) from the 64 px mini base: first pass at 80x56, Lanczos, img2img.
    sampler = sample.Sampler(cfg)
    images, params = sampler.render(["a red house"], [1], 1080, 720, 1, hires="auto")
    assert images[0].size == (1080, 720) and params["Size"] == "80x56" and params["Hires resize"] == "1080x720"


def test_clip_skip_is_kohyas(mini_base_dir, tmp_path):
    """kohya's clip_skip 2 is diffusers' clip_skip 1: hidden_states[-(1 + 1)], then the final layer norm.

    (diffusers 0.42's own encode_prompt(clip_skip=...) reads text_encoder.text_model, which
    transformers 5 no longer has, so the sampler encodes prompts itself.)
    """
    cfg = make_cfg(mini_base_dir, tmp_path / "out")
    cfg.model.clip_skip = 2
    sampler = sample.Sampler(cfg)
    te, tok = sampler.pipe.text_encoder, sampler.pipe.tokenizer
    ids = tok(["a red house"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states
        diffusers_skip1 = te.final_layer_norm(hidden[-(1 + 1)])
    torch.testing.assert_close(sampler.encode(["a red house"]).hidden, diffusers_skip1)
    cfg.model.clip_skip = 1
    assert not torch.allclose(sampler.encode(["a red house"]).hidden, diffusers_skip1)
    images, params = sampler.render(["a red house"], [1], 64, 64, 2)
    assert params["Clip skip"] is None
    cfg.model.clip_skip = 2
    assert sampler.render(["a red house"], [1], 64, 64, 2)[1]["Clip skip"] == 2


def test_preview_leaves_a_shared_base_as_it_was(cfg, adapter, tmp_path):
    base = load_base(cfg.model)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    grid = sample.preview(cfg, adapter, 3, tmp_path / "previews", base=base)
    assert grid.parent.name == "epoch000003" and grid.is_file()
    after = base.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow  # ~30 s on one contended core: most of it is the VAE at 1080x720
@pytest.mark.skipif(not (TINY_DIR / "model_index.json").is_file(), reason="no embedded tiny base")
def test_embedded_tiny_base_renders_1080x720(tmp_path):
    cfg = config_from_dict({"output": {"dir": str(tmp_path)},
                            "sample": {"prompts": ["a red house"], "steps": 2, "seeds": [1], "hires": "auto"}})
    images, params = sample.Sampler(cfg).render(["a red house"], [1], 1080, 720, 2, "auto")
    assert images[0].size == (1080, 720) and params["Size"] == "160x104" and params["Hires resize"] == "1080x720"
    assert pixels(images[0]).std() > 5  # a picture, not a flat field


def test_locon_3x3_conv_adapters_render_through_both_paths(cfg, tmp_path):
    locon = write_adapter(cfg, tmp_path / "locon.safetensors", type="locon")
    assert any(t.dim() == 4 and t.shape[-1] == 3 for t in read_adapter(locon)[0].values())
    base = render(cfg, [], 0.0)
    unfused = render(cfg, [(locon, None)], 1.0)
    assert np.abs(unfused - base).mean() > 1
    assert np.abs(unfused - render(cfg, [(locon, None)], 1.0, fuse=True)).max() <= 2
