"""`sdlora run` as a whole, and the loss the trainer computes, against references written from the papers."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_train import make_style

from sdlora import run
from sdlora.config import load_config
from sdlora.errors import UserError
from sdlora.training.examples import TrainingSamples, steps_per_epoch
from sdlora.training.loop import Trainer, train

RUN_EXTRA = ("max_train_steps = 4\n[caption]\ntagger = \"none\"\n[sample]\nprompts = [\"clrscn, lake\"]\n"
             "width = 64\nheight = 64\nsteps = 2\nseeds = [1]\nlora_scales = [0.0, 1.0]")


def test_run_trains_once_then_a_second_run_does_nothing_and_a_changed_config_is_not_overwritten(tmp_path,
                                                                                               mini_base_dir):
    path = make_style(tmp_path, mini_base_dir, extra=RUN_EXTRA)
    first = run.run(load_config(path), log=lambda m: None)
    adapter = first["paths"]["adapter"]
    assert adapter.is_file() and first["sample"].grids and (tmp_path / "out" / "report.md").exists()
    mtime = adapter.stat().st_mtime_ns
    logs = []
    again = run.run(load_config(path), log=logs.append)
    assert any("up to date" in line for line in logs)
    assert adapter.stat().st_mtime_ns == mtime  # not retrained
    assert again["train"] is None  # not retrained: nothing re-encoded
    assert again["figures"] is not None  # samples at scale 0 and 1: style figures in the report
    changed = load_config(path, ["train.unet_lr=1e-3"])
    with pytest.raises(UserError, match=r"already exists but was trained with other settings or images; set "
                                         r"output\.output_name to another name, or rerun with --set "
                                         r"train\.overwrite=true"):
        run.run(changed, log=lambda m: None)
    assert adapter.stat().st_mtime_ns == mtime
    run.run(load_config(path, ["train.unet_lr=1e-3", "train.overwrite=true"]), log=lambda m: None)
    assert adapter.stat().st_mtime_ns != mtime


def test_one_run_walks_the_dataset_folders_once(tmp_path, mini_base_dir, monkeypatch):
    """The manifest is resolved once per `sdlora run` and handed down: the trainer, the up-to-date
    check, the results and the style figures do not walk the image folders again."""
    from types import SimpleNamespace

    from sdlora.data import dataset
    from sdlora.sampling import sampler

    monkeypatch.setattr(sampler, "run_sample", lambda *a, **k: SimpleNamespace(images=[], folder=tmp_path))
    walks = []
    real = dataset._scan_subsets
    monkeypatch.setattr(dataset, "_scan_subsets", lambda *a, **k: walks.append(1) or real(*a, **k))
    path = make_style(tmp_path, mini_base_dir, extra=RUN_EXTRA)
    run.run(load_config(path), log=lambda m: None)  # trains
    assert len(walks) == 1
    run.run(load_config(path), log=lambda m: None)  # up to date
    assert len(walks) == 2


def test_trainer_renders_previews_every_n_epochs(tmp_path, mini_base_dir):
    extra = "[sample]\nprompts = [\"clrscn, lake\"]\nevery_n_epochs = 1\npreview_steps = 2"
    cfg = load_config(make_style(tmp_path, mini_base_dir, extra=extra), ["train.epochs=3"])
    train(cfg, log=lambda m: None)
    grids = sorted(p.parent.name for p in (cfg.output_dir / "previews").rglob("preview_grid_seed*.png"))
    assert grids == ["epoch000001", "epoch000002"]  # every epoch but the last, which sample renders


def _first_batch(trainer):
    samples = TrainingSamples(trainer.data, trainer.data.batches)
    return torch.utils.data.default_collate([samples[key] for key in next(iter(trainer.data.batches))])


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_is_min_snr_weighted_mse_to_the_papers_target(tmp_path, mini_base_dir, prediction):
    """epsilon: target = noise; v (Salimans & Ho 2022): v = sqrt(a) * noise - sqrt(1 - a) * x0;
    min-SNR-gamma (Hang et al. 2023): w = min(SNR, gamma) / SNR, or / (SNR + 1) for v; SNR = a / (1 - a)."""
    cfg = load_config(make_style(tmp_path, mini_base_dir), [f"model.v_parameterization='{prediction}'",
                                                             "train.min_snr_gamma=2.0"])
    trainer = Trainer(cfg, log=lambda m: None)
    batch = _first_batch(trainer)
    with torch.no_grad():
        loss = trainer.step(batch)
        x0 = batch["latents"] * trainer.base.vae.config.scaling_factor
        a = trainer.base.noise_scheduler.alphas_cumprod[batch["timesteps"]].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * batch["noise"]
        text = trainer.encode_text(batch["input_ids"])
        pred = trainer.unet(noisy, batch["timesteps"], text.hidden).sample
        target = batch["noise"] if prediction == "epsilon" else a.sqrt() * batch["noise"] - (1 - a).sqrt() * x0
        snr = (a / (1 - a)).flatten()
        weight = snr.clamp(max=2.0) / (snr if prediction == "epsilon" else snr + 1)
        expected = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert trainer.objective.v_prediction == (prediction == "v_prediction")


def _train_in_bf16(config_path):
    """In its own process: train under bf16 mixed precision; what the U-Net's first layer saw
    (autocast on, its dtype; the frozen weight's dtype), the adapters' dtypes, the exported tensors."""
    cfg = load_config(config_path, ["train.epochs=1", "train.mixed_precision='bf16'"])
    trainer = Trainer(cfg, log=lambda m: None)
    seen = []
    trainer.base.unet.conv_in.register_forward_hook(
        lambda module, args, out: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                                               module.weight.dtype)))
    result = trainer.run()
    return seen, {p.dtype for p in trainer.network.trainable_parameters()}, load_file(result.adapter)


def test_bf16_mixed_precision_trains_under_autocast(tmp_path, mini_base_dir, fresh_process):
    seen, adapter_dtypes, tensors = fresh_process(_train_in_bf16, make_style(tmp_path, mini_base_dir, n=2))
    assert seen and all(s == (True, torch.bfloat16, torch.bfloat16) for s in seen)  # bf16 base, autocast on
    assert adapter_dtypes == {torch.float32}  # adapters train in fp32
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())


def test_a_second_training_in_another_precision_in_one_process_is_refused_in_words(tmp_path, mini_base_dir):
    path = make_style(tmp_path, mini_base_dir, n=2)
    Trainer(load_config(path), log=lambda m: None)  # this process's precision: "no"
    with pytest.raises(UserError, match=r"mixed_precision = 'bf16', but this Python process already trained "
                                        r"with 'no'.*new process"):
        Trainer(load_config(path, ["train.mixed_precision='bf16'"]), log=lambda m: None)
    Trainer(load_config(path), log=lambda m: None)  # the same precision again: fine


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, mini_base_dir):
    results = {}
    for flag in ("false", "true"):
        (tmp_path / flag).mkdir()
        cfg = load_config(make_style(tmp_path / flag, mini_base_dir, n=2), ["train.epochs=1",
                                                                             f"train.gradient_checkpointing={flag}"])
        trainer = Trainer(cfg, log=lambda m: None)
        results[flag] = load_file(trainer.run().adapter)
        assert trainer.base.unet.is_gradient_checkpointing == (flag == "true")
    for k in results["false"]:
        torch.testing.assert_close(results["false"][k], results["true"][k], atol=1e-6, rtol=1e-4)


def test_gradient_accumulation_steps_the_optimizer_once_per_n_micro_batches(tmp_path, mini_base_dir):
    cfg = load_config(make_style(tmp_path, mini_base_dir), ["train.epochs=1", "train.gradient_accumulation_steps=2"])
    trainer = Trainer(cfg, log=lambda m: None)
    result = trainer.run()
    micro = steps_per_epoch(trainer.data.examples, 2)
    assert micro == 4 and result.steps == 2 and len(result.losses) == 2
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {2}  # Adam stepped twice, not four times


@pytest.mark.parametrize("scheduler, extra, curve", [
    # lr(s) / lr after s scheduler steps, 8 steps in all; warmup = round(ratio * 8)
    ("linear", ["train.lr_warmup_ratio=0.25"], lambda s: s / 2 if s < 2 else (8 - s) / 6),
    ("cosine", ["train.lr_warmup_ratio=0.25"],
     lambda s: s / 2 if s < 2 else 0.5 * (1 + torch.cos(torch.tensor(torch.pi * (s - 2) / 6)).item())),
    ("cosine_with_restarts", ["train.lr_warmup_ratio=0", "train.lr_scheduler_num_cycles=2"],
     lambda s: 0.0 if s >= 8 else 0.5 * (1 + torch.cos(torch.tensor(torch.pi * ((2 * s / 8) % 1))).item())),
])
def test_learning_rate_follows_the_schedule_with_warmup(tmp_path, mini_base_dir, scheduler, extra, curve):
    cfg = load_config(make_style(tmp_path, mini_base_dir), [f"train.lr_scheduler='{scheduler}'", *extra])
    trainer = Trainer(cfg, log=lambda m: None)
    logged = []
    log = trainer.accelerator.log
    trainer.accelerator.log = lambda values, step=None, **kw: (logged.append(values), log(values, step=step, **kw))
    trainer.run()
    assert len(logged) == 8
    for s, values in enumerate(logged, start=1):
        assert values["lr/unet"] == pytest.approx(cfg.train.unet_lr * curve(s), abs=1e-9), (s, values)
        assert values["lr/text_encoder"] == pytest.approx(cfg.train.text_encoder_lr * curve(s), abs=1e-9)
