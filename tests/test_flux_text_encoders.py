"""Adapters on FLUX.1's text encoders and its text settings, on a tiny FLUX.1-dev folder: CLIP-L LoRA
(`lora_te1_text_model_...`) with network.train_text_encoder, T5 LoRA (`lora_te3_encoder_block_...`) only
with network.train_t5, named as sd-scripts' lora_flux.py names them and as ComfyUI's key map reads them;
one learning rate per encoder; a frozen encoder's outputs cached while a trained one runs; T5's length
per variant ([train] t5_max_length); caption dropout per encoder as sd-scripts' sd3 strategy does it
(the dropped encoder's outputs are zeros)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from test_train import make_style, repeat_batch

from sdlora.adapters import apply, keys, network
from sdlora.adapters.file import read_adapter
from sdlora.config import config_from_dict, load_config
from sdlora.errors import UserError
from sdlora.models.families import FLUX_DEV, FLUX_SCHNELL
from sdlora.sampling.sampler import Sampler
from sdlora.tiny.configs import build_flux_components, build_flux_pipeline
from sdlora.training.loop import Trainer

SHORT_T5 = "t5_max_length = 16"  # the tiny T5 at 16 tokens keeps these tests fast (the default is 512)


@pytest.fixture(scope="module")
def flux_dev_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_dev")
    build_flux_pipeline(guidance=True).save_pretrained(folder)
    return folder


def trainer(tmp_path, folder, extra: str = "", overrides=()) -> Trainer:
    path = make_style(tmp_path, folder, extra=f"max_train_steps = 3\n{SHORT_T5}\n{extra}")
    return Trainer(load_config(path, ["dataset.shuffle_caption=false", *overrides]), log=lambda m: None)


# ---------------------------------------------------------------------------------------------
# Names, as kohya writes them and ComfyUI reads them

# sd-scripts networks/lora_flux.py: LoRANetwork.TEXT_ENCODER_TARGET_REPLACE_MODULE, prefixes lora_te1 / lora_te3.
KOHYA_TEXT_TARGETS = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "T5Attention", "T5DenseGatedActDense"]


def kohya_text_names(prefix: str, encoder, transformers4_root: str = "") -> set[str]:
    """lora_flux.py's create_modules on a text encoder: every Linear inside a target class, named
    prefix.name.child_name with "." -> "_". Kohya ran transformers 4, whose CLIPTextModel nests its
    modules under `text_model` (`transformers4_root`)."""
    names = set()
    for name, module in encoder.named_modules():
        if type(module).__name__ in KOHYA_TEXT_TARGETS:
            for child_name, child in module.named_modules():
                if isinstance(child, torch.nn.Linear):
                    names.add(f"{prefix}.{transformers4_root}{name}.{child_name}".replace(".", "_"))
    return names


def comfyui_text_keys(clip_l, t5) -> set[str]:
    """ComfyUI's comfy/lora.py model_lora_keys_clip for FLUX (clip_l and t5xxl present, no clip_g):
    lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP} per CLIP-L layer, and for every T5 weight
    `t5xxl.transformer.X.weight`, lora_te3_X ("." -> "_"), ComfyUI's T5 module names being transformers'."""
    clip_map = ["mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj", "self_attn_out_proj"]
    found = {f"lora_te1_text_model_encoder_layers_{b}_{c}" for b in range(clip_l.config.num_hidden_layers)
             for c in clip_map}
    t5_weights = [k[:-len(".weight")] for k in t5.state_dict() if k.endswith(".weight")]
    return found | {"lora_te3_" + k.replace(".", "_") for k in t5_weights}


def test_text_encoder_names_and_counts_equal_kohyas_and_comfyui_reads_every_one():
    parts = build_flux_components()
    clip_l, t5 = parts["text_encoder"], parts["text_encoder_2"]
    cfg = config_from_dict({"name": "s", "network": {"dim": 4, "alpha": 2, "train_t5": True}})
    order = keys.text_parts(FLUX_DEV.text_encoders)
    assert order == ["te1", "te3"]
    want = kohya_text_names("lora_te1", clip_l, "text_model.") | kohya_text_names("lora_te3", t5)
    comfyui = comfyui_text_keys(clip_l, t5)  # both read before injection adds the adapters' own Linears
    net = network.inject(parts["transformer"], dict(zip(order, (clip_l, t5))), cfg.network, text_order=tuple(order))
    ours = {k for k in net.modules if not k.startswith("lora_unet")}
    assert ours == want
    clip_keys, t5_keys = sorted(k for k in ours if k.startswith("lora_te1_")), sorted(k for k in ours if "te3" in k)
    assert len(clip_keys) == 6 * clip_l.config.num_hidden_layers  # q, k, v, out_proj, fc1, fc2: 72 on CLIP-L
    assert len(t5_keys) == 7 * t5.config.num_layers  # q, k, v, o, wi_0, wi_1, wo: 168 on T5-XXL
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in clip_keys
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in t5_keys
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_1" in t5_keys
    assert ours <= comfyui


# ---------------------------------------------------------------------------------------------
# Training


def test_clip_l_lora_trains_by_default_the_loss_falls_and_t5_stays_frozen_and_cached(tmp_path, flux_dev_dir):
    t = trainer(tmp_path, flux_dev_dir, "unet_lr = 1e-2\ntext_encoder_lr = 1e-2")
    assert set(t.network.models) == {"unet", "te1"}  # no T5 adapters without train_t5, as kohya
    assert t.settings.text_encoder_lrs == (1e-2, 0.0)
    assert [(g["name"], g["lr"]) for g in t.optimizer.param_groups] == [("unet", 1e-2), ("text_encoder_1", 1e-2)]
    batch = next(iter(t.loader))
    assert set(batch["text"]) == {"1.hidden"}  # T5's outputs, encoded once; CLIP-L runs each step
    assert t.data.te_cache.encodes == 4
    clip_ups = [p for k in t.network.modules if k.startswith("lora_te1")
                for s, p in t.network._adapter_params(k).items() if s == "lora_up.weight"]
    assert clip_ups and all(not p.any() for p in clip_ups)
    losses = repeat_batch(t, batch, 10)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(p.any() for p in clip_ups)  # CLIP-L's adapters learned
    exported = {k.split(".")[0] for k in t.network.kohya_state_dict()}
    clip_modules = {k for k in t.network.modules if k.startswith("lora_te1")}
    assert {k for k in exported if k.startswith("lora_te")} == clip_modules


def test_t5_lora_only_with_train_t5_and_each_encoder_gets_its_own_rate(tmp_path, flux_dev_dir):
    t = trainer(tmp_path, flux_dev_dir, "text_encoder_lr = [1e-4, 3e-5]", ["network.train_t5=true"])
    assert [(g["name"], g["lr"]) for g in t.optimizer.param_groups] == [
        ("unet", 5e-4), ("text_encoder_1", 1e-4), ("text_encoder_3", 3e-5)]
    assert t.data.te_cache is None  # both encoders train: both run each step
    t5_keys = [k for k in t.network.modules if k.startswith("lora_te3_")]
    assert len(t5_keys) == 14
    t5_params = {id(p) for k in t5_keys for p in t.network._adapter_params(k).values()}
    assert t5_params == {id(p) for p in t.optimizer.param_groups[2]["params"]}
    batch = next(iter(t.loader))
    t.accelerator.backward(t.step(batch))
    assert all(p.grad is not None for k in t5_keys for p in t.network._adapter_params(k).values())
    meta = network.adapter_metadata(t.cfg, t.base, {"num_train_images": 4, "num_epochs": 1, "epoch": 1, "steps": 1},
                                    settings=t.settings)
    assert json.loads(meta["ss_network_args"])["train_t5xxl"] == "True"  # as kohya's network_args say it
    assert meta["ss_text_encoder_lr"] == "0.0001, 3e-05" and meta["ss_network_train_unet_only"] == "False"

    # without train_t5 the second rate is T5's and unused; a rate per encoder of another count is refused
    lrs = network.text_encoder_lrs(config_from_dict({"name": "s", "train": {"text_encoder_lr": [1e-4, 3e-5]}}),
                                   {"family": "flux1_dev", "name": "flux"})
    assert lrs == [1e-4, 0.0]
    with pytest.raises(UserError, match=r"give one learning rate or one per encoder \[clip_l, t5\]"):
        network.text_encoder_lrs(config_from_dict({"name": "s", "train": {"text_encoder_lr": [1e-4, 1e-5, 1e-6]}}),
                                 {"family": "flux1_dev", "name": "flux"})
    with pytest.raises(UserError, match=r"train_t5 = true: sd has no T5 text encoder; set train_t5 = false"):
        network.text_encoder_lrs(config_from_dict({"name": "s", "network": {"train_t5": True}}),
                                 {"family": "sd_v1", "name": "sd"})
    with pytest.raises(UserError, match=r"train_t5 = true adds T5 .* set train_text_encoder = true"):
        network.text_encoder_lrs(config_from_dict({"name": "s", "network": {"train_t5": True,
                                                                            "train_text_encoder": False}}),
                                 {"family": "flux1_dev", "name": "flux"})


def test_exported_text_encoder_keys_read_back_equal_and_apply_to_the_pipeline(tmp_path, flux_dev_dir):
    t = trainer(tmp_path, flux_dev_dir, "text_encoder_lr = 1e-2\nunet_lr = 1e-2", ["network.train_t5=true"])
    batch = next(iter(t.loader))
    repeat_batch(t, batch, 2)
    state = t.network.kohya_state_dict(torch.float32)
    path = tmp_path / "te.safetensors"
    save_file(state, str(path))
    tensors, _ = read_adapter(path, log=lambda m: None)  # the one reader: names kept as written
    assert tensors.keys() == state.keys()
    assert any(k.startswith("lora_te3_encoder_block_0_") for k in tensors)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in tensors)

    for p in t.network.trainable_parameters():
        p.data.zero_()
    t.network.load_kohya_state_dict(tensors)
    again = t.network.kohya_state_dict(torch.float32)
    assert all(torch.equal(again[k], state[k]) for k in state)

    # the engine that samples and merges takes every module onto a FluxPipeline's CLIP-L and T5
    pipe = build_flux_pipeline(guidance=True)
    matched, _ = apply.read_for_model(path, keys.model_parts(pipe))
    assert set(matched) == {k.split(".")[0] for k in state if not k.startswith("lora_unet")} | {
        k for k in matched if k.startswith("lora_unet")}
    assert set(keys.model_parts(pipe)) == {"unet", "te1", "te3"}


# ---------------------------------------------------------------------------------------------
# T5's length and caption dropout per encoder


def test_t5_length_is_the_variants_unless_t5_max_length_says_and_the_sampler_uses_it(tmp_path, flux_dev_dir):
    tokenizers = build_flux_pipeline().tokenizer, build_flux_pipeline().tokenizer_2
    assert FLUX_DEV.token_lengths(tokenizers) == [77, 512]  # kohya's t5xxl_max_token_length defaults
    assert FLUX_SCHNELL.token_lengths(tokenizers) == [77, 256]
    train = config_from_dict({"name": "s", "train": {"t5_max_length": 40}}).train
    assert FLUX_SCHNELL.with_text_settings(train).token_lengths(tokenizers) == [77, 40]

    t = trainer(tmp_path, flux_dev_dir, overrides=["network.train_text_encoder=false", "train.t5_max_length=24"])
    assert t.family.token_lengths(t.base.tokenizers) == [77, 24]
    caption = ", ".join(t.data.examples[0].tags)
    assert t.data.te_cache.get(caption)["1.hidden"].shape[0] == 24  # the transformer sees 24 text tokens
    sampler = Sampler(t.cfg)
    assert sampler.encode(["clrscn, lake"]).hidden.shape[1] == 24  # diffusers' max_sequence_length likewise


def test_caption_dropout_zeros_each_encoders_outputs_alone_and_is_seeded(tmp_path, flux_dev_dir):
    t = trainer(tmp_path, flux_dev_dir, "t5_dropout_rate = 0.5",
                ["network.train_text_encoder=false", "dataset.num_repeats=8", "train.batch_size=4"])
    assert t.settings.text_dropout_rates == (0.0, 0.5)
    masks = []
    for batch in t.loader:
        masks.append(batch["text_dropout"])
        if len(masks) == 1:
            text = t.encode_per_encoder(batch)
            dropped = batch["text_dropout"][:, 1].bool()
            assert dropped.any() and not dropped.all()
            assert not text.hidden[dropped].any() and text.hidden[~dropped].abs().sum(dim=(1, 2)).all()
            assert text.pooled.abs().sum(dim=1).all()  # CLIP-L's pooled output is kept
    masks = torch.cat(masks)
    assert not masks[:, 0].any() and 0.2 < masks[:, 1].mean() < 0.8
    again = Trainer(t.cfg, log=lambda m: None)
    assert torch.equal(torch.cat([b["text_dropout"] for b in again.loader]), masks)  # the same seed, the same drops


def test_a_dropout_rate_for_an_encoder_the_family_lacks_is_one_line():
    cfg = config_from_dict({"name": "s", "train": {"clip_g_dropout_rate": 0.1}})
    with pytest.raises(UserError, match=r"^config: \[train\] clip_g_dropout_rate = 0.1: flux \(FLUX.1 dev\) has "
                                        r"no clip_g text encoder \(its text encoders are clip_l, t5\); set "
                                        r"clip_g_dropout_rate = 0$"):
        network.text_dropout_rates(cfg, {"family": "flux1_dev", "name": "flux"})
    cfg = config_from_dict({"name": "s", "train": {"clip_l_dropout_rate": 0.1}})
    with pytest.raises(UserError, match="caption_dropout_rate"):
        network.text_dropout_rates(cfg, {"family": "sdxl", "name": "sdxl"})
