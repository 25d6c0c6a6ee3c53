"""`sdlora import-kohya SOURCE... -o NEW.toml`: a kohya-ss setup as an sdlora config.

Sources, in any combination: a kohya dataset config (`[general]`, `[[datasets]]`,
`[[datasets.subsets]]`), a train_network.py arguments file (`--config_file` TOML, or a
kohya_ss GUI `.json`), or a command line (`"accelerate launch train_network.py --network_dim 16
..."`). Names are looked up in `kohya_names.KOHYA_KEYS`; values kohya spells differently
(optimizer and scheduler names, `network_module` + `network_args`, "512,512" resolutions,
`network_train_unet_only`, ...) are converted here. Every mapping is printed, and so is every
argument that has no sdlora equivalent. Relative paths are made absolute from the current
folder, as kohya reads them.
"""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path

from .config import ConfigError, SUBSET_SHARED_KEYS, config_from_dict, describe, path_keys
from .errors import UserError
from .kohya_names import KOHYA_KEYS

OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "lion": "lion", "prodigy": "prodigy",
              "adafactor": "adafactor", "adamwschedulefree": "adamw_schedulefree",
              "schedulefree.adamwschedulefree": "adamw_schedulefree"}
SAMPLERS = {"ddim": "ddim", "euler": "euler", "k_euler": "euler", "euler_a": "euler_a", "k_euler_a": "euler_a",
            "dpmsolver++": "dpmpp_2m"}
NETWORK_TYPES = {"standard": "lora", "lora": "lora", "locon": "locon", "kohya locon": "locon",
                 "lycoris/locon": "locon", "loha": "loha", "lycoris/loha": "loha", "lokr": "lokr", "lycoris/lokr": "lokr"}
# model.base is a file, a folder or a hub id: made absolute only when it exists here.
PATH_KEYS = path_keys() | {"model.base"}
# kohya settings sdlora decides itself: converting them would change nothing.
NOT_NEEDED = {"v2": "the base model's family is read from the base itself",
              "sdxl": "the base model's family is read from the base itself",
              "logging_dir": "TensorBoard logs go to OUTPUT/logs",
              "save_model_as": "adapters are always .safetensors",
              "network_weights_dtype": "", "persistent_data_loader_workers": "", "max_data_loader_n_workers": "",
              "cache_latents": "latents are always cached on disk",
              "cache_latents_to_disk": "latents are always cached on disk"}


def parse_command_line(text: str) -> dict:
    """`[accelerate launch ...] train_network.py --a 1 --b=x --flag --list p q` -> {"a": "1", ...}.

    Arguments before the script (accelerate's own) are skipped; a flag alone is True; several
    values after one flag are a list (kohya's nargs="*" arguments such as network_args)."""
    tokens = shlex.split(text)
    script = next((i for i, t in enumerate(tokens) if t.endswith(".py")), -1)
    out: dict = {}
    key = None
    for token in tokens[script + 1:]:
        if token.startswith("--"):
            key, sep, value = token[2:].partition("=")
            out[key] = value if sep else True
        elif key is not None:
            current = out[key]
            out[key] = token if current is True else (current if isinstance(current, list) else [current]) + [token]
    return out


def read_source(source: str) -> tuple[dict, list[dict]]:
    """(train_network arguments, dataset-config subsets with their inherited keys) of one source."""
    path = Path(source)
    if not path.is_file():
        if "--" in source:
            return parse_command_line(source), []
        raise UserError(f"{source}: not a file, nor a command line with --arguments; give a kohya dataset "
                        "TOML, a train_network.py arguments file (.toml/.json) or a quoted command line")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text), []
        except ValueError as e:
            raise UserError(f"{path}: not valid JSON: {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    if "datasets" not in data and "general" not in data:
        return data, []
    general = data.get("general", {})
    args, subsets = dict(general), []
    for dataset in data.get("datasets", []):
        shared = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        args.update({k: v for k, v in dataset.items() if k != "subsets"})
        subsets += [{**{k: v for k, v in shared.items() if k in SUBSET_SHARED_KEYS}, **s}
                    for s in dataset.get("subsets", [])]
    if len(data.get("datasets", [])) > 1:
        args["_several_datasets"] = len(data["datasets"])
    return args, subsets


def _number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return {"true": True, "false": False}.get(str(text).lower(), text)


def _key_value_list(value) -> dict:
    """kohya's ["k=v", ...] (or one "k=v k2=v2" string) -> {k: number or text}."""
    items = value if isinstance(value, list) else str(value).split()
    out = {}
    for item in items:
        k, _, v = str(item).partition("=")
        v = [_number(x) for x in v.split(",")] if "," in v else _number(v)
        out[k.strip()] = v
    return out


def _resolution(value):
    parts = [int(float(p)) for p in str(value).replace("x", ",").split(",") if p.strip()] \
        if not isinstance(value, (int, list)) else ([value] if isinstance(value, int) else value)
    return parts[0] if len(parts) == 1 or parts[0] == parts[1] else parts[:2]


def convert(args: dict, subsets: list[dict]) -> tuple[dict, list[str], list[str]]:
    """(sdlora config dict, mapping lines, unmapped lines)."""
    known = {key for key, _, _ in describe()}
    config: dict = {}
    mapped, unmapped = [], []

    def put(target: str, value, source: str, missing: str = "not offered by sdlora") -> None:
        if value is None:
            unmapped.append(f"{source} = {raw_text}: {missing}")
            return
        if target not in known:
            unmapped.append(f"{source}: no sdlora key {target} in this version")
            return
        if target in PATH_KEYS and isinstance(value, str) and value and (
                target != "model.base" or Path(value).expanduser().exists()):  # else a hub id
            value = str(Path(value).expanduser().resolve())
        section, _, name = target.partition(".")
        (config.setdefault(section, {}) if name else config)[name or section] = value
        mapped.append(f"{source} {raw_text} -> {target} = {_toml_value(value)}")

    args = dict(args)
    network_args = _key_value_list(args.pop("network_args", []))
    several = args.pop("_several_datasets", 0)
    if several:
        unmapped.append(f"[[datasets]]: {several} datasets; sdlora trains one, so their subsets are merged and "
                        "the first dataset's resolution and batch size apply")
    raw_text = ""
    for key, value in args.items():
        target = KOHYA_KEYS.get(key)
        source = f"--{key}"
        raw_text = " ".join(map(str, value)) if isinstance(value, list) else str(value)
        if key in NOT_NEEDED:
            unmapped.append(f"{source}: not needed ({NOT_NEEDED[key] or 'no effect in sdlora'})")
        elif target is None:
            unmapped.append(f"{source} = {value!r}: no sdlora equivalent")
        elif target.startswith("dataset.subsets[]"):
            if not subsets:
                unmapped.append(f"{source} = {value!r}: only a [[datasets.subsets]] key")
        elif key in ("optimizer_type", "optimizer"):
            name = OPTIMIZERS.get(str(value).lower())
            put(target, name, source)
        elif key in ("network_module", "LoRA_type"):
            kind = str(network_args.pop("algo", value)).lower().rpartition(".")[2] if key == "network_module" \
                else str(value).lower()
            kind = {"lora": "locon" if "conv_dim" in network_args else "lora", "kohya": "lora"}.get(kind, kind)
            name = NETWORK_TYPES.get(kind)
            put(target, name, source)
        elif key in ("resolution", "max_resolution"):
            put(target, _resolution(value), source)
        elif key == "network_train_unet_only":
            put(target, not _number(value), source)
        elif key == "v_parameterization":
            put(target, "v_prediction" if _number(value) else "epsilon", source)
        elif key == "save_precision":
            put(target, {"float": "fp32"}.get(str(value), str(value)), source)
        elif key in ("xformers", "sdpa"):
            choice = value if isinstance(value, str) else (key if value else "sdpa")
            put(target, choice if choice in ("xformers", "sdpa") else "sdpa", source)
        elif key == "sample_sampler":
            name = SAMPLERS.get(str(value).lower())
            put(target, name, source, "no such sdlora sampler")
        elif key == "learning_rate":
            for lr in ("unet_lr", "text_encoder_lr"):  # kohya: learning_rate where the specific one is not given
                if lr not in args:
                    put(f"train.{lr}", _number(value), source)
        elif key == "optimizer_args":
            put("train.optimizer_args", _key_value_list(value), source)
        elif key == "lr_warmup_steps":
            number = _number(value)
            put("train.lr_warmup_ratio" if isinstance(number, float) and number < 1 else "train.lr_warmup_steps",
                number, source)
        elif key == "lr_warmup":  # the kohya_ss GUI's percent of the steps
            put(target, _number(value) / 100, source)
        elif key == "lr_scheduler":
            put(target, str(value), source)
        else:
            put(target, _number(value) if isinstance(value, str) and target not in PATH_KEYS else value, source)
    for k in ("conv_dim", "conv_alpha", "dropout"):
        if k in network_args:
            raw_text = str(network_args[k])
            put(f"network.{'dropout' if k == 'dropout' else k}", _number(network_args.pop(k)), f"--network_args {k}")
    for k, v in network_args.items():
        unmapped.append(f"--network_args {k}={v}: no sdlora equivalent")
    if subsets:
        entries = []
        for i, subset in enumerate(subsets):
            entry = {}
            for key, value in subset.items():
                if key in SUBSET_SHARED_KEYS or key in ("class_tokens", "is_reg"):
                    entry[key] = str(Path(value).expanduser().resolve()) if key == "image_dir" else value
                    mapped.append(f"[[datasets.subsets]] {i} {key} = {_toml_value(value)} -> [[dataset.subsets]] {key}")
                else:
                    unmapped.append(f"[[datasets.subsets]] {i} {key} = {value!r}: no sdlora equivalent")
            entries.append(entry)
        config.setdefault("dataset", {})["subsets"] = entries
    try:
        config_from_dict(json.loads(json.dumps(config)))
    except ConfigError as e:
        raise UserError(f"the converted config is not valid: {e}") from None
    return config, mapped, unmapped


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: dict, header: str = "") -> str:
    lines = [header] if header else []
    lines += [f"{k} = {_toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for section, table in config.items():
        if not isinstance(table, dict):
            continue
        lines += ["", f"[{section}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if k != "subsets"]
        for subset in table.get("subsets", []):
            lines += ["", f"[[{section}.subsets]]"] + [f"{k} = {_toml_value(v)}" for k, v in subset.items()]
    return "\n".join(lines) + "\n"


def import_kohya(sources: list[str], log=print) -> str:
    """The sdlora config text for the given kohya sources; logs each mapping and what was not mapped."""
    args, subsets = {}, []
    for source in sources:
        a, s = read_source(source)
        args.update(a)
        subsets += s
    config, mapped, unmapped = convert(args, subsets)
    for line in mapped:
        log(f"mapped: {line}")
    for line in unmapped:
        log(f"not mapped: {line}")
    header = f"# converted by `sdlora import-kohya` from: {', '.join(sources)}"
    return to_toml(config, header)
