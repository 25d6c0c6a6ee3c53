"""The hires pass's upscale step with an upscaler model file ([sample] hires_upscaler), read as ComfyUI
and Forge read them (spandrel); the files are tiny ESRGANs the tests write in the released layout."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdlora.config import config_from_dict
from sdlora.errors import UserError
from sdlora.sampling import sampler as sample
from sdlora.sampling import upscale

pytest.importorskip("spandrel")


def esrgan_2x(nf: int = 8, gc: int = 32, out_bias: float | None = None, seed: int = 0) -> dict:
    """A 2x ESRGAN (RRDBNet, one RRDB block) state dict in the layout of ESRGAN's released .pth files:
    model.0 first conv, model.1.sub.0.RDB{1,2,3}.conv{1..5}.0 the dense block, model.1.sub.1 the trunk
    conv, model.3 the conv after the nearest x2, model.5 the HR conv, model.7 the last conv.
    out_bias: every weight of the last conv 0 and its bias this value, so the output is that grey."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, cout, cin):
        sd[f"{name}.weight"] = 0.05 * torch.randn(cout, cin, 3, 3, generator=g)
        sd[f"{name}.bias"] = torch.zeros(cout)

    conv("model.0", nf, 3)
    for r in (1, 2, 3):
        for i in range(1, 6):
            conv(f"model.1.sub.0.RDB{r}.conv{i}.0", nf if i == 5 else gc, nf + (i - 1) * gc)
    conv("model.1.sub.1", nf, nf)
    conv("model.3", nf, nf)
    conv("model.5", nf, nf)
    conv("model.7", 3, nf)
    if out_bias is not None:
        sd["model.7.weight"].zero_()
        sd["model.7.bias"].fill_(out_bias)
    return sd


def test_an_esrgan_file_upscales_until_the_target_then_lanczos_gives_the_exact_size(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    grey = tmp_path / "grey_2x.safetensors"
    save_file(esrgan_2x(out_bias=0.5), grey)
    model = upscale.ModelUpscaler(grey, "cpu")
    assert model.name == "grey_2x"
    assert model.upscale_one(image).size == (80, 48)  # the file's 2x
    # Whatever the input, the file's last conv paints 0.5 grey: its weights are what ran.
    assert np.all(np.asarray(model.upscale_one(image)) == 128)
    random = tmp_path / "random_2x.pth"
    torch.save(esrgan_2x(seed=1), random)
    out = upscale.ModelUpscaler(random, "cpu", allow_pickle=True)([image], 100, 60)[0]  # 40 -> 80 -> 160 px
    assert out.size == (100, 60)
    assert not np.array_equal(np.asarray(out), np.asarray(upscale.lanczos([image], 100, 60)[0]))


def test_upscaler_mistakes_are_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="hires_upscaler.*no such file"):
        upscale.ModelUpscaler(tmp_path / "missing.pth", "cpu")
    pickled = tmp_path / "4x_model.pth"  # a pickle: read only when the user opts in
    torch.save(esrgan_2x(seed=1), pickled)
    with pytest.raises(UserError, match=r"4x_model.pth' is a pickled .pth file.*\[model\] allow_pickle = true"):
        upscale.ModelUpscaler(pickled, "cpu")
    lora = tmp_path / "a_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, lora)
    with pytest.raises(UserError, match="not an upscaler architecture"):
        upscale.ModelUpscaler(lora, "cpu")
    broken = tmp_path / "broken_2x.safetensors"  # ESRGAN's names, a dense block of the wrong widths
    save_file(esrgan_2x(gc=4), broken)
    with pytest.raises(UserError, match="cannot read it as an upscaler model") as error:
        upscale.ModelUpscaler(broken, "cpu")
    assert "\n" not in str(error.value)
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(UserError, match="cannot read it as an upscaler model"):
        upscale.ModelUpscaler(text, "cpu")
    monkeypatch.setitem(sys.modules, "spandrel", None)  # not installed
    with pytest.raises(UserError, match=r"pip install 'sdlora\[upscalers\]'"):
        upscale.ModelUpscaler(lora, "cpu")


def test_the_hires_pass_upscales_with_the_named_model(mini_base_dir, tmp_path):
    path = tmp_path / "tiny_2x.safetensors"
    save_file(esrgan_2x(seed=2), path)
    settings = {"prompts": ["a red house"], "steps": 2, "hires_denoise": 0.0}
    cfg = config_from_dict({"model": {"base": str(mini_base_dir)}, "output": {"dir": str(tmp_path)},
                            "sample": {**settings, "hires_upscaler": str(path)}})
    sampler = sample.Sampler(cfg)
    images, params = sampler.render(["a red house"], [3], 136, 96, 2, hires="on")  # first pass 80x56
    assert images[0].size == (136, 96) and params["Hires upscaler"] == "tiny_2x"
    # hires_denoise 0: the picture is the upscale itself, the model's and not Lanczos'.
    plain = sample.Sampler(config_from_dict({"model": {"base": str(mini_base_dir)}, "output": {"dir": str(tmp_path)},
                                             "sample": settings}))
    lanczos, plain_params = plain.render(["a red house"], [3], 136, 96, 2, hires="on")
    assert plain_params["Hires upscaler"] == "Lanczos"
    assert not np.array_equal(np.asarray(lanczos[0]), np.asarray(images[0]))
