"""kohya's block-wise U-Net settings (networks/lora.py network_args): per-block ranks and alphas
(`block_dims`, `block_alphas`, `conv_block_dims`, `conv_block_alphas`) and learning-rate weights
(`down_lr_weight`, `mid_lr_weight`, `up_lr_weight`, `block_lr_zero_threshold`).

Blocks are numbered as kohya numbers them, from the module's Kohya key:

    SD1.x / SD2.x (25 blocks): 0 = IN00 (conv_in, never adapted), 1 + 3 i + j = down_blocks.i's
        resnets/attentions.j (its downsampler: j = 2), 12 = mid_block, 13 + 3 i + j = up_blocks.i's
        (its upsampler shares j = 2 with the third layer): IN01..IN11, MID, OUT00..OUT11.
    SDXL (23 blocks, SGM names): 0 = time/label embedding, 1 + n = input_blocks.n, 10 + n =
        middle_block.n, 13 + n = output_blocks.n, 22 = out.

Learning-rate weights are given per side: down (IN00..) and up (OUT00..) have 12 entries (SDXL 9),
mid 1 (SDXL 3); SDXL's blocks 0 and 22 weigh 1. A side may be one of kohya's presets over its
entries i = 0..n-1: cosine sin(pi/2 * (n-1-i)/(n-1)), sine sin(pi/2 * i/(n-1)), linear i/(n-1),
reverse_linear (n-1-i)/(n-1), zeros 0; "+x" adds x to each. A weight <= block_lr_zero_threshold
becomes 0, and a block of weight 0 gets no adapters (kohya does not create them).

Values are read in kohya's spellings (a list, or "1,2,3"); `kohya_args` writes them back as
kohya's `ss_network_args` does. Pure Python: the config loader uses it without torch.
"""

from __future__ import annotations

import math
import re

from sdlora.errors import ConfigError, UserError

# (entries of the down and of the up side, entries of mid) by naming: diffusers (SD1.x/SD2.x), SGM (SDXL)
SIDES = {False: (12, 1), True: (9, 3)}
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
LR_WEIGHT_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
_PRESET = re.compile(rf"^({'|'.join(LR_WEIGHT_PRESETS)})(\+[-+]?[0-9.]+(e[-+]?\d+)?)?$")
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def block_count(sgm: bool) -> int:
    """25 (SD1.x / SD2.x) or 23 (SDXL, SGM names: kohya's extra embedding and out blocks)."""
    side, mid = SIDES[sgm]
    return 2 * side + mid + (2 if sgm else 0)


def block_index(key: str, sgm: bool) -> int:
    """kohya's block number of a U-Net module from its Kohya key (networks/lora.py get_block_index)."""
    name = key.removeprefix("lora_unet_")
    if sgm:
        for prefix, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
            if name.startswith(prefix):
                return first + int(name[len(prefix):].split("_")[0])
        if name.startswith(("time_embed_", "label_emb_")):
            return 0
        if name.startswith("out_"):
            return 22
    else:
        m = _UPDOWN.search(key)
        if m:
            side, i, kind, j = m.groups()
            index = 3 * int(i) + (2 if kind in ("upsamplers", "downsamplers") else int(j))
            return 1 + index if side == "down" else SIDES[False][0] + 1 + index
        if "mid_block_" in key:
            return SIDES[False][0]
    raise ValueError(f"{key}: no kohya block holds this U-Net module")


# ---------------------------------------------------------------------------------------------
# Reading the config values (network.block_dims = [..] or "4,4,8", network.down_lr_weight = "sine+0.5")


def _numbers(value, where: str, kind: type, empty_is_zero: bool = False) -> list:
    if isinstance(value, str):
        items = [s.strip() for s in value.split(",")] if value.strip() else []
        try:
            value = [kind(0) if s == "" and empty_is_zero else kind(s) for s in items]
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a comma-separated list of "
                              f"{'integers' if kind is int else 'numbers'}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of numbers (or kohya's \"1,2,3\"), got {value!r}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, float) and kind is int and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise ConfigError(f"{where}[{i}]: expected {'an integer' if kind is int else 'a number'}, got {v!r}")
        if not math.isfinite(v):
            raise ConfigError(f"{where}[{i}]: {v!r} is not a finite number")
        out.append(kind(v))
    return out


def check_block_dims(value, where: str) -> list[int]:
    """network.block_dims / conv_block_dims: one rank >= 0 per block (0: no adapter there)."""
    dims = _numbers(value, where, int)
    for i, d in enumerate(dims):
        if not 0 <= d <= 1024:
            raise ConfigError(f"{where}[{i}]: {d} is not a rank from 0 to 1024")
    return dims


def check_block_alphas(value, where: str) -> list[float]:
    """network.block_alphas / conv_block_alphas: one alpha >= 0 per block."""
    alphas = _numbers(value, where, float)
    for i, a in enumerate(alphas):
        if a < 0:
            raise ConfigError(f"{where}[{i}]: alpha {a:g} is below 0")
    return alphas


def check_lr_weight(value, where: str, presets: bool = True):
    """down_lr_weight / up_lr_weight: a list of weights, kohya's "1,0.5,..." or a preset such as
    "sine" or "cosine+0.25"; mid_lr_weight: numbers only (kohya reads no preset there)."""
    if presets and isinstance(value, str) and _PRESET.match(value.strip()):
        return value.strip()
    try:
        return _numbers(value, where, float, empty_is_zero=True)
    except ConfigError:
        if not (presets and isinstance(value, str)):
            raise
        raise ConfigError(f"{where}: {value!r} is neither a list of weights nor a preset; choose one of "
                          f"{', '.join(LR_WEIGHT_PRESETS)}, optionally with \"+number\" (e.g. \"sine+0.5\")") from None


def check_mid_lr_weight(value, where: str) -> list[float]:
    return check_lr_weight(value, where, presets=False)


# ---------------------------------------------------------------------------------------------
# Resolving them for one U-Net


def _expand(value, n: int) -> list[float]:
    """A side's weights: the list as given, or the preset's n values."""
    if not isinstance(value, str):
        return list(value)
    name, _, plus = value.partition("+")
    base = float(plus) if plus else 0.0
    ramp = [i / (n - 1) for i in range(n)]
    curve = {"cosine": [math.sin(math.pi * x / 2) for x in reversed(ramp)],
             "sine": [math.sin(math.pi * x / 2) for x in ramp],
             "linear": ramp, "reverse_linear": ramp[::-1], "zeros": [0.0] * n}[name]
    return [w + base for w in curve]


def uses_blocks(net) -> bool:
    """Whether any block-wise key of [network] is set."""
    return any(getattr(net, k) for k in (*DIM_KEYS, *LR_WEIGHT_KEYS))


def block_lr_weights(net, sgm: bool, log=print) -> list[float] | None:
    """One learning-rate weight per block (kohya's get_block_lr_weight), None when no side is set.
    A side longer than kohya's count is cut, a shorter one filled with 1.0, as kohya does; `log`
    says so."""
    side, mid = SIDES[sgm]
    sides = [("down_lr_weight", net.down_lr_weight, side), ("mid_lr_weight", net.mid_lr_weight, mid),
             ("up_lr_weight", net.up_lr_weight, side)]
    if not any(value for _, value, _ in sides):
        return None
    weights = []
    for key, value, n in sides:
        w = _expand(value, n) if value else [1.0] * n
        if len(w) != n:
            log(f"warning: [network] {key} has {len(w)} weights, this U-Net's {key.split('_')[0]} side has {n}: "
                f"{'the rest are cut' if len(w) > n else 'the missing ones are 1.0'} (as kohya does)")
            w = (w + [1.0] * n)[:n]
        if value:
            w = [x if x > net.block_lr_zero_threshold else 0.0 for x in w]
        weights += w
    return [1.0, *weights, 1.0] if sgm else weights


def check_block_lengths(net, sgm: bool) -> None:
    """block_dims and the other per-block lists must have one value per block of this U-Net."""
    n = block_count(sgm)
    for key in DIM_KEYS:
        value = getattr(net, key)
        if value and len(value) != n:
            names = "BASE, IN00-IN08, MID0-2, OUT00-OUT08, OUT" if sgm else "IN00-IN11, MID, OUT00-OUT11"
            raise UserError(f"[network] {key} has {len(value)} values; this U-Net ({'SDXL' if sgm else 'SD1.x/SD2.x'}) "
                            f"has {n} blocks ({names}): give {n}")


def kohya_args(net) -> dict[str, str]:
    """The block-wise keys that are set, as kohya's ss_network_args spells them ("4,4,8", "sine+0.5")."""
    args = {}
    for key in (*DIM_KEYS, *LR_WEIGHT_KEYS):
        value = getattr(net, key)
        if value:
            args[key] = value if isinstance(value, str) else ",".join(f"{v:g}" for v in value)
    if any(key in args for key in LR_WEIGHT_KEYS) and net.block_lr_zero_threshold:
        args["block_lr_zero_threshold"] = f"{net.block_lr_zero_threshold:g}"
    return args


# ---------------------------------------------------------------------------------------------
# Transformer blocks (kohya's networks/lora_flux.py: train_double_block_indices, train_single_block_indices;
# networks/lora_sd3.py: train_block_indices over the joint blocks)


def block_selection(value, where: str, total: int | None = None) -> list[int] | None:
    """The block indices a kohya selection string names, kohya's `parse_block_selection`: "all"
    (None: every block), "none" or "" (none), or indices and inclusive ranges, "0,1,8-12,18". With
    `total` (the model's block count) each index must lie in 0..total-1; without it only the
    syntax is checked (the config loader knows no model)."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string such as \"all\", \"none\" or \"0,1,8-12\", got {value!r}")
    text = value.strip()
    if text == "all":
        return None
    if text in ("none", ""):
        return []
    selected: set[int] = set()
    for item in text.split(","):
        start, dash, end = item.partition("-")
        try:
            first, last = int(start), int(end if dash else start)
        except ValueError:
            raise ConfigError(f"{where}: {item.strip()!r} in {value!r} is neither an index nor a range such as "
                              f"\"8-12\"; write \"all\", \"none\" or indices and ranges, e.g. \"0,1,8-12\"") from None
        if first > last:
            raise ConfigError(f"{where}: range {item.strip()!r} runs backwards; write it as \"{last}-{first}\"")
        for index in (first, last):
            if index < 0 or (total is not None and index >= total):
                bound = f"0 to {total - 1}" if total is not None else "0 or above"
                raise UserError(f"{where}: block {index} does not exist; this model's blocks are numbered {bound}")
        selected.update(range(first, last + 1))
    return sorted(selected)


def check_block_selection(value, where: str) -> str:
    """network.train_double_block_indices / train_single_block_indices / train_block_indices: kohya's
    selection syntax."""
    block_selection(value, where)
    return value.strip()


def selection_args(net) -> dict[str, str]:
    """The transformer block selection keys that are not "all", as kohya's ss_network_args spells them."""
    args = {"train_blocks": net.train_blocks, "train_double_block_indices": net.train_double_block_indices,
            "train_single_block_indices": net.train_single_block_indices,
            "train_block_indices": net.train_block_indices}
    return {key: value for key, value in args.items() if value != "all"}
