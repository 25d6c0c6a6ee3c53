"""kohya's training options: pyramid (multires) noise, adaptive noise offset, max-norm regularisation
(scale_weight_norms), stop_text_encoder_training and block-wise dims / alphas / learning-rate weights,
each checked against kohya's published formula (written here from sd-scripts' source) and in a short
training on the mini base."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora import BASE, STATS, _outputs, leftover_messages, randomise_adapters
from test_train import make_style

from sdlora import kohya_blocks
from sdlora.adapters import network as lora
from sdlora.adapters.file import save_adapter
from sdlora.config import ConfigError, config_from_dict, load_config
from sdlora.errors import UserError
from sdlora.tiny.configs import build_pipeline, build_sdxl_pipeline
from sdlora.training.examples import TrainingSamples
from sdlora.training.loop import Trainer, train
from sdlora.training.loss import add_pyramid, noise_offset_strength, pyramid_noise

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


@pytest.mark.parametrize("iterations, discount, shape",
                         [(6, 0.3, (4, 24, 40)), (10, 0.8, (4, 7, 9)), (1, 0.3, (4, 8, 8))])
def test_pyramid_noise_is_kohyas_formula_with_unit_std(iterations, discount, shape):
    g = torch.Generator().manual_seed(3)
    noise = torch.randn((1, *shape), generator=g)
    expected = kohya_pyramid_noise_like(noise, g, iterations, discount)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn((1, *shape), generator=g)
    got = add_pyramid(noise, pyramid_noise(shape, iterations, discount, g)[None])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert abs(float(got.std()) - 1) < 1e-5


def test_pyramid_noise_carries_low_frequencies_that_white_noise_lacks():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(16, 4, 64, 64, generator=g)
    pyramid = add_pyramid(white, torch.stack([pyramid_noise((4, 64, 64), 6, 0.8, g) for _ in range(16)]))

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
    strength = noise_offset_strength(tc, latents)
    torch.testing.assert_close(strength[:, :, 0, 0], 0.1 + 0.05 * means.abs())
    tc.adaptive_noise_scale = -0.1  # kohya allows a negative scale: the offset stops at 0
    strength = noise_offset_strength(tc, latents)
    torch.testing.assert_close(strength[:, :, 0, 0], torch.clamp(0.1 - 0.1 * means.abs(), min=0))
    tc.adaptive_noise_scale = 0.0
    assert noise_offset_strength(tc, latents) == 0.1


def test_adaptive_noise_scale_needs_noise_offset_as_in_kohya(tmp_path, mini_base_dir):
    path = make_style(tmp_path, mini_base_dir, extra="adaptive_noise_scale = 0.05")
    with pytest.raises(ConfigError, match=r"\[train\] adaptive_noise_scale = 0.05 .*set noise_offset"):
        load_config(path)
    load_config(path, ["train.noise_offset=0.05"])


def test_the_step_uses_each_noise_option_and_nothing_else_changes(tmp_path, mini_base_dir):
    cfg = load_config(make_style(tmp_path, mini_base_dir, n=2), ["train.multires_noise_iterations=6"])
    trainer = Trainer(cfg, log=lambda m: None)
    samples = TrainingSamples(trainer.data, trainer.data.batches)
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
    return {key: network.layer(key).get_delta_weight(lora.ADAPTER_NAME).detach().float()
            for key in network.exported_keys()}


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


# -- block-wise dims, alphas and learning-rate weights -------------------------------------------------


def test_block_numbers_are_kohyas():
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in": 1, "lora_unet_down_blocks_0_resnets_1_conv1": 2,
          "lora_unet_down_blocks_1_downsamplers_0_conv": 6, "lora_unet_down_blocks_3_resnets_1_conv2": 11,
          "lora_unet_mid_block_attentions_0_proj_out": 12, "lora_unet_up_blocks_0_resnets_0_conv1": 13,
          "lora_unet_up_blocks_1_upsamplers_0_conv": 18, "lora_unet_up_blocks_3_attentions_2_proj_out": 24}
    for key, block in sd.items():
        assert kohya_blocks.block_index(key, sgm=False) == block, key
    sdxl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": 5, "lora_unet_input_blocks_0_0": 1,
            "lora_unet_middle_block_1_proj_in": 11, "lora_unet_output_blocks_8_0_in_layers_2": 21}
    for key, block in sdxl.items():
        assert kohya_blocks.block_index(key, sgm=True) == block, key
    assert (kohya_blocks.block_count(False), kohya_blocks.block_count(True)) == (25, 23)


def kohya_preset(name, n, plus=0.0):
    """networks/lora.py get_block_lr_weight's presets."""
    return {"cosine": [math.sin(math.pi * (i / (n - 1)) / 2) + plus for i in reversed(range(n))],
            "sine": [math.sin(math.pi * (i / (n - 1)) / 2) + plus for i in range(n)],
            "linear": [i / (n - 1) + plus for i in range(n)],
            "reverse_linear": [i / (n - 1) + plus for i in reversed(range(n))],
            "zeros": [0.0 + plus] * n}[name]


@pytest.mark.parametrize("preset", ["cosine", "sine", "linear", "reverse_linear", "zeros+0.5"])
def test_lr_weight_presets_are_kohyas(preset):
    name, _, plus = preset.partition("+")
    net = config_from_dict({"network": {"down_lr_weight": preset, "up_lr_weight": "1,0.5,,2",
                                        "block_lr_zero_threshold": 0.1}}).network
    weights = kohya_blocks.block_lr_weights(net, sgm=False, log=lambda m: None)
    down = [w if w > 0.1 else 0 for w in kohya_preset(name, 12, float(plus or 0))]
    assert weights == pytest.approx(down + [1.0] + [1.0, 0.5, 0.0, 2.0] + [1.0] * 8)
    sdxl = kohya_blocks.block_lr_weights(net, sgm=True, log=lambda m: None)
    down = [w if w > 0.1 else 0 for w in kohya_preset(name, 9, float(plus or 0))]
    assert sdxl == pytest.approx([1.0] + down + [1.0] * 3 + [1.0, 0.5, 0.0, 2.0] + [1.0] * 5 + [1.0])


@pytest.mark.parametrize("network, message", [
    ({"block_dims": "4,x"}, r"block_dims: '4,x' is not a comma-separated list of integers"),
    ({"block_dims": [4, 2.5]}, r"block_dims\[1\]: expected an integer"),
    ({"block_alphas": [-1.0]}, r"block_alphas\[0\]: alpha -1 is below 0"),
    ({"down_lr_weight": "sinus"}, r"down_lr_weight: 'sinus' is neither a list of weights nor a preset"),
    ({"mid_lr_weight": "sine"}, r"mid_lr_weight: 'sine' is not a comma-separated list of numbers"),
])
def test_bad_block_values_are_refused_in_one_line(network, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"network": network})


def test_a_block_list_of_the_wrong_length_names_the_blocks_this_unet_has():
    pipe = build_sdxl_pipeline()
    cfg = config_from_dict({"network": {"block_dims": [4] * 25}})
    with pytest.raises(UserError, match=r"block_dims has 25 values; this U-Net \(SDXL\) has 23 blocks"):
        lora.inject(pipe.unet, None, cfg.network)
    net = lora.inject(pipe.unet, None, config_from_dict({"network": {
        "block_dims": [4] * 4 + [2] + [4] * 18, "train_text_encoder": False}}).network)
    ranks = {kohya_blocks.block_index(k, sgm=True): net.layer(k).r[lora.ADAPTER_NAME] for k in net.modules}
    assert ranks.get(4) == 2 and set(ranks.values()) == {2, 4}  # input_blocks.3: IN03


BLOCKWISE = {"type": "locon", "unet_targets": "all", "dim": 4, "alpha": 2, "conv_dim": 2,
             "block_dims": [4] * 4 + [8] + [4] * 7 + [6] + [3] * 12, "block_alphas": [2.0] * 12 + [1.0] * 13,
             "conv_block_dims": "2,2,2,2,2,2,2,0,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2",
             "down_lr_weight": "0,1,1,1,0.5", "up_lr_weight": "zeros+1"}


@pytest.mark.parametrize("alphas", ["network.alpha", "block_alphas"])
def test_block_dims_reach_the_file_and_the_sampler_renders_it_exactly(tmp_path, alphas):
    """Per-block ranks and alphas load through diffusers' load_lora_weights with no key left and render
    as the trained network does."""
    from sdlora.sampling.sampler import AdapterSet

    settings = BLOCKWISE if alphas == "block_alphas" else {**BLOCKWISE, "block_alphas": []}
    pipe = build_pipeline("mini")
    network = lora.inject(pipe.unet, pipe.text_encoder, config_from_dict({"network": settings}).network)
    randomise_adapters(network)
    hidden, noise_pred = _outputs(pipe)
    tensors = network.kohya_state_dict(torch.float32)
    unet_keys = {k.split(".")[0] for k in tensors if k.startswith("lora_unet")}
    for key in unet_keys:
        block = kohya_blocks.block_index(key, sgm=False)
        conv = tensors[f"{key}.lora_down.weight"].shape[2:] == (3, 3)
        rank, alpha = (2, 1.0) if conv else (BLOCKWISE["block_dims"][block],
                                              settings["block_alphas"][block] if settings["block_alphas"] else 2.0)
        assert tensors[f"{key}.lora_down.weight"].shape[0] == rank, key
        assert float(tensors[f"{key}.alpha"]) == alpha, key
        assert not (conv and block == 7) and block != 0  # conv rank 0 / lr weight 0: no module
    assert {kohya_blocks.block_index(k, sgm=False) for k in unet_keys} >= {4, 12}  # the mini U-Net's blocks with 8 and 6
    assert all(tensors[k].shape[0] == 4 for k in tensors if k.startswith("lora_te") and "lora_down" in k)

    path = tmp_path / "blocks.safetensors"
    save_adapter(path, tensors, {"ss_output_name": "blocks"})
    fresh = build_pipeline("mini")
    adapters = AdapterSet(fresh, fuse=False)
    problems = leftover_messages(lambda: adapters.add(path))
    assert not problems, problems
    adapters.set_weights([1.0])
    # diffusers' peft layers in both cases: the sampler hands each module at alpha 1 (kinds.lora.with_alpha_one),
    # so per-block alphas diffusers would misread still render exactly
    assert adapters.adapters[0].name
    loaded_hidden, loaded_pred = _outputs(fresh)
    torch.testing.assert_close(loaded_hidden, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded_pred, noise_pred, rtol=1e-5, atol=1e-5)


def test_block_lr_weights_make_one_group_per_block_at_unet_lr_times_its_weight():
    pipe = build_pipeline("mini")
    net = config_from_dict({"network": {**BLOCKWISE, "down_lr_weight": "sine", "mid_lr_weight": 0.25,
                                        "block_lr_zero_threshold": 0.3}}).network
    network = lora.inject(pipe.unet, pipe.text_encoder, net)
    groups = network.param_groups(1e-3, [1e-4])
    weights = kohya_preset("sine", 12) + [0.25] + [1.0] * 12
    weights = [w if w > 0.3 else 0 for w in weights[:13]] + weights[13:]
    unet_blocks = {kohya_blocks.block_index(k, sgm=False) for k, (part, _) in network.modules.items() if part == "unet"}
    assert [g["name"] for g in groups] == [f"unet_block{b}" for b in sorted(unet_blocks)] + ["text_encoder"]
    for group, block in zip(groups, sorted(unet_blocks)):
        assert group["lr"] == pytest.approx(1e-3 * weights[block])
        keys = [k for k, (part, _) in network.modules.items() if part == "unet"
                and kohya_blocks.block_index(k, sgm=False) == block]
        assert {id(p) for p in group["params"]} == {id(p) for k in keys for p in network._adapter_params(k).values()}
    assert all(weights[b] > 0 for b in unet_blocks)  # blocks of weight <= the threshold have no modules
    assert 1 not in unet_blocks and 12 not in unet_blocks  # sine's IN01 (0.14) and MID (0.25) are under 0.3
    assert groups[-1]["lr"] == 1e-4


# -- metadata, and all of it in one training --------------------------------------------------------


def test_metadata_spells_the_options_as_kohya_writes_them():
    off = lora.adapter_metadata(config_from_dict({}), BASE, STATS)
    assert {k: off[k] for k in ("ss_multires_noise_iterations", "ss_multires_noise_discount",
                                "ss_adaptive_noise_scale", "ss_scale_weight_norms")} == {
        "ss_multires_noise_iterations": "None", "ss_multires_noise_discount": "0.3",
        "ss_adaptive_noise_scale": "None", "ss_scale_weight_norms": "None"}  # kohya's str(None) for "off"
    assert "block_dims" not in json.loads(off["ss_network_args"])
    cfg = config_from_dict({"network": BLOCKWISE | {"block_lr_zero_threshold": 0.1}, "train": {
        "noise_offset": 0.05, "adaptive_noise_scale": 0.01, "multires_noise_iterations": 8,
        "multires_noise_discount": 0.4, "scale_weight_norms": 1, "stop_text_encoder_training": 100}})
    on = lora.adapter_metadata(cfg, BASE, STATS)
    assert (on["ss_multires_noise_iterations"], on["ss_multires_noise_discount"], on["ss_adaptive_noise_scale"],
            on["ss_scale_weight_norms"], on["ss_stop_text_encoder_training"]) == ("8", "0.4", "0.01", "1.0", "100")
    assert json.loads(on["ss_network_args"]) == {
        "conv_dim": "2", "conv_alpha": "1",
        "block_dims": "4,4,4,4,8,4,4,4,4,4,4,4,6,3,3,3,3,3,3,3,3,3,3,3,3",
        "block_alphas": "2,2,2,2,2,2,2,2,2,2,2,2,1,1,1,1,1,1,1,1,1,1,1,1,1",
        "conv_block_dims": "2,2,2,2,2,2,2,0,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2",
        "down_lr_weight": "0,1,1,1,0.5", "up_lr_weight": "zeros+1", "block_lr_zero_threshold": "0.1"}


def test_a_training_with_every_option_stops_the_text_encoder_and_bounds_the_norms(tmp_path, mini_base_dir):
    cfg = load_config(make_style(tmp_path, mini_base_dir, n=2, extra="max_train_steps = 3"), [
        "train.save_every_n_steps=1", "train.stop_text_encoder_training=1", "train.scale_weight_norms=0.02",
        "train.noise_offset=0.05", "train.adaptive_noise_scale=0.1", "train.multires_noise_iterations=6",
        "train.unet_lr=1e-2", "train.text_encoder_lr=1e-2", 'network.down_lr_weight="1,0,1,1,0.5"'])
    logs = []
    result = train(cfg, log=logs.append)
    first, final = load_file(cfg.adapter_path(step=1)), load_file(result.adapter)
    te = [k for k in final if k.startswith("lora_te") and not k.endswith(".alpha")]
    unet = [k for k in final if k.startswith("lora_unet") and not k.endswith(".alpha")]
    assert te and all(torch.equal(first[k], final[k]) for k in te)  # kept from step 1 on, and saved
    assert any(float(first[k].abs().max()) > 0 for k in te if "lora_up" in k)  # it did learn in step 1
    assert any(not torch.equal(first[k], final[k]) for k in unet)  # the U-Net went on
    assert any("text-encoder adapters stop training" in m for m in logs)
    norms = {}
    for key in {k.split(".")[0] for k in final}:  # kohya's max norm, recomputed from the file
        down, up = final[f"{key}.lora_down.weight"], final[f"{key}.lora_up.weight"]
        norms[key] = float((float(final[f"{key}.alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))).norm())
        assert norms[key] <= 0.02 * (1 + 1e-4), key
    # kohya's figures in TensorBoard; the last step's are those of the modules still learning (the U-Net's)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (cfg.output_dir / "logs").rglob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload()
    figures = {tag: [e.value for e in scalars.Scalars(tag)]
               for tag in ("max_norm/keys_scaled", "max_norm/max_key_norm", "norm/avg_key_norm")}
    assert all(len(values) == 3 for values in figures.values()) and figures["max_norm/keys_scaled"][0] > 0
    unet_norms = [n for key, n in norms.items() if key.startswith("lora_unet")]
    assert figures["max_norm/max_key_norm"][-1] == pytest.approx(max(unet_norms), rel=1e-4)
    assert figures["norm/avg_key_norm"][-1] == pytest.approx(sum(unet_norms) / len(unet_norms), rel=1e-4)
    assert not any(kohya_blocks.block_index(k, sgm=False) == 1 for k in unet)  # IN01: weight 0, no modules
    with safe_open(str(result.adapter), "pt") as f:
        metadata = f.metadata()
    assert (metadata["ss_scale_weight_norms"], metadata["ss_multires_noise_iterations"],
            metadata["ss_adaptive_noise_scale"], metadata["ss_stop_text_encoder_training"]) == ("0.02", "6", "0.1", "1")
    assert json.loads(metadata["ss_network_args"])["down_lr_weight"] == "1,0,1,1,0.5"
