"""The demo LoRA measurably moves samples toward the style (a shortened colorful_scenery run)."""

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
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


def test_lab_matches_the_cie_reference_values():
    white, red = Image.new("RGB", (1, 1), (255, 255, 255)), Image.new("RGB", (1, 1), (255, 0, 0))
    assert metrics.lab(white)[0] == pytest.approx([100.0, 0.0, 0.0], abs=0.05)
    assert metrics.lab(red)[0] == pytest.approx([53.24, 80.09, 67.20], abs=0.1)  # sRGB red in CIELAB (D65)


def test_palette_distance_reads_in_delta_e():
    grey, teal = Image.new("RGB", (16, 16), (120, 120, 120)), Image.new("RGB", (16, 16), (40, 150, 140))
    delta_e = float(np.linalg.norm(metrics.lab(grey)[0] - metrics.lab(teal)[0]))
    assert metrics.palette_distance([grey], [grey]) == 0.0
    # Two flat colours lie their delta-E apart (the sphere's directions sampled: within 2%).
    assert metrics.palette_distance([grey], [teal]) == pytest.approx(delta_e, rel=0.02)


def test_palette_distance_falls_as_a_palette_moves_toward_the_style_set():
    from sdlora.tiny.scenery import make_scene_image

    style = [make_scene_image(s, "colorful")[0] for s in range(10, 14)]  # other scenes than the moved ones
    muted = [make_scene_image(s, "muted")[0] for s in range(4)]
    colourful = [make_scene_image(s, "colorful")[0] for s in range(4)]  # the same scenes in the style's palette
    distances = [metrics.palette_distance([Image.blend(m, c, t) for m, c in zip(muted, colourful)], style)
                 for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    print(distances)
    assert all(a > b for a, b in itertools.pairwise(distances)), distances
    # Lightness counts too: the style set itself darkened is farther than the style set.
    darker = [Image.eval(i.convert("RGB"), lambda v: int(v * 0.6)) for i in style]
    assert metrics.palette_distance(darker, style) > 10
    summary = metrics.lab_summary(darker)
    assert summary["lightness"] < metrics.lab_summary(style)["lightness"] - 10
