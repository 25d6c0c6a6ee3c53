"""Optimizers beyond AdamW, optimizer_args, warm-up steps and constant_with_warmup."""

import sys
from types import SimpleNamespace

import pytest
import torch
from test_train import make_style

from sdlora.config import TrainConfig, load_config
from sdlora.errors import UserError
from sdlora.training.loop import Trainer, train
from sdlora.training.optimizers import make_optimizer


def settings(**kw):
    return SimpleNamespace(**{**{f: getattr(TrainConfig(), f) for f in ("weight_decay", "optimizer_args")}, **kw})


@pytest.mark.parametrize("name, cls, args, check", [
    ("lion", "Lion", {"betas": [0.95, 0.98]}, ("betas", (0.95, 0.98))),
    ("adafactor", "Adafactor", {"clip_threshold": 2.0}, ("clip_threshold", 2.0)),
    ("adamw_schedulefree", "AdamWScheduleFree", {"warmup_steps": 5}, ("warmup_steps", 5)),
    ("adamw", "AdamW", {"betas": [0.8, 0.9]}, ("betas", (0.8, 0.9))),
])
def test_optimizers_take_their_arguments_and_step(name, cls, args, check):
    p = torch.nn.Parameter(torch.ones(4))
    opt = make_optimizer(settings(optimizer=name, optimizer_args=args), [{"params": [p], "lr": 1e-2}], "c.toml")
    assert type(opt).__name__ == cls and opt.param_groups[0][check[0]] == check[1]
    if hasattr(opt, "train"):
        opt.train()
    (p * torch.arange(4.0)).sum().backward()
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(4))


def test_missing_extra_and_wrong_arguments_are_one_line_errors(monkeypatch):
    p = torch.nn.Parameter(torch.ones(2))
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # as if not installed
    with pytest.raises(UserError, match=r"optimizer = 'lion' needs lion_pytorch: pip install 'sdlora\[lion\]'"):
        make_optimizer(settings(optimizer="lion"), [{"params": [p], "lr": 1.0}], "c.toml")
    with pytest.raises(UserError, match="optimizer_args .*do not fit AdamW"):
        make_optimizer(settings(optimizer="adamw", optimizer_args={"d_coef": 2}), [{"params": [p], "lr": 1.0}],
                             "c.toml")


def test_warmup_steps_and_constant_with_warmup(tmp_path, mini_base_dir):
    path = make_style(tmp_path, mini_base_dir, n=2, extra="lr_warmup_steps = 3")
    cfg = load_config(path, ["train.lr_scheduler='constant_with_warmup'", "train.unet_lr=0.3"])
    trainer = Trainer(cfg, log=lambda m: None)
    lrs = []
    for _ in range(5):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.3])


def test_schedule_free_trains_and_saves_its_averaged_weights(tmp_path, mini_base_dir):
    pytest.importorskip("schedulefree")
    from safetensors.torch import load_file

    cfg = load_config(make_style(tmp_path, mini_base_dir, n=2, extra='optimizer = "adamw_schedulefree"'),
                      ["train.epochs=1", "train.lr_scheduler='constant'"])
    trainer = Trainer(cfg, log=lambda m: None)
    result = trainer.run()
    group = trainer.optimizer.param_groups[0]
    assert group["train_mode"] is False  # switched to the averaged weights before saving
    saved = load_file(result.adapter)
    exported = trainer.network.kohya_state_dict(torch.float32)
    assert all(torch.allclose(saved[k].float(), v) for k, v in exported.items())
    assert result.steps == 2


def test_training_continues_from_an_adapter_with_matching_modules_and_ranks(tmp_path, mini_base_dir, capsys):
    from sdlora.adapters.file import read_adapter
    from sdlora.cli import main

    path = make_style(tmp_path, mini_base_dir, n=2)
    first = train(load_config(path, ["train.epochs=1"]), log=lambda m: None)
    start = read_adapter(first.adapter)[0]
    cfg = load_config(path, [f"network.init_weights='{first.adapter}'", "output.output_name='second'"])
    trainer = Trainer(cfg, log=lambda m: None)
    now = trainer.network.kohya_state_dict(torch.float32)
    assert set(now) == set(start) and all(torch.equal(now[k], start[k].float()) for k in start)
    assert any(float(v.abs().max()) > 0 for k, v in now.items() if "lora_up" in k)  # not a fresh (zero) init

    wrong = make_style(tmp_path, mini_base_dir, n=2, extra=f"[network]\ndim = 8\nalpha = 2\ninit_weights = '{first.adapter}'")
    wrong.write_text(wrong.read_text().replace("[network]\ndim = 4\nalpha = 2\n", ""))
    assert main(["train", str(wrong), "--set", "output.output_name='third'"]) == 2
    err = capsys.readouterr().err
    assert "[network] init_weights" in err and "network.dim" in err and "Traceback" not in err
