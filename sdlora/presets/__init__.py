"""Configs other trainers wrote (kohya_ss GUI presets, sd-scripts TOML and command lines), read
into sdlora's config."""
