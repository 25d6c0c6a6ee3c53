"""Shared test set-up: one torch thread (on 2 shared cores, the default thread pool makes small
models ~100x slower), and the fixtures every stage's tests build on."""

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def _one_thread():
    torch.set_num_threads(1)


def in_fresh_process(fn, *args):
    """fn(*args) in a new Python process (spawned: nothing of this one's state comes along), its
    result returned here, its exception raised here.

    For trainings in another mixed precision than the suite's: accelerate fixes a process's mixed
    precision with its first Accelerator (sdlora says so, tests/test_run.py), as a user meets it.
    fn: a module-level function of a test module, which the new process imports by name."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
        return pool.submit(fn, *args).result()


@pytest.fixture
def fresh_process():
    """in_fresh_process, for a test to call."""
    return in_fresh_process


@pytest.fixture
def mini_base_dir(tmp_path_factory):
    """A random-weight SD1.x-architecture diffusers folder (the 'mini' size), built in ~1 s."""
    from sdlora.tiny.configs import build_pipeline

    folder = tmp_path_factory.mktemp("mini_base")
    build_pipeline("mini", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def mini_sdxl_dir(tmp_path_factory):
    """A random-weight SDXL-architecture diffusers folder at test size (two text encoders, text_time U-Net)."""
    from sdlora.tiny.configs import build_sdxl_pipeline

    folder = tmp_path_factory.mktemp("mini_sdxl")
    build_sdxl_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def mini_flux_dir(tmp_path_factory):
    """A random-weight FLUX.1-dev-architecture diffusers folder at test size (CLIP-L, T5, packed latents)."""
    from sdlora.tiny.configs import build_flux_pipeline

    folder = tmp_path_factory.mktemp("mini_flux")
    build_flux_pipeline(guidance=True).save_pretrained(folder)
    return folder


@pytest.fixture
def mini_sd3_dir(tmp_path_factory):
    """A random-weight SD3.5-Large-architecture diffusers folder at test size (CLIP-L, CLIP-G, T5, MMDiT)."""
    from sdlora.tiny.configs import build_sd3_pipeline

    folder = tmp_path_factory.mktemp("mini_sd3")
    build_sd3_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def interrupt_at_step(monkeypatch):
    """arm(n, signum): this process gets `signum` (default SIGINT, what Ctrl-C sends) during the
    n-th training step, through the same handler a user's Ctrl-C or `kill` reaches."""
    import signal

    from sdlora.training.loop import Trainer

    def arm(n: int, signum=signal.SIGINT):
        original, calls = Trainer.step, []

        def step(self, batch):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signum)
            return original(self, batch)

        monkeypatch.setattr(Trainer, "step", step)
    return arm
