"""The demo LoRA measurably moves samples toward the style (a shortened colorful_scenery run)."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from sdlora.config import load_config
from sdlora.sampling import metrics, sampler
from sdlora.tiny.scenery import STYLE_TAGS
from sdlora.training.loop import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (REPO / "sdlora" / "assets" / "tiny" / "model_index.json").exists(),
                                reason="tiny base not built")


def test_colourfulness_rises_and_palette_moves_toward_the_style_set(tmp_path):
    shutil.copytree(REPO / "datasets_cfg" / "colorful_scenery", tmp_path / "colorful_scenery")
    shutil.copy(REPO / "datasets_cfg" / "colorful_scenery.toml", tmp_path / "style.toml")
    truth = json.loads((REPO / "datasets_cfg" / "colorful_scenery" / ".ground_truth.json").read_text())
    for name, entry in truth.items():  # the builder's job; here: trigger + the true content tags
        content = [t for t in entry["tags"] if t not in STYLE_TAGS]  # folded into the trigger, as the builder does
        (tmp_path / "colorful_scenery" / name).with_suffix(".txt").write_text(", ".join(["clrscn", *content]))
    # The demo config shortened: 600 of 1250 steps, the config's three prompts at the native size.
    cfg = load_config(tmp_path / "style.toml", [
        "output.dir='out'", "train.max_train_steps=600", "train.save_every_n_epochs=0",
        "sample.seeds=[1, 2, 3, 4]", "sample.lora_scales=[0.0, 1.0]", "sample.width=192", "sample.height=128",
        "sample.hires='off'"])
    result = train(cfg, log=lambda m: None)
    rendered = sampler.run_sample(cfg, loras=[(result.adapter, None)], log=lambda m: None).images
    base = [Image.open(r.path) for r in rendered if r.scale == 0.0]
    lora = [Image.open(r.path) for r in rendered if r.scale == 1.0]
    style = [Image.open(p) for p in sorted((tmp_path / "colorful_scenery").glob("*.png"))]
    figures = metrics.style_shift(base, lora, style)
    assert len(base) == len(lora) == 12
    print(figures)
    assert figures["colourfulness_ratio"] >= 1.3, figures
    assert figures["hist_distance_lora"] < figures["hist_distance_base"], figures


def test_colourfulness_metric_orders_palettes():
    from sdlora.tiny.scenery import make_scene_image

    muted = [make_scene_image(s, "muted")[0] for s in range(6)]
    colourful = [make_scene_image(s, "colorful")[0] for s in range(6)]
    assert min(map(metrics.colourfulness, colourful)) > 0
    assert sum(map(metrics.colourfulness, colourful)) > 1.5 * sum(map(metrics.colourfulness, muted))
    grey = Image.new("RGB", (8, 8), (128, 128, 128))
    assert metrics.colourfulness(grey) == 0.0
    hist = metrics.hue_sat_histogram(colourful)
    assert metrics.hellinger(hist, hist) == 0.0
    assert metrics.hellinger(hist, metrics.hue_sat_histogram(muted)) > 0.1
