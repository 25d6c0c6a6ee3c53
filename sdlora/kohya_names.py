"""kohya-ss names of sdlora's config keys: one table for `sdlora import-kohya` and for the
config loader's did-you-mean.

`KOHYA_KEYS` maps a train_network.py argument, a kohya dataset-config key or a kohya_ss GUI
config key to the sdlora key it becomes. Keys whose value needs converting (optimizer names,
`network_module`, resolution strings, ...) are listed too; `kohya_import` does the converting.
Subset keys map to `dataset.subsets[].KEY`.
"""

from __future__ import annotations

KOHYA_KEYS: dict[str, str] = {
    # model
    "pretrained_model_name_or_path": "model.base",
    "vae": "model.vae",
    "clip_skip": "model.clip_skip",
    "v_parameterization": "model.v_parameterization",
    # dataset (train_network.py arguments and the dataset config's [general]/[[datasets]])
    "train_data_dir": "dataset.image_dir",
    "reg_data_dir": "dataset.reg_dir",
    "dataset_repeats": "dataset.num_repeats",
    "num_repeats": "dataset.num_repeats",
    "resolution": "dataset.resolution",
    "max_resolution": "dataset.resolution",
    "enable_bucket": "dataset.enable_bucket",
    "min_bucket_reso": "dataset.min_bucket_reso",
    "max_bucket_reso": "dataset.max_bucket_reso",
    "bucket_reso_steps": "dataset.bucket_reso_steps",
    "bucket_no_upscale": "dataset.bucket_no_upscale",
    "caption_extension": "dataset.caption_extension",
    "shuffle_caption": "dataset.shuffle_caption",
    "keep_tokens": "dataset.keep_tokens",
    "caption_dropout_rate": "dataset.caption_dropout_rate",
    "caption_tag_dropout_rate": "dataset.caption_tag_dropout_rate",
    "flip_aug": "dataset.flip_aug",
    "max_token_length": "dataset.max_token_length",
    "validation_split": "dataset.validation_split",
    "class_tokens": "dataset.subsets[].class_tokens",
    "is_reg": "dataset.subsets[].is_reg",
    "image_dir": "dataset.subsets[].image_dir",
    # network
    "network_dim": "network.dim",
    "network_alpha": "network.alpha",
    "network_dropout": "network.dropout",
    "network_module": "network.type",
    "LoRA_type": "network.type",
    "network_train_unet_only": "network.train_text_encoder",
    "conv_dim": "network.conv_dim",
    "conv_alpha": "network.conv_alpha",
    "network_weights": "network.init_weights",
    "dora_wd": "network.dora",  # LyCORIS's network_args / the kohya_ss GUI's field
    "lora_network_weights": "network.init_weights",  # the kohya_ss GUI's name
    # train
    "learning_rate": "train.unet_lr",
    "unet_lr": "train.unet_lr",
    "text_encoder_lr": "train.text_encoder_lr",
    "max_train_epochs": "train.epochs",
    "epoch": "train.epochs",
    "max_train_steps": "train.max_train_steps",
    "train_batch_size": "train.batch_size",
    "batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "optimizer_type": "train.optimizer",
    "optimizer": "train.optimizer",
    "optimizer_args": "train.optimizer_args",
    "lr_warmup_steps": "train.lr_warmup_steps",
    "lr_warmup": "train.lr_warmup_ratio",
    "lr_scheduler": "train.lr_scheduler",
    "lr_scheduler_num_cycles": "train.lr_scheduler_num_cycles",
    "max_grad_norm": "train.max_grad_norm",
    "min_snr_gamma": "train.min_snr_gamma",
    "noise_offset": "train.noise_offset",
    "prior_loss_weight": "train.prior_loss_weight",
    "mixed_precision": "train.mixed_precision",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "save_every_n_epochs": "train.save_every_n_epochs",
    "save_every_n_steps": "train.save_every_n_steps",
    "save_precision": "train.save_precision",
    "seed": "train.seed",
    "xformers": "train.attention",
    "sdpa": "train.attention",
    # rectified flow (flux_train_network.py; the weighting options are train_util's, used by FLUX and SD3)
    "timestep_sampling": "train.timestep_sampling",
    "sigmoid_scale": "train.sigmoid_scale",
    "discrete_flow_shift": "train.discrete_flow_shift",
    "model_prediction_type": "train.model_prediction_type",
    "weighting_scheme": "train.weighting_scheme",
    "logit_mean": "train.logit_mean",
    "logit_std": "train.logit_std",
    "mode_scale": "train.mode_scale",
    "guidance_scale": "train.guidance_scale",
    "ae": "model.vae",  # FLUX's autoencoder file
    "fp8_base": "model.quantize",
    # sample, output
    "sample_every_n_epochs": "sample.every_n_epochs",
    "sample_sampler": "sample.sampler",
    "sample_prompts": "sample.prompt_file",
    "output_dir": "output.dir",
    "output_name": "output.output_name",
    # kohya's training options, and the block-wise network_args (kohya_import reads those from network_args too)
    "multires_noise_iterations": "train.multires_noise_iterations",
    "multires_noise_discount": "train.multires_noise_discount",
    "adaptive_noise_scale": "train.adaptive_noise_scale",
    "scale_weight_norms": "train.scale_weight_norms",
    "stop_text_encoder_training": "train.stop_text_encoder_training",
    "block_dims": "network.block_dims",
    "block_alphas": "network.block_alphas",
    "conv_block_dims": "network.conv_block_dims",
    "conv_block_alphas": "network.conv_block_alphas",
    "down_lr_weight": "network.down_lr_weight",
    "mid_lr_weight": "network.mid_lr_weight",
    "up_lr_weight": "network.up_lr_weight",
    "block_lr_zero_threshold": "network.block_lr_zero_threshold",
    # networks/lora_flux.py network_args
    "train_blocks": "network.train_blocks",
    "train_double_block_indices": "network.train_double_block_indices",
    "train_single_block_indices": "network.train_single_block_indices",
    "train_block_indices": "network.train_block_indices",  # networks/lora_sd3.py
}


def kohya_hint(key: str, section: str | None) -> str | None:
    """'; kohya's X is ...' for a key written in kohya's spelling, or None. `section` is the table
    the key was found in (None: the top level)."""
    target = KOHYA_KEYS.get(key)
    if not target:
        return None
    where, _, name = target.rpartition(".")
    if where == section:
        return f"; did you mean '{name}' (kohya's {key})?"
    table = "[[dataset.subsets]]" if where.endswith("[]") else f"[{where}]"
    return f"; kohya's {key} is {table} {name} here (`sdlora import-kohya` converts kohya files)"


# The modulation ranks of kohya's transformer networks (network_args): all 0 drop the blocks' modulation
# linears, as network.train_modulation = false does.
FLUX_MODULATION_ARGS = ("img_mod_dim", "txt_mod_dim", "single_mod_dim")  # networks/lora_flux.py
SD3_MODULATION_ARGS = ("context_mod_dim", "x_mod_dim")  # networks/lora_sd3.py
