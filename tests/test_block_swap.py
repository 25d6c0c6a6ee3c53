"""[train] blocks_to_swap (`models.blockswap`): the swapped blocks' frozen weights leave the model's
tensors between their forward and their backward, so the bytes the model holds on its device peak
lower by about those blocks' bytes, while losses, adapter gradients and trained weights stay bitwise
the same, with and without gradient checkpointing, in the block-level API and in `sdlora train`.

On the CPU the device copy of a block is the offload copy itself, so what is measured is the bytes
that the model's parameters and buffers hold (an evicted tensor holds an empty placeholder) plus the
copies in flight (prefetched, not yet in): what a GPU would hold of the model."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_flux_train import FLUX
from test_train import make_style

from sdlora.bench import memory, parts
from sdlora.config import NetworkConfig, load_config
from sdlora.errors import ConfigError, UserError
from sdlora.models import blockswap
from sdlora.models.families import FAMILIES
from sdlora.tiny.configs import build_flux_pipeline
from sdlora.training.loop import Trainer
from sdlora.training.stats import config_hash

FULL_FLUX, FULL_SD35_MEDIUM = memory.FULL_TRANSFORMERS
# 4 double + 6 single blocks: kohya's limit (two blocks of each list stay) allows blocks_to_swap <= 4
SWAP_FLUX = FULL_FLUX.reduced
FLUX_DEV = FAMILIES["flux1_dev"]


def _resident_bytes(model, swap) -> int:
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return held + (sum(blockswap.tensor_bytes(copies) for copies, _ in swap.pending.values()) if swap else 0)


def _with_lora(seed: int = 0):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**SWAP_FLUX).requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                          "proj_mlp", "proj_out", "ff.net.2"]), model)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():  # lora_B starts at zero: random factors give every one a gradient
        if "lora_" in name:
            p.data = 0.1 * torch.randn(p.shape, generator=g)
    return model


def _train(model, blocks_to_swap: int, checkpointing: bool, steps: int = 2):
    """`steps` SGD steps of the LoRA factors; (losses, last gradients, trained factors, peak bytes, swap)."""
    swap = blockswap.enable(FLUX_DEV, model, blocks_to_swap, "cpu", "test.toml")
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    peak = [0]

    def measure(*_):
        peak[0] = max(peak[0], _resident_bytes(model, swap))

    def after(module, args, output):  # at each block's forward end and backward start
        measure()
        needs_grad = [t for t in output if t.requires_grad]
        if needs_grad and torch.is_grad_enabled():
            torch.autograd.graph.register_multi_grad_hook(needs_grad, measure, mode="any")

    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.register_forward_pre_hook(measure)
        block.register_forward_hook(after)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        out = model(hidden_states=torch.randn(1, 16, 64, generator=g),  # (B, 4x4 patches, 4 x 16 channels)
                    encoder_hidden_states=torch.randn(1, 8, SWAP_FLUX["joint_attention_dim"], generator=g),
                    pooled_projections=torch.randn(1, SWAP_FLUX["pooled_projection_dim"], generator=g),
                    timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                    guidance=torch.tensor([1.0])).sample
        loss = out.pow(2).mean()
        loss.backward()
        measure()
        losses.append(loss.item())
        grads = [p.grad.clone() for p in trainable]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # the optimizer updates the model's own adapter tensors, which never left
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in trainable]
    assert all(p.requires_grad and p.numel() for p in model.parameters() if p.requires_grad)
    return losses, grads, [p.detach().clone() for p in trainable], peak[0], swap


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapping_lowers_the_resident_peak_by_the_swapped_blocks_and_changes_no_number(checkpointing):
    model = _with_lora()
    losses, grads, weights, peak, _ = _train(copy.deepcopy(model), 0, checkpointing)
    losses_s, grads_s, weights_s, peak_s, swap = _train(copy.deepcopy(model), 4, checkpointing)

    assert losses_s == losses and len(grads_s) == len(grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads_s, grads))
    assert all(torch.equal(a, b) for a, b in zip(weights_s, weights))
    # kohya's split of 4: 2 double + 2 x 2 single blocks, the last of each list
    assert swap.swapped == [2, 3, 6, 7, 8, 9]
    swapped = swap.swapped_bytes()
    largest = max(blockswap.tensor_bytes(copies) for copies in swap.offload.values())
    assert peak == _resident_bytes(model, None)  # unswapped: the whole model, all the time
    # swapped: the rest of the model, plus the block running and the one on its way at most
    assert peak - swapped <= peak_s <= peak - swapped + 2 * largest
    assert peak_s < peak - swapped / 4


def test_a_removed_swap_gives_the_blocks_their_weights_back():
    model = _with_lora()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swap = blockswap.enable(FLUX_DEV, model, 2, "cpu", "test.toml")
    assert any(v.numel() == 0 for v in model.state_dict().values())  # out: empty placeholders
    swap.remove()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_what_cannot_swap_is_refused_in_one_line(tmp_path, mini_base_dir):
    model = _with_lora()
    with pytest.raises(UserError, match=r"test.toml: \[train\] blocks_to_swap = 5 is more .* at most 4"):
        blockswap.enable(FLUX_DEV, model, 5, "cpu", "test.toml")
    cfg = load_config(make_style(tmp_path, mini_base_dir, extra="blocks_to_swap = 2"))
    with pytest.raises(UserError, match="has no transformer blocks to swap"):
        Trainer(cfg, log=lambda m: None)
    with pytest.raises(ConfigError, match="blocks_to_swap = 2 cannot be combined with compile"):
        load_config(make_style(tmp_path, mini_base_dir, extra="blocks_to_swap = 2\ncompile = true"))


@pytest.fixture(scope="module")
def swap_flux_dir(tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    pipe = build_flux_pipeline(guidance=True)
    torch.manual_seed(0)
    pipe.register_modules(transformer=FluxTransformer2DModel(**SWAP_FLUX))
    folder = tmp_path_factory.mktemp("flux_swap")
    pipe.save_pretrained(folder)
    return folder


def test_sdlora_train_with_blocks_to_swap_writes_the_same_adapter(tmp_path, swap_flux_dir):
    results = []
    for n in (0, 3):
        run_dir = tmp_path / f"swap{n}"
        run_dir.mkdir()
        extra = f"max_train_steps = 3\nunet_lr = 1e-2\ngradient_checkpointing = true\nblocks_to_swap = {n}"
        cfg = load_config(make_style(run_dir, swap_flux_dir, extra=extra), FLUX)
        logs = []
        trainer = Trainer(cfg, log=logs.append)
        result = trainer.run()
        results.append((result.losses, load_file(result.adapter)))
        if n:
            assert trainer.block_swap.swapped == [3, 6, 7, 8, 9]  # 1 double + 2 x 2 single blocks
            assert any(line.startswith("block swap: 5 of 10 transformer blocks") for line in logs)
            last = trainer.base.unet.single_transformer_blocks[-1]  # out since its backward: only adapters held
            assert all(p.numel() == 0 for p in last.parameters() if not p.requires_grad)
            # the same adapter either way: `sdlora run` and --resume take a run with another blocks_to_swap
            unswapped = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, blocks_to_swap=0))
            assert config_hash(unswapped, trainer.data.dataset) == config_hash(cfg, trainer.data.dataset)
    (losses, tensors), (losses_s, tensors_s) = results
    assert losses_s == losses and len(losses) == 3
    assert tensors_s.keys() == tensors.keys() and all(torch.equal(tensors_s[k], tensors[k]) for k in tensors)


def test_the_memory_table_counts_weights_adapters_and_activations_on_the_meta_device():
    from diffusers import FluxTransformer2DModel

    tiny = dataclasses.replace(FULL_FLUX, config=SWAP_FLUX, text_tokens=8)
    rows = {(r["precision"], r["resolution"]): r for r in memory.memory_table(tiny, (64, 128), blocks_to_swap=2)}
    assert len(rows) == 2 * 2 * 2  # bf16 / fp8, each alone and with blocks_to_swap, at two resolutions

    model = _with_lora()  # the same architecture with real weights on the CPU, LoRA on other targets
    base_params = sum(p.numel() for p in FluxTransformer2DModel(**SWAP_FLUX).parameters())
    bf16, fp8 = rows[("bf16", 64)], rows[("fp8", 64)]
    assert bf16["frozen_gib"] * memory.GIB == 2 * base_params  # every base parameter in bf16
    assert 0.4 < fp8["frozen_gib"] / bf16["frozen_gib"] < 0.7  # Linear weights at 1 byte, the rest bf16
    # swapping takes off what the real swapper keeps on the CPU, less the two blocks in flight
    swap = blockswap.enable(FLUX_DEV, torch.nn.Module.to(model, torch.bfloat16), 2, "cpu", "test.toml")
    sizes = sorted(blockswap.tensor_bytes(c) for c in swap.offload.values())
    swapped = rows[("bf16 + blocks_to_swap 2", 64)]
    assert (bf16["frozen_gib"] - swapped["frozen_gib"]) * memory.GIB == sum(sizes) - sum(sizes[-2:]) > 0
    assert swapped["activations_gib"] == bf16["activations_gib"]  # swapping moves weights only
    network = memory.lora_on_meta(tiny.cls_name, tiny.config, NetworkConfig(train_text_encoder=False))[1]
    assert bf16["adapters_gib"] * memory.GIB == 16 * sum(p.numel() for p in network.trainable_parameters())
    big = rows[("bf16", 128)]  # 4x the image tokens
    assert big["activations_gib"] > 2 * bf16["activations_gib"]
    assert big["activations_checkpointed_gib"] < big["activations_gib"]


def test_a_cpu_step_of_a_flow_family_records_its_weights_and_trains():
    figures = parts.measured_cpu_step(FULL_FLUX, 64, reduced=True)
    assert figures["weights_gib"] > 0 and figures["step_extra_gib"] >= 0 and figures["loss"] > 0


@pytest.mark.slow
def test_full_flux_memory_table_and_one_training_step_on_the_meta_device():
    """FLUX.1-dev at its full 12B parameters on the meta device (no RAM): one LoRA step (forward, backward,
    AdamW) per precision and the README's memory table."""
    rows = memory.memory_table(FULL_FLUX)
    print("\n" + memory.markdown(rows))
    by = {(r["precision"], r["resolution"]): r for r in rows}
    assert 11.8e9 < by[("bf16", 1024)]["frozen_gib"] * memory.GIB / 2 < 12.0e9  # 11.9B parameters in bf16
    totals = [by[(p, 1024)]["total_checkpointed_gib"]
              for p in ("bf16", "bf16 + blocks_to_swap 16", "fp8", "fp8 + blocks_to_swap 16")]
    assert totals == sorted(totals, reverse=True)
    assert by[("fp8 + blocks_to_swap 16", 1024)]["total_checkpointed_gib"] < 12  # kohya's 12 GB advice holds


def _available_gib() -> float:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    return int(line.split()[1]) / 2**20


@pytest.mark.slow
def test_sd35_medium_bf16_training_step_on_the_cpu_records_its_peak():
    if FULL_SD35_MEDIUM.family not in FAMILIES:
        pytest.skip("the SD3.5 Medium family is not registered in this checkout")
    if _available_gib() < 16:
        pytest.skip("SD3.5 Medium in bf16 needs ~5 GB for its weights and more for the step")
    figures = parts.measured_cpu_step(FULL_SD35_MEDIUM, 256)
    print(f"\nSD3.5 Medium bf16, 256 px, one LoRA step on the CPU: {figures}")
    assert 4.0 < figures["weights_gib"] < 6.0 and figures["step_extra_gib"] > 0
