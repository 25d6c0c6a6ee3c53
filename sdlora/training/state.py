"""Training state as data: tensors in a safetensors file, everything else as JSON in its header.

A state is a tree of dicts, lists, tuples, numbers, strings, None and tensors (the adapter,
the optimizer's and the scheduler's state dicts, RNG states, counters, losses). `save_state`
moves every tensor into the safetensors body under its path in the tree and writes the rest
of the tree as JSON (header key "sdlora_state"); `load_state` puts them back together. One
file, written atomically, so a kill leaves the previous state whole. Reading it runs no code:
safetensors and json parse data only, where `torch.load` of a pickle can execute anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdlora.io import atomic_save_file

STATE_FILE = "training_state.safetensors"  # in <output.dir>/state/
OLD_STATE_FILE = "training_state.pt"  # sdlora before 0.2: a pickle, never read
FORMAT = "sdlora-training-state/1"
_KEY = "sdlora_state"


class DamagedState(ValueError):
    """The file is not a readable training state (truncated, edited, or another format)."""


def _encode(obj, path: str, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()  # clone: no shared storage in the file
        return {"tensor": path}
    if isinstance(obj, dict):
        return {"dict": [[k, _encode(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state: {path} is a {type(obj).__name__}, which is not data")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        (kind, value), = obj.items()
        if kind == "tensor":
            return tensors[value]
        if kind == "tuple":
            return tuple(_decode(v, tensors) for v in value)
        if kind == "dict":
            return {k: _decode(v, tensors) for k, v in value}
        raise DamagedState(f"unknown entry {kind!r}")
    return obj


def save_state(state: dict, path: str | Path) -> None:
    """Write `state` atomically; a NaN or infinity outside the tensors is a bug and raises ValueError."""

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors)
    header = json.dumps({"format": FORMAT, "state": tree}, allow_nan=False)
    atomic_save_file(tensors, path, metadata={_KEY: header})


def load_state(path: str | Path) -> dict:
    """The state saved by `save_state`; DamagedState for anything else."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            header = json.loads((f.metadata() or {})[_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if header.get("format") != FORMAT:
            raise DamagedState(f"format {header.get('format')!r}, expected {FORMAT!r}")
        return _decode(header["state"], tensors)
    except DamagedState:
        raise
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DamagedState(f"{type(e).__name__}: {e}") from None
