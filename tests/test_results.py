"""After training: the best epoch by measurement, and the adapter resized by energy at export."""

import torch
from safetensors.torch import load_file, save_file
from test_sample import write_adapter

from sdlora.adapters import keys
from sdlora.config import config_from_dict
from sdlora.lowrank import svd
from sdlora.sampling import sampler as sample
from sdlora.tiny.scenery import make_scene_image
from sdlora.training import results

PROMPTS = ["clrscn, mountains, lake, sunset", "clrscn, night, moon, stars, sea", "clrscn, day, hills, forest, clouds"]


def demo_cfg(out_dir, **output):
    """The demo's prompts on the embedded base, 192x128 targets scored at its first pass (160x104), few steps."""
    return config_from_dict({
        "name": "style", "trigger": "clrscn", "output": {"dir": str(out_dir), **output},
        "caption": {"model": "tiny", "style_tags": ["pastel colors", "colorful"]},
        "sample": {"prompts": PROMPTS, "width": 192, "height": 128, "steps": 6, "seeds": [1]}})


def rewrite_ups(path, change, alpha=None):
    """Rewrite the adapter at `path` with change(up) for every up matrix (and every alpha set to
    `alpha`, if given), metadata kept."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    new = {k: change(v) if k.endswith("lora_up.weight") else v for k, v in tensors.items()}
    if alpha is not None:
        new.update({k: torch.tensor(float(alpha)) for k in new if k.endswith(".alpha")})
    save_file(new, path, metadata)
    return path


def scaled(path, factor):
    """The adapter at `path` with its update `factor` x larger."""
    return rewrite_ups(path, lambda up: up * factor)


def test_over_fitted_last_epochs_are_not_recommended_and_the_report_says_why(tmp_path):
    """Epochs 1-2 nudge the base; epochs 3-4 stand for a run whose learning rate was far too high at
    the end: their update is 10-30x larger and the pictures stop showing what the prompt asks for."""
    cfg = demo_cfg(tmp_path / "out", keep="best")
    cfg.output_dir.mkdir(parents=True)
    files = []
    for epoch, factor in [(1, 0.02), (2, 0.1), (3, 1.0), (4, 3.0)]:
        path = write_adapter(cfg, cfg.adapter_path(epoch), seed=epoch)
        files.append((f"epoch {epoch}", scaled(path, factor)))
    style = [make_scene_image(i, palette="colourful")[0] for i in range(8)]
    ranking = results.score_epochs(cfg, files, log=lambda m: None, style=style)
    by_label = {e.label: e for e in ranking.scores}
    assert ranking.best.label in ("epoch 1", "epoch 2")
    assert by_label["epoch 4"].adherence < results.adherence_floor(by_label["base"])
    assert "epoch 4" in ranking.reason and "over-fitted" in ranking.reason
    kept = results.keep_best(cfg, ranking)
    assert kept == cfg.adapter_path() and kept.read_bytes() == ranking.best.path.read_bytes()
    results.report_epochs(cfg, ranking, results.epochs_grid(cfg, ranking))
    report = cfg.report_path.read_text()
    assert f"Recommended: **{ranking.best.label}**" in report and "lost the prompt" in report
    w, h = sample.first_pass_size(cfg.sample.width, cfg.sample.height, 128)  # the embedded base's first pass
    assert ranking.size == (w, h) and f"at {w}x{h}, the first pass's size" in report
    # The palette figure is a CIELAB distance with the lightness and chroma it is made of, the training set's beside.
    assert "(delta-E)" in report and "| training set | | 0 |" in report
    assert all(e.palette_distance > 0 and 0 < e.lab["lightness"] < 100 for e in ranking.scores)
    assert (cfg.output_dir / "epochs_scored_grid.png").is_file()
    results.report_epochs(cfg, ranking, None)  # a second run replaces the section
    assert cfg.report_path.read_text().count("## Epochs ranked") == 1


def test_resize_energy_keeps_ninety_percent_of_every_module_and_loads_in_diffusers(tmp_path):
    cfg = demo_cfg(tmp_path / "out", resize_energy=0.9)
    cfg.output_dir.mkdir(parents=True)
    final = write_adapter(cfg, cfg.adapter_path(), seed=3)
    # Energy in a few directions, as trained adapters have it: up's column j scaled by 0.3^j; alpha 1
    # (Kohya's default) so each resized module's alpha differs from its rank and must be read per module.
    rewrite_ups(final, lambda up: 4 * up * 0.3 ** torch.arange(up.shape[1], dtype=up.dtype).reshape(1, -1, *[1] * (up.dim() - 2)),
                alpha=1.0)
    style = [make_scene_image(i, palette="colourful")[0] for i in range(4)]
    out = results.export_resized(cfg, log=lambda m: None, style=style)
    path = out["path"]
    assert path.name == "style-energy90.safetensors" and out["size_after"] < out["size_before"]
    full, small = keys.group_modules(load_file(final)), keys.group_modules(load_file(path))
    assert full.keys() == small.keys()
    for key, parts in full.items():
        # Energy of the resized update relative to the full one, from the SVD of the full update.
        S = torch.linalg.svdvals((parts["lora_up.weight"].flatten(1) @ parts["lora_down.weight"].flatten(1)).double())
        k = small[key]["lora_down.weight"].shape[0]
        assert svd.energy_kept(S, k) >= 0.9 - 1e-6, key
        assert k == 1 or svd.energy_kept(S, k - 1) < 0.9  # the smallest such rank
    from sdlora.models.load import load_base

    load_base(cfg.model).pipeline().load_lora_weights(str(path))  # diffusers reads every key
    # ...but applies per-module ranks and alphas at the wrong scale (diffusers 0.42), so sdlora's
    # sampler patches such a file in: unfused and fused render the same picture.
    import numpy as np

    from sdlora.sampling.sampler import Sampler

    pictures = []
    for fuse in (False, True):
        sampler = Sampler(cfg, fuse=fuse)
        sampler.adapters.add(path, 1.0)
        sampler.adapters.set_weights([1.0])
        pictures.append(np.asarray(sampler.render(["clrscn, hills"], [1], 64, 64, 3)[0][0], dtype=np.int16))
        sampler.adapters.set_weights([0.0])
        base = np.asarray(sampler.render(["clrscn, hills"], [1], 64, 64, 3)[0][0], dtype=np.int16)
        sampler.adapters.close()
    assert np.abs(pictures[0] - base).max() > 20  # the adapter changes the picture...
    assert np.abs(pictures[0] - pictures[1]).max() <= 3  # ...at its Kohya scale, W + (alpha / r) up down
    report = cfg.report_path.read_text()
    assert "## Resized by energy" in report and path.name in report and "colourfulness" in report


def test_scored_epoch_renders_are_reused_by_sample_epochs_dir_native(tmp_path, monkeypatch):
    """The scoring after training renders each epoch on the prompts and seeds; `sdlora sample
    --epochs-dir --native` asks for the same pictures and draws none of them again, until a file changes."""
    import dataclasses

    import numpy as np

    from sdlora.sampling import sampler

    cfg = demo_cfg(tmp_path / "out")
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, prompts=PROMPTS[:2]))
    cfg.output_dir.mkdir(parents=True)
    files = [(f"epoch {e}", write_adapter(cfg, cfg.adapter_path(e), seed=e)) for e in (1, 2)]
    drawn = []
    real = sampler.Sampler.render

    def counting(self, prompts, *args, **kwargs):
        drawn.append(len(prompts))
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(sampler.Sampler, "render", counting)
    style = [make_scene_image(i, palette="colourful")[0] for i in range(4)]
    ranking = results.score_epochs(cfg, files, log=lambda m: None, style=style)
    assert sum(drawn) == 3 * 2  # the base and two epochs, two prompts x one seed
    drawn.clear()
    lines = []
    result = sampler.run_sample(cfg, epochs_dir=cfg.output_dir, native=True, log=lines.append)
    assert drawn == [] and len(result.images) == 4
    assert any("drawn before" in line for line in lines)
    scored = [im for score in ranking.scores[1:] for im in score.images]
    assert all(np.array_equal(np.asarray(r.image), np.asarray(im)) for r, im in zip(result.images, scored))
    scaled(files[1][1], 2.0)  # a changed adapter file is a new picture
    sampler.run_sample(cfg, epochs_dir=cfg.output_dir, native=True, log=lambda m: None)
    assert sum(drawn) == 2


def test_the_report_says_when_no_epoch_is_closer_to_the_training_set_than_the_base():
    lab = {"lightness": 50.0, "lightness_std": 10.0, "chroma": 12.0}
    base = results.EpochScore("base", None, 0.7, 38.0, 1.0, lab)
    farther = [results.EpochScore(f"epoch {i}", None, 0.68, d, 1.1, lab) for i, d in ((2, 38.1), (4, 39.8))]
    best, reason = results.recommend([base, *farther])
    assert best.label == "epoch 2" and "no epoch's palette is closer" in reason
    closer = results.EpochScore("epoch 6", None, 0.68, 30.0, 1.2, lab)
    best, reason = results.recommend([base, *farther, closer])
    assert best.label == "epoch 6" and "no epoch's palette is closer" not in reason
