"""`sdlora convert`: an adapter file with any key names written with Kohya's, the names A1111,
Forge, ComfyUI and kohya's loaders read, or with diffusers' own (`format = "diffusers"`, what
`load_lora_weights` of diffusers' pipelines reads natively). A key-format job: every module's weight
change is kept exactly (a fused FLUX.1 / SD3 module is split or joined, `transformer_keys`)."""

from __future__ import annotations

from pathlib import Path

from sdlora.adapters import keys, kinds, transformer_keys
from sdlora.adapters.file import read_adapter, save_adapter
from sdlora.adapters.network import network_fields, one_or_dynamic
from sdlora.config import ADAPTER_FORMATS
from sdlora.errors import UserError
from sdlora.io import refuse_to_overwrite
from sdlora.models.load import model_skeleton


def convert(src, dst, overwrite: bool = False, output_format: str = "kohya", base=None) -> dict[str, str]:
    """Write the adapter `src` (Kohya, LyCORIS, diffusers, peft, OneTrainer or ai-toolkit keys) as a
    `output_format`-named file `dst`.

    Tensors are those `file.read_adapter` gives every command (bundled embeddings left out);
    diffusers' own header keys are dropped, and a file without Kohya metadata gets the
    network fields A1111 reads (module, dim, alpha, output name). `base` (a diffusers folder, read
    without its weights, or any base) names the modules: the diffusers format needs it (Kohya's keys
    do not say where "_" was "."), and so does a FLUX.1 / SD3 file on diffusers' modules written as Kohya's
    (their fused modules). Returns the metadata written.
    """
    src, dst = Path(src), Path(dst)
    if output_format not in ADAPTER_FORMATS:
        raise UserError(f"convert: --format {output_format!r}: choose {' or '.join(ADAPTER_FORMATS)}")
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
    if base is None:
        if output_format == "diffusers":
            raise UserError(f"convert {src}: --format diffusers needs --base (the base's diffusers folder, whose "
                            f"module paths the diffusers keys name)")
        on_diffusers_modules = _transformer_parts(groups)
        if on_diffusers_modules:
            raise UserError(f"convert {src}: {len(on_diffusers_modules)} modules are on a FLUX.1 / SD3 transformer's "
                            f"diffusers modules (e.g. {on_diffusers_modules[0]}); give --base (the base's diffusers "
                            f"folder) to write them as Kohya's fused modules")
    else:
        models, denoiser_component = model_skeleton(base)
        parts = keys.model_parts(models)
        if output_format == "diffusers":
            tensors = keys.to_diffusers_names(tensors, parts, denoiser_component)
            metadata["format"] = "pt"  # what diffusers' own files carry
        else:
            tensors = _kohya_names(tensors, parts)
    save_adapter(dst, tensors, metadata, overwrite=overwrite)
    return metadata


def _transformer_parts(groups: dict) -> list[str]:
    """Keys of modules on a FLUX.1 / SD3 transformer's diffusers modules: inside its diffusers block lists."""
    prefixes = tuple(f"{transformer_keys.UNET_PREFIX}_{ours}_" for names in transformer_keys.NAMES_BY_CLASS.values()
                     for _, ours, _ in names.blocks)
    return [key for key in groups if key.startswith(prefixes)]


def _kohya_names(tensors: dict, parts: dict) -> dict:
    """A transformer's modules on diffusers' modules joined into the original's, as kohya names them."""
    names = transformer_keys.names_of(parts["unet"])
    if names is None:
        return tensors
    originals = transformer_keys.kohya_modules(parts["unet"], names, outer=True)
    modules = transformer_keys.fuse_modules(parts["unet"], originals, keys.group_modules(tensors))
    return {f"{key}.{suffix}": t for key, module in modules.items() for suffix, t in module.items()}
