"""What peft's LyCORIS-style kinds (LoHa, LoKr) share: their config's settings."""

from __future__ import annotations

from sdlora.errors import UserError


def lycoris_peft_config(config_class, network_cfg, dim: int, alpha: float, paths: list[str], rank_pattern: dict,
                        alpha_pattern: dict):
    """peft's LoHaConfig / LoKrConfig for explicit module paths and per-path ranks and alphas."""
    if network_cfg.dropout:
        raise UserError(f"[network] dropout applies to lora and locon adapters; set dropout = 0 for "
                        f"{network_cfg.type}")
    # use_effective_conv2d=False keeps LyCORIS's plain (non-Tucker) shapes for convs; LoKr's
    # factorisation is LyCORIS's default too (factor -1: the most balanced split of each side).
    return config_class(r=dim, alpha=alpha, target_modules=paths, rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern, use_effective_conv2d=False, init_weights=True)
