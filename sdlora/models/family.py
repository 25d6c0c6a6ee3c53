"""What differs between base-model families, behind one interface: a `Family` per family in
`FAMILIES`, keyed by `BaseModel.family`. The trainer and the samplers ask the family object and
never branch on a family's name; adding a family is a new `Family` (its own module when it needs
one) and a registry entry.

    family     text conditioning of the U-Net                         extra U-Net inputs
    sd_v1      CLIP-L hidden states (B, 77, 768), kohya's clip_skip     -
    sd_v2(_v)  OpenCLIP-H hidden states (B, 77, 1024), clip_skip        -
    sdxl       penultimate CLIP-L (768) ++ penultimate OpenCLIP-bigG    text_embeds: the pooled projection
               (1280) = (B, 77, 2048)                                   of encoder 2 (B, 1280); time_ids (B, 6)

SDXL was trained with size and crop conditioning: `time_ids` = (original height, original
width, crop top, crop left, target height, target width) of each example, as in kohya's
`sdxl_train_network.py` and diffusers' SDXL LoRA example. At sampling time the pipeline builds
them itself (original = target = the image size, crop (0, 0)).

kohya's clip_skip does not apply to SDXL: both encoders always give their penultimate layer
(without the final layer norm), which is what clip_skip 2 means for SD1.x; kohya warns and
ignores other values, and so does sdlora. The pooled embedding always comes from the last layer.

The training objective (`DiffusionObjective`: epsilon or v-prediction on the DDPM schedule, with
its timestep sampling and min-SNR weighting) and the latent format (`LatentFormat`: scaling and
shift from the VAE's config) come from the family too, so a rectified-flow family (noisy =
(1 - sigma) x + sigma noise, target noise - x) brings its own objective and the loop is unchanged.

Kohya key names (`lora_te1_` / `lora_te2_`, SGM U-Net names) live in `kohya.py`; the
Kohya/modelspec names of each family are its `Family` fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def is_sdxl(family: str) -> bool:
    return family == "sdxl"


def with_prediction_type(family: str, prediction_type: str) -> str:
    """SD2.x's two variants are named by their prediction type (sd_v2: epsilon, the 512 px base;
    sd_v2_v: v_prediction, 768 px); the other families keep their name."""
    if family.startswith("sd_v2"):
        return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"
    return family


# transformers 4 nests CLIPTextModel's transformer as `.text_model` (so its module paths read
# `text_model.encoder.layers.N...`); transformers 5 flattens CLIPTextModel (`encoder.layers.N...`)
# and keeps the nesting in CLIPTextModelWithProjection. Files (Kohya adapters, original-layout
# checkpoints) always use the 4.x names.
_TEXT_TRANSFORMER_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm")


def nested_text_name(path: str) -> str:
    """A text encoder's module or parameter path under its transformers-4 name: `encoder.layers.3.mlp.fc1`
    -> `text_model.encoder.layers.3.mlp.fc1`; nested paths and `text_projection` are kept."""
    return "text_model." + path if path.startswith(_TEXT_TRANSFORMER_CHILDREN) else path


def nested_text_key(body: str) -> str:
    """`nested_text_name` for the body of a Kohya key, whose "." are already "_": `encoder_layers_3_mlp_fc1`
    (what kohya and LyCORIS write under transformers 5) -> `text_model_encoder_layers_3_mlp_fc1`."""
    children = tuple(child.replace(".", "_") for child in _TEXT_TRANSFORMER_CHILDREN)
    return "text_model_" + body if body.startswith(children) else body


def text_transformer(text_encoder):
    """The CLIPTextTransformer (embeddings, encoder, final_layer_norm) of a text encoder, nested or flat,
    also when accelerate wrapped it for multi-process training."""
    from accelerate.utils import extract_model_from_parallel

    text_encoder = extract_model_from_parallel(text_encoder)
    return getattr(text_encoder, "text_model", text_encoder)


@dataclass
class TextConditioning:
    """What the text encoder(s) give the U-Net for a batch of captions."""

    hidden: torch.Tensor  # (B, 77, d): encoder_hidden_states
    pooled: torch.Tensor | None = None  # (B, 1280): SDXL's text_embeds; None for SD1.x/SD2.x

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"hidden": self.hidden} if self.pooled is None else {"hidden": self.hidden, "pooled": self.pooled}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> "TextConditioning":
        return cls(d["hidden"], d.get("pooled"))


def tokenize(tokenizers_, captions: list[str]) -> list[torch.Tensor]:
    """Each tokenizer's (B, 77) input ids, padded and truncated to its 77 positions."""
    return [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok in tokenizers_]


def encode_prompt(text_encoder, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """One CLIP text encoder's hidden states for the UNet's cross attention, (B, 77, dim).

    kohya's clip_skip: 1 is the last hidden state; n > 1 is the hidden state n layers from
    the end (hidden_states[-n]) passed through the final layer norm, as sd-scripts does.
    diffusers' pipelines count differently: their `clip_skip=k` takes hidden_states[-(k + 1)]
    (then the final layer norm), so kohya/A1111 clip_skip n is diffusers clip_skip n - 1;
    never pass this value to a pipeline's `clip_skip` argument, pass prompt_embeds instead.
    """
    if clip_skip <= 1:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    return text_transformer(text_encoder).final_layer_norm(hidden)


@dataclass(frozen=True)
class LatentFormat:
    """How a family's VAE latents enter the denoiser: (latent - shift) x scaling, both read from the
    VAE's config (`scaling_factor`; `shift_factor`, which SD1.x/SD2.x/SDXL leave unset: 0)."""

    scaling: float
    shift: float = 0.0

    @classmethod
    def of(cls, vae) -> "LatentFormat":
        return cls(vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0)

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, h, w) -> the denoiser's latents (shift 0: exactly latents x scaling)."""
        return (latents - self.shift) * self.scaling


class DiffusionObjective:
    """The DDPM objective of SD1.x, SD2.x and SDXL on the base's noise schedule:

        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   t ~ U{0, ..., T - 1}
        target = eps (epsilon) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (v-prediction)

    min-SNR-gamma weights (Hang et al. 2023): w = min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v),
    SNR = abar / (1 - abar) from diffusers' `compute_snr`."""

    def __init__(self, noise_scheduler):
        self.noise_scheduler = noise_scheduler
        self.v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
        self.num_timesteps = noise_scheduler.config.num_train_timesteps

    def sample_timesteps(self, generator: torch.Generator) -> torch.Tensor:
        """One example's timestep, () int64, uniform over the schedule."""
        return torch.randint(0, self.num_timesteps, (), generator=generator)

    def fixed_timesteps(self, k: int) -> torch.Tensor:
        """k timesteps spread evenly over (0, T), (k,): the validation loss's."""
        return torch.tensor([(i + 1) * self.num_timesteps // (k + 1) for i in range(k)])

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.v_prediction:
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, timesteps)
        return torch.clamp(snr, max=gamma) / (snr + 1 if self.v_prediction else snr)


@dataclass(frozen=True)
class Family:
    """A family with one CLIP text encoder (SD1.x, SD2.x): its hidden states condition the U-Net."""

    name: str  # BaseModel.family
    base_model_version: str  # ss_base_model_version
    architecture: str  # modelspec.architecture, before "/lora"
    # modelspec.implementation: kohya writes Stability's repository for SDXL, "diffusers" for SD1/2.
    implementation: str = "diffusers"

    def encode_text(self, encoders: list, input_ids: list[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
        """The U-Net's text conditioning from each encoder's (B, 77) input ids (see the module docstring)."""
        return TextConditioning(encode_prompt(encoders[0], input_ids[0], clip_skip))

    def size_conditioning(self, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                          target_size: tuple[int, int]) -> torch.Tensor | None:
        """An example's extra conditioning on its size and crop ((height, width) / (top, left) pairs);
        None: the family has none."""
        return None

    def predict(self, denoiser, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
                time_ids_: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The denoiser's prediction (noise or velocity, the objective's target) for noisy latents
        (B, C, h, w) at timesteps (B,), run in `dtype`."""
        return denoiser(noisy_latents.to(dtype), timesteps, **self.unet_conditioning(text, time_ids_, dtype)).sample

    def unet_conditioning(self, text: TextConditioning, time_ids_: torch.Tensor | None, dtype: torch.dtype) -> dict:
        """Keyword arguments of the U-Net call beside (latents, timesteps)."""
        return {"encoder_hidden_states": text.hidden.to(dtype)}

    def clip_skip_note(self, clip_skip: int) -> str | None:
        """A warning when clip_skip asks for something the family ignores."""
        return None

    def unread_text_layers(self, clip_skip: int, num_layers: list[int]) -> dict[str, range]:
        """{text-encoder part: indices of its trailing layers whose output the conditioning never reads}.

        Adapters there get no gradient (kohya creates and exports them all the same); the trainer
        freezes them so that multi-process training does not wait for their gradients. SD1.x/SD2.x
        read hidden_states[-clip_skip]."""
        return {"te": range(num_layers[0] - max(clip_skip, 1) + 1, num_layers[0])}

    def objective(self, noise_scheduler) -> DiffusionObjective:
        return DiffusionObjective(noise_scheduler)

    def latent_format(self, vae) -> LatentFormat:
        return LatentFormat.of(vae)


@dataclass(frozen=True)
class SDXLFamily(Family):
    """SDXL: two text encoders whose penultimate states are concatenated, encoder 2's pooled
    projection, and size/crop conditioning (`time_ids`)."""

    def encode_text(self, encoders: list, input_ids: list[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
        out1 = encoders[0](input_ids[0], output_hidden_states=True)
        out2 = encoders[1](input_ids[1], output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (B, 77, 768 + 1280)
        return TextConditioning(hidden, out2.text_embeds)  # text_embeds: projection of the EOS token's state

    def size_conditioning(self, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                          target_size: tuple[int, int]) -> torch.Tensor:
        """time_ids, (6,)."""
        return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)

    def unet_conditioning(self, text: TextConditioning, time_ids_: torch.Tensor | None, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": text.hidden.to(dtype),
                "added_cond_kwargs": {"text_embeds": text.pooled.to(dtype), "time_ids": time_ids_.to(dtype)}}

    def clip_skip_note(self, clip_skip: int) -> str | None:
        if clip_skip > 2:  # kohya's behaviour
            return (f"model.clip_skip = {clip_skip} is ignored for SDXL: both text encoders always give their "
                    "penultimate layer (what kohya and A1111 use); set clip_skip = 1 or 2 to silence this")
        return None

    def unread_text_layers(self, clip_skip: int, num_layers: list[int]) -> dict[str, range]:
        """SDXL reads encoder 1's penultimate state and encoder 2's last (its pooled output)."""
        return {"te1": range(num_layers[0] - 1, num_layers[0]), "te2": range(0)}


FAMILIES = {f.name: f for f in (
    Family("sd_v1", "sd_v1", "stable-diffusion-v1"),
    Family("sd_v2", "sd_v2", "stable-diffusion-v2-512"),
    Family("sd_v2_v", "sd_v2_v", "stable-diffusion-v2-768-v"),
    SDXLFamily("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base",
               "https://github.com/Stability-AI/generative-models"),
)}
