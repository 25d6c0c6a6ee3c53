"""Block swapping, kohya's `blocks_to_swap`: some of a transformer's blocks keep their frozen weights
off the accelerator and bring them in for their forward and backward only.

The family says which blocks (`Family.swap_blocks`: FLUX.1's double and single blocks, split as
kohya splits them; SD3.5's joint blocks); the last ones of each list are swapped. What moves is a
block's frozen tensors (the base's weights and biases, fp8 `qweight`s and their scales): the
adapters' parameters require grad, stay on the device and are the very tensors the optimizer holds.

Each frozen tensor of a swapped block keeps its identity (the autograd graph and every module hold
it) while its storage changes, as kohya's `weight.data = ...` does:

    out   tensor.data = an empty placeholder on the device    the real values: the offload copy (CPU)
    in    tensor.data = offload copy .to(device)               (a fresh device tensor, dropped when out)

Frozen weights never change, so nothing is copied back (kohya swaps device buffers and must). The
schedule of one training step over the blocks in forward order 0 .. n-1:

    denoiser forward starts   every swapped block out
    block i forward           in (waits for its prefetch), prefetch the next swapped block; then out
    block i backward starts   in (prefetched), out: the later blocks whose backward is done,
                              prefetch the previous swapped block that awaits its backward

"block i backward starts" is the first gradient of one of its outputs (a multi-grad hook): autograd
runs a later block's nodes before an earlier block's (they were created later), so by then block
i + 1's backward is whole. Gradient checkpointing re-runs block i's forward inside that backward;
the hooks see the block already in its backward and leave it in. With CUDA the copies run on a side
stream and the compute stream waits for each block's copy only when the block runs; elsewhere they
are plain synchronous copies, with the same tensors and the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from sdlora.errors import UserError


def frozen_tensors(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """The block's tensors that do not train, as (module, name): its frozen parameters and its buffers
    (fp8 weights). Named, not held: `Module.to` replaces buffers by new tensors (parameters it keeps)."""
    seen, out = set(), []
    for module in block.modules():
        tensors = [(n, p) for n, p in module.named_parameters(recurse=False) if not p.requires_grad]
        for name, t in tensors + list(module.named_buffers(recurse=False)):
            if id(t) not in seen:
                seen.add(id(t))
                out.append((module, name))
    return out


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _output_tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _output_tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _output_tensors(o)]
    return []


class BlockSwap:
    """Swaps `swapped` (indices into `blocks`, the denoiser's blocks in forward order) between the
    CPU and `device` around their forward and backward, see the module docstring."""

    def __init__(self, denoiser: nn.Module, blocks: list[nn.Module], swapped: list[int], device):
        self.blocks, self.swapped = blocks, sorted(swapped)
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.frozen = {i: frozen_tensors(blocks[i]) for i in self.swapped}
        # the real values of each swapped tensor: pinned host memory with CUDA, so copies run asynchronously
        self.offload = {i: [getattr(*named).detach().to("cpu") for named in self.frozen[i]] for i in self.swapped}
        if cuda:
            self.offload = {i: [t.pin_memory() for t in copies] for i, copies in self.offload.items()}
        self.resident: set[int] = set()
        self.pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.phase = ["idle"] * len(blocks)  # idle | forward (its backward to come) | backward
        for i in self.swapped:
            self._out(i)
        self.handles = [denoiser.register_forward_pre_hook(lambda module, args: self.start_pass())]
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(lambda module, args, i=i: self._before_forward(i)))
            self.handles.append(block.register_forward_hook(lambda module, args, out, i=i: self._after_forward(i, out)))

    def swapped_bytes(self) -> int:
        """The bytes of the swapped blocks' frozen tensors: what no longer stays on the device."""
        return sum(tensor_bytes(copies) for copies in self.offload.values())

    # -- moving one block
    def _prefetch(self, i: int) -> None:
        """Start copying block i's frozen tensors to the device (no-op when in or on its way)."""
        if i in self.resident or i in self.pending:
            return
        if self.stream is None:
            self.pending[i] = ([t.to(self.device) for t in self.offload[i]], None)
            return
        # the source is pinned host memory that never changes and the target is fresh: nothing to wait for
        with torch.cuda.stream(self.stream):
            copies = [t.to(self.device, non_blocking=True) for t in self.offload[i]]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[i] = (copies, event)

    def _in(self, i: int) -> None:
        if i in self.resident:
            return
        self._prefetch(i)
        copies, event = self.pending.pop(i)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for c in copies:  # allocated on the side stream, used on this one: freed only after its work
                c.record_stream(compute)
        for named, c in zip(self.frozen[i], copies):
            getattr(*named).data = c
        self.resident.add(i)

    def _out(self, i: int) -> None:
        for named in self.frozen[i]:
            t = getattr(*named)
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        self.resident.discard(i)

    # -- the hooks
    def start_pass(self) -> None:
        """A new forward of the denoiser: every swapped block out (the last backward leaves its first in)."""
        for i in list(self.pending):
            self._in(i)
        for i in self.swapped:
            self._out(i)
        self.phase = ["idle"] * len(self.blocks)

    def _before_forward(self, i: int) -> None:
        if i in self.frozen:
            self._in(i)
        if self.phase[i] != "backward":  # not a checkpoint's recomputation
            later = [j for j in self.swapped if j > i]
            if later:
                self._prefetch(later[0])

    def _after_forward(self, i: int, output) -> None:
        if self.phase[i] == "backward":  # recomputed inside its backward: stays in for it
            return
        needs_grad = [t for t in _output_tensors(output) if t.requires_grad]
        if needs_grad and torch.is_grad_enabled():
            self.phase[i] = "forward"
            torch.autograd.graph.register_multi_grad_hook(needs_grad, lambda grad, i=i: self._before_backward(i),
                                                          mode="any")
        if i in self.frozen:
            self._out(i)

    def _before_backward(self, i: int) -> None:
        self.phase[i] = "backward"
        for j in [j for j in self.resident if j > i and self.phase[j] == "backward"]:
            self._out(j)  # its backward is done
        if i in self.frozen:
            self._in(i)
        earlier = [j for j in self.swapped if j < i and self.phase[j] == "forward"]
        if earlier:
            self._prefetch(earlier[-1])

    def remove(self) -> None:
        """Every block back to its real values on the CPU, the hooks removed."""
        for h in self.handles:
            h.remove()
        self.pending.clear()
        for i in self.swapped:
            for named, c in zip(self.frozen[i], self.offload[i]):
                getattr(*named).data = c
        self.resident.clear()


def swap_plan(groups: list[tuple[list[nn.Module], int]]) -> tuple[list[nn.Module], list[int]]:
    """(all blocks in forward order, the indices of the swapped ones: the last `n` of each group)."""
    blocks, swapped = [], []
    for group, n in groups:
        swapped += range(len(blocks) + len(group) - n, len(blocks) + len(group))
        blocks += group
    return blocks, swapped


def most_blocks_to_swap(family, denoiser) -> int:
    """The largest blocks_to_swap the family's split allows: two blocks of each list stay on the device
    (kohya's limit; its offloader needs them)."""
    n = 0
    while all(k <= len(group) - 2 for group, k in family.swap_blocks(denoiser, n + 1)):
        n += 1
    return n


def enable(family, denoiser, blocks_to_swap: int, device, where: str) -> BlockSwap | None:
    """[train] blocks_to_swap on the family's denoiser (before it moves to the device: the swapped
    blocks never arrive there whole); None when 0. A U-Net family, or more blocks than the family's
    split leaves room for, is refused in one line."""
    if not blocks_to_swap:
        return None
    if not family.swap_blocks(denoiser, blocks_to_swap):
        raise UserError(f"{where}: [train] blocks_to_swap = {blocks_to_swap}: {family.title} has no transformer "
                        "blocks to swap (block swapping is for FLUX.1 and SD3.5); set blocks_to_swap = 0")
    most = most_blocks_to_swap(family, denoiser)
    if blocks_to_swap > most:
        raise UserError(f"{where}: [train] blocks_to_swap = {blocks_to_swap} is more than this {family.title} "
                        f"transformer can swap: at most {most} (two blocks of each block list stay on the device)")
    blocks, swapped = swap_plan(family.swap_blocks(denoiser, blocks_to_swap))
    return BlockSwap(denoiser, blocks, swapped, device)
