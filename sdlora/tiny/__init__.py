"""`sdlora tiny build`: regenerate the data and retrain the embedded base family from fixed seeds.

It replaces the packaged base model (sdlora/assets/tiny, assets/open_clip/tiny.*) only with
--overwrite; use --assets-dir to build a copy elsewhere (`--scale 0.01`: a smoke test in seconds).

Stages (each writes its result, so a stage can be rerun alone):
  data     procedural scenes: muted 128 px squares and 3:2 / 2:3 frames, with tags
  demo     the 25-image colorful_scenery style set (no captions: the builder writes them)
  vae      AutoencoderKL (f=8, 4 channels) on 64 px crops of both palettes: L1 + edge + tiny KL
  clip     open_clip tagger: ViT + text tower, sigmoid (SigLIP) loss of images x tags
  unet     text encoder + UNet2DConditionModel jointly, epsilon prediction, on cached latents
  export   fp16 diffusers folder `sdlora/assets/tiny/`, `sdlora/assets/open_clip/tiny.*`,
           a sample grid and `report.md`
"""
# This module holds what the command line needs without loading the build's numpy and torch.


STAGES = ["data", "demo", "vae", "unet", "clip", "export", "report"]
BUILD_MINUTES = 45  # the whole build at --scale 1 on 2 CPU cores (README)
