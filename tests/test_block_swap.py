"""[train] blocks_to_swap (`models.blockswap`): the swapped blocks' frozen weights leave the model's
tensors between their forward and their backward, so the bytes the model holds on its device peak
lower by about those blocks' bytes, while losses, adapter gradients and trained weights stay bitwise
the same, with and without gradient checkpointing, in the block-level API and in `sdlora train`.

On the CPU the device copy of a block is the offload copy itself, so what is measured is the bytes
that the model's parameters and buffers hold (an evicted tensor holds an empty placeholder) plus the
copies in flight (prefetched, not yet in): what a GPU would hold of the model."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from test_flux_train import FLUX
from test_train import make_style

from sdlora.config import load_config
from sdlora.errors import ConfigError, UserError
from sdlora.models import blockswap
from sdlora.models.families import FAMILIES
from sdlora.tiny.configs import MINI_FLUX_TRANSFORMER, build_flux_pipeline
from sdlora.training.loop import Trainer

# 4 double + 6 single blocks: kohya's limit (two blocks of each list stay) allows blocks_to_swap <= 4
SWAP_FLUX = dict(MINI_FLUX_TRANSFORMER, num_layers=4, num_single_layers=6)
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
    (losses, tensors), (losses_s, tensors_s) = results
    assert losses_s == losses and len(losses) == 3
    assert tensors_s.keys() == tensors.keys() and all(torch.equal(tensors_s[k], tensors[k]) for k in tensors)
