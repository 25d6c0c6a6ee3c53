"""Typed, validated configuration: one TOML per style, plus `--set section.key=value`.

Every key has a default and a help text; unknown keys, wrong types and out-of-range
values raise `ConfigError` naming the file, the key and what is allowed, before any
work starts. Paths are resolved relative to the config file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlora import kohya_blocks
from sdlora.errors import ConfigError  # noqa: F401 - raised here, caught as config.ConfigError by callers
from sdlora.io import IMAGE_EXTENSIONS, file_name_problem, inside
from sdlora.kohya_names import KOHYA_KEYS, kohya_hint

SEED_MAX = 2**32 - 1  # numpy's and A1111's seed range, which accelerate's set_seed and samplers share


def opt(default, help: str, *, choices=None, min=None, max=None, path=False, check=None, items=None):
    """A config field with its help text and constraints, read by `validate` and `--help`.

    check: for fields typed `Any`, a function (value, where) -> value that validates them.
    items: the type of a list's elements (or a table's values); min/max then bound each element.
    """
    meta = {"help": help, "choices": choices, "min": min, "max": max, "path": path, "check": check, "items": items}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Image sides: multiples of the VAE's 8x downscale (SIDE_STEP); training sides at least MIN_SIDE.
SIDE_STEP, MIN_SIDE = 8, 64


def nearest_side(side: float, minimum: int = MIN_SIDE) -> int:
    """The nearest side sdlora accepts: a multiple of SIDE_STEP, at least `minimum` (import-kohya's
    nearest valid value for kohya's resolutions and bucket steps)."""
    return max(minimum, round(side / SIDE_STEP) * SIDE_STEP)


def _resolution(value, where: str):
    """An int (square) or [width, height], sides multiples of 8 and at least 64."""
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                            for v in value))
    if not ok:
        raise ConfigError(f"{where}: expected an integer or [width, height], got {value!r}")
    sides = [value] if isinstance(value, int) else value
    for s in sides:
        if s < MIN_SIDE or s % SIDE_STEP:
            raise ConfigError(f"{where}: sides must be multiples of 8 and at least 64, got {value!r}")
    return value


def _learning_rates(value, where: str):
    """One learning rate, or one per text encoder in the family's order: SDXL [te1, te2], FLUX.1 [clip_l, t5],
    SD3 [clip_l, clip_g, t5] (the count is checked against the base, `network.text_encoder_lrs`)."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if number(value):
        value = float(value)
    elif isinstance(value, list) and value and len(value) <= 3 and all(number(v) for v in value):
        value = [float(v) for v in value]
    else:
        raise ConfigError(f"{where}: expected a number or one per text encoder ([te1, te2]; FLUX.1 [clip_l, t5]), "
                          f"got {value!r}")
    for v in value if isinstance(value, list) else [value]:
        if not 0.0 <= v < float("inf"):
            raise ConfigError(f"{where}: {v!r} is not a finite learning rate >= 0")
    return value


@dataclass
class ModelConfig:
    base: str = opt("tiny", "base model: 'tiny' (embedded), a diffusers folder, a .safetensors "
                    "checkpoint, or a hub id (downloaded only when named)")
    vae: str = opt("", "optional separate VAE: a .safetensors file or diffusers folder", path=True)
    text_encoders: list = opt([], "separate text encoders for a single-file base that lacks them (FLUX.1: "
                              "clip_l.safetensors, t5xxl_fp16.safetensors), each recognised by its tensors, "
                              "and the T5 tokenizer's folder", path=True, items=str)
    clip_skip: int = opt(1, "kohya's clip_skip: 2 uses the penultimate text-encoder layer", min=1, max=12)
    allow_pickle: bool = opt(False, "allow loading pickled .ckpt/.pt/.pth files: bases (torch.load "
                                           "weights_only=True) and [sample] hires_upscaler models")
    v_parameterization: str = opt("auto", "prediction type: auto (from the base) | epsilon | v_prediction",
                                  choices=["auto", "epsilon", "v_prediction"])
    quantize: str = opt("none", "hold the frozen U-Net and text-encoder weights quantised while training: "
                        "none | fp8 (any device) | nf4 (bitsandbytes, CUDA); adapters stay full precision",
                        choices=["none", "fp8", "nf4"])


# Precisions a saved file (adapter, merged model) can be written in: train.save_precision, --save-precision.
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
# Key styles of adapter files ([output] format, `sdlora convert --format`): Kohya's, diffusers' own.
ADAPTER_FORMATS = ("kohya", "diffusers")
# The [dataset] keys a [[dataset.subsets]] table may set (its defaults come from [dataset]).
SUBSET_SHARED_KEYS = ("image_dir", "num_repeats", "keep_tokens", "caption_extension", "shuffle_caption",
                      "caption_dropout_rate", "caption_tag_dropout_rate", "flip_aug")


@dataclass
class DatasetConfig:
    image_dir: str = opt("images", "folder of training images (with .txt captions)", path=True)
    num_repeats: int = opt(10, "times each image is seen per epoch (kohya's repeats)", min=1)
    resolution: Any = opt(512, "training resolution: an int or [width, height]", check=_resolution)
    enable_bucket: bool = opt(True, "aspect-ratio bucketing (no squashing, minimal cropping)")
    min_bucket_reso: int = opt(256, "smallest bucket side", min=32)
    max_bucket_reso: int = opt(1024, "largest bucket side", min=32)
    bucket_reso_steps: int = opt(64, "bucket side step (a multiple of 8)", min=8)
    bucket_no_upscale: bool = opt(False, "never upscale an image to reach its bucket")
    caption_extension: str = opt(".txt", "caption sidecar extension: a text type such as .txt or .caption, "
                                 "never an image type")
    shuffle_caption: bool = opt(True, "shuffle tags each step, keeping the first keep_tokens in place")
    keep_tokens: int = opt(1, "leading tags never shuffled or dropped (the trigger)", min=0)
    caption_dropout_rate: float = opt(0.0, "probability of training on an empty caption", min=0.0, max=1.0)
    caption_tag_dropout_rate: float = opt(0.0, "probability of dropping each non-kept tag", min=0.0, max=1.0)
    flip_aug: bool = opt(False, "random horizontal flips (both orientations are cached)")
    validation_split: float = opt(0.0, "share of each training subset's images held out for a validation loss "
                                       "per epoch (kohya's validation_split)", min=0.0, max=0.9)
    max_token_length: int = opt(75, "caption tokens the text encoder sees (kohya's): 150 / 225 encode 75-token "
                                     "chunks separately and join them", choices=[75, 150, 225])
    # Dataset-builder settings (validation, de-duplication); see `sdlora dataset`.
    max_pixels: int = opt(40_000_000, "images with more pixels are rejected (decompression bombs)", min=1)
    min_side: int = opt(64, "images whose shorter side is smaller are rejected", min=1)
    background: str = opt("#ffffff", "colour transparent pixels are composited on")
    dedupe: bool = opt(True, "keep only the first image of each near-duplicate group")
    dedupe_threshold: float = opt(0.97, "cosine similarity above which images are near-duplicates",
                                  min=0.0, max=1.0)
    subsets: list = opt([], "[[dataset.subsets]] tables, kohya's subsets: each needs image_dir and may set "
                            f"{', '.join(SUBSET_SHARED_KEYS[1:])} (default: the [dataset] value) and the "
                            "dataset.subsets[] keys below")
    reg_dir: str = opt("", "kohya's reg_data_dir: its N_words folders are regularisation subsets", path=True)


@dataclass
class CaptionConfig:
    tagger: str = opt("open_clip", "auto-tagger backend", choices=["open_clip", "none"])
    model: str = opt("tiny", "open_clip model: 'tiny' (embedded) or an open_clip architecture name")
    pretrained: str = opt("", "open_clip checkpoint: a local file, or a pretrained tag (downloads)")
    vocabulary: str = opt("", "tag vocabulary file, one tag per line; empty = the packaged general vocabulary "
                              "(scenery, subjects, style, medium)", path=True)
    threshold: float = opt(0.35, "keep tags scoring above this", min=0.0, max=1.0)
    max_tags: int = opt(20, "at most this many tags per image", min=1)
    batch_size: int = opt(16, "images per tagger batch", min=1)
    retag: bool = opt(False, "re-tag images that already have captions (old ones are backed up)")
    blacklist: list = opt([], "tags never written", items=str)
    replace: dict = opt({}, "synonym rules: {\"from\" = \"to\"}", items=str)
    style_tags: list = opt([], "style words folded into the trigger and removed from captions", items=str)
    min_tag_count: int = opt(1, "drop tags seen on fewer images than this", min=1)


@dataclass
class NetworkConfig:
    type: str = opt("lora", "adapter type", choices=["lora", "locon", "loha", "lokr"])
    dim: int = opt(16, "network rank (network_dim)", min=1, max=1024)
    alpha: float = opt(8.0, "network_alpha; the scale is alpha / dim", min=0.0)
    conv_dim: int = opt(0, "rank of the ResNet 3x3 conv adapters (LoCon; 'all' preset); 0 = dim", min=0)
    conv_alpha: float = opt(0.0, "alpha of the conv adapters; 0 = conv_dim / 2", min=0.0)
    unet_targets: str = opt("transformer", "U-Net modules adapted",
                            choices=["attn2", "attention", "transformer", "all"])
    train_text_encoder: bool = opt(True, "adapt the text encoder too (FLUX.1 / SD3: the CLIP encoders; T5 only with "
                                         "train_t5)")
    train_t5: bool = opt(False, "adapt T5-XXL too (FLUX.1 / SD3, kohya's train_t5xxl; needs train_text_encoder)")
    dropout: float = opt(0.0, "dropout on the adapter input", min=0.0, max=1.0)
    init_weights: str = opt("", "start from this Kohya LoRA file (kohya's network_weights); its modules, ranks and "
                                "alphas must match [network]", path=True)
    dora: bool = opt(False, "DoRA: learn a magnitude per output row too (lora and locon; LyCORIS dora_wd)")
    # kohya's block-wise network_args (networks/lora.py); kohya_blocks.py numbers the blocks
    block_dims: Any = opt([], "U-Net rank per block (kohya's block_dims): 25 values IN00-IN11, MID, OUT00-OUT11 "
                              "(SDXL: 23), a list or \"2,4,...\"; 0 = no adapter in that block; 3x3 convs keep "
                              "conv_dim",
                          check=kohya_blocks.check_block_dims)
    block_alphas: Any = opt([], "U-Net alpha per block (kohya's block_alphas); empty = alpha (0: the block's dim)",
                            check=kohya_blocks.check_block_alphas)
    conv_block_dims: Any = opt([], "rank of the 3x3 conv adapters per block (kohya's conv_block_dims); empty = "
                                   "conv_dim",
                               check=kohya_blocks.check_block_dims)
    conv_block_alphas: Any = opt([], "alpha of the 3x3 conv adapters per block; empty = conv_alpha (0: the block's "
                                     "conv dim / 2)", check=kohya_blocks.check_block_alphas)
    down_lr_weight: Any = opt([], "unet_lr weight of each down block IN00-IN11 (SDXL: 9, IN00-IN08), a list or "
                                  "a preset: cosine, sine, linear, reverse_linear, zeros, with an optional "
                                  "\"+number\" (e.g. \"sine+0.5\")", check=kohya_blocks.check_lr_weight)
    mid_lr_weight: Any = opt([], "unet_lr weight of the mid block (SDXL: 3 values)",
                             check=kohya_blocks.check_mid_lr_weight)
    up_lr_weight: Any = opt([], "unet_lr weight of each up block OUT00-OUT11 (SDXL: 9), a list or a preset as "
                                "down_lr_weight", check=kohya_blocks.check_lr_weight)
    block_lr_zero_threshold: float = opt(0.0, "a block lr weight at or below this becomes 0: the block gets no "
                                              "adapters (kohya's block_lr_zero_threshold)", min=0.0)
    # kohya's networks/lora_flux.py network_args: which transformer blocks get adapters
    train_blocks: str = opt("all", "transformer blocks adapted (FLUX.1; kohya's train_blocks): all, single (the "
                                   "single-stream blocks only) or double", choices=["all", "single", "double"])
    train_double_block_indices: Any = opt("all", "FLUX.1 double blocks adapted (kohya's train_double_block_indices): "
                                                 "\"all\", \"none\" or indices and ranges, e.g. \"0,1,8-12,18\"",
                                          check=kohya_blocks.check_block_selection)
    train_single_block_indices: Any = opt("all", "FLUX.1 single blocks adapted (kohya's train_single_block_indices), "
                                                 "as train_double_block_indices",
                                          check=kohya_blocks.check_block_selection)
    train_block_indices: Any = opt("all", "SD3.x joint blocks adapted (kohya lora_sd3's train_block_indices), as "
                                          "train_double_block_indices", check=kohya_blocks.check_block_selection)
    train_modulation: bool = opt(True, "adapt the transformer blocks' modulation linears too (FLUX.1 img_mod, "
                                       "txt_mod, modulation; SD3 adaLN_modulation); false = kohya's img_mod_dim = "
                                       "txt_mod_dim = single_mod_dim = 0 (SD3: context_mod_dim = x_mod_dim = 0)")


@dataclass
class TrainConfig:
    unet_lr: float = opt(5e-4, "learning rate of the U-Net adapters", min=0.0)
    text_encoder_lr: Any = opt(1e-4, "learning rate of the text-encoder adapters: one, or one per encoder in the "
                                      "family's order (SDXL [te1, te2], FLUX.1 [clip_l, t5], SD3 [clip_l, clip_g, "
                                      "t5]); 0 freezes it", check=_learning_rates)
    stop_text_encoder_training: int = opt(0, "text-encoder adapters stop learning after this many optimizer steps and "
                                             "are saved as they are then (kohya's stop_text_encoder_training; "
                                             "0 = never)",
                                          min=0)
    epochs: int = opt(10, "passes over the repeated dataset", min=1)
    max_train_steps: int = opt(0, "stop after this many optimizer steps (0 = epochs decide)", min=0)
    batch_size: int = opt(2, "images per optimizer step (all processes together)", min=1)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", min=1)
    optimizer: str = opt("adamw", "optimizer (lion, prodigy, adamw8bit, adamw_schedulefree: optional extras)",
                         choices=["adamw", "adamw8bit", "lion", "adafactor", "prodigy", "adamw_schedulefree"])
    optimizer_args: dict = opt({}, "extra keyword arguments of the optimizer (kohya's optimizer_args), "
                                   "e.g. {betas = [0.9, 0.99], d_coef = 2}")
    weight_decay: float = opt(1e-2, "AdamW weight decay", min=0.0)
    lr_scheduler: str = opt("cosine_with_restarts", "learning-rate schedule",
                            choices=["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear"])
    lr_scheduler_num_cycles: int = opt(1, "cycles of cosine_with_restarts", min=1)
    lr_warmup_ratio: float = opt(0.05, "share of steps spent warming up", min=0.0, max=1.0)
    lr_warmup_steps: int = opt(0, "warm-up steps (kohya's lr_warmup_steps); when > 0 it replaces lr_warmup_ratio",
                               min=0)
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)", min=0.0)
    scale_weight_norms: float = opt(0.0, "max-norm regularisation (kohya's scale_weight_norms): after each optimizer "
                                         "step, any adapter module whose weight change has a norm above this is "
                                         "scaled down to it (1.0 is kohya's starting point; 0 = off)", min=0.0)
    min_snr_gamma: float = opt(5.0, "min-SNR-gamma loss weighting (0 = off)", min=0.0)
    # Rectified flow (FLUX.1), kohya's flux_train_network.py options and names (models/flow.py states the maths)
    timestep_sampling: str = opt("sigma", "how sigma is drawn (kohya's timestep_sampling)",
                                 choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"])
    sigmoid_scale: float = opt(1.0, "scale of the normal draw in sigmoid / shift / flux_shift sampling", min=0.0)
    discrete_flow_shift: float = opt(3.0, "shift S of the sigma and shift samplings (3.1582 = FLUX's at 1024 px)",
                                     min=0.0)
    model_prediction_type: str = opt("raw", "what the loss compares with noise - latents: raw (the output), "
                                            "additive, sigma_scaled (kohya's default)",
                                     choices=["raw", "additive", "sigma_scaled"])
    weighting_scheme: str = opt("none", "density of sigma sampling (logit_normal, mode) or loss weights with "
                                        "sigma_scaled (sigma_sqrt, cosmap)",
                                choices=["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"])
    logit_mean: float = opt(0.0, "mean of the logit_normal density")
    logit_std: float = opt(1.0, "standard deviation of the logit_normal density", min=0.0)
    mode_scale: float = opt(1.29, "scale of the mode density")
    guidance_scale: float = opt(3.5, "FLUX.1-dev's guidance input during training (kohya's default 3.5; its "
                                     "docs advise 1.0 for LoRA)", min=0.0)
    training_shift: float = opt(1.0, "SD3.x: shift S of the sigma drawn from weighting_scheme's density (kohya's "
                                     "sd3 training_shift; 3.0 is SD3.5's sampling shift)", min=0.0)
    # FLUX.1 / SD3 text encoders (kohya's t5xxl_max_token_length and sd3's per-encoder caption dropout)
    t5_max_length: int = opt(0, "T5 tokens per caption, also when sampling (kohya's t5xxl_max_token_length; "
                                "0 = the family's: FLUX.1 dev 512, schnell 256, SD3 256)", min=0, max=4096)
    clip_l_dropout_rate: float = opt(0.0, "probability that an example's CLIP-L outputs are zeros (kohya's "
                                          "clip_l_dropout_rate)", min=0.0, max=1.0)
    clip_g_dropout_rate: float = opt(0.0, "probability that an example's CLIP-G outputs are zeros (SD3)",
                                     min=0.0, max=1.0)
    t5_dropout_rate: float = opt(0.0, "probability that an example's T5 outputs are zeros", min=0.0, max=1.0)
    noise_offset: float = opt(0.0, "noise offset (brighter/darker images)", min=0.0, max=1.0)
    adaptive_noise_scale: float = opt(0.0, "adds this x abs(mean of each latent channel) to noise_offset (kohya's "
                                           "adaptive_noise_scale; needs noise_offset; 0 = off)", min=-1.0, max=1.0)
    multires_noise_iterations: int = opt(0, "multi-resolution (pyramid) noise levels (kohya's "
                                            "multires_noise_iterations; 6 to 10 is usual; 0 = off)", min=0, max=64)
    multires_noise_discount: float = opt(0.3, "weight ratio of each coarser pyramid noise level (kohya's "
                                              "multires_noise_discount)", min=0.0, max=1.0)
    prior_loss_weight: float = opt(1.0, "loss weight of regularisation images (kohya's prior_loss_weight)", min=0.0)
    mixed_precision: str = opt("no", "mixed precision of the frozen base and autocast (accelerate fixes it once "
                               "per Python process)", choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = opt(False, "trade compute for memory")
    blocks_to_swap: int = opt(0, "transformer blocks (FLUX.1, SD3.5) whose frozen weights stay on the CPU and "
                                 "come to the GPU only for their forward and backward (kohya's blocks_to_swap; "
                                 "0 = off)", min=0)
    save_every_n_epochs: int = opt(1, "save an adapter and training state every n epochs (0 = end only)", min=0)
    save_every_n_steps: int = opt(0, "also save an adapter (NAME-stepNNNNNNNN) and training state every n "
                                     "optimizer steps (0 = off)", min=0)
    save_precision: str = opt("fp16", "dtype of exported adapters", choices=list(SAVE_PRECISIONS))
    seed: int = opt(42, "random seed", min=0, max=SEED_MAX)
    attention: str = opt("sdpa", "attention kernel: sdpa (PyTorch) | xformers (needs xformers and CUDA)",
                         choices=["sdpa", "xformers"])
    compile: bool = opt(False, "torch.compile each U-Net transformer block (CUDA; costs a compile at start)")
    channels_last: bool = opt(False, "U-Net in channels-last memory format (CUDA convolutions)")
    tf32: bool = opt(True, "allow TF32 tensor cores for fp32 matmuls and convolutions (CUDA, Ampere and newer)")
    overwrite: bool = opt(False, "replace an existing final adapter of the same name")


@dataclass
class SampleConfig:
    prompts: list = opt([], "prompts of the sample grid (rows)", items=str)
    prompt_file: str = opt("", "kohya-style prompt file, one prompt per line with --n --w --h --d --s --l --ss "
                               "options; replaces prompts", path=True)
    negative_prompt: str = opt("", "negative prompt")
    width: int = opt(1080, "image width (a multiple of 8)", min=64)
    height: int = opt(720, "image height (a multiple of 8)", min=64)
    steps: int = opt(25, "denoising steps", min=1, max=1000)
    cfg_scale: float = opt(7.0, "classifier-free guidance scale", min=0.0)
    guidance_scale: float = opt(3.5, "FLUX.1-dev's distilled guidance input when sampling (no classifier-free "
                                     "guidance; schnell takes none)", min=0.0)
    skip_layer_guidance_scale: float = opt(0.0, "SD3.x: skip-layer guidance scale (diffusers' default 2.8; 0 = off)",
                                           min=0.0)
    skip_guidance_layers: list = opt([7, 8, 9], "SD3.x: transformer blocks skipped by skip-layer guidance (SAI's "
                                                "[7, 8, 9] for SD3.5 Medium)", items=int, min=0)
    skip_layer_guidance_start: float = opt(0.01, "SD3.x: share of the steps after which skip-layer guidance starts",
                                           min=0.0, max=1.0)
    skip_layer_guidance_stop: float = opt(0.2, "SD3.x: share of the steps at which skip-layer guidance stops",
                                          min=0.0, max=1.0)
    sampler: str = opt("dpmpp_2m_karras", "scheduler",
                       choices=["dpmpp_2m_karras", "dpmpp_2m", "euler_a", "euler", "ddim"])
    seeds: list = opt([1, 2, 3, 4], "seeds (one image per prompt x seed x scale)", items=int, min=0, max=SEED_MAX)
    lora_scales: list = opt([0.0, 0.5, 1.0], "LoRA scales of the grid columns (0 = the base)", items=float)
    batch_size: int = opt(1, "images per pipeline call", min=1)
    first_pass_resolution: int = opt(0, "side of the square area the first pass renders at before the hires pass "
                                        "(the target's aspect ratio; A1111's hires-fix first pass): 0 = the base's "
                                        "native size; an adapter trained larger draws its style best at its "
                                        "[dataset] resolution", min=0)
    hires: str = opt("auto", "second pass above the first pass's size (first_pass_resolution): on (one img2img pass "
                             "at the target size) | tiled (img2img in blended tiles) | off | auto (off at or below the "
                             "first pass's area, tiled above hires_tiled_above x it, on between)",
                     choices=["auto", "on", "tiled", "off"])
    hires_tiled_above: float = opt(4.0, "auto picks the tiled pass when the target's area exceeds the "
                                   "first pass's area by more than this factor", min=1.0)
    hires_tile: int = opt(0, "tile side of the tiled pass in pixels, a multiple of 8 (0 = the base's native size)",
                          min=0)
    hires_tile_overlap: int = opt(0, "pixels neighbouring tiles share, a multiple of 8 (0 = a quarter of the tile)",
                                  min=0)
    hires_upscaler: str = opt("", "upscale step of the hires pass: empty = Lanczos, or an upscaler model file "
                                  "(.pth / .safetensors: ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, ... read by spandrel as "
                                  "ComfyUI and Forge read them; pip install 'sdlora[upscalers]')", path=True)
    hires_denoise: float = opt(0.45, "img2img denoising strength of the hires pass", min=0.0, max=1.0)
    hires_steps: int = opt(0, "steps of the hires pass (0 = same as steps)", min=0)
    thumbnail: int = opt(256, "longest side of each grid cell", min=16)
    fuse: bool = opt(False, "fuse adapters into the weights for speed")
    every_n_epochs: int = opt(0, "preview grid every n epochs while training (0 = off)", min=0)
    preview_steps: int = opt(12, "steps of in-training previews", min=1)


@dataclass
class OutputConfig:
    dir: str = opt("output", "where adapters, samples, state and reports go", path=True)
    output_name: str = opt("", "adapter file name (ss_output_name); default: the config's name")
    score_epochs: bool = opt(True, "after training, render each saved epoch at the native size, score style and "
                                   "prompt adherence, and rank them in report.md")
    keep: str = opt("last", "the final adapter file: last (the last epoch) | best (the epoch report.md recommends)",
                    choices=["last", "best"])
    resize_energy: float = opt(0.0, "also write NAME-energyNN.safetensors keeping this share of each module's "
                                    "energy, e.g. 0.9 (0 = off)", min=0.0, max=1.0)
    format: str = opt("kohya", "key style of the adapter files: kohya (lora_unet_*, what A1111, Forge, ComfyUI and "
                               "kohya read) | diffusers (unet. / transformer. / text_encoder. lora_A / lora_B with the "
                               "scale baked in, what diffusers' load_lora_weights reads natively; LoRA and LoCon only)",
                      choices=list(ADAPTER_FORMATS))


@dataclass
class Config:
    name: str = opt("lora", "style name")
    trigger: str = opt("", "trigger tag, first in every caption")
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    source: Path | None = field(default=None, metadata={"internal": True})

    @property
    def output_name(self) -> str:
        return self.output.output_name or self.name

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir)

    def adapter_path(self, epoch: int | None = None, step: int | None = None) -> Path:
        """The exported adapter, `<output.dir>/<output_name>.safetensors`; an epoch's is `<output_name>-0000NN`,
        a `save_every_n_steps` one `<output_name>-step000000NN` (kohya's names). Never outside output.dir."""

        stem = self.output_name
        if step is not None:
            stem = f"{stem}-step{step:08d}"
        elif epoch is not None:
            stem = f"{stem}-{epoch:06d}"
        return inside(self.output_dir, self.output_dir / f"{stem}.safetensors", "adapter")

    @property
    def report_path(self) -> Path:
        """The training report, `<output.dir>/report.md` (the run's style figures are appended to it)."""
        return self.output_dir / "report.md"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


@dataclass
class _SubsetOnly:
    class_tokens: str = opt("", "caption of images without a caption file (kohya's class_tokens; an N_words "
                                "folder's words)")
    is_reg: bool = opt(False, "regularisation images: weighted by train.prior_loss_weight, repeated to match "
                              "the training images, never tagged with the trigger nor written to")
    validation: bool = opt(False, "validation images: never trained; their loss is logged every epoch (see "
                                  "dataset.validation_split)")


_EPOCH_ADAPTER = re.compile(r"^(?P<name>.+)-(?P<epoch>\d{6})\.safetensors$")


def epoch_of_adapter(file_name: str) -> tuple[str, int] | None:
    """(output name, epoch) of a file that Config.adapter_path(epoch=N) names; None for any other
    (the final adapter, a step one)."""
    m = _EPOCH_ADAPTER.match(file_name)
    return (m["name"], int(m["epoch"])) if m else None


def _subset_name(self) -> str:
    """kohya's key for ss_dataset_dirs and ss_tag_frequency: the folder's basename."""
    return Path(self.image_dir).name


def _subset_to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _subset_from_dict(cls, data: dict):
    return cls(**data)


# The one subset type, from the config to the manifest: a [[dataset.subsets]] table as written, and
# each subset training reads once kohya's folders are expanded (`subsets.resolve_subsets`, which
# says where it came from in `origin`); the manifest stores its to_dict() and reads it back.
Subset = dataclasses.make_dataclass(
    "Subset",
    [(f.name, f.type, field(default=f.default, metadata=f.metadata))
     for f in dataclasses.fields(DatasetConfig) if f.name in SUBSET_SHARED_KEYS]
    + [(f.name, f.type, field(default=f.default, metadata=f.metadata)) for f in dataclasses.fields(_SubsetOnly)]
    + [("origin", str, field(default="config", metadata={"internal": True}))],  # "config" or "folder N_words"
    namespace={"__doc__": "One [[dataset.subsets]] table (kohya's subset): a folder and its caption rules.",
               "name": property(_subset_name), "to_dict": _subset_to_dict,
               "from_dict": classmethod(_subset_from_dict)},
    frozen=True)
Subset.__module__ = __name__

SECTION_CLASSES = {
    "model": ModelConfig, "dataset": DatasetConfig, "caption": CaptionConfig, "network": NetworkConfig,
    "train": TrainConfig, "sample": SampleConfig, "output": OutputConfig,
}


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a list", dict: "a table"}.get(t, str(t))


def _coerce(value, f: dataclasses.Field, t, where: str):
    """Check one value against its field's type `t` and constraints; return it (int -> float allowed)."""
    meta = f.metadata
    if t is Any:
        return meta["check"](value, where)
    value = _check_type(value, t, where)
    if meta.get("items") is not None:
        if isinstance(value, dict):
            return {k: _check_bounds(_check_type(v, meta["items"], f"{where}.{k}"), meta, f"{where}.{k}")
                    for k, v in value.items()}
        return [_check_bounds(_check_type(v, meta["items"], f"{where}[{i}]"), meta, f"{where}[{i}]")
                for i, v in enumerate(value)]
    return _check_bounds(value, meta, where)


def _check_type(value, t, where: str):
    """`value` as type `t` (an int is taken for a float); NaN and infinity are refused."""
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if t is int and isinstance(value, bool) or not isinstance(value, t):
        raise ConfigError(f"{where}: expected {_type_name(t)}, got {value!r} ({type(value).__name__})")
    if t is float and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number; give a number such as 1e-4")
    return value


def _check_bounds(value, meta, where: str):
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, meta['choices']))}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{where}: {value!r} is below the minimum {meta['min']}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{where}: {value!r} is above the maximum {meta['max']}")
    return value


def _unknown(key: str, known, where: str, cls=None) -> ConfigError:
    section = {c: name for name, c in SECTION_CLASSES.items()}.get(cls, "dataset.subsets[]" if cls is Subset else None)
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = kohya_hint(key, section) or (f"; did you mean '{close[0]}'?" if close else
                                        f"; known keys: {', '.join(sorted(known))}")
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _build(cls, data: dict, where: str, base_dir: Path | None):
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    types = typing.get_type_hints(cls)  # annotations are strings here (`from __future__ import annotations`)
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(key, fields, where.rstrip(), cls)
        f = fields[key]
        loc = f"{where}{key}"
        if key in SECTION_CLASSES and cls is Config:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}[{key}]: expected a table [{key}]")
            values[key] = _build(SECTION_CLASSES[key], value, f"{where}[{key}] ", base_dir)
            continue
        if cls is DatasetConfig and key == "subsets":
            values[key] = _build_subsets(value, data, f"{where}", base_dir)
            continue
        value = _coerce(value, f, types[key], loc)
        values[key] = value
    obj = cls(**values)
    if base_dir is not None:
        relative = {f.name: getattr(obj, f.name) for f in fields.values() if f.metadata.get("path")}
        resolved = {k: _resolve(base_dir, v) for k, v in relative.items() if v}
        obj = dataclasses.replace(obj, **resolved)  # subsets are frozen
    return obj


def _resolve(base_dir: Path, value):
    """A path field's value (a path, or a list of them) with relative paths read from `base_dir`."""
    if isinstance(value, list):
        return [_resolve(base_dir, v) for v in value]
    return value if Path(value).is_absolute() else str((base_dir / value).resolve())


def path_keys() -> set[str]:
    """The keys whose value is a file or folder (opt(path=True): a relative one is read from the
    config file's folder), subsets' as `dataset.subsets[].KEY`."""
    keys = {f"{section}.{f.name}" for section, cls in SECTION_CLASSES.items() for f in dataclasses.fields(cls)
            if f.metadata.get("path")}
    return keys | {f"dataset.subsets[].{f.name}" for f in dataclasses.fields(Subset) if f.metadata.get("path")}


def _build_subsets(entries, dataset: dict, where: str, base_dir: Path | None) -> list:
    """[[dataset.subsets]] -> Subset list; each unset shared key takes the [dataset] value."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{where}subsets: expected [[dataset.subsets]] tables")
    out = []
    for i, entry in enumerate(entries):
        loc = f"{where}subsets[{i}] "
        if "image_dir" not in entry:
            raise ConfigError(f"{loc}: image_dir is missing; every [[dataset.subsets]] table names its folder")
        inherited = {k: dataset[k] for k in SUBSET_SHARED_KEYS if k in dataset and k != "image_dir"}
        out.append(_build(Subset, {**inherited, **entry}, loc, base_dir))
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as TOML, or as a string)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.epochs=5")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            names = sorted(p.stem for p in path.parent.glob("*.toml"))
            hint = f"; configs there: {', '.join(names)}" if names else ""
        raise ConfigError(f"{path}: config file not found{hint}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: '{k}' is not a section")
        node[keys[-1]] = value
    _refuse_kohya_file(data, path)
    data.setdefault("name", path.stem)
    cfg = _build(Config, data, f"{path}: ", path.parent.resolve())
    cfg.source = path.resolve()
    _check_consistency(cfg, path)
    return cfg


def _refuse_kohya_file(data: dict, path: Path) -> None:
    """A kohya dataset config ([general], [[datasets]]) or a kohya arguments file is not an sdlora
    config: say so, and name the command that converts it."""

    fields = {f.name for f in dataclasses.fields(Config)}
    dataset_config = [k for k in data if k in ("general", "datasets")]
    arguments = [k for k in data if k in KOHYA_KEYS and k not in fields]
    kohya = dataset_config or (arguments if len(arguments) > 1 else [])  # one stray key: the did-you-mean says it
    if kohya:
        what = "dataset config" if dataset_config else "training arguments"
        raise ConfigError(f"{path}: this is a kohya-ss {what} file ({', '.join(kohya[:3])}), not an sdlora config; "
                          f"convert it with `sdlora import-kohya {path} -o NEW.toml`")


def config_from_dict(data: dict, base_dir: Path | None = None) -> Config:
    """Build a config from a dict (tests, programmatic use); the same validation as files."""
    return _build(Config, data, "<config>: ", base_dir)


def _check_consistency(cfg: Config, path: Path) -> None:
    d = cfg.dataset
    if d.min_bucket_reso > d.max_bucket_reso:
        raise ConfigError(f"{path}: [dataset] min_bucket_reso ({d.min_bucket_reso}) is larger than "
                          f"max_bucket_reso ({d.max_bucket_reso})")
    if d.bucket_reso_steps % SIDE_STEP:
        raise ConfigError(f"{path}: [dataset] bucket_reso_steps must be a multiple of 8")
    s = cfg.sample
    for side, v in (("width", s.width), ("height", s.height)):
        if v % SIDE_STEP:
            raise ConfigError(f"{path}: [sample] {side} = {v} is not a multiple of 8; try {v - v % 8}")
    t = cfg.train
    if t.adaptive_noise_scale and not t.noise_offset:
        raise ConfigError(f"{path}: [train] adaptive_noise_scale = {t.adaptive_noise_scale:g} adds to noise_offset, "
                          "which is 0 (kohya requires it too); set noise_offset (e.g. 0.05) or "
                          "adaptive_noise_scale = 0")
    if t.blocks_to_swap and t.compile:
        # a compiled block guards on its weights' storage, which swapping replaces every step
        raise ConfigError(f"{path}: [train] blocks_to_swap = {t.blocks_to_swap} cannot be combined with compile = "
                          "true (the swapped weights change storage every step); set one of them off")
    if cfg.trigger and "," in cfg.trigger:
        raise ConfigError(f"{path}: trigger {cfg.trigger!r} must be one tag without commas")
    _check_file_names(cfg, path)


def _check_file_names(cfg: Config, path: Path) -> None:
    """The adapter's file name comes from output.output_name (default: name) and captions get
    dataset.caption_extension: both must name a file in their folder, and captions never an image."""
    from PIL import Image

    key = "[output] output_name" if cfg.output.output_name else "name"
    problem = file_name_problem(cfg.output_name)
    if problem:
        raise ConfigError(f"{path}: {key} = {cfg.output_name!r} cannot be a file name: {problem}; "
                          f"use letters, digits, '-' and '_', e.g. \"my_style\"")
    ext = cfg.dataset.caption_extension
    if not (ext.startswith(".") and len(ext) > 1 and ext[1:].replace("_", "").isalnum()):
        raise ConfigError(f"{path}: [dataset] caption_extension = {ext!r}: expected a file extension such as "
                          f"\".txt\" or \".caption\"")
    images = IMAGE_EXTENSIONS | set(Image.registered_extensions())
    if ext.lower() in images or ext.lower() in (".safetensors", ".ckpt", ".pt", ".bin", ".toml", ".json", ".npy"):
        raise ConfigError(f"{path}: [dataset] caption_extension = {ext!r} is not a caption type: captions would be "
                          f"written over {'images' if ext.lower() in images else 'other files'}; use \".txt\"")


def describe(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field: the config reference in --help and README."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        if cls is Config and f.name in SECTION_CLASSES:
            rows += describe(SECTION_CLASSES[f.name], f"{f.name}.")
            if f.name == "dataset":
                rows += describe(_SubsetOnly, "dataset.subsets[].")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        extra = f" (one of: {', '.join(map(str, f.metadata['choices']))})" if f.metadata.get("choices") else ""
        rows.append((prefix + f.name, repr(default), f.metadata.get("help", "") + extra))
    return rows


def add_override_argument(parser, example: str = "train.epochs=5") -> None:
    """The `--set SECTION.KEY=VALUE` option every config-taking command shares (see `parse_override`)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")


def reference_markdown() -> str:
    """The config reference table of the README (`sdlora config keys`)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, help_text in describe():
        lines.append(f"| `{key}` | `{default}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines)
