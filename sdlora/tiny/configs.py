"""Model configs of the embedded base family (SD1.x classes and module names, small sizes).

`tiny` is what the build trains and ships; `mini` is an even smaller random-weight
variant that tests build in milliseconds (no files, no downloads).
"""

from __future__ import annotations

from sdlora.models.arch import part_config
from sdlora.models.tokenizer import clip_tokenizer, open_clip_tokenizer

NATIVE = 128  # pixels; latents are NATIVE // 8

TEXT_ENCODER = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                    projection_dim=64, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)

VAE = dict(in_channels=3, out_channels=3, latent_channels=4,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
           block_out_channels=[32, 64, 64, 64], layers_per_block=1, norm_num_groups=16,
           sample_size=NATIVE, scaling_factor=1.0)

UNET = dict(sample_size=NATIVE // 8, in_channels=4, out_channels=4, layers_per_block=1,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            block_out_channels=[64, 96, 128], cross_attention_dim=64, attention_head_dim=4,
            norm_num_groups=32)

SCHEDULER = part_config("sd_v1", "scheduler")  # SD1.x's noise schedule

# Tests: the same classes, a fraction of the size.
MINI_TEXT_ENCODER = dict(TEXT_ENCODER, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, projection_dim=32)
MINI_VAE = dict(VAE, block_out_channels=[8, 16, 16, 16], norm_num_groups=8, sample_size=64)
MINI_UNET = dict(UNET, sample_size=8, block_out_channels=[32, 32, 64], cross_attention_dim=32,
                 attention_head_dim=2, norm_num_groups=16,
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])

# An SDXL-architecture family at test size: the same classes and conditioning paths as SDXL
# (CLIP-L-style encoder 1, OpenCLIP-style encoder 2 with a projection, a `text_time` U-Net whose
# cross attention takes both widths concatenated and whose addition embedding takes the pooled
# projection and six time ids). A whole pipeline, so its U-Net's widths follow these encoders;
# arch.reduced_unet_config is SDXL's U-Net alone at toy width, for the benchmarks. (Built from that
# one instead, the fixture learns more slowly and the SDXL training tests' margins move.)
MINI_SDXL_TEXT_ENCODER = dict(MINI_TEXT_ENCODER, num_attention_heads=4)
MINI_SDXL_TEXT_ENCODER_2 = dict(MINI_TEXT_ENCODER, num_attention_heads=4, projection_dim=16, hidden_act="gelu")
MINI_SDXL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                      norm_num_groups=8, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[2, 4],
                      transformer_layers_per_block=[1, 2], cross_attention_dim=32 + 32, use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=16 + 6 * 8)

# FLUX.1- and SD3.5-architecture denoisers and text encoders at test size: the same classes and
# module names as the real ones (diffusers' FluxTransformer2DModel / SD3Transformer2DModel,
# transformers' CLIP and T5 encoders), on the real 16-channel latents. Widths are chained as in the
# real models: FLUX's transformer takes T5's hidden states (joint_attention_dim = d_model) and
# CLIP-L's pooled output (pooled_projection_dim = hidden_size); SD3's takes CLIP-L ++ CLIP-G
# penultimate states (32 + 32, T5's width here; the real 768 + 1280 are zero-padded to 4096) then T5's
# along the sequence, and the two projections concatenated (32 + 16) as its pooled input.
MINI_T5 = dict(vocab_size=32128, d_model=64, d_kv=8, d_ff=96, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",  # T5 v1.1, as T5-XXL
               is_encoder_decoder=False, use_cache=False)
FLOW_LATENT_CHANNELS = 16
# hidden = heads x head_dim = 2 x 16; the rotary axes (id, row, column) split head_dim 4 + 4 + 8.
# FLUX's VAE: 16 channels, latents (z - 0.1159) x 0.3611 (its config's shift_factor / scaling_factor).
MINI_FLUX_VAE = dict(MINI_VAE, latent_channels=FLOW_LATENT_CHANNELS, shift_factor=0.1159, scaling_factor=0.3611,
                     use_quant_conv=False, use_post_quant_conv=False)
MINI_T5_MAX_LENGTH = 32  # the T5 tokenizer's model_max_length: the text sequence the transformer sees
MINI_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=4 * FLOW_LATENT_CHANNELS, num_layers=2, num_single_layers=2,
                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=MINI_T5["d_model"],
                             pooled_projection_dim=MINI_TEXT_ENCODER["hidden_size"], axes_dims_rope=[4, 4, 8],
                             guidance_embeds=True)  # dev; schnell has no guidance embedding
# SD3.5 Large-like (qk RMS norm); SD3.5 Medium adds a second image self-attention (MMDiT-X) in its first blocks.
MINI_SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=FLOW_LATENT_CHANNELS,
                            out_channels=FLOW_LATENT_CHANNELS, num_layers=2, attention_head_dim=8,
                            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=MINI_T5["d_model"],
                            pooled_projection_dim=MINI_TEXT_ENCODER["projection_dim"]
                            + MINI_SDXL_TEXT_ENCODER_2["projection_dim"],
                            pos_embed_max_size=16, qk_norm="rms_norm")
MINI_SD35_MEDIUM_TRANSFORMER = dict(MINI_SD3_TRANSFORMER, dual_attention_layers=(0,))
# SD3's VAE: 16 channels, latents (z - 0.0609) x 1.5305 (its config's shift_factor / scaling_factor).
MINI_SD3_VAE = dict(MINI_FLUX_VAE, shift_factor=0.0609, scaling_factor=1.5305)

OPEN_CLIP = dict(embed_dim=64, init_logit_bias=-5.0,
                 vision_cfg=dict(image_size=64, layers=4, width=96, patch_size=8, head_width=32),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=48, heads=4, layers=3))


def build_components(size: str = "tiny", seed: int = 0):
    """Random-weight (tokenizer, text_encoder, vae, unet, scheduler) of the embedded family."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    te_cfg, vae_cfg, unet_cfg = (TEXT_ENCODER, VAE, UNET) if size == "tiny" else (MINI_TEXT_ENCODER, MINI_VAE, MINI_UNET)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    vae = AutoencoderKL(**vae_cfg)
    unet = UNet2DConditionModel(**unet_cfg)
    return clip_tokenizer(), text_encoder, vae, unet, DDPMScheduler.from_config(SCHEDULER)


def build_pipeline(size: str = "mini", seed: int = 0):
    """A StableDiffusionPipeline of random components (no safety checker), for tests."""
    from diffusers import StableDiffusionPipeline

    tokenizer, text_encoder, vae, unet, scheduler = build_components(size, seed)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline of random components at test size (see MINI_SDXL_*)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**MINI_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**MINI_SDXL_TEXT_ENCODER)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**MINI_SDXL_TEXT_ENCODER_2)),
        tokenizer=clip_tokenizer(), tokenizer_2=open_clip_tokenizer(), unet=UNet2DConditionModel(**MINI_SDXL_UNET),
        scheduler=DDPMScheduler.from_config(SCHEDULER))


def build_flux_components(guidance: bool = True, seed: int = 0) -> dict:
    """Random-weight FLUX.1-architecture parts at test size, named as FluxPipeline names them:
    transformer (dev-like with `guidance`, else schnell-like), text_encoder (CLIP-L), text_encoder_2 (T5)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return {"transformer": FluxTransformer2DModel(**dict(MINI_FLUX_TRANSFORMER, guidance_embeds=guidance)),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**MINI_TEXT_ENCODER)),
            "text_encoder_2": T5EncoderModel(T5Config(**MINI_T5))}


def build_sd3_components(medium: bool = False, seed: int = 0) -> dict:
    """Random-weight SD3.5-architecture parts at test size, named as StableDiffusion3Pipeline names them:
    transformer (Large-like, or Medium-like with `medium`), text_encoder (CLIP-L), text_encoder_2 (CLIP-G),
    text_encoder_3 (T5)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    torch.manual_seed(seed)
    return {"transformer": SD3Transformer2DModel(**(MINI_SD35_MEDIUM_TRANSFORMER if medium else MINI_SD3_TRANSFORMER)),
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**MINI_TEXT_ENCODER)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**MINI_SDXL_TEXT_ENCODER_2)),
            "text_encoder_3": T5EncoderModel(T5Config(**MINI_T5))}


def t5_tokenizer():
    """A small T5TokenizerFast built offline (a Unigram model over a few words and the letters, T5's
    special tokens <pad> 0, </s> 1, <unk> 2 and its "</s>" suffix): tests need no Hub download."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = "a the of and mountains lake sunset river forest sky clrscn scenery colorful pastel".split()
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in words]
             + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.:()\u2581"])
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=MINI_T5_MAX_LENGTH, extra_ids=0)


def build_flux_pipeline(guidance: bool = True, seed: int = 0):
    """A FluxPipeline of random FLUX.1-architecture components at test size (`build_flux_components`, a
    16-channel VAE with FLUX's latent factors, offline tokenizers); save_pretrained makes a base folder."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    parts = build_flux_components(guidance, seed)
    torch.manual_seed(seed + 1)
    # FLUX.1-dev's scheduler config (schnell's: shift 1.0, no dynamic shifting)
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096)
                 if guidance else FlowMatchEulerDiscreteScheduler(shift=1.0))
    return FluxPipeline(scheduler=scheduler, vae=AutoencoderKL(**MINI_FLUX_VAE), tokenizer=clip_tokenizer(),
                        tokenizer_2=t5_tokenizer(), **parts)


def build_sd3_pipeline(medium: bool = False, seed: int = 0):
    """A StableDiffusion3Pipeline of random SD3.5-architecture components at test size (`build_sd3_components`,
    a 16-channel VAE with SD3's latent factors, offline tokenizers, SD3.5's scheduler config: shift 3.0);
    save_pretrained makes a base folder."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        StableDiffusion3Pipeline,
    )

    parts = build_sd3_components(medium, seed)
    torch.manual_seed(seed + 1)
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=AutoencoderKL(**MINI_SD3_VAE), tokenizer=clip_tokenizer(),
                                    tokenizer_2=open_clip_tokenizer(), tokenizer_3=t5_tokenizer(), **parts)
