"""kohya's training options: pyramid (multires) noise, adaptive noise offset, max-norm regularisation
(scale_weight_norms) and stop_text_encoder_training, each checked against kohya's published formula
(written here from sd-scripts' source) and in a short training on the mini base."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora import lora, train
from sdlora.config import ConfigError, config_from_dict, load_config
from sdlora.tiny.configs import build_pipeline
from test_lora import BASE, STATS, randomise_adapters
from test_train import make_style


# -- noise ----------------------------------------------------------------------------------------


def kohya_pyramid_noise_like(noise, generator, iterations, discount):
    """sd-scripts' library/custom_train_functions.pyramid_noise_like, its random draws taken from
    `generator` in its order (kohya uses Python's random and torch's global generator)."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    noise = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn, generator=generator)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


@pytest.mark.parametrize("iterations, discount, shape", [(6, 0.3, (4, 24, 40)), (10, 0.8, (4, 7, 9)), (1, 0.3, (4, 8, 8))])
def test_pyramid_noise_is_kohyas_formula_with_unit_std(iterations, discount, shape):
    g = torch.Generator().manual_seed(3)
    noise = torch.randn((1, *shape), generator=g)
    expected = kohya_pyramid_noise_like(noise, g, iterations, discount)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn((1, *shape), generator=g)
    got = train.add_pyramid(noise, train.pyramid_noise(shape, iterations, discount, g)[None])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert abs(float(got.std()) - 1) < 1e-5


def test_pyramid_noise_carries_low_frequencies_that_white_noise_lacks():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(16, 4, 64, 64, generator=g)
    pyramid = train.add_pyramid(white, torch.stack([train.pyramid_noise((4, 64, 64), 6, 0.8, g) for _ in range(16)]))

    def neighbour_correlation(x):
        return float((x[..., 1:] * x[..., :-1]).mean() / x.var())

    assert abs(neighbour_correlation(white)) < 0.02
    assert neighbour_correlation(pyramid) > 0.15
    # each example at unit variance (kohya's rescaling)
    torch.testing.assert_close(pyramid.std(dim=(1, 2, 3)), torch.ones(16), rtol=1e-5, atol=1e-5)


def test_adaptive_noise_offset_adds_the_scaled_channel_mean_and_clamps_at_zero():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = latents - latents.mean(dim=(2, 3), keepdim=True)
    means = torch.tensor([[0.5, -1.0, 0.0, 2.0], [-0.25, 0.1, 3.0, -4.0]])
    latents = latents + means[:, :, None, None]
    tc = config_from_dict({"train": {"noise_offset": 0.1, "adaptive_noise_scale": 0.05}}).train
    strength = train.noise_offset_strength(tc, latents)
    torch.testing.assert_close(strength[:, :, 0, 0], 0.1 + 0.05 * means.abs())
    tc.adaptive_noise_scale = -0.1  # kohya allows a negative scale: the offset stops at 0
    strength = train.noise_offset_strength(tc, latents)
    torch.testing.assert_close(strength[:, :, 0, 0], torch.clamp(0.1 - 0.1 * means.abs(), min=0))
    tc.adaptive_noise_scale = 0.0
    assert train.noise_offset_strength(tc, latents) == 0.1


def test_adaptive_noise_scale_needs_noise_offset_as_in_kohya(tmp_path, mini_base_dir):
    path = make_style(tmp_path, mini_base_dir, extra="adaptive_noise_scale = 0.05")
    with pytest.raises(ConfigError, match=r"\[train\] adaptive_noise_scale = 0.05 .*set noise_offset"):
        load_config(path)
    load_config(path, ["train.noise_offset=0.05"])


def test_the_step_uses_each_noise_option_and_nothing_else_changes(tmp_path, mini_base_dir):
    cfg = load_config(make_style(tmp_path, mini_base_dir, n=2), ["train.multires_noise_iterations=6"])
    trainer = train.Trainer(cfg, log=lambda m: None)
    trainer.setup()
    samples = train.TrainingSamples(trainer, trainer.batches)
    with_pyramid = samples[(0, 0)]
    cfg.train.multires_noise_iterations = 0
    without = samples[(0, 0)]
    assert "pyramid" in with_pyramid and "pyramid" not in without
    for key in without:  # the sample's other draws are those of a run without multires noise
        pairs = zip(with_pyramid[key], without[key]) if key == "input_ids" else [(with_pyramid[key], without[key])]
        assert all(torch.equal(a, b) for a, b in pairs), key

    seen = []
    scheduler = trainer.base.noise_scheduler
    add_noise = scheduler.add_noise
    scheduler.add_noise = lambda latents, noise, t: seen.append((latents, noise)) or add_noise(latents, noise, t)
    batch = {k: v[None] if isinstance(v, torch.Tensor) else [x[None] for x in v] for k, v in with_pyramid.items()}
    with torch.no_grad():
        trainer.step(batch)
        cfg.train.noise_offset, cfg.train.adaptive_noise_scale = 0.1, 0.5
        trainer.step({k: v for k, v in batch.items() if k != "pyramid"})
    (_, pyramid_noise), (latents, offset_noise) = seen
    expected = batch["noise"] + batch["pyramid"]
    torch.testing.assert_close(pyramid_noise, expected / expected.std(), rtol=1e-5, atol=1e-6)
    strength = 0.1 + 0.5 * latents.mean(dim=(2, 3), keepdim=True).abs()
    torch.testing.assert_close(offset_noise, batch["noise"] + strength * batch["offset"])


# -- max-norm regularisation ------------------------------------------------------------------------


def peft_deltas(network):
    """{key: dW} from peft's own get_delta_weight: (alpha / r) * update, DoRA's inside its decomposition."""
    return {key: network.layer(key).get_delta_weight(lora.ADAPTER_NAME).detach().float() for key in network.exported_keys()}


@pytest.mark.parametrize("network", [
    {"type": "lora"}, {"type": "locon", "unet_targets": "all", "conv_dim": 2}, {"type": "loha"},
    {"type": "lokr"}, {"type": "lora", "dora": True}], ids=["lora", "locon", "loha", "lokr", "dora"])
def test_max_norm_scales_every_module_above_the_norm_and_reports_kohyas_figures(network):
    pipe = build_pipeline("mini")
    cfg = config_from_dict({"network": {"dim": 4, "alpha": 2, "train_text_encoder": False, **network}})
    net = lora.inject(pipe.unet, None, cfg.network)
    randomise_adapters(net)
    before = {k: float(d.norm()) for k, d in peft_deltas(net).items()}
    max_norm = sorted(before.values())[len(before) // 2]  # about half the modules are above it
    params_before = {k: [p.detach().clone() for p in net._adapter_params(k).values()] for k in before}
    keys_scaled, mean_norm, max_key_norm = net.apply_max_norm(max_norm)

    after = {k: float(d.norm()) for k, d in peft_deltas(net).items()}
    above = [k for k, n in before.items() if n > max_norm]
    assert keys_scaled == len(above) > 0
    for key in before:
        if key in above:
            assert after[key] == pytest.approx(max_norm, rel=1e-5)
        else:  # untouched, bit for bit (DoRA's magnitude included)
            assert all(torch.equal(a, b) for a, b in zip(net._adapter_params(key).values(), params_before[key]))
    expected = [min(n, max_norm) for n in before.values()]
    assert mean_norm == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert max_key_norm == pytest.approx(max(expected), rel=1e-5)
    if network.get("dora"):
        key = above[0]
        assert torch.equal(net._adapter_params(key)["dora_scale"], params_before[key][-1])


# -- metadata, and all of it in one training --------------------------------------------------------


def test_metadata_spells_the_options_as_kohya_writes_them():
    off = lora.adapter_metadata(config_from_dict({}), BASE, STATS)
    assert {k: off[k] for k in ("ss_multires_noise_iterations", "ss_multires_noise_discount",
                                "ss_adaptive_noise_scale", "ss_scale_weight_norms")} == {
        "ss_multires_noise_iterations": "None", "ss_multires_noise_discount": "0.3",
        "ss_adaptive_noise_scale": "None", "ss_scale_weight_norms": "None"}  # kohya's str(None) for "off"
    cfg = config_from_dict({"train": {
        "noise_offset": 0.05, "adaptive_noise_scale": 0.01, "multires_noise_iterations": 8,
        "multires_noise_discount": 0.4, "scale_weight_norms": 1, "stop_text_encoder_training": 100}})
    on = lora.adapter_metadata(cfg, BASE, STATS)
    assert (on["ss_multires_noise_iterations"], on["ss_multires_noise_discount"], on["ss_adaptive_noise_scale"],
            on["ss_scale_weight_norms"], on["ss_stop_text_encoder_training"]) == ("8", "0.4", "0.01", "1.0", "100")


def test_a_training_with_every_option_stops_the_text_encoder_and_bounds_the_norms(tmp_path, mini_base_dir):
    cfg = load_config(make_style(tmp_path, mini_base_dir, n=2, extra="max_train_steps = 3"), [
        "train.save_every_n_steps=1", "train.stop_text_encoder_training=1", "train.scale_weight_norms=0.02",
        "train.noise_offset=0.05", "train.adaptive_noise_scale=0.1", "train.multires_noise_iterations=6",
        "train.unet_lr=1e-2", "train.text_encoder_lr=1e-2"])
    logs = []
    result = train.train(cfg, log=logs.append)
    first, final = load_file(cfg.adapter_path(step=1)), load_file(result.adapter)
    te = [k for k in final if k.startswith("lora_te") and not k.endswith(".alpha")]
    unet = [k for k in final if k.startswith("lora_unet") and not k.endswith(".alpha")]
    assert te and all(torch.equal(first[k], final[k]) for k in te)  # kept from step 1 on, and saved
    assert any(float(first[k].abs().max()) > 0 for k in te if "lora_up" in k)  # it did learn in step 1
    assert any(not torch.equal(first[k], final[k]) for k in unet)  # the U-Net went on
    assert any("text-encoder adapters stop training" in m for m in logs)
    for key in {k.split(".")[0] for k in final}:  # kohya's max norm, recomputed from the file
        down, up = final[f"{key}.lora_down.weight"], final[f"{key}.lora_up.weight"]
        delta = float(final[f"{key}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))
        assert float(delta.norm()) <= 0.02 * (1 + 1e-4), key
    with safe_open(str(result.adapter), "pt") as f:
        metadata = f.metadata()
    assert (metadata["ss_scale_weight_norms"], metadata["ss_multires_noise_iterations"],
            metadata["ss_adaptive_noise_scale"], metadata["ss_stop_text_encoder_training"]) == ("0.02", "6", "0.1", "1")
