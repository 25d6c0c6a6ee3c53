"""The embedded base family: shipped, small, and its samples follow the prompt."""

from pathlib import Path

import numpy as np
import pytest
import torch

from sdlora.tiny import build, configs
from sdlora.tiny.scenery import TIMES, make_scene_image, random_scene

ASSETS = Path(build.ASSETS)
pytestmark = pytest.mark.skipif(not (ASSETS / "tiny" / "model_index.json").exists(), reason="tiny base not built")


def test_shipped_assets_fit_in_30_mb_and_load_as_a_diffusers_pipeline():
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    total = sum(f.stat().st_size for d in ("tiny", "open_clip") for f in (ASSETS / d).rglob("*") if f.is_file())
    assert total <= 30e6
    pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "tiny", safety_checker=None)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert pipe.vae.config.latent_channels == 4 and 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    assert pipe.vae.config.scaling_factor != 1.0  # its own, measured on its latents
    assert any("attn2" in name for name, _ in pipe.unet.named_modules())  # cross-attention
    assert pipe.tokenizer("night, moon").input_ids == [49406, 930, 267, 3293, 49407]  # the real CLIP BPE


def test_scenery_is_deterministic_and_tagged():
    a, tags_a = make_scene_image(7, "muted")
    b, tags_b = make_scene_image(7, "muted")
    assert np.array_equal(np.asarray(a), np.asarray(b)) and tags_a == tags_b
    assert tags_a[0] in TIMES
    assert {random_scene(s).aspect for s in range(40)} == {"1:1", "3:2", "2:3"}
    assert "pastel colors" in make_scene_image(7, "colorful")[1]


def test_base_samples_follow_the_prompted_time_of_day():
    from sdlora.data.caption import tiny_tagger

    samples = build.render_base_samples(ASSETS / "tiny", seeds=(0, 1, 2, 3), steps=20)
    figures = build.prompt_following(samples, tiny_tagger())
    assert figures["time_of_day_agreement"] >= 0.8, figures
    assert figures["brightness"]["night"] < figures["brightness"]["day"] - 20, figures
    assert samples["day"][0].size == (configs.NATIVE, configs.NATIVE)


def test_demo_set_is_shipped_without_captions():
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    folder = repo / "datasets_cfg" / "colorful_scenery"
    assert len(list(folder.glob("*.png"))) == 25
    tracked = subprocess.run(["git", "ls-files", str(folder)], cwd=repo, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert not [f for f in tracked.stdout.split() if f.endswith(".txt")]  # captioning is the builder's job


def test_tiny_build_runs_end_to_end_at_a_small_scale(tmp_path):
    """`sdlora tiny build --scale`: every stage, in order, into folders of the test's own (the shipped
    assets, demo set and report are untouched); the exported base loads and renders."""
    from diffusers import StableDiffusionPipeline

    b = build.Build(work=tmp_path / "work", assets=tmp_path / "assets", demo_dir=tmp_path / "demo",
                    report_dir=tmp_path / "report", scale=0.002)
    build.build(build.STAGES, b)
    assert len(list((tmp_path / "demo").glob("*.png"))) == 25
    assert (tmp_path / "report" / "tiny_build_report.md").exists()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "assets" / "tiny", safety_checker=None,
                                                   torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("night, moon", num_inference_steps=2, width=64, height=64).images[0]
    assert image.size == (64, 64)
    with pytest.raises(Exception, match="unknown stage"):
        build.build(["data", "bake"], b)
