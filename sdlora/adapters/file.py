"""Adapter files: the one reader every command goes through, the checks that refuse an unusable
file with one line naming it, the atomic writer with Kohya's hashes, and A1111's hashes.

Kohya and LyCORIS files load as they are; diffusers/peft files are renamed to Kohya's keys
(`keys.to_kohya_names`). `sshs_model_hash` is sha256 of the tensor-data bytes (formats.md).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import torch

from sdlora.adapters import keys, kinds
from sdlora.errors import UserError
from sdlora.io import atomic_write_bytes, refuse_to_overwrite


def _data_section(serialized: bytes) -> bytes:
    """The tensor bytes of a serialized safetensors file: after the 8-byte length and the JSON header."""
    (header_len,) = struct.unpack("<Q", serialized[:8])
    return serialized[8 + header_len:]


def parse_adapter_arg(text: str) -> tuple[Path, float | None]:
    """FILE[:SCALE] -> (path, scale or None); a Windows drive colon or a colon in the file name
    stays part of the path."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), None


def save_adapter(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool = False) -> str:
    """Write the adapter atomically, with `sshs_model_hash` and `sshs_legacy_hash`; return the first.

    The hash is Kohya's / A1111's "addnet" hash: sha256 of the tensor-data bytes. That section
    does not depend on the header, so it is taken from a first serialisation without the hash.
    """
    from safetensors.torch import save

    path = Path(path)
    refuse_to_overwrite(path, overwrite, "pass --overwrite (sdlora train: set train.overwrite = true)")
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"safetensors metadata values must be strings: {bad}")
    broken = non_finite_modules(tensors)
    if broken:
        raise UserError(f"{path}: not written: {len(broken)} adapter modules hold NaN or infinite values "
                        f"(e.g. {next(iter(broken))}); the weights diverged, see the training message")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    training_only = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    model_hash = hashlib.sha256(_data_section(training_only)).hexdigest()
    # sd-webui-additional-networks' legacy hash, as kohya computes it: 64 KiB at 1 MiB into the
    # file written with the ss_* metadata only (a smaller file hashes the empty string).
    legacy_hash = hashlib.sha256(training_only[0x100000:0x110000]).hexdigest()[:8]
    serialized = save(tensors, metadata={**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash})
    atomic_write_bytes(path, serialized)
    return model_hash


def addnet_hash(path) -> str:
    """sha256 (hex) of a safetensors file's tensor-data bytes, computed from the file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + header_len)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def short_hash(path) -> str:
    """The 12 hex digits A1111 writes in "Lora hashes": `sshs_model_hash` when the file has one
    (A1111 reads it first), else the addnet hash of the file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        stored = (f.metadata() or {}).get("sshs_model_hash")
    return (stored or addnet_hash(path))[:12]


def read_adapter(path, allow_non_finite: bool = False, log=print) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(Kohya-named tensors, metadata) of an adapter file, with a clear error for anything else.

    Kohya and LyCORIS files load as they are; diffusers/peft files are renamed to Kohya's keys
    (`keys.to_kohya_names`), and bundled embeddings are left out; `log` gets a note for either.
    Every command that takes an adapter reads it here, so an unusable one (`check_adapter`) is
    refused everywhere; `inspect` alone reads NaN/inf values, to report them.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: adapter file not found")
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise UserError(f"{path}: pickled adapters are not read (they can run code); convert it to .safetensors")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable .safetensors file ({e})") from None
    tensors, notes = keys.to_kohya_names(tensors, metadata)
    for note in notes:
        log(f"note: {path.name}: {note}")
    prefixes = tuple(p + "_" for p in keys.PREFIXES.values())
    foreign = [k for k in tensors if not k.startswith(prefixes)]
    if not tensors or len(foreign) == len(tensors):
        raise UserError(f"{path}: no LoRA keys in Kohya (lora_unet_*, lora_te_*), diffusers or peft style "
                        f"(e.g. {foreign[:2]}); is it an adapter file?")
    if foreign:
        raise UserError(f"{path}: {len(foreign)} tensors outside the Kohya LoRA keys, e.g. {foreign[:3]}")
    check_adapter(path, tensors, allow_non_finite)
    return tensors, metadata


def diffusers_names_of(path) -> dict[str, str]:
    """{kohya key: diffusers module name} of an adapter file in diffusers' own key style (`keys.diffusers_module_names`,
    from its header alone); {} for any other style."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return keys.diffusers_module_names(f.keys())


def non_finite_modules(tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """{module key: [suffixes of its tensors holding NaN or infinity]}, for modules that have any."""
    broken: dict[str, list[str]] = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            key, _, suffix = name.partition(".")
            broken.setdefault(key, []).append(suffix)
    return broken


def check_adapter(path, tensors: dict[str, torch.Tensor], allow_non_finite: bool = False) -> None:
    """One line naming the file for what no command can use: NaN/inf values (a diverged
    training), factors whose ranks disagree, an alpha that is not one number."""
    for name, tensor in tensors.items():
        if name.endswith(".alpha") and tensor.numel() != 1:
            raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}; alpha must be one number: "
                            f"the file is damaged or not a LoRA")
    for key, parts in keys.group_modules(tensors).items():
        for (a, axis_a), (b, axis_b) in kinds.rank_pairs(parts):
            if a in parts and b in parts and (parts[a].dim() <= axis_a or parts[b].dim() <= axis_b
                                              or parts[a].shape[axis_a] != parts[b].shape[axis_b]):
                raise UserError(f"{path}: {key}: {a} {tuple(parts[a].shape)} and {b} {tuple(parts[b].shape)} "
                                f"disagree on the rank; the file is damaged")
    broken = {} if allow_non_finite else non_finite_modules(tensors)
    if broken:
        raise UserError(f"{path}: {len(broken)} modules hold NaN or infinite values (e.g. {next(iter(broken))}); "
                        f"the adapter is unusable (its training diverged): use an earlier epoch file or retrain "
                        f"with a lower learning rate. `sdlora inspect` lists the modules")
