"""`sdlora convert`: an adapter file with any key names written with Kohya's, the names A1111,
Forge and ComfyUI load (a key-format job: no weight is changed)."""

from __future__ import annotations

from pathlib import Path

from sdlora.adapters import keys, kinds
from sdlora.adapters.file import read_adapter, save_adapter
from sdlora.adapters.network import network_fields, one_or_dynamic
from sdlora.io import refuse_to_overwrite


def convert(src, dst, overwrite: bool = False) -> dict[str, str]:
    """Write the adapter `src` (Kohya, LyCORIS, diffusers or peft keys) as a Kohya-named file `dst`.

    Tensors are those `file.read_adapter` gives every command (bundled embeddings left out);
    diffusers' own header keys are dropped, and a file without Kohya metadata gets the
    network fields A1111 reads (module, dim, alpha, output name). Returns the metadata written.
    """
    src, dst = Path(src), Path(dst)
    refuse_to_overwrite(dst, overwrite)
    tensors, metadata = read_adapter(src)
    metadata = {k: v for k, v in metadata.items()
                if k not in ("lora_adapter_metadata", "format", "sshs_model_hash")}  # save_adapter hashes anew
    groups = keys.group_modules(tensors)
    if "ss_network_module" not in metadata:
        algos = sorted({kinds.module_kind(parts) for parts in groups.values()})
        lycoris = not all(kinds.is_plain_lora(parts) for parts in groups.values())
        algo = (algos[0] if len(algos) == 1 else "locon") if lycoris else None
        ranks = [kinds.module_rank(parts) or 0 for parts in groups.values()]
        alphas = [round(kinds.module_scale(parts) * (kinds.module_rank(parts) or 1), 6) for parts in groups.values()]
        metadata |= network_fields(one_or_dynamic(ranks), one_or_dynamic(alphas, "{:g}".format), algo,
                                   dora=any(kinds.has_dora(parts) for parts in groups.values()))
    metadata.setdefault("ss_output_name", dst.stem)
    save_adapter(dst, tensors, metadata, overwrite=overwrite)
    return metadata
