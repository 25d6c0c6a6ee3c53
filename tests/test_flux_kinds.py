"""Adapter kinds and targets on FLUX.1's transformer: kohya lora_flux's block selection (train_blocks,
train_double_block_indices, train_single_block_indices, train_modulation) gives kohya's names and counts
on the full architecture (meta device), and LoRA, LoCon, LoHa, LoKr and DoRA train on a tiny FLUX.1-dev,
export in names other tools read and apply back (adapters/apply.py) as the trained network changed
each diffusers Linear.

The file layouts are checked against LyCORIS's own maths (`lycoris.functional`: the LoHa and LoKr
weight changes, DoRA's weight decomposition per output row) and ComfyUI's way of applying a file
(comfy/lora.py `model_lora_keys_unet`, comfy/utils.py `flux_to_diffusers`): a `lora_unet_<original>`
module patches the original's whole weight, a `lora_transformer_<diffusers path>` module the rows of
the fused weight that the diffusers part holds, (dim 0, offset, size) = (0, 0, H), (0, H, H), (0, 2H, H)
for q, k, v and (0, 3H, 4H) for a single block's proj_mlp.

The expected counts are those of kohya's own `networks/lora_flux.py create_network` on its FLUX.1-dev
model (sd-scripts 48d368fa, run on the meta device with these network_args): all 304, single 114,
double 190, img_mod_dim = txt_mod_dim = single_mod_dim = 0 228, double "0,1,8-12,18" + single "none"
80, double "none" + single "3, 30-37" without modulation 18, train_blocks double + double "5-6" 20.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from lycoris.functional import general as lycoris_general
from lycoris.functional import loha as lycoris_loha
from lycoris.functional import lokr as lycoris_lokr
from safetensors.torch import load_file, save_file
from test_flux_train import FLUX, flux_dev_dir  # noqa: F401  (the tiny FLUX.1-dev folder fixture)
from test_train import make_style, repeat_batch

from sdlora.adapters import apply, kinds, transformer_keys
from sdlora.adapters.network import ADAPTER_NAME, adapter_metadata, inject
from sdlora.config import NetworkConfig, load_config
from sdlora.errors import ConfigError, UserError
from sdlora.sampling.sampler import Sampler
from sdlora.tiny.configs import MINI_UNET
from sdlora.training.loop import Trainer

SELECTIONS = {
    "all": ({}, 304),
    "single": ({"train_blocks": "single"}, 114),
    "double": ({"train_blocks": "double"}, 190),
    "no modulation": ({"train_modulation": False}, 228),
    "double indices": ({"train_double_block_indices": "0,1,8-12,18", "train_single_block_indices": "none"}, 80),
    "single indices": ({"train_double_block_indices": "none", "train_single_block_indices": "3, 30-37",
                        "train_modulation": False}, 18),
    "double blocks by index": ({"train_blocks": "double", "train_double_block_indices": "5-6"}, 20),
}
DEFAULTS = dict(train_blocks="all", train_double_block_indices="all", train_single_block_indices="all",
                train_block_indices="all", train_modulation=True)


def selected_keys(transformer, **selection) -> list[str]:
    """The Kohya modules a selection keeps: those none of whose diffusers parts it leaves out."""
    left_out = transformer_keys.unselected_paths(transformer, transformer_keys.FLUX_NAMES,
                                                 SimpleNamespace(**(DEFAULTS | selection)))
    return [k for k, m in transformer_keys.kohya_modules(transformer, transformer_keys.FLUX_NAMES).items()
            if not set(m.paths) & left_out]


@pytest.fixture(scope="module")
def full_flux():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1-dev: 19 double, 38 single blocks


@pytest.mark.parametrize("name", SELECTIONS)
def test_block_selection_names_and_counts_equal_kohyas(full_flux, name):
    selection, count = SELECTIONS[name]
    keys = selected_keys(full_flux, **selection)
    assert len(keys) == count
    blocks = {(k.split("_")[2], int(k.split("_")[4])) for k in keys}  # kohya's own block index: split("_")[4]
    if name == "double indices":
        assert {i for kind, i in blocks if kind == "double"} == {0, 1, 8, 9, 10, 11, 12, 18}
        assert not any(kind == "single" for kind, _ in blocks)
    if name == "single indices":
        assert blocks == {("single", i) for i in (3, *range(30, 38))}
        assert keys[:2] == ["lora_unet_single_blocks_3_linear1", "lora_unet_single_blocks_3_linear2"]
    if name == "no modulation":
        assert not [k for k in keys if k.endswith(("_mod_lin", "_modulation_lin"))]
        assert "lora_unet_double_blocks_18_txt_attn_qkv" in keys


@pytest.mark.parametrize("selection, message", [
    ({"train_double_block_indices": "19"}, r"train_double_block_indices: block 19 does not exist; .* 0 to 18"),
    ({"train_single_block_indices": "30-38"}, r"block 38 does not exist; .* 0 to 37"),
])
def test_indices_beyond_the_models_blocks_are_refused_in_one_line(full_flux, selection, message):
    with pytest.raises(UserError, match=message):
        selected_keys(full_flux, **selection)


@pytest.mark.parametrize("override, message", [
    ("network.train_double_block_indices=0,x", r"'x' in '0,x' is neither an index nor a range"),
    ("network.train_single_block_indices=12-3", r"range '12-3' runs backwards"),
    ("network.train_blocks=joint", r"train_blocks"),
])
def test_bad_selections_are_refused_when_the_config_loads(tmp_path, flux_dev_dir, override, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message):
        load_config(make_style(tmp_path, flux_dev_dir), [*FLUX, override])


def test_a_selection_of_no_block_and_a_selection_on_a_unet_are_refused(tmp_path, flux_dev_dir):  # noqa: F811
    cfg = load_config(make_style(tmp_path, flux_dev_dir),
                      [*FLUX, "network.train_blocks=double", "network.train_double_block_indices=none"])
    with pytest.raises(UserError, match="select no transformer block"):
        Trainer(cfg, log=lambda m: None)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**MINI_UNET)
    with pytest.raises(UserError, match="this base is a U-Net: leave them at their defaults"):
        inject(unet, None, NetworkConfig(train_text_encoder=False, train_modulation=False))


def test_the_selection_is_written_to_ss_network_args_as_kohya_spells_it(tmp_path, flux_dev_dir):  # noqa: F811
    import json

    cfg = load_config(make_style(tmp_path, flux_dev_dir), [*FLUX, "network.train_double_block_indices=0,1",
                                                           "network.train_modulation=false"])
    base = {"family": "flux1_dev", "prediction_type": "flow", "name": "flux", "model_hash": ""}
    meta = adapter_metadata(cfg, base, {"num_train_images": 4, "num_epochs": 1, "epoch": 1, "steps": 1})
    args = json.loads(meta["ss_network_args"])
    assert args == {"train_double_block_indices": "0,1", "img_mod_dim": "0", "txt_mod_dim": "0", "single_mod_dim": "0"}


def test_import_kohya_maps_lora_flux_block_selection():
    import tomllib

    from sdlora.presets.kohya import import_kohya

    mapped = []
    text = import_kohya(['flux_train_network.py --network_dim 4 --network_args "train_blocks=single" '
                         '"train_double_block_indices=0" "train_single_block_indices=0,1,8-12" '
                         '"img_mod_dim=0" "txt_mod_dim=0" "single_mod_dim=0"'], log=mapped.append)
    network = tomllib.loads(text)["network"]
    assert network == {"dim": 4, "train_blocks": "single", "train_double_block_indices": "0",  # "0" is block 0
                       "train_single_block_indices": "0,1,8-12", "train_modulation": False}
    text = import_kohya(['flux_train_network.py --network_args "img_mod_dim=0"'], log=mapped.append)
    assert "train_modulation" not in text and any("img_mod_dim=0: sdlora drops" in m for m in mapped)


# ---------------------------------------------------------------------------------------------
# Kinds: train, export, apply back


KINDS = {"lora": ["network.type=lora"], "locon": ["network.type=locon"], "loha": ["network.type=loha"],
         "lokr": ["network.type=lokr"], "dora": ["network.type=lora", "network.dora=true"]}


def train_a_few_steps(tmp_path, base_dir, overrides, steps: int = 3) -> Trainer:
    cfg = load_config(make_style(tmp_path, base_dir, extra="unet_lr = 1e-2"), [*FLUX, *overrides])
    trainer = Trainer(cfg, log=lambda m: None)
    losses = repeat_batch(trainer, next(iter(trainer.loader)), steps)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    return trainer


def trained_changes(transformer) -> dict[str, torch.Tensor]:
    """{diffusers path: W - W0} of every adapted Linear, as peft itself merges the adapter (DoRA included)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(transformer)
    changes = {}
    for path, layer in merged.named_modules():
        if isinstance(layer, BaseTunerLayer):
            before = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=[ADAPTER_NAME])
            changes[path] = layer.get_base_layer().weight.detach() - before
    return changes


def lycoris_change(module: dict[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """A file module's weight change as LyCORIS computes it (its functional LoHa / LoKr / LoRA weight,
    scaled alpha / rank; DoRA: weight_decompose per output row, minus W0)."""
    alpha = float(module["alpha"])
    if "hada_w1_a" in module:
        delta = lycoris_loha.diff_weight(module["hada_w1_b"], module["hada_w1_a"], module["hada_w2_b"],
                                         module["hada_w2_a"], None, None, gamma=alpha / module["hada_w1_b"].shape[0],
                                         backend="torch")
    elif any(k.startswith("lokr_") for k in module):
        # functional.lokr divides gamma by the rank of the low-rank factor itself (scale 1 without one)
        delta = lycoris_lokr.diff_weight(*(module.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                                                                     "lokr_w2_a", "lokr_w2_b", "lokr_t2")),
                                         gamma=alpha, backend="torch")
    else:
        delta = alpha / module["lora_down.weight"].shape[0] * module["lora_up.weight"] @ module["lora_down.weight"]
    if "dora_scale" in module:
        return lycoris_general.weight_decompose(base + delta, module["dora_scale"], wd_on_out=True,
                                                backend="torch") - base
    return delta


COMFY_OFFSETS = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "attn.add_q_proj": 0, "attn.add_k_proj": 1,
                 "attn.add_v_proj": 2, "proj_mlp": 3}  # x H, comfy/utils.py flux_to_diffusers


def assert_comfy_patches_as_trained(base, originals, parts, tensors, changes, offsets) -> None:
    """Each module of the file (`tensors`), its change computed by LyCORIS (`lycoris_change`) and patched onto
    the `base` transformer's weights as ComfyUI patches them, equals the trained change of each diffusers
    Linear (`changes`): a module named as the original (`originals`) changes the whole original weight (its
    (shift, scale) halves exchanged where the original's order differs), one of `parts` (ComfyUI's
    `lora_transformer_<diffusers path>`) the part's rows at `offsets[its path in the block]` x hidden (0 when
    absent: the whole weight, ComfyUI's swap_scale_shift applied to the change) and nothing else."""
    modules = {k.split(".", 1)[0] for k in tensors}
    grouped = {k: {s.split(".", 1)[1]: t for s, t in tensors.items() if s.split(".", 1)[0] == k} for k in modules}
    hidden = base.config.num_attention_heads * base.config.attention_head_dim
    for key, module in grouped.items():
        if key in parts:
            original, part = parts[key]
            w0 = torch.cat([base.get_submodule(p).weight for p in original.paths]).detach()
            offset = offsets.get(part.split(".", 2)[2], 0) * hidden
            rows = base.get_submodule(part).weight.shape[0]
            patched = w0.clone()
            patched.narrow(0, offset, rows).add_(lycoris_change(module, w0.narrow(0, offset, rows)))
            want = {part: changes[part]}
            got = {part: (patched - w0).narrow(0, offset, rows)}
            assert not torch.cat([(patched - w0)[:offset], (patched - w0)[offset + rows:]]).any()
        else:
            original = originals[key]
            w0 = torch.cat([base.get_submodule(p).weight for p in original.paths]).detach()
            if original.swap_halves:  # the original's rows are (shift, scale), diffusers' (scale, shift)
                w0 = torch.cat(w0.chunk(2)[::-1])
            change = lycoris_change(module, w0)
            if original.swap_halves:
                change = torch.cat(change.chunk(2)[::-1])
            want = {p: changes[p] for p in original.paths}
            got = dict(zip(original.paths, change.split(transformer_keys.output_sizes(base, original))))
        for p in want:
            assert torch.allclose(got[p], want[p], atol=1e-5), (key, p)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_trains_exports_in_names_others_read_and_applies_back_exactly(tmp_path, flux_dev_dir, kind):  # noqa: F811
    from diffusers import FluxTransformer2DModel

    assert_kind_trains_exports_and_applies_back(
        tmp_path, flux_dev_dir, kind, FluxTransformer2DModel, transformer_keys.FLUX_NAMES,
        "lora_unet_double_blocks_0_img_attn_qkv", COMFY_OFFSETS, "networks.lora_flux")


def assert_kind_trains_exports_and_applies_back(tmp_path, base_dir, kind, transformer_class, names, qkv_key,
                                                comfy_offsets, kohya_network,
                                                untrained=lambda transformer: set()) -> tuple[set, dict]:
    """`kind` trained a few steps on the base in `base_dir` changes every adapted Linear (but the paths
    `untrained(transformer)` names); its Kohya file (`names`) holds the original modules, or for a LoKr ComfyUI's
    per-part names of each fused or (shift, scale)-exchanged one; the fused `qkv_key` of a LoHa / DoRA stacks
    its three parts; the file patched as ComfyUI patches it (`comfy_offsets`) and applied back by our engine and
    the sampler changes each Linear by its trained change, the metadata names `kohya_network` for LoRA / LoCon.
    Returns (the file's module names, the transformer's Kohya modules) for the family's own checks."""
    trainer = train_a_few_steps(tmp_path, base_dir, KINDS[kind])
    transformer = trainer.base.unet
    changes = trained_changes(transformer)
    skipped = untrained(transformer)
    assert changes and all(c.abs().max() > 0 for p, c in changes.items() if p not in skipped), "every Linear trained"
    path = tmp_path / "adapter.safetensors"
    save_file(trainer.network.kohya_state_dict(torch.float32), str(path))
    tensors = load_file(str(path))
    modules = {k.split(".", 1)[0] for k in tensors}

    # The layout: kohya's names with fused qkv (linear1) where the kind stacks rows exactly, a modulation in the
    # original's (shift, scale) order (SD3's last context block; FLUX.1 has none); a LoKr of those is written
    # per diffusers part under ComfyUI's names (a Kronecker product per part does not stack into one, nor
    # exchange its halves).
    originals = transformer_keys.kohya_modules(transformer, names)
    rearranged = {k: m for k, m in originals.items() if len(m.paths) > 1 or m.swap_halves}
    parts = {f"lora_transformer_{p.replace('.', '_')}": (m, p) for m in rearranged.values() for p in m.paths}
    if kind == "lokr":
        assert modules == (set(originals) - set(rearranged)) | set(parts)
    else:
        assert modules == set(originals)
        qkv = {name.split(".", 1)[1]: t for name, t in tensors.items() if name.startswith(f"{qkv_key}.")}
        if kind == "loha":  # block-diagonal w1_a / w2_a: rank 3 x dim, alpha 3 x alpha, the same scale
            assert qkv["hada_w1_a"].shape == (3 * 32, 3 * 4) and qkv["hada_w1_b"].shape == (3 * 4, 32)
            assert float(qkv["alpha"]) == 3 * 2
        if kind == "dora":
            assert qkv["dora_scale"].shape == (3 * 32, 1)

    # Each module's change, computed from the file by LyCORIS and patched as ComfyUI patches it (the whole
    # original weight, or the part's rows of it), equals the trained change of each diffusers Linear.
    base = transformer_class.from_pretrained(base_dir, subfolder="transformer")
    assert_comfy_patches_as_trained(base, originals, parts, tensors, changes, comfy_offsets)

    assert_applies_back_as_trained(trainer, base, path, tensors, changes, kind, kohya_network)
    return modules, originals


def assert_applies_back_as_trained(trainer, base, path, tensors, changes, kind, kohya_network) -> None:
    """The exported file at `path` (its `tensors`) applied by our engine to a fresh `base` transformer, and by
    the sampler to its pipeline, changes each diffusers Linear by its trained change (`changes`), and close
    restores it; the metadata names kohya's or LyCORIS's network; read back into the network it gives the
    same file (resume, init_weights)."""
    # Our one engine applies the file back: each diffusers Linear changes by the trained change.
    w0 = {p: base.get_submodule(p).weight.detach().clone() for p in changes}
    assert apply.merge_files({"unet": base}, [(path, 1.0)]) == {str(path): len(changes)}
    for p, change in changes.items():
        assert torch.allclose(base.get_submodule(p).weight - w0[p], change, atol=1e-5), p

    # Sampling applies it the same way: the pipeline's transformer changes by the trained change, and back.
    sampler = Sampler(trainer.cfg)
    sampled = sampler.pipe.transformer
    w0 = {p: sampled.get_submodule(p).weight.detach().clone() for p in changes}
    sampler.adapters.add(path)
    sampler.adapters.set_scale(1.0)
    for p, change in changes.items():
        assert torch.allclose(sampled.get_submodule(p).weight - w0[p], change, atol=1e-5), p
    sampler.adapters.close()
    assert all(torch.equal(sampled.get_submodule(p).weight, w0[p]) for p in changes)

    meta = adapter_metadata(trainer.cfg, trainer.base, {"num_train_images": 4, "num_epochs": 1, "epoch": 1, "steps": 3})
    lycoris = kind in ("loha", "lokr", "dora")  # LyCORIS's algorithms; LoRA and LoCon are kohya's own network
    assert meta["ss_network_module"] == ("lycoris.kohya" if lycoris else kohya_network)

    # resume / init_weights: the file read back into the network gives the same file
    network = trainer.network
    with torch.no_grad():
        for param in network.trainable_parameters():
            param.zero_()
    network.load_kohya_state_dict(tensors)
    again = network.kohya_state_dict(torch.float32)
    assert again.keys() == tensors.keys()
    assert all(torch.allclose(again[k], tensors[k]) for k in tensors)


def test_a_lokr_file_with_a_fused_module_is_refused_in_one_line(full_flux):
    originals = transformer_keys.kohya_modules(full_flux, transformer_keys.FLUX_NAMES)
    lokr = {"lokr_w1": torch.zeros(4, 4), "lokr_w2": torch.zeros(2304, 768)}
    with pytest.raises(UserError, match="lora_unet_double_blocks_0_img_attn_qkv: a LoKr module on a fused Linear"):
        transformer_keys.split_modules(full_flux, originals, {"lora_unet_double_blocks_0_img_attn_qkv": lokr})
    assert kinds.module_kind(lokr) == "lokr"
