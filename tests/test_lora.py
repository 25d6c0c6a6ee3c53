import hashlib
import json
import logging
import re
import struct
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdlora.adapters import keys, kinds
from sdlora.adapters import network as lora
from sdlora.adapters.file import (
    addnet_hash,
    parse_adapter_arg,
    read_adapter,
    save_adapter,
    short_hash,
)
from sdlora.config import config_from_dict
from sdlora.errors import UserError
from sdlora.tiny.configs import build_pipeline

REQUIRED_METADATA = [
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
    "ss_output_name", "ss_tag_frequency", "ss_dataset_dirs", "ss_sd_model_name", "ss_resolution", "ss_clip_skip",
    "ss_num_train_images", "ss_num_epochs", "ss_steps", "ss_epoch", "ss_learning_rate", "ss_unet_lr",
    "ss_text_encoder_lr", "ss_lr_scheduler", "ss_optimizer", "ss_seed", "ss_min_snr_gamma", "ss_noise_offset",
    "ss_mixed_precision", "ss_training_started_at", "ss_training_finished_at", "ss_session_id",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.resolution", "modelspec.date", "modelspec.prediction_type", "modelspec.trigger_phrase",
    "modelspec.description", "sshs_model_hash",
]
BASE = {"family": "sd_v1", "prediction_type": "epsilon", "resolution": 128, "name": "tiny", "model_hash": "ab" * 32}
STATS = {"num_train_images": 250, "num_epochs": 10, "epoch": 10, "steps": 1250,
         "training_started_at": 1700000000.0, "training_finished_at": 1700003600.5}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models on a shared 2-core machine: thread wake-ups cost ~7 ms per op, 200x the work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def network_cfg(**network):
    return config_from_dict({"network": {"dim": 4, "alpha": 2, **network}}).network


def sd15_on_meta():
    from sdlora.models import arch

    # SD1.5's architecture from the shipped config, without a byte of weights
    return arch.build_unet("sd_v1", device="meta"), arch.build_text_encoder("sd_v1", device="meta")


def randomise_adapters(network: lora.Network, seed: int = 0):
    """Trained-looking adapters: every up (and LoHa factor) non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


# a. Kohya's module set on the real SD1.5 architecture -----------------------------------------


def part_keys(network: lora.Network, part: str) -> dict[str, str]:
    """{kohya key: module path} of the adapted modules of one part."""
    return {key: path for key, (p, path) in network.modules.items() if p == part}


def set_scale(network: lora.Network, multiplier: float) -> None:
    """Every adapter at `multiplier` through peft's own per-layer API (scaling = w * alpha / r)."""
    for key in network.modules:
        network.layer(key).set_scale(lora.ADAPTER_NAME, multiplier)


def test_sd15_default_targets_are_kohyas_192_unet_and_72_text_encoder_modules():
    unet, text_encoder = sd15_on_meta()
    network = lora.inject(unet, text_encoder, network_cfg(dim=16, alpha=8))
    unet_keys, te_keys = part_keys(network, "unet"), part_keys(network, "te")
    assert (len(unet_keys), len(te_keys)) == (192, 72)
    for key in ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
                "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
                "lora_unet_mid_block_attentions_0_proj_in", "lora_unet_up_blocks_1_attentions_0_proj_out"]:
        assert key in unet_keys
    for key in ["lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_11_mlp_fc2",
                "lora_te_text_model_encoder_layers_5_self_attn_out_proj", "lora_te_text_model_encoder_layers_3_mlp_fc1"]:
        assert key in te_keys
    # The keys are the injected peft layers themselves, and kohya.py names them the same way.
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert all(isinstance(network.layer(k), BaseTunerLayer) for k in network.modules)
    injected = {k: p for k, p in keys.kohya_module_map(unet, "unet").items()
                if isinstance(unet.get_submodule(p), BaseTunerLayer)}
    assert injected == unet_keys


def test_sd15_all_targets_are_kohyas_278_unet_modules_with_conv_dim():
    unet, text_encoder = sd15_on_meta()
    network = lora.inject(unet, text_encoder, network_cfg(unet_targets="all", dim=16, conv_dim=8, conv_alpha=4))
    keys = part_keys(network, "unet")
    assert len(keys) == 278
    conv = network.layer("lora_unet_down_blocks_1_resnets_0_conv1")
    assert conv.r[lora.ADAPTER_NAME] == 8 and conv.lora_alpha[lora.ADAPTER_NAME] == 4
    assert conv.lora_A[lora.ADAPTER_NAME].weight.shape == (8, 320, 3, 3)
    assert conv.lora_B[lora.ADAPTER_NAME].weight.shape == (640, 8, 1, 1)
    shortcut = network.layer("lora_unet_up_blocks_0_resnets_0_conv_shortcut")  # 1x1: the network dim
    assert shortcut.r[lora.ADAPTER_NAME] == 16
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in keys
    assert "lora_unet_up_blocks_2_upsamplers_0_conv" in keys
    assert "lora_unet_mid_block_resnets_1_time_emb_proj" in keys


def test_narrower_presets_on_sd15():
    unet, _ = sd15_on_meta()
    attn2 = lora.unet_target_paths(unet, "attn2")
    attention = lora.unet_target_paths(unet, "attention")
    assert len(attn2) == 64 and all(".attn2." in p for p in attn2)
    assert len(attention) == 128 and set(attn2) < set(attention)
    with pytest.raises(UserError, match="unet_targets"):
        lora.unet_target_paths(unet, "everything")


# b. Export, then diffusers' own loader on a fresh copy of the base -------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


# What diffusers says (log or warning) when it leaves a key of a file unloaded or misnamed.
LEFTOVERS = re.compile(r"not (been )?(correctly )?(loaded|renamed)|unexpected|missing|did not match", re.I)


def leftover_messages(load) -> list[str]:
    """diffusers' messages about keys it did not load, logged or warned while `load()` runs."""
    records = _Records()
    logger = logging.getLogger("diffusers")
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load()
    finally:
        logger.removeHandler(records)
    return [m for m in records.messages + [str(w.message) for w in caught] if LEFTOVERS.search(m)]


def _outputs(pipe, generator_seed=0):
    generator = torch.Generator().manual_seed(generator_seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    ids = pipe.tokenizer(["clrscn, mountains, lake, sunset", "a tree"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        noise_pred = pipe.unet(latents, torch.tensor([10, 700]), encoder_hidden_states=hidden).sample
    return hidden, noise_pred


@pytest.mark.parametrize("kind,targets", [("lora", "transformer"), ("lora", "all"), ("locon", "attn2")])
def test_exported_adapter_loads_in_diffusers_with_no_key_left_and_same_outputs(tmp_path, kind, targets):
    pipe = build_pipeline("mini")
    base_hidden, base_pred = _outputs(pipe)
    network = lora.inject(pipe.unet, pipe.text_encoder, network_cfg(type=kind, unet_targets=targets))
    hidden, noise_pred = _outputs(pipe)
    torch.testing.assert_close((hidden, noise_pred), (base_hidden, base_pred))  # injection is the identity
    randomise_adapters(network)
    hidden, noise_pred = _outputs(pipe)
    assert (hidden - base_hidden).abs().max() > 1e-2 and (noise_pred - base_pred).abs().max() > 1e-2

    path = tmp_path / "style.safetensors"
    save_adapter(path, network.kohya_state_dict(torch.float32), {"ss_output_name": "style"})
    fresh = build_pipeline("mini")
    problems = leftover_messages(lambda: fresh.load_lora_weights(str(path), adapter_name="style"))
    assert not problems, problems
    # Every module of the file became an adapter (diffusers drops some keys without a word).
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = sum(isinstance(m, BaseTunerLayer) for model in (fresh.unet, fresh.text_encoder) for m in model.modules())
    assert adapted == len(network.modules)
    loaded_hidden, loaded_pred = _outputs(fresh)
    torch.testing.assert_close(loaded_hidden, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded_pred, noise_pred, rtol=1e-5, atol=1e-5)


def test_lora_deltas_in_the_file_are_the_trained_layers_deltas():
    pipe = build_pipeline("mini")
    network = lora.inject(pipe.unet, pipe.text_encoder, network_cfg(unet_targets="all", conv_dim=3, conv_alpha=1))
    randomise_adapters(network, seed=1)
    groups = keys.group_modules(network.kohya_state_dict(torch.float32))
    x = torch.randn(1, 32, 8, 8)
    for key in ["lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_attentions_0_proj_in",
                "lora_te_text_model_encoder_layers_1_mlp_fc1"]:
        layer = network.layer(key)
        base = layer.get_base_layer()
        delta = kinds.module_delta(groups[key], base.weight.shape)
        torch.testing.assert_close(delta, layer.get_delta_weight(lora.ADAPTER_NAME), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            if isinstance(base, torch.nn.Conv2d):
                inputs = x[:, :base.in_channels]
                merged = F.conv2d(inputs, base.weight + delta, base.bias, base.stride, base.padding)
            else:
                inputs = torch.randn(3, base.in_features)
                merged = F.linear(inputs, base.weight + delta, base.bias)
            torch.testing.assert_close(layer(inputs), merged, rtol=1e-4, atol=1e-5)
    assert kinds.module_rank(groups["lora_unet_down_blocks_0_resnets_0_conv1"]) == 3
    assert kinds.module_scale(groups["lora_unet_down_blocks_0_resnets_0_conv1"]) == pytest.approx(1 / 3)


# Training-side behaviour -----------------------------------------------------------------------


@pytest.mark.parametrize("family, text_encoder_lr, train_te, per_encoder, written", [
    ("sd_v1", 1e-4, True, [1e-4], "0.0001"),
    ("sdxl", 1e-4, True, [1e-4, 1e-4], "0.0001"),  # one rate for both encoders, written once
    ("sdxl", [1e-4, 0.0], True, [1e-4, 0.0], "0.0001, 0"),
    ("sdxl", [1e-4, 5e-5], False, [0.0, 0.0], "0"),
    ("sd_v1", 0.0, True, [0.0], "0"),
])
def test_text_encoder_rates_per_encoder_feed_the_metadata(family, text_encoder_lr, train_te, per_encoder, written):
    cfg = config_from_dict({"name": "s", "network": {"train_text_encoder": train_te},
                            "train": {"text_encoder_lr": text_encoder_lr}})
    base = dict(BASE, family=family)
    assert lora.text_encoder_lrs(cfg, base) == per_encoder
    meta = lora.adapter_metadata(cfg, base, STATS)
    assert meta["ss_text_encoder_lr"] == written
    assert meta["ss_network_train_unet_only"] == str(not any(per_encoder))


def test_a_text_encoder_rate_pair_for_one_encoder_is_refused():
    cfg = config_from_dict({"name": "s", "train": {"text_encoder_lr": [1e-4, 1e-5]}})
    with pytest.raises(UserError, match=r"tiny has 1 text encoder\(s\); give one learning rate$"):
        lora.text_encoder_lrs(cfg, BASE)


def test_only_adapters_train_and_a_zero_text_encoder_lr_freezes_and_drops_them():
    pipe = build_pipeline("mini")
    network = lora.inject(pipe.unet, pipe.text_encoder, network_cfg())
    trainable = [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in network.trainable_parameters()}
    assert all(p.abs().sum() == 0 for k in network.modules
               for p in [network._adapter_params(k)["lora_up.weight"]])

    groups = network.param_groups(unet_lr=5e-4, text_encoder_lrs=[1e-4])
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 5e-4), ("text_encoder", 1e-4)]
    assert sum(len(g["params"]) for g in groups) == len(network.trainable_parameters())

    groups = network.param_groups(unet_lr=5e-4, text_encoder_lrs=[0.0])
    assert [g["name"] for g in groups] == ["unet"]
    assert not any(p.requires_grad for p in network.parameters_of("te"))
    assert not [k for k in network.kohya_state_dict() if k.startswith("lora_te")]
    with pytest.raises(UserError, match="both 0"):
        network.param_groups(0, [0.0])


def test_text_encoder_adapters_are_not_created_when_not_trained():
    pipe = build_pipeline("mini")
    network = lora.inject(pipe.unet, pipe.text_encoder, network_cfg(train_text_encoder=False))
    assert not part_keys(network, "te")
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


def test_kohya_state_dict_round_trips_through_load(tmp_path):
    pipe = build_pipeline("mini")
    network = lora.inject(pipe.unet, pipe.text_encoder, network_cfg(unet_targets="all"))
    randomise_adapters(network)
    exported = network.kohya_state_dict(torch.float32)
    assert exported["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"].dim() == 0
    assert network.kohya_state_dict()["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].dtype == torch.float16

    other = build_pipeline("mini")
    resumed = lora.inject(other.unet, other.text_encoder, network_cfg(unet_targets="all"))
    resumed.load_kohya_state_dict(exported)
    reexported = resumed.kohya_state_dict(torch.float32)
    assert reexported.keys() == exported.keys()
    assert all(torch.equal(reexported[k], exported[k]) for k in exported)

    narrower = lora.inject(build_pipeline("mini").unet, None, network_cfg(unet_targets="attn2"))
    with pytest.raises(UserError, match="does not match this network"):
        narrower.load_kohya_state_dict(exported)
    wrong_rank = lora.inject(build_pipeline("mini").unet, build_pipeline("mini").text_encoder,
                             network_cfg(unet_targets="all", dim=8, alpha=2))
    with pytest.raises(UserError, match="network.dim"):
        wrong_rank.load_kohya_state_dict(exported)


def test_adapter_dropout_is_applied_in_training():
    pipe = build_pipeline("mini")
    network = lora.inject(pipe.unet, pipe.text_encoder, network_cfg(dropout=0.5))
    randomise_adapters(network)
    pipe.unet.train()
    g = torch.Generator().manual_seed(0)
    x, hidden = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    torch.manual_seed(1)
    a = pipe.unet(x, torch.tensor([10]), hidden).sample
    torch.manual_seed(2)
    b = pipe.unet(x, torch.tensor([10]), hidden).sample
    assert not torch.allclose(a, b)  # network.dropout reaches peft's lora_dropout


# c. LoHa -------------------------------------------------------------------------------------


def test_loha_export_has_lycoris_keys_shapes_and_maths(tmp_path):
    pipe = build_pipeline("mini")
    network = lora.inject(pipe.unet, pipe.text_encoder, network_cfg(type="loha", unet_targets="all", dim=4,
                                                                       alpha=2, conv_dim=2, conv_alpha=1))
    base_hidden, _ = _outputs(pipe)
    assert torch.equal(_outputs(pipe)[0], base_hidden)
    randomise_adapters(network)
    tensors = network.kohya_state_dict(torch.float32)
    groups = keys.group_modules(tensors)
    assert all(set(parts) == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"} for parts in groups.values())
    # LyCORIS (non-Tucker): w*_a [out, r], w*_b [r, in * kh * kw].
    shapes = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((32, 4), (4, 32), 2.0),
        "lora_unet_down_blocks_0_attentions_0_proj_in": ((32, 4), (4, 32), 2.0),  # 1x1 conv
        "lora_unet_down_blocks_0_resnets_0_conv1": ((32, 2), (2, 32 * 9), 1.0),  # 3x3 conv, conv_dim
        "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_ff_net_2": ((32, 4), (4, 128), 2.0),
    }
    for key, (a_shape, b_shape, alpha) in shapes.items():
        parts = groups[key]
        assert parts["hada_w1_a"].shape == parts["hada_w2_a"].shape == a_shape
        assert parts["hada_w1_b"].shape == parts["hada_w2_b"].shape == b_shape
        assert float(parts["alpha"]) == alpha
        layer = network.layer(key)
        weight = layer.get_base_layer().weight
        expected = ((parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
                    * alpha / b_shape[0]).reshape(weight.shape)
        torch.testing.assert_close(kinds.module_delta(parts, weight.shape), expected)
        torch.testing.assert_close(layer.get_delta_weight(lora.ADAPTER_NAME), expected, rtol=1e-5, atol=1e-6)

    cfg = config_from_dict({"name": "pastel", "trigger": "clrscn",
                            "network": {"type": "loha", "unet_targets": "all", "dim": 4, "alpha": 2,
                                        "conv_dim": 2, "conv_alpha": 1}})
    path = tmp_path / "pastel.safetensors"
    save_adapter(path, tensors, lora.adapter_metadata(cfg, BASE, STATS))
    read, metadata = read_adapter(path)
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "loha", "conv_dim": "2", "conv_alpha": "1"}

    other = build_pipeline("mini")
    resumed = lora.inject(other.unet, other.text_encoder, cfg.network)
    resumed.load_kohya_state_dict(read)
    torch.testing.assert_close(_outputs(other), _outputs(pipe))


def test_loha_refuses_input_dropout():
    pipe = build_pipeline("mini")
    with pytest.raises(UserError, match="dropout"):
        lora.inject(pipe.unet, None, network_cfg(type="loha", dropout=0.1))


# d. Metadata and files -----------------------------------------------------------------------


def _saved(tmp_path, **config):
    cfg = config_from_dict({"name": "colorful_scenery", "trigger": "clrscn", **config})
    tensors = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4),
               "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0)}
    tags = {"colorful_scenery": {"clrscn": 25, "mountains": 12, "lake": 7}}
    dirs = {"colorful_scenery": {"n_repeats": 10, "img_count": 25}}
    metadata = lora.adapter_metadata(cfg, BASE, STATS, tags, dirs)
    path = tmp_path / "colorful_scenery.safetensors"
    returned_hash = save_adapter(path, tensors, metadata)
    return path, tensors, returned_hash


def test_metadata_has_every_kohya_and_modelspec_key_as_strings(tmp_path):
    path, _, _ = _saved(tmp_path, network={"unet_targets": "all", "conv_dim": 8})
    _, metadata = read_adapter(path)
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    assert not missing
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("16", "8")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "4"}
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_output_name"] == "colorful_scenery"
    assert json.loads(metadata["ss_tag_frequency"]) == {"colorful_scenery": {"clrscn": 25, "mountains": 12, "lake": 7}}
    assert json.loads(metadata["ss_dataset_dirs"]) == {"colorful_scenery": {"n_repeats": 10, "img_count": 25}}
    assert metadata["ss_resolution"] == "(512, 512)"
    assert (metadata["ss_unet_lr"], metadata["ss_text_encoder_lr"]) == ("0.0005", "0.0001")
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.resolution"] == "512x512"
    assert metadata["modelspec.trigger_phrase"] == "clrscn"
    assert metadata["modelspec.date"].startswith("2023-11-14T")
    assert metadata["modelspec.prediction_type"] == "epsilon"


def test_metadata_of_a_v_prediction_sd2_base():
    cfg = config_from_dict({"dataset": {"resolution": [768, 512]}})
    meta = lora.adapter_metadata(cfg, dict(BASE, family="sd_v2_v", prediction_type="v_prediction"), STATS)
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["ss_v2"] == "True"
    assert meta["modelspec.resolution"] == "768x512" and meta["ss_resolution"] == "(768, 512)"


def test_model_hash_is_the_sha256_of_the_tensor_bytes(tmp_path):
    path, _, returned_hash = _saved(tmp_path)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    independent = hashlib.sha256(raw[8 + header_len:]).hexdigest()
    assert header["__metadata__"]["sshs_model_hash"] == independent == returned_hash
    assert addnet_hash(path) == independent
    assert short_hash(path) == independent[:12]


def test_save_refuses_to_overwrite_and_keeps_the_old_file(tmp_path):
    path, tensors, _ = _saved(tmp_path)
    before = path.read_bytes()
    with pytest.raises(UserError, match="already exists.*overwrite"):
        save_adapter(path, {k: v * 2 for k, v in tensors.items()}, {})
    assert path.read_bytes() == before
    save_adapter(path, {k: v * 2 for k, v in tensors.items()}, {}, overwrite=True)
    assert path.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_read_adapter_explains_what_is_wrong(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(UserError, match="not found"):
        read_adapter(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(UserError, match="not a readable .safetensors"):
        read_adapter(junk)
    pickled = tmp_path / "old.ckpt"
    pickled.write_bytes(b"x")
    with pytest.raises(UserError, match="pickled"):
        read_adapter(pickled)
    not_an_adapter = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 4)}, str(not_an_adapter))
    with pytest.raises(UserError, match="no LoRA keys in Kohya.*diffusers or peft style"):
        read_adapter(not_an_adapter)


def test_adapter_arg_keeps_colons_that_are_not_a_scale():
    assert parse_adapter_arg("style.safetensors:0.8") == (Path("style.safetensors"), 0.8)
    assert parse_adapter_arg("style.safetensors") == (Path("style.safetensors"), None)
    assert parse_adapter_arg(r"C:\loras\style.safetensors") == (Path(r"C:\loras\style.safetensors"), None)
    assert parse_adapter_arg("a:b.safetensors:-1") == (Path("a:b.safetensors"), -1.0)
    assert parse_adapter_arg(":0.5") == (Path(":0.5"), None)


def test_one_message_for_an_existing_output(tmp_path, mini_base_dir):
    """save_adapter, resize, merge and train refuse alike: the file, another name, and how to replace it."""
    from sdlora.lowrank import tools

    path, tensors, _ = _saved(tmp_path)
    messages = []
    for refuse in (lambda: save_adapter(path, tensors, {}),
                   lambda: tools.resize(path, path, rank=1),
                   lambda: tools.merge(mini_base_dir, [(path, 1.0)], path)):
        with pytest.raises(UserError) as e:
            refuse()
        messages.append(str(e.value))
    assert all(m.startswith(f"{path} already exists; choose another output name, or ") for m in messages)
    assert "--overwrite" in messages[1] and "--overwrite" in messages[2]


@pytest.mark.parametrize("command", [
    ["convert", "{path}", "{path}"],
    ["resize", "{path}", "{path}", "--rank", "1"],
    ["bench", "--json", "{path}"],
    ["import-kohya", "train_network.py --network_dim 4", "-o", "{path}"],
])
def test_every_command_refuses_an_existing_output_in_one_wording(tmp_path, capsys, command):
    """The same sentence and the same flag (--overwrite) whichever command writes the file."""
    from sdlora.cli import main

    path, _, _ = _saved(tmp_path)
    before = path.read_bytes()
    assert main([arg.format(path=path) for arg in command]) == 2
    assert (f"{path} already exists; choose another output name, or pass --overwrite to replace it"
            in capsys.readouterr().err)
    assert path.read_bytes() == before


def test_import_kohya_takes_overwrite_like_every_command_and_still_force(tmp_path, capsys):
    from sdlora.cli import main

    out = tmp_path / "new.toml"
    for flag in ("--overwrite", "--force"):
        out.write_text("# mine\n")
        assert main(["import-kohya", "train_network.py --network_dim 4", "-o", str(out), flag]) == 0
        assert "dim = 4" in out.read_text()


def test_checkpoint_saves_refuse_in_the_same_wording_with_their_own_keyword(tmp_path, mini_base_dir):
    from sdlora.config import ModelConfig
    from sdlora.models import checkpoint, load

    base = load.load_base(ModelConfig(base=str(mini_base_dir)))
    for save, target in ((checkpoint.save_single_file, tmp_path / "m.safetensors"),
                         (checkpoint.save_diffusers, tmp_path / "pipe")):
        target.mkdir() if not target.suffix else target.write_bytes(b"mine")
        with pytest.raises(UserError) as e:
            save(base, target)
        assert str(e.value) == f"{target} already exists; choose another output name, or pass overwrite=True to replace it"
