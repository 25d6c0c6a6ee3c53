"""`sdlora import-kohya SOURCE... -o NEW.toml`: a kohya-ss setup as an sdlora config.

Sources, in any combination (later ones win): a kohya dataset config (`[general]`, `[[datasets]]`,
`[[datasets.subsets]]`), a train_network.py arguments file (`--config_file` TOML, flat or in
sections as kohya flattens them), a kohya_ss GUI config (a saved or preset `.json`, or the GUI's
sectioned `config.toml`), or a command line of any length (`"accelerate launch train_network.py
--network_dim 16 ..."`, also in a .sh/.bat/.ps1/.txt file). A command line's `--config_file` and
`--dataset_config` and a GUI config's `dataset_config` and `additional_parameters` (a command line)
are read as further sources, in kohya's order: dataset-config values beat arguments, a command line
beats its `--config_file`.

Names are looked up in `kohya_names.KOHYA_KEYS`; values kohya spells differently (optimizer and
scheduler names, `network_module` + `network_args`, "512,512" resolutions, the GUI's percentages,
...) are converted here. Values keep their type's meaning: 5e-06 stays 5e-06, 64.0 where sdlora
wants an integer is 64, the GUI's "unset" values ("" and 0 where kohya means unset) leave sdlora's
default. A value sdlora cannot take is replaced by the nearest one it can, and a note says so.
Every mapping is printed, and so is every argument that has no sdlora equivalent. Relative paths
are made absolute from the current folder, as kohya reads them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
import tempfile
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from sdlora import kohya_blocks
from sdlora.config import (
    SECTION_CLASSES,
    SIDE_STEP,
    SUBSET_SHARED_KEYS,
    Config,
    ConfigError,
    Subset,
    load_config,
    nearest_side,
    path_keys,
)
from sdlora.errors import UserError
from sdlora.kohya_names import FLUX_MODULATION_ARGS, KOHYA_KEYS, SD3_MODULATION_ARGS

# kohya optimizer name (lowercased) -> sdlora's; the second table holds the nearest sdlora optimizer where
# sdlora has no such one, with why it is the nearest.
OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "lion": "lion", "prodigy": "prodigy",
              "adafactor": "adafactor", "adamwschedulefree": "adamw_schedulefree",
              "schedulefree.adamwschedulefree": "adamw_schedulefree"}
NEAREST_OPTIMIZERS = {
    **dict.fromkeys(("dadaptation", "dadaptadam", "dadaptadamprepr", "dadaptadampreprint", "dadaptadagrad",
                     "dadaptadan", "dadaptadanip", "dadaptlion", "dadaptsgd", "prodigyplus.prodigyplusschedulefree"),
                    ("prodigy", "Prodigy is D-Adaptation's successor and takes the same learning rates (about 1)")),
    **dict.fromkeys(("pagedadamw", "pagedadamw32bit"), ("adamw", "AdamW without bitsandbytes' paging")),
    "pagedadamw8bit": ("adamw8bit", "AdamW8bit without bitsandbytes' paging"),
    **dict.fromkeys(("lion8bit", "pagedlion8bit"), ("lion", "Lion in full precision")),
}
SAMPLERS = {"ddim": "ddim", "euler": "euler", "k_euler": "euler", "euler_a": "euler_a", "k_euler_a": "euler_a",
            "dpmsolver++": "dpmpp_2m"}
# kohya scheduler -> (nearest sdlora scheduler, why); the others are sdlora's own names.
NEAREST_SCHEDULERS = {"adafactor": ("constant", "Adafactor's own schedule keeps the set rate, as sdlora's "
                                                "adafactor does"),
                      "polynomial": ("linear", "kohya's polynomial decay with its default power 1 is linear")}
NETWORK_TYPES = {"standard": "lora", "lora": "lora", "flux1": "lora", "locon": "locon", "kohya locon": "locon",
                 "lycoris/locon": "locon", "loha": "loha", "lycoris/loha": "loha", "kohya loha": "loha",
                 "lokr": "lokr", "lycoris/lokr": "lokr", "kohya lokr": "lokr"}
# model.base is a file, a folder or a hub id: made absolute only when it exists here.
PATH_KEYS = path_keys() | {"model.base"}
# kohya settings sdlora decides itself: converting them would change nothing.
NOT_NEEDED = {"v2": "the base model's family is read from the base itself",
              "sdxl": "the base model's family is read from the base itself",
              "logging_dir": "TensorBoard logs go to OUTPUT/logs",
              "save_model_as": "adapters are always .safetensors",
              "network_weights_dtype": "", "persistent_data_loader_workers": "", "max_data_loader_n_workers": "",
              "cache_latents": "latents are always cached on disk",
              "cache_latents_to_disk": "latents are always cached on disk",
              **dict.fromkeys(("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk",
                               "sdxl_cache_text_encoder_outputs", "flux1_cache_text_encoder_outputs",
                               "flux1_cache_text_encoder_outputs_to_disk", "sd3_cache_text_encoder_outputs",
                               "sd3_cache_text_encoder_outputs_to_disk"),
                              "text-encoder outputs are cached whenever the text encoder is frozen"),
              **dict.fromkeys(("no_half_vae", "sdxl_no_half_vae"), "latents are always encoded with the VAE in fp32"),
              "num_cpu_threads_per_process": "accelerate launch's option; sdlora sets its CPU threads itself"}
# kohya/LyCORIS options at the value that changes nothing sdlora does (their defaults, or what sdlora does
# anyway): listed with the unset ones, not as lost settings.
AS_SDLORA_DOES = {"unit": 1,  # DyLoRA's unit: sdlora trains no DyLoRA
                  "max_timestep": 1000, "min_timestep": 0,  # the whole schedule, as sdlora samples it
                  "factor": -1,  # LoKr's most balanced split, sdlora's
                  "train_on_input": True,  # IA3's default: sdlora trains no IA3
                  "lr_scheduler_power": 1}
# FLUX/SD3 options sdlora has no key for, with what sdlora does instead.
FLOW_NOT_MAPPED = {
    "apply_t5_attn_mask": "sdlora encodes T5 without its attention mask (kohya's default)",
    "model_type": "sdlora trains FLUX.1 dev and schnell; other models of the FLUX script (Chroma) are not supported",
    "split_mode": "deprecated in sd-scripts, where blocks_to_swap replaces it",
    "cpu_offload_checkpointing": "sdlora's gradient checkpointing keeps activations on the device",
    "fp8_base_unet": "model.quantize = \"fp8\" holds the transformer and the text encoders in fp8 together",
    "mem_eff_save": "sdlora's adapters are small enough to save at once",
}
# Keys read here rather than through KOHYA_KEYS: further sources, and the GUI's switches and percentages.
READ_HERE = {"network_args", "additional_parameters", "dataset_config", "config_file", "noise_offset_type",
             "stop_text_encoder_training_pct", "use_8bit_adam", "text_encoder_lr1", "text_encoder_lr2",
             "learning_rate_te", "learning_rate_te1", "learning_rate_te2", "flux1_checkbox", "sd3_checkbox",
             "t5xxl_lr"}

# Which sd-scripts family a setup trains: the kohya_ss GUI's checkbox, else the script, else the network module.
GUI_CHECKBOXES = {"flux1_checkbox": "flux", "sd3_checkbox": "sd3"}
FAMILY_SCRIPTS = {"flux_train_network.py": "flux", "flux_train.py": "flux", "sd3_train_network.py": "sd3",
                  "sd3_train.py": "sd3"}
FAMILY_MODULES = {"networks.lora_flux": "flux", "networks.oft_flux": "flux", "networks.lora_sd3": "sd3"}
# The kohya_ss GUI saves every field but passes these to sd-scripts only with its family's checkbox on
# (kohya_gui/lora_gui.py, config_toml_data and the Flux1 network_args); sigmoid_scale it passes for none of
# sdlora's families. With the checkbox off they are not training settings.
GUI_FAMILY_KEYS = {
    **dict.fromkeys(("guidance_scale", "timestep_sampling", "model_prediction_type", "discrete_flow_shift", "ae",
                     "t5xxl_max_token_length", "apply_t5_attn_mask", "split_mode", "mem_eff_save",
                     "cpu_offload_checkpointing", "single_blocks_to_swap", "double_blocks_to_swap", "fp8_base_unet",
                     "train_t5xxl", "flux1_cache_text_encoder_outputs",
                     "flux1_cache_text_encoder_outputs_to_disk"), ("flux",)),
    **dict.fromkeys(("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "clip_g", "sd3_clip_l", "sd3_t5xxl",
                     "clip_l_dropout_rate", "clip_g_dropout_rate", "sd3_clip_l_dropout_rate", "t5_dropout_rate",
                     "sd3_t5_dropout_rate", "enable_scaled_pos_embed", "sd3_enable_scaled_pos_embed",
                     "pos_emb_random_crop_rate", "save_clip", "save_t5xxl", "t5xxl_device", "t5xxl_dtype",
                     "sd3_text_encoder_batch_size", "sd3_cache_text_encoder_outputs",
                     "sd3_cache_text_encoder_outputs_to_disk", "sd3_fused_backward_pass",
                     "sd3_disable_mmap_load_safetensors"), ("sd3",)),
    **dict.fromkeys(("clip_l", "t5xxl", "blocks_to_swap"), ("flux", "sd3")),
    "sigmoid_scale": (),
}
# sd-scripts' defaults (flux_train_utils.add_flux_train_arguments) where sdlora's differ: written out when the
# sources leave them unset, so the config trains as kohya did.
FAMILY_DEFAULTS = {"flux": {"model_prediction_type": ("sigma_scaled", "its docs advise raw"),
                            "guidance_scale": (3.5, "its docs advise 1.0 for FLUX.1-dev LoRAs")}}
# kohya's spellings of sdlora's choices: weighting_scheme "uniform" is kohya's default and means none.
CHOICE_ALIASES = {"weighting_scheme": {"uniform": "none"}}
# The kohya_ss GUI's Flux1 fields, lora_flux's network_args: the block selection and modulation ranks map
# (`_network_args`), train_t5xxl too; the other ranks per module type, kohya's qkv split and GGPO have no key.
FLUX_NETWORK_ARGS = ("img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim",
                     "single_dim", "single_mod_dim", "in_dims", "split_qkv", "enable_all_linear", "ggpo_beta",
                     "ggpo_sigma", "train_blocks", "train_double_block_indices", "train_single_block_indices",
                     "train_t5xxl")
# kohya options whose sdlora keys other parts of issue 22 add: mapped when this sdlora has the key, else
# listed as not mapped with the key that takes them. Text-encoder files become one list, [model] text_encoders.
PENDING_KEYS = {"t5xxl_max_token_length": "train.t5_max_length", "blocks_to_swap": "train.blocks_to_swap",
                "clip_l_dropout_rate": "train.clip_l_dropout_rate",
                "sd3_clip_l_dropout_rate": "train.clip_l_dropout_rate",
                "clip_g_dropout_rate": "train.clip_g_dropout_rate", "t5_dropout_rate": "train.t5_dropout_rate",
                "sd3_t5_dropout_rate": "train.t5_dropout_rate", "training_shift": "train.training_shift"}
PENDING_NETWORK_ARGS = {"train_t5xxl": "network.train_t5"}
TEXT_ENCODER_FILES = ("clip_l", "sd3_clip_l", "clip_g", "t5xxl", "sd3_t5xxl")  # the families' order: CLIP-L, G, T5
# Sections of the kohya_ss GUI's config.toml that hold other tabs' settings (captioning, hub upload, other
# trainers), not this training's: flattening them would let e.g. the WD14 tagger's batch_size win.
GUI_OTHER_TABS = {"wd14_caption", "dataset_preparation", "settings", "server", "configuration", "huggingface",
                  "metadata", "leco", "anima_lllite"}
# Keys where 0 means "unset" in kohya (or its GUI): 0 epochs or cycles would be no training at all.
ZERO_IS_UNSET = {"epoch", "max_train_epochs", "max_train_steps", "clip_skip", "lr_scheduler_num_cycles",
                 "max_token_length", "stop_text_encoder_training_pct"}
# network_args that become [network] keys (their sdlora names are KOHYA_KEYS'; network_args' dropout is
# network_dropout). The block ones are also the kohya_ss GUI's top-level keys: comma lists of numbers for the
# dims and alphas; the lr weights a list or a preset name ("sine", "cosine+.25").
BLOCK_ARGS = (*kohya_blocks.DIM_KEYS, *kohya_blocks.LR_WEIGHT_KEYS, "block_lr_zero_threshold")
NETWORK_ARGS = ("conv_dim", "conv_alpha", "dropout", "dora_wd", *BLOCK_ARGS)
# lora_flux's and lora_sd3's block selection (strings: "0" names block 0, it does not switch anything off);
# their modulation ranks (FLUX_MODULATION_ARGS, SD3_MODULATION_ARGS) map to network.train_modulation = false
# when all of one network's are 0.
SELECTION_ARGS = ("train_blocks", "train_double_block_indices", "train_single_block_indices", "train_block_indices")
# The dataset-config keys a subset inherits from its dataset and [general] (kohya's "ascendable" ones).
INHERITED = (*SUBSET_SHARED_KEYS, "class_tokens")
COMMAND_FILES = {".sh", ".bat", ".cmd", ".ps1", ".txt"}
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass
class Setup:
    """What the sources say: train_network arguments (each with the source it came from, and whether a
    kohya_ss GUI file said it), the dataset config's datasets, and notes made while reading."""

    args: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict)
    gui: set = field(default_factory=set)
    datasets: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    scripts: list = field(default_factory=list)  # the sd-scripts scripts the command lines run

    def update(self, args: dict, where: str, gui: bool = False) -> None:
        self.args.update(args)
        self.origin.update(dict.fromkeys(args, where))
        self.gui = (self.gui | set(args)) if gui else (self.gui - set(args))


def _is_file(text: str) -> bool:
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):  # a long command line is "File name too long"; a NUL byte is a ValueError
        return False


def _split_words(text: str, where: str) -> list[str]:
    """Shell words of a command line; backslashes stay (Windows paths), line continuations (\\ ^ `) go."""
    text = re.sub(r"[\\^`][ \t]*\r?\n", " ", text)
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split, lexer.escape, lexer.commenters = True, "", ""
    try:
        return list(lexer)
    except ValueError as e:
        raise UserError(f"{where}: cannot split the command line ({e}); check its quotes") from None


def parse_command_line(text: str, where: str = "the command line") -> dict:
    """`[accelerate launch ...] train_network.py --a 1 --b=x --flag --list p q` -> {"a": "1", ...}.

    Arguments before the script (accelerate's own) are skipped; a flag alone is True; several
    values after one flag are a list (kohya's nargs="*" arguments such as network_args)."""
    return _command(text, where)[1]


def _command(text: str, where: str) -> tuple[str, dict]:
    """(the script's file name, lowercased, "" when none; its arguments as `parse_command_line` reads them)."""
    tokens = _split_words(text, where)
    script = next((i for i, t in enumerate(tokens) if t.lower().endswith(".py")), -1)
    name = re.split(r"[\\/]", tokens[script])[-1].lower() if script >= 0 else ""
    out: dict = {}
    key = None
    for token in tokens[script + 1:]:
        if token.startswith("--") and len(token) > 2:
            key, sep, value = token[2:].partition("=")
            out[key] = value if sep else True
        elif key is not None:
            current = out[key]
            out[key] = token if current is True else (current if isinstance(current, list) else [current]) + [token]
    return name, out


def _read_command(text: str, where: str, setup: Setup, seen: frozenset, whole: bool = True) -> Setup:
    script, args = _command(text, where)
    if script:
        setup.scripts.append(script)
    return _read_arguments(args, where, setup, seen, whole=whole)


def read_source(source: str, setup: Setup | None = None, seen: frozenset = frozenset()) -> Setup:
    """Add one source (a file, or a command line) to `setup`, with the further sources it names."""
    setup = setup if setup is not None else Setup()
    if _is_file(source):
        return _read_file(Path(source).expanduser(), setup, seen)
    if "--" in source:
        return _read_command(source, "the command line", setup, seen)
    if Path(source).expanduser().is_dir():
        raise UserError(f"{source}: a folder; give a kohya config file inside it, or its images as "
                        "[dataset] image_dir of an sdlora config")
    raise UserError(f"{source}: not a file, nor a command line with --arguments; give a kohya dataset "
                    "TOML, a train_network.py arguments file (.toml/.json) or a quoted command line")


def _read_file(path: Path, setup: Setup, seen: frozenset) -> Setup:
    if path.resolve() in seen:
        raise UserError(f"{path}: read twice (a --config_file or dataset_config names itself)")
    seen = seen | {path.resolve()}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); is it a kohya config?") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read: {e.strerror}") from None
    if path.suffix.lower() in COMMAND_FILES:
        return _read_command(text, str(path), setup, seen)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise UserError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: a JSON {type(data).__name__}, not a kohya_ss GUI config (a table of settings)")
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: not valid TOML: {e}") from None
    if "datasets" in data or "general" in data:
        general = data.get("general")
        if "datasets" not in data and isinstance(general, dict) and not (set(KOHYA_KEYS) | set(INHERITED)) & set(general):
            raise UserError(f"{path}: not a kohya dataset config: a [general] table with no [[datasets]] and none "
                            "of kohya's dataset settings; give a dataset config with [[datasets]] and "
                            "[[datasets.subsets]] (image_dir = ...)")
        setup.datasets += _read_dataset_config(data, str(path))
        return setup
    gui = path.suffix.lower() == ".json" or any(k in data for k in ("basic", "advanced", "folders"))
    return _read_arguments(_flatten(data, str(path), setup.notes), str(path), setup, seen, gui=gui)


def _flatten(data: dict, where: str, notes: list) -> dict:
    """kohya's read_config_from_file: the keys of every [section] as one table. The GUI's config.toml
    sections of other tabs are left out."""
    args = {}
    for key, value in data.items():
        if not isinstance(value, dict):
            args[key] = value
        elif key in GUI_OTHER_TABS:
            notes.append(f"{where} [{key}]: the kohya_ss GUI's {key} tab, not training settings; not read")
        else:
            args.update(value)
    return args


def _read_arguments(args: dict, where: str, setup: Setup, seen: frozenset, gui: bool = False,
                    whole: bool = True) -> Setup:
    """Arguments of one source, with the sources they name: a --config_file under them, the GUI's
    additional_parameters over them (the GUI appends them to the command), a dataset config beside."""
    args = dict(args)
    known = set(KOHYA_KEYS) | set(NOT_NEEDED) | READ_HERE
    if whole and not known & set(args):
        keys = ", ".join(list(map(str, args))[:3]) or "none"
        raise UserError(f"{where}: not a kohya training config: none of its keys ({keys}) is a kohya "
                        "argument or dataset setting; give a kohya_ss GUI .json, a train_network.py arguments "
                        ".toml, a dataset config .toml or a command line")
    config_file, dataset_config = args.pop("config_file", None), args.pop("dataset_config", None)
    extra = args.pop("additional_parameters", None)
    if _given(config_file):
        name = str(config_file) if str(config_file).endswith(".toml") else f"{config_file}.toml"  # as kohya does
        _read_named_file(name, f"{where}: --config_file", setup, seen)
    setup.update(args, where, gui)
    if _given(extra):
        if not isinstance(extra, str):
            raise UserError(f"{where}: additional_parameters = {extra!r}: expected the command-line text")
        _read_command(extra, f"{where} additional_parameters", setup, seen, whole=False)
    if _given(dataset_config):
        before = len(setup.datasets)
        _read_named_file(str(dataset_config), f"{where}: dataset_config", setup, seen)
        if len(setup.datasets) == before:
            raise UserError(f"{where}: dataset_config {dataset_config} has no [general] or [[datasets]]; is it a "
                            "kohya dataset config?")
    return setup


def _read_named_file(name: str, what: str, setup: Setup, seen: frozenset) -> None:
    if not _is_file(name):
        raise UserError(f"{what} = {name}: file not found (read from the current folder, as kohya reads it); run "
                        "from the folder kohya ran in, or give the file's full path")
    _read_file(Path(name).expanduser(), setup, seen)


def _read_dataset_config(data: dict, where: str) -> list[dict]:
    """[general] + [[datasets]] + [[datasets.subsets]] -> [{where, keys, subsets}], keys being a dataset's
    own and inherited settings, each subset with what it inherits (kohya's config_util cascade)."""
    general, datasets = data.get("general", {}), data.get("datasets", [])
    if not isinstance(general, dict):
        raise UserError(f"{where}: general must be a [general] table")
    if isinstance(datasets, dict):  # TOML makes `datasets` a table when [[datasets.subsets]] has no [[datasets]]
        raise UserError(f"{where}: [[datasets.subsets]] without a [[datasets]] above it (kohya refuses this too); "
                        "add a line [[datasets]] before the first [[datasets.subsets]]")
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise UserError(f"{where}: datasets must be [[datasets]] tables")
    out = []
    for i, dataset in enumerate(datasets, 1):
        subsets = dataset.get("subsets", [])
        if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
            raise UserError(f"{where}: [[datasets]] {i}: subsets must be [[datasets.subsets]] tables")
        keys = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        inherited = {k: v for k, v in keys.items() if k in INHERITED}
        out.append({"where": f"{where} [[datasets]] {i}", "keys": keys,
                    "subsets": [{**inherited, **s} for s in subsets]})
    return out or [{"where": where, "keys": dict(general), "subsets": []}]


def _given(value) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _is_off(value) -> bool:
    """A value that switches nothing on: nothing is lost when it has no sdlora equivalent."""
    value = _number(value)
    return not _given(value) or value is False or value == [] or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


def _number(text):
    """kohya's text values: an integer, a float (5e-06 stays 5e-06), true/false, or the text."""
    if not isinstance(text, str):
        return text
    t = text.strip().strip("\"'")
    if _INTEGER.fullmatch(t):
        return int(t)
    try:
        return float(t)
    except ValueError:
        return {"true": True, "false": False}.get(t.lower(), t)


def _key_value_list(value, where: str) -> dict:
    """kohya's ["k=v", ...] (or one "k=v k2=v2" string, quoted or not) -> {k: number, text or list}."""
    if isinstance(value, dict):
        return dict(value)
    items = value if isinstance(value, list) else _split_words(str(value), where)
    out = {}
    for item in items:
        k, sep, v = str(item).partition("=")
        if not sep or not k.strip():
            raise UserError(f"{where}: {item!r} is not key=value")
        v = v.strip().strip("\"'")
        if k.strip() in BLOCK_ARGS or k.strip() in SELECTION_ARGS:  # per-block text ("1,,0.5", "0,1,8-12"), read whole
            out[k.strip()] = v
        else:
            out[k.strip()] = [_number(x) for x in v.split(",") if x.strip()] if "," in v else _number(v)
    return out


def _field(target: str):
    """(dataclass field, its type) of an sdlora key such as "train.epochs" or "dataset.subsets[].is_reg";
    None for a key this version of sdlora does not have."""
    section, _, name = target.partition(".")
    cls = Subset if name.startswith("subsets[].") else SECTION_CLASSES.get(section, Config)
    name = name.removeprefix("subsets[].") or section
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    if name not in fields or name in SECTION_CLASSES and cls is Config:
        return None
    return fields[name], typing.get_type_hints(cls)[name]


def _typed(value, kind, where: str):
    """`value` (a TOML/JSON value or command-line text) as sdlora's `kind`, or a one-line UserError."""
    if isinstance(value, dict) and kind is not dict or isinstance(value, list) and kind not in (list, typing.Any):
        raise UserError(f"{where}: expected one {kind.__name__ if kind is not typing.Any else 'value'}, "
                        f"got {value!r}")
    value = _number(value) if kind is not str else value
    if kind is bool:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise UserError(f"{where}: {value!r} is not a finite number")
        if kind is float:
            return float(value)
        if not float(value).is_integer():
            raise UserError(f"{where}: sdlora takes a whole number here, got {value!r}; give e.g. {round(value)}")
        return int(value)
    if kind is str and not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{where}: expected text, got {value!r}")
    return value


def _nearest(value, f, target: str):
    """The nearest value sdlora accepts for a number out of its range (and bucket steps that are not
    multiples of 8), or the value itself."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if target.endswith("bucket_reso_steps"):
        return nearest_side(value, SIDE_STEP)
    if low is not None and value < low:
        return type(value)(low)
    if high is not None and value > high:
        return type(value)(high)
    return value


def _resolution(value, where: str):
    """kohya's 512, "512", "512,768", "512x768" or [512, 768] -> sdlora's int or [width, height]."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,x ]+", value.strip()) if p]
    else:
        parts = value if isinstance(value, list) else [value]
    if not 1 <= len(parts) <= 2:
        raise UserError(f"{where}: expected a size such as 512 or \"512,768\", got {value!r}")
    sides = [_typed(p, int, where) for p in parts]
    return sides[0] if len(sides) == 1 or sides[0] == sides[1] else sides


def _caption_extension(value: str) -> str:
    """The nearest file extension sdlora accepts: a leading dot, letters, digits and '_'."""
    return "." + (re.sub(r"[^0-9A-Za-z_]", "_", value.lstrip(".")) or "txt")


@dataclass
class Conversion:
    config: dict = field(default_factory=dict)
    mapped: list = field(default_factory=list)
    unmapped: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    off: list = field(default_factory=list)  # kohya keys without an sdlora one whose value is off or unset


def convert(setup: Setup) -> Conversion:
    """The sdlora config dict of what the sources say, every mapping and every value not mapped."""
    out = Conversion(notes=list(setup.notes))
    args, origin = dict(setup.args), dict(setup.origin)

    def where(key: str) -> str:
        return f"{origin.get(key, 'the sources')}: {key}"

    def put(target: str, value, key: str, raw=None, converted=None) -> None:
        """Set sdlora's `target` from kohya's `key`: typed as sdlora's field, moved to the nearest valid value."""
        shown = raw if raw is not None else args.get(key, value)
        shown = " ".join(map(str, shown)) if isinstance(shown, list) else str(shown)
        f, kind = _field(target)
        try:
            value = converted(value) if converted else _typed(value, kind, where(key))
        except ConfigError as e:  # the config schema's own check, refusing a value of the sources
            raise UserError(str(e)) from None
        nearest = _nearest(value, f, target)
        if nearest != value:
            out.notes.append(f"--{key} = {shown}: sdlora's {target} takes {_describe_range(f, target)}; "
                             f"the nearest, {_toml_value(nearest)}, is used")
            value = nearest
        if target in PATH_KEYS and isinstance(value, str) and value and (
                target != "model.base" or Path(value).expanduser().exists()):  # else a hub id
            value = str(Path(value).expanduser().resolve())
        section, _, name = target.partition(".")
        (out.config.setdefault(section, {}) if name else out.config)[name or section] = value
        out.mapped.append(f"--{key} {shown} -> {target} = {_toml_value(value)}")

    def not_mapped(key: str, why: str) -> None:
        out.unmapped.append(f"--{key} = {args[key]!r}: {why}")

    _drop_unset(args, setup.gui, out)
    family = _family(setup, args)
    _gui_family_fields(args, setup.gui, out)
    for key, (value, why) in FAMILY_DEFAULTS.get(family, {}).items():
        if key not in args:
            args[key], origin[key] = value, "kohya's default"
            out.notes.append(f"--{key} is not set: kohya's default for this family, {value}, is written out "
                             f"({why})")
    subsets = _apply_datasets(setup.datasets, args, origin, out)
    network_args = _key_value_list(args.pop("network_args", []), where("network_args"))
    for key in BLOCK_ARGS:  # the GUI's top-level block weights; network_args win, as the GUI puts them there
        if key in args:
            network_args.setdefault(key, args.pop(key))
    gui_flux_lora = str(args.get("LoRA_type", "")).lower() == "flux1"
    for key in FLUX_NETWORK_ARGS:  # the GUI's Flux1 fields: network_args of lora_flux when LoRA_type is Flux1
        if key in args and key in setup.gui:
            value = args.pop(key)
            if gui_flux_lora and not _is_off(value):
                network_args.setdefault(key, value)
            else:
                out.off.append(key)
    _pending(args, network_args, put, out)

    if "max_train_epochs" in args and "epoch" in args:  # kohya_ss: max_train_epochs, when set, replaces epoch
        out.notes.append(f"--epoch {args.pop('epoch')}: replaced by --max_train_epochs {args['max_train_epochs']}")
    _learning_rates(args, setup.gui, put, out)
    _noise(args, out)
    _stop_text_encoder_training(args, setup.gui, out)
    if "use_8bit_adam" in args and "optimizer" not in args and "optimizer_type" not in args:
        if _typed(args.pop("use_8bit_adam"), bool, where("use_8bit_adam")):
            put("train.optimizer", "adamw8bit", "use_8bit_adam", raw="true")

    for key, value in args.items():
        target = KOHYA_KEYS.get(key)
        if key in NOT_NEEDED:
            out.unmapped.append(f"--{key}: not needed ({NOT_NEEDED[key] or 'no effect in sdlora'})")
        elif key in FLOW_NOT_MAPPED and not _is_off(value):
            not_mapped(key, FLOW_NOT_MAPPED[key])
        elif target is None or target.startswith("dataset.subsets[]"):
            if _is_off(value) or (key in AS_SDLORA_DOES and _number(value) == AS_SDLORA_DOES[key]):
                out.off.append(key)
            elif target is None:
                not_mapped(key, "no sdlora equivalent")
            elif not subsets:
                not_mapped(key, "only a [[datasets.subsets]] key")
        elif key in ("optimizer_type", "optimizer"):
            name = str(value).strip().lower()
            if name in NEAREST_OPTIMIZERS:
                nearest, why = NEAREST_OPTIMIZERS[name]
                out.notes.append(f"--{key} = {value}: sdlora has no {value}; the nearest, {nearest}, is used ({why})")
                put(target, nearest, key)
            elif name in OPTIMIZERS:
                put(target, OPTIMIZERS[name], key)
            else:
                not_mapped(key, "not offered by sdlora; its default optimizer applies, so check the learning rates")
        elif key in ("network_module", "LoRA_type"):
            kind = str(network_args.pop("algo", value)).lower().rpartition(".")[2] if key == "network_module" \
                else str(value).lower()
            kind = "lora" if kind.startswith("lora_") else kind  # networks.lora_flux, lora_sd3: a family's LoRA
            kind = {"lora": "locon" if "conv_dim" in network_args else "lora", "kohya": "lora"}.get(kind, kind)
            if kind in NETWORK_TYPES:
                put(target, NETWORK_TYPES[kind], key)
            else:
                not_mapped(key, "sdlora has no such adapter; it trains its default, lora")
        elif key in ("resolution", "max_resolution"):
            put(target, value, key, converted=lambda v: _nearest_resolution(v, where(key), key, out))
        elif key == "network_train_unet_only":
            put(target, not _typed(value, bool, where(key)), key)
        elif key == "v_parameterization" and family:
            if _is_off(value):
                out.off.append(key)
            else:
                not_mapped(key, "FLUX.1 and SD3 predict the flow velocity; the option does not apply")
        elif key == "v_parameterization":
            put(target, "v_prediction" if _typed(value, bool, where(key)) else "epsilon", key)
        elif key == "save_precision":
            put(target, {"float": "fp32"}.get(str(value), str(value)), key)
        elif key in ("xformers", "sdpa"):
            choice = value if isinstance(value, str) else (key if _typed(value, bool, where(key)) else "sdpa")
            put(target, choice if choice in ("xformers", "sdpa") else "sdpa", key)
        elif key == "sample_sampler":
            if str(value).lower() in SAMPLERS:
                put(target, SAMPLERS[str(value).lower()], key)
            else:
                not_mapped(key, "no such sdlora sampler")
        elif key == "sample_prompts":
            _sample_prompts(value, key, put, not_mapped)
        elif key in ("timestep_sampling", "model_prediction_type", "weighting_scheme"):
            name = str(value).strip().lower()
            name = CHOICE_ALIASES.get(key, {}).get(name, name)
            choices = _field(target)[0].metadata["choices"]
            if name in choices:
                put(target, name, key)
            else:
                not_mapped(key, f"sdlora offers {', '.join(choices)}; its default applies")
        elif key == "fp8_base":
            put(target, "fp8" if _typed(value, bool, where(key)) else "none", key)
        elif key == "optimizer_args":
            put(target, _key_value_list(value, where(key)), key)
        elif key == "lr_warmup_steps":
            number = _typed(value, float, where(key))
            put("train.lr_warmup_ratio" if number < 1 and not float(number).is_integer() else target, number, key)
        elif key == "lr_warmup":  # the kohya_ss GUI's percent of the steps
            put(target, _typed(value, float, where(key)) / 100, key)
        elif key == "lr_scheduler":
            name = str(value)
            if name in NEAREST_SCHEDULERS:
                nearest, why = NEAREST_SCHEDULERS[name]
                out.notes.append(f"--{key} = {name}: sdlora has no {name} schedule; the nearest, {nearest}, is used "
                                 f"({why})")
                name = nearest
            if name in _field(target)[0].metadata["choices"]:
                put(target, name, key)
            else:
                not_mapped(key, "no such sdlora schedule; its default applies")
        elif key == "caption_extension":
            text = _typed(value, str, where(key))
            if _caption_extension(text) != text:
                out.notes.append(f"--{key} = {text}: not a file extension sdlora accepts; the nearest, "
                                 f"{_caption_extension(text)}, is used")
            put(target, _caption_extension(text), key)
        else:
            put(target, value, key)
    _network_args(network_args, put, out, where('network_args'))
    network = out.config.get("network", {})
    if network.get("dora") and network.get("type", "lora") not in ("lora", "locon"):
        out.notes.append(f"dora_wd = true: sdlora's DoRA is for lora and locon adapters, not {network['type']}; "
                         "not used")
        del network["dora"]
    if out.off:
        out.unmapped.append(f"off or unset in the source, nothing lost: {', '.join('--' + k for k in out.off)}")
    if subsets:
        out.config.setdefault("dataset", {})["subsets"] = _subsets(subsets, out)
    return out


def _drop_unset(args: dict, gui: set, out: Conversion) -> None:
    """The GUI's "unset": "" (and 0 where kohya means unset; a GUI's seed 0 too) leaves sdlora's default."""
    unset = [k for k, v in args.items() if not _given(v) or v == [] or (
        (k in ZERO_IS_UNSET or k == "seed" and k in gui) and not isinstance(v, bool) and _number(v) == 0)]
    defaults = sorted(f"{KOHYA_KEYS[k]} ({k})" for k in unset if k in KOHYA_KEYS)
    out.off += [k for k in unset if k not in KOHYA_KEYS]
    if defaults:
        out.notes.append(f"unset in the source (\"\" or 0), so sdlora's default applies: {', '.join(defaults)}")
    for k in unset:
        del args[k]


def _family(setup: Setup, args: dict) -> str | None:
    """"flux" or "sd3" when the sources say which sd-scripts family they train (the GUI's checkbox, the
    script, the network module), else None."""
    for key, family in GUI_CHECKBOXES.items():
        if _number(args.get(key)) is True:
            return family
    scripts = [FAMILY_SCRIPTS[s] for s in setup.scripts if s in FAMILY_SCRIPTS]
    if scripts:
        return scripts[-1]
    if str(args.get("LoRA_type", "")).lower().startswith("flux1"):
        return "flux"
    return FAMILY_MODULES.get(str(args.get("network_module", "")).lower())


def _gui_family_fields(args: dict, gui: set, out: Conversion) -> None:
    """The kohya_ss GUI's fields of a family whose checkbox is off are not passed to sd-scripts: left out."""
    on = {family for key, family in GUI_CHECKBOXES.items() if _number(args.get(key)) is True}
    unused = [k for k in args if k in gui and k in GUI_FAMILY_KEYS and not on & set(GUI_FAMILY_KEYS[k])]
    for key in unused:
        del args[key]
    if unused:
        out.notes.append(f"{', '.join(unused)}: the kohya_ss GUI passes these only with its FLUX.1 / SD3 checkbox "
                         "on, which this file leaves off (or, sigmoid_scale, for none of them); not used")
    for key in GUI_CHECKBOXES:
        if key in args:
            out.unmapped.append(f"--{key}: not needed (the base model's family is read from the base itself)")
            del args[key]


def _pending(args: dict, network_args: dict, put, out: Conversion) -> None:
    """The options whose sdlora keys other parts of issue 22 add (PENDING_KEYS, PENDING_NETWORK_ARGS, the
    text-encoder files): mapped when this sdlora has the key."""
    def take(target: str, value, key: str, label: str, converted=None) -> None:
        if _field(target) is None:
            out.unmapped.append(f"--{label} = {value}: needs sdlora's {target}, which this version does not have")
        else:
            put(target, value, key, raw=value, converted=converted)

    for key, target in PENDING_KEYS.items():
        if key in args:
            value = args.pop(key)
            if _is_off(value):
                out.off.append(key)
            else:
                take(target, value, key, key)
    for key, target in PENDING_NETWORK_ARGS.items():
        if key in network_args:
            value = network_args.pop(key)
            if key != "train_t5xxl" or not _is_off(value):
                take(target, value, key, f"network_args {key}")
    named = [k for k in TEXT_ENCODER_FILES if k in args]
    files = list(dict.fromkeys(str(args.pop(k)) for k in named))  # the GUI's clip_l and sd3_clip_l may agree
    if files:
        take("model.text_encoders", files, named[0], "/".join(named),
             converted=lambda v: [str(Path(f).expanduser().resolve()) for f in v])


def _stop_text_encoder_training(args: dict, gui: set, out: Conversion) -> None:
    """The GUI's stop_text_encoder_training(_pct), a percentage of the steps: its LoRA tab ignores it ("not yet
    supported. Ignoring", kohya_gui/lora_gui.py) and kohya trains the text encoder to the end, so it is left
    out. sd-scripts' own --stop_text_encoder_training (steps) maps through KOHYA_KEYS."""
    for key in ["stop_text_encoder_training_pct"] + ["stop_text_encoder_training"] * (
            "stop_text_encoder_training" in gui):
        if key not in args:
            continue
        pct = args.pop(key)
        if _is_off(pct):
            out.off.append(key)
        else:
            out.unmapped.append(f"--{key} = {pct}% of the steps: the kohya_ss LoRA tab ignores it and trains the "
                                "text encoder to the end, as this config now does (set "
                                "train.stop_text_encoder_training to a step count to stop it)")


def _network_args(network_args: dict, put, out: Conversion, where: str) -> None:
    """network_args -> [network] keys: conv_dim, conv_alpha, dropout and the block weights (comma lists of
    numbers; the lr weights may be a preset name instead)."""
    # kohya (networks/lora.py create_network) reads block_alphas and the conv block values only when
    # block_dims or a block lr weight is given; alone they change nothing there.
    blockwise = any(not _is_off(network_args.get(k)) for k in ("block_dims", *kohya_blocks.LR_WEIGHT_KEYS))
    for modulation_args in (FLUX_MODULATION_ARGS, SD3_MODULATION_ARGS):  # lora_flux's, lora_sd3's
        modulation = {k: _number(network_args.pop(k)) for k in modulation_args if k in network_args}
        if modulation and len(modulation) == len(modulation_args) and not any(modulation.values()):
            put("network.train_modulation", False, "network_args", raw=" ".join(f"{k}=0" for k in modulation_args))
        elif modulation:
            out.unmapped.append(f"--network_args {', '.join(f'{k}={v}' for k, v in modulation.items())}: sdlora "
                                f"drops the modulation linears only all together (network.train_modulation = "
                                f"false, kohya's {' = '.join(modulation_args)} = 0)")
    for key, value in network_args.items():
        label = f"{where} {key}"
        if key in SELECTION_ARGS:  # "0,1,8-12" arrives as a list of its items
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            check = _field(KOHYA_KEYS[key])[0].metadata["check"]
            put(KOHYA_KEYS[key], text, f"network_args {key}", raw=text,
                converted=(lambda v, label=label, check=check: check(v, label)) if check else None)
        elif _is_off(value):
            out.off.append(f"network_args {key}")
        elif key in ("block_alphas", "conv_block_dims", "conv_block_alphas") and not blockwise:
            out.unmapped.append(f"--network_args {key}={value}: kohya ignores it without block_dims or a block lr "
                                f"weight, so it is left out (sdlora's network.{key} would apply it alone)")
        elif key in NETWORK_ARGS:
            target = KOHYA_KEYS["network_dropout" if key == "dropout" else key]
            # the block values as the config schema's own check reads them (kohya's "1,,0.5" strings or lists)
            check = _field(target)[0].metadata["check"] if key in BLOCK_ARGS else None
            converted = (lambda v, label=label, check=check: check(v, label)) if check else None
            put(target, value, f"network_args {key}", raw=value, converted=converted)
        else:
            out.unmapped.append(f"--network_args {key}={value}: no sdlora equivalent")


def _learning_rates(args: dict, gui: set, put, out: Conversion) -> None:
    """kohya's learning_rate is the rate of whichever of unet_lr / text_encoder_lr is not given; SDXL's two
    text encoders take text_encoder_lr1/2 (or text_encoder_lr as a list of two) -> sdlora's [te1, te2]."""
    rates = ("unet_lr", "text_encoder_lr")
    if set(rates) <= gui & set(args) and all(_number(args[k]) == 0 for k in rates):
        # The kohya_ss GUI passes neither rate when both are 0, so kohya trains both at learning_rate.
        out.notes.append("unet_lr = 0 and text_encoder_lr = 0: the kohya_ss GUI then trains both at learning_rate")
        for k in rates:
            del args[k]
    lr = args.pop("learning_rate", None)
    t5 = args.pop("t5xxl_lr", None)
    if "unet_lr" in args or lr is not None:
        key = "unet_lr" if "unet_lr" in args else "learning_rate"
        put("train.unet_lr", args.pop("unet_lr", lr), key)
    te = args.pop("text_encoder_lr", args.pop("learning_rate_te", None))
    if isinstance(te, list) and len(te) == 1:
        te = te[0]
    halves = [args.pop(k, args.pop(gui, None)) for k, gui in (("text_encoder_lr1", "learning_rate_te1"),
                                                            ("text_encoder_lr2", "learning_rate_te2"))]
    if any(h is not None for h in halves):
        fallback = next(v for v in (te, lr, _field("train.text_encoder_lr")[0].default) if v is not None)
        value, key = [h if h is not None else fallback for h in halves], "text_encoder_lr1/2"
    elif te is not None:
        value, key = te, "text_encoder_lr"
    elif lr is not None:
        value, key = lr, "learning_rate"
    else:
        return
    if not _is_off(t5) and isinstance(_number(value), (int, float)) and _number(value) > 0:
        # the kohya_ss GUI's T5-XXL rate: it passes --text_encoder_lr text_encoder_lr t5xxl_lr (lora_gui.py)
        value, key = [value, t5], "text_encoder_lr, t5xxl_lr"
    if isinstance(value, list) and len(value) == 2 and _number(value[0]) == _number(value[1]):
        value = value[0]  # one rate for every text encoder: also right for a base with one (SD1.x, SD2.x)

    def rates(v):
        typed = [_typed(x, float, key) for x in v] if isinstance(v, list) else _typed(v, float, key)
        if any(x < 0 for x in (typed if isinstance(typed, list) else [typed])):
            raise UserError(f"--{key} = {v}: a learning rate is 0 or more")
        return typed

    put("train.text_encoder_lr", value, key, raw=value, converted=rates)


def _noise(args: dict, out: Conversion) -> None:
    """The GUI's noise_offset_type picks one noise: "Original" (noise_offset, adaptive_noise_scale) or
    "Multires" (multires_noise_iterations / discount); the other's values are not used."""
    kind = str(args.pop("noise_offset_type", "")).lower()
    unused = {"multires": ("noise_offset", "adaptive_noise_scale"),
              "original": ("multires_noise_iterations", "multires_noise_discount")}.get(kind, ())
    dropped = [f"{k} = {v}" for k, v in ((k, args.pop(k)) for k in unused if k in args) if not _is_off(v)]
    if dropped:
        out.notes.append(f"noise_offset_type = {kind.title()}: {', '.join(dropped)} not used, as in kohya_ss")
    if not _is_off(args.get("adaptive_noise_scale")) and _is_off(args.get("noise_offset")):
        out.notes.append(f"adaptive_noise_scale = {args.pop('adaptive_noise_scale')} adds to noise_offset, which is "
                         "not set: not used (kohya refuses it without noise_offset)")


def _sample_prompts(value, key: str, put, not_mapped) -> None:
    """sd-scripts' sample_prompts is a prompt file; the kohya_ss GUI's holds the prompts themselves."""
    text = str(value)
    if "\n" not in text and (_is_file(text) or text.lower().endswith(".txt")):
        put("sample.prompt_file", text, key)
    elif "\n" not in text and text.lower().endswith((".toml", ".json")):
        not_mapped(key, "sdlora reads prompt files as text, one prompt per line (--n --w --h --d --s --l --ss)")
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if any(" --" in line for line in lines):
            not_mapped(key, "prompts with --options: save them to a file and set sample.prompt_file to it")
        else:
            put("sample.prompts", lines, key, raw=" | ".join(lines))


def _nearest_resolution(value, where: str, key: str, out: Conversion):
    """A resolution whose sides are multiples of 8 and at least 64 (sdlora's VAE and buckets need them)."""
    size = _resolution(value, where)
    sides = [size] if isinstance(size, int) else size
    nearest = [nearest_side(s) for s in sides]
    if nearest != sides:
        out.notes.append(f"--{key} = {value}: sdlora's sides are multiples of 8, at least 64; the nearest, "
                         f"{_toml_value(nearest if len(nearest) > 1 else nearest[0])}, is used")
    return nearest[0] if len(nearest) == 1 else nearest


def _apply_datasets(datasets: list[dict], args: dict, origin: dict, out: Conversion) -> list[dict]:
    """sdlora trains one dataset: the first [[datasets]]'s settings apply (over the arguments', as kohya's
    dataset config beats them), the subsets of every dataset are trained. Returns the subsets."""
    if not datasets:
        return []
    for key in ("train_data_dir", "reg_data_dir", "in_json"):  # kohya ignores them when a dataset config is given
        if key in args:
            out.notes.append(f"--{key} {args.pop(key)}: not used, a dataset config names the images (as in kohya)")
    first, subsets = datasets[0], []
    for dataset in datasets:
        split = dataset["keys"].get("validation_split")
        whole = split is not None and _number(split) == 1
        subsets += [{**s, "validation": True} if whole else s for s in dataset["subsets"]]
        if whole:  # kohya: the whole dataset is held out for validation; sdlora says that per subset
            out.notes.append(f"{dataset['where']}: validation_split = 1 holds out its subsets whole -> "
                             "[[dataset.subsets]] validation = true")
    own = {k: v for k, v in first["keys"].items() if not (k == "validation_split" and _number(v) == 1)}
    for key, value in own.items():
        if key in args and args[key] != value:
            out.notes.append(f"--{key} {args[key]} ({origin[key]}): the dataset config's {value} applies, as in kohya")
        args[key], origin[key] = value, first["where"]
    for dataset in datasets[1:]:
        ignored = [f"{k} = {v}" for k, v in dataset["keys"].items()
                   if k not in INHERITED and not (k == "validation_split" and _number(v) == 1) and own.get(k) != v]
        if ignored:
            out.notes.append(f"{dataset['where']}: {', '.join(ignored)} not used: sdlora trains one dataset, and "
                             f"{first['where']}'s settings apply to every subset")
    return subsets


def _subsets(subsets: list[dict], out: Conversion) -> list[dict]:
    """[[datasets.subsets]] -> sdlora's [[dataset.subsets]] tables."""
    entries = []
    for i, subset in enumerate(subsets):
        label = f"[[datasets.subsets]] {i}"
        if not _given(subset.get("image_dir")):
            out.unmapped.append(f"{label}: no image_dir (a fine-tuning subset with metadata_file?); sdlora reads "
                                "images and caption files from a folder, so it is left out")
            continue
        entry = {}
        for key, value in subset.items():
            found = _field(f"dataset.subsets[].{key}")
            if found is None:
                if not _is_off(value):
                    out.unmapped.append(f"{label} {key} = {value!r}: no sdlora equivalent")
                continue
            f, kind = found
            value = _typed(value, kind, f"{label} {key}")
            if key == "image_dir":
                value = str(Path(value).expanduser().resolve())
            elif key == "caption_extension" and _caption_extension(value) != value:
                out.notes.append(f"{label} caption_extension = {value}: the nearest sdlora accepts, "
                                 f"{_caption_extension(value)}, is used")
                value = _caption_extension(value)
            if _nearest(value, f, key) != value:
                out.notes.append(f"{label} {key} = {value}: sdlora's subsets take {_describe_range(f, key)}; the "
                                 f"nearest, {_nearest(value, f, key)}, is used")
                value = _nearest(value, f, key)
            entry[key] = value
            out.mapped.append(f"{label} {key} = {_toml_value(value)} -> [[dataset.subsets]] {key}")
        entries.append(entry)
    return entries


def _describe_range(f, target: str) -> str:
    if target.endswith("bucket_reso_steps"):
        return "multiples of 8"
    low, high = f.metadata.get("min"), f.metadata.get("max")
    return " to ".join(str(x) for x in (low, high) if x is not None) if high is not None else f"at least {low}"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{value!r} is not a finite number; sdlora writes none to a config")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise UserError(f"{value!r} cannot be written to a TOML config")


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


def check(text: str) -> None:
    """Refuse a converted config that `sdlora config check` would refuse, naming the key."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "converted.toml"
        path.write_text(text, encoding="utf-8")
        try:
            load_config(path)
        except ConfigError as e:
            raise UserError(f"the converted config is not valid: {str(e).replace(str(path), 'converted config')}") \
                from None


def import_kohya(sources: list[str], log=print) -> str:
    """The sdlora config text for the given kohya sources; logs each mapping and what was not mapped."""
    setup = Setup()
    for source in sources:
        read_source(source, setup)
    result = convert(setup)
    named = re.sub(r"[\x00-\x1f\x7f]", " ", ", ".join(s if len(s) < 200 else s[:200] + "..." for s in sources))
    text = to_toml(result.config, f"# converted by `sdlora import-kohya` from: {named}")
    check(text)
    for line in result.mapped:
        log(f"mapped: {line}")
    for line in result.unmapped:
        log(f"not mapped: {line}")
    for line in result.notes:
        log(f"note: {line}")
    return text

