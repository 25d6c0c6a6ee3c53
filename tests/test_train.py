"""The trainer end to end on the mini base: export loads in diffusers, resume, cache, multi-process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlora import digest
from sdlora.cli import main
from sdlora.config import load_config
from sdlora.tiny.scenery import make_scene_image
from sdlora.training.examples import collect_examples, make_caption, steps_per_epoch
from sdlora.training.guards import TrainingDiverged, TrainingStopped, check_finite
from sdlora.training.loop import Trainer, train
from sdlora.training.state import STATE_FILE
from sdlora.training.stats import TrainResult, write_report

REPO = Path(__file__).resolve().parents[1]


def repeat_batch(trainer: Trainer, batch: dict, steps: int) -> list[float]:
    """`steps` optimizer steps of `trainer` on the same batch (no clipping, no schedule): the losses."""
    losses = []
    for _ in range(steps):
        loss = trainer.step(batch)
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def make_style(tmp_path: Path, base_dir: Path, n: int = 4, extra: str = "", captions: bool = True) -> Path:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for i in range(n):
        img, tags = make_scene_image(i, "colorful", 64, aspect=("1:1", "3:2")[i % 2])
        img.save(images / f"img{i}.png")
        if captions:
            (images / f"img{i}.txt").write_text(", ".join(["clrscn", *tags[:5]]))
    path = tmp_path / "style.toml"
    path.write_text(f"""
name = "style"
trigger = "clrscn"
[model]
base = "{base_dir}"
[dataset]
image_dir = "images"
num_repeats = 2
resolution = 64
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
[network]
dim = 4
alpha = 2
[train]
epochs = 2
batch_size = 2
save_every_n_epochs = 1
save_precision = "fp32"
lr_scheduler = "constant"
seed = 1
{extra}
[output]
dir = "out"
""")
    return path


def test_export_loads_in_diffusers_and_matches_the_training_model(tmp_path, mini_base_dir):
    from diffusers import StableDiffusionPipeline

    cfg = load_config(make_style(tmp_path, mini_base_dir))
    trainer = Trainer(cfg, log=lambda m: None)
    result = trainer.run()
    out = cfg.output_dir
    assert result.adapter == out / "style.safetensors" and result.adapter.exists()
    assert (out / "style-000001.safetensors").exists()  # every save_every_n_epochs
    assert (out / "report.md").exists() and (out / "loss_curve.png").exists()
    assert result.steps == 2 * 4  # 2 epochs x (2 buckets x ceil(2 images x 2 repeats / 2))

    tensors = load_file(result.adapter)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)
    assert any(k.startswith("lora_unet_") and "attn2_to_k" in k for k in tensors)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_up" in k)  # it trained

    def render(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("clrscn, day, mountains", num_inference_steps=3, width=64, height=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = trainer.base
    pipe = StableDiffusionPipeline.from_pretrained(mini_base_dir, safety_checker=None)
    assert base.vae.device.type == "meta"  # released once the latents were cached: the base's own VAE
    in_training = StableDiffusionPipeline(vae=pipe.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=base.unet, scheduler=base.noise_scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    expected = render(in_training.to(torch.float32))
    before = render(pipe)
    pipe.load_lora_weights(str(result.adapter))
    loaded = render(pipe)
    assert abs(loaded - expected).max() < 1e-4
    assert abs(before - expected).max() > 1e-3  # the adapter changes the picture


def assert_resume_ends_where_an_uninterrupted_run_ends(a, b, interrupt_at_step, between=lambda stopped: None):
    """a and b: one config in two folders. a trains through; b is stopped by Ctrl-C during step 3 (the state
    is saved after it), `between(stopped)` checks the stop, then b resumes: the adapters are equal bitwise."""
    full = train(a, log=lambda m: None)
    interrupt_at_step(3)  # through the signal Ctrl-C sends
    with pytest.raises(TrainingStopped) as stopped:
        train(b, log=lambda m: None)
    between(stopped.value)
    resumed = train(b, resume=True, log=lambda m: None)
    ta, tb = load_file(full.adapter), load_file(resumed.adapter)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, mini_base_dir, interrupt_at_step):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = (load_config(make_style(tmp_path / x, mini_base_dir)) for x in "ab")

    def stopped_mid_epoch_1(stopped):
        assert stopped.exit_code == 130 and "after step 3" in str(stopped)
        assert not (b.output_dir / "style.safetensors").exists()
        state = b.output_dir / "state" / STATE_FILE
        assert state.read_bytes()[8:].lstrip().startswith(b"{")  # safetensors, not a pickle

    assert_resume_ends_where_an_uninterrupted_run_ends(a, b, interrupt_at_step, stopped_mid_epoch_1)


def test_latents_are_cached_and_changed_images_re_encoded(tmp_path, mini_base_dir, monkeypatch):
    cfg = load_config(make_style(tmp_path, mini_base_dir), ["train.epochs=1", "train.overwrite=true"])
    hashed, sha256 = [], digest._sha256
    monkeypatch.setattr(digest, "_sha256", lambda path: hashed.append(path) or sha256(path))
    digest._DIGESTS.clear()
    vae_encodes = train(cfg, log=lambda m: None).vae_encodes
    assert vae_encodes == 4
    assert len(hashed) == 5  # 4 images + the base's UNet weights (its model hash)
    vae_encodes += train(cfg, log=lambda m: None).vae_encodes
    assert vae_encodes == 4  # second run: zero encodes
    assert len(hashed) == 5  # and in one process, no file is hashed twice
    img, _ = make_scene_image(99, "colorful", 64)
    img.save(tmp_path / "images" / "img0.png")
    vae_encodes += train(cfg, log=lambda m: None).vae_encodes
    assert vae_encodes == 5  # only the changed image
    assert len(hashed) == 6


def test_flip_aug_caches_both_orientations(tmp_path, mini_base_dir):
    cfg = load_config(make_style(tmp_path, mini_base_dir, n=2), ["dataset.flip_aug=true", "train.epochs=1"])
    assert train(cfg, log=lambda m: None).vae_encodes == 4  # each image and its mirror, encoded once
    entries = list((cfg.output_dir / "cache" / "latents").rglob("*.safetensors"))
    entry = load_file(entries[0])
    assert {"mean", "std", "flip_mean", "flip_std"} <= entry.keys()
    assert not torch.allclose(entry["mean"], entry["flip_mean"], atol=1e-3)  # a real mirror image, not a copy


def test_frozen_text_encoder_is_not_exported_and_its_outputs_are_cached(tmp_path, mini_base_dir):
    cfg = load_config(make_style(tmp_path, mini_base_dir),
                      ["train.text_encoder_lr=0", "dataset.shuffle_caption=false", "train.epochs=1"])
    trainer = Trainer(cfg, log=lambda m: None)
    assert trainer.data.te_cache.encodes == 4  # one per distinct caption, all before the first step
    assert trainer.base.text_encoder.device.type == "meta"  # then released
    assert trainer.base.vae.device.type != "meta"  # the latents are encoded as training first reaches them
    result = Trainer(cfg, log=lambda m: None).run()
    again = Trainer(cfg, log=lambda m: None)
    assert again.base.vae.device.type == "meta"  # all cached now: the VAE leaves before the first step
    assert not any(k.startswith("lora_te") for k in load_file(result.adapter))
    assert trainer.data.te_cache.encodes + result.te_encodes + again.data.te_cache.encodes == 4  # later runs read the cache


def test_noise_offset_trains_and_changes_the_adapter(tmp_path, mini_base_dir):
    results = {}
    for offset in (0.0, 0.1):
        folder = tmp_path / str(offset)
        folder.mkdir()
        cfg = load_config(make_style(folder, mini_base_dir, n=2), ["train.epochs=1", f"train.noise_offset={offset}"])
        results[offset] = load_file(train(cfg, log=lambda m: None).adapter)
    assert any(not torch.equal(results[0.0][k], results[0.1][k]) for k in results[0.0] if "lora_up" in k)


@pytest.mark.parametrize("optimizer, package", [("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")])
def test_optional_optimizers_say_what_to_install(tmp_path, mini_base_dir, capsys, optimizer, package):
    try:
        __import__(package)
        pytest.skip(f"{package} is installed")
    except ImportError:
        pass
    path = make_style(tmp_path, mini_base_dir, n=1, extra=f'optimizer = "{optimizer}"')
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"optimizer = '{optimizer}'" in err and package in err and "Traceback" not in err


def test_caption_shuffle_keeps_the_first_keep_tokens():
    import random

    tags = ["clrscn", "a", "b", "c", "d", "e"]
    seen = set()
    for seed in range(20):
        caption = make_caption(tags, 1, True, 0.0, 0.0, random.Random(seed)).split(", ")
        assert caption[0] == "clrscn" and sorted(caption) == sorted(tags)
        seen.add(tuple(caption))
    assert len(seen) > 5
    assert make_caption(tags, 1, True, 0.0, 1.0, random.Random(0)) == ""  # caption dropout


def test_steps_per_epoch_is_kohyas_count(tmp_path, mini_base_dir):
    cfg = load_config(make_style(tmp_path, mini_base_dir, n=3), ["dataset.resolution=96", "dataset.num_repeats=5"])
    examples = collect_examples(cfg, log=lambda m: None)
    assert [str(ex.bucket) for ex in examples] == ["96x96", "128x64", "96x96"]
    # img0, img2 square (one bucket), img1 3:2 (another): ceil(2*5/3) + ceil(1*5/3)
    assert steps_per_epoch(examples, 3) == 4 + 2


@pytest.mark.parametrize("problem, expected", [
    ("missing", "does not exist"),
    ("empty", "no usable image"),
])
def test_bad_datasets_give_one_clear_message(tmp_path, mini_base_dir, capsys, problem, expected):
    path = make_style(tmp_path, mini_base_dir, n=1)
    images = tmp_path / "images"
    for f in images.iterdir():
        f.unlink()
    if problem == "missing":
        images.rmdir()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_uncaptioned_images_train_with_the_trigger_and_say_so(tmp_path, mini_base_dir):
    cfg = load_config(make_style(tmp_path, mini_base_dir, n=2, captions=False))
    messages = []
    examples = collect_examples(cfg, log=messages.append)
    assert all(ex.tags == ["clrscn"] for ex in examples)
    assert any("no caption" in m and "clrscn" in m for m in messages)


def test_refuses_to_overwrite_a_final_adapter(tmp_path, mini_base_dir, capsys):
    path = make_style(tmp_path, mini_base_dir, n=1)
    final = tmp_path / "out" / "style.safetensors"
    final.parent.mkdir()
    final.write_bytes(b"precious")
    assert main(["train", str(path)]) == 2
    assert "overwrite" in capsys.readouterr().err and final.read_bytes() == b"precious"


# kohya's options that touch every step: per-example pyramid noise, max-norm, the encoders leaving autograd
KOHYA_OPTIONS = ("stop_text_encoder_training = 2\nscale_weight_norms = 0.05\nmultires_noise_iterations = 6\n"
                 "noise_offset = 0.05\nadaptive_noise_scale = 0.1")


def free_port() -> int:
    """A TCP port nobody listens on now: parallel test workers each launch their own two processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The flow families: FLUX.1 with its CLIP-L adapters (T5 cached), SD3 with both CLIPs'; T5 at 16 tokens keeps it quick.
@pytest.mark.parametrize("base, extra", [("mini_base_dir", ""), ("mini_sdxl_dir", ""), ("mini_base_dir", KOHYA_OPTIONS),
                                         ("mini_flux_dir", "t5_max_length = 16"),
                                         ("mini_sd3_dir", "t5_max_length = 16")],
                         ids=["sd1", "sdxl", "sd1-kohya-options", "flux", "sd3"])
def test_two_processes_match_one(tmp_path, request, base, extra):
    """accelerate launch --multi_gpu --num_processes 2 (gloo on CPU) == one process, same global batch."""
    base_dir = request.getfixturevalue(base)
    runs = {}
    for procs in (1, 2):
        folder = tmp_path / f"p{procs}"
        folder.mkdir()
        cfg_path = make_style(folder, base_dir, extra=f"max_train_steps = 4\n{extra}")
        launch = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port())] if procs == 2 else [sys.executable])
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        proc = subprocess.run([*launch, "-m", "sdlora.cli", "train", str(cfg_path)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[procs] = load_file(folder / "out" / "style.safetensors")
    # Gradients are all-reduced in another summation order; Adam's first steps (~lr * sign(g))
    # amplify that float noise to ~lr on near-zero gradients, so compare relative norms.
    assert runs[1].keys() == runs[2].keys()
    for k in runs[1]:
        if k.endswith(".alpha"):
            assert torch.equal(runs[1][k], runs[2][k])
            continue
        rel = (runs[1][k] - runs[2][k]).norm() / runs[1][k].norm().clamp_min(1e-12)
        assert rel < 1e-2, (k, float(rel))


def test_train_then_merge_then_sample_agrees_with_the_loaded_adapter(tmp_path, mini_base_dir):
    """The trained file, baked into the base (`sdlora merge`), renders what load_lora_weights renders."""
    from diffusers import StableDiffusionPipeline

    from sdlora.lowrank import tools

    cfg = load_config(make_style(tmp_path, mini_base_dir), ["train.epochs=1"])
    adapter = train(cfg, log=lambda m: None).adapter

    def render(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("clrscn, night, lake", num_inference_steps=3, width=64, height=64, output_type="np",
                    generator=torch.Generator().manual_seed(3)).images

    pipe = StableDiffusionPipeline.from_pretrained(mini_base_dir, safety_checker=None)
    base_image = render(pipe)
    pipe.load_lora_weights(str(adapter))
    loaded = render(pipe)
    merged_base, merged = tools.load_merged(str(mini_base_dir), [(adapter, 1.0)])
    assert sum(merged.values()) > 0  # modules merged per adapter file
    merged_image = render(merged_base.pipeline())
    assert abs(merged_image - loaded).max() < 1e-3
    assert abs(base_image - loaded).max() > 1e-3


def test_the_first_step_waits_for_one_batch_of_latents_not_the_whole_dataset(tmp_path, mini_base_dir):
    """Time to first step: setup encodes nothing; each image is encoded when training first reaches it, once."""
    cfg = load_config(make_style(tmp_path, mini_base_dir, n=8), ["train.max_train_steps=1"])
    trainer = Trainer(cfg, log=lambda m: None)
    assert trainer.data.latents.cache.encodes == 0 and trainer.data.latents.missing == 8
    loader = iter(trainer.loader)
    next(loader)
    # this batch's images and, at most, the next batch's (accelerate's loader reads one batch ahead)
    assert 2 <= trainer.data.latents.cache.encodes <= 4 and trainer.data.latents.missing >= 4
    assert trainer.base.vae.device.type != "meta"
    for _ in loader:  # the rest of the epoch: the other images, each once, then the VAE goes
        pass
    assert trainer.data.latents.cache.encodes == 8 and trainer.base.vae.device.type == "meta"


def test_divergence_message_and_report_state_the_effective_alpha(tmp_path):
    """network.alpha = 0 means alpha = dim (Kohya's default): the user reads 8, not 0."""
    from types import SimpleNamespace

    from sdlora.adapters.network import resolve_settings
    from sdlora.config import config_from_dict

    cfg = config_from_dict({"name": "style", "network": {"dim": 8, "alpha": 0}, "output": {"dir": str(tmp_path)}})
    with pytest.raises(TrainingDiverged) as e:
        check_finite(cfg, step=3, epoch=1, loss=float("nan"), grad_norm=1.0, losses=[0.1], overflow_skips=False)
    assert "network.alpha / network.dim (8 / 8)" in str(e.value)

    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    base = SimpleNamespace(name="tiny", family="sd_v1", prediction_type="epsilon")
    trainer = SimpleNamespace(cfg=cfg, base=base, settings=resolve_settings(cfg, base),
                              data=SimpleNamespace(examples=[], validation=[]), epochs=1, train_te=False,
                              validation_losses=[])
    report = write_report(trainer, TrainResult(adapter=tmp_path / "style.safetensors", steps=2,
                                               losses=[0.2, 0.1], seconds=1.0)).read_text()
    assert "- network: lora, dim 8, alpha 8, " in report
