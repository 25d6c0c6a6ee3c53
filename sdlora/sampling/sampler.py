"""`sdlora sample`: render a trained adapter the way A1111 / ComfyUI will show it.

The adapter is read from its exported Kohya `.safetensors` file, never from training state
(a FLUX.1 file's fused modules split onto diffusers' layers, and always patched: diffusers reads
FLUX Kohya files only at the full model's widths):

    unfused (default)  diffusers' `load_lora_weights` (peft layers), one adapter name per file,
                       per-file weights through `set_adapters`: W x + w * (alpha / r) * up(down(x))
    fused / others     A1111's way: the weights are patched in place, W = W0 + sum_i w_i * dW_i
                       with dW_i = kinds.module_delta (any kind), W0 kept in a CPU copy so every
                       new set of weights (and weight 0, the base exactly) starts from W0; each
                       dW_i is formed one layer at a time, so memory stays that of the base.
                       diffusers cannot read LoHa, LoKr or Tucker modules and drops DoRA, so
                       files with any of them always take this path, as does a LoRA file of which
                       diffusers leaves a module out.
    When sampling ends, peft layers are unloaded and W0 is copied back (`AdapterSet.close`).
    The patching is the adapters' one engine (`adapters.apply`), which merging uses too.

Grids (one per seed, rows = prompts, columns = LoRA scales or epoch files) are `grids.py`'s;
the text each PNG carries is `infotext.py`'s.

Before anything is loaded, every module key of a file is matched against the base's
Linear/Conv2d layers and its shape checked (`apply.read_for_model`): diffusers would drop
unmatched keys silently.

FLUX.1 and SD3.x (`family.one_pass`) render with their own pipeline (`Sampler.render_one_pass`): a
flow-matching solver (`FLOW_SAMPLERS`: Euler, or DPM++ 2M on flow sigmas), FLUX.1 dev's distilled
guidance or SD3's classifier-free guidance with its skip-layer guidance option, sides at the next
multiple of 16 and cropped; for FLUX.1 a second pass (FluxImg2ImgPipeline, or tiles of multiples of
16 px) only when hires says on or tiled.

Hires ("hires fix"): the first pass renders at the base's native area (or `[sample]
first_pass_resolution`'s: `first_pass_side`) with the target's aspect ratio, a Lanczos upscale (or
the upscaler model `hires_upscaler` names: upscale.py) takes it to the target size, and an img2img pass over the same components (strength = hires_denoise) adds the
detail; far above the native size the img2img pass runs in tiles (`tiled.py`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora.adapters import apply, keys, kinds, transformer_keys
from sdlora.adapters.file import short_hash
from sdlora.config import SampleConfig
from sdlora.errors import UserError
from sdlora.io import safe_file_stem
from sdlora.models import prompts as rules
from sdlora.models.families import FAMILIES, unread_settings
from sdlora.models.families.base import TextConditioning, tokenize
from sdlora.models.load import compute_device, load_base
from sdlora.quiet import quiet
from sdlora.sampling import tiled, upscale
from sdlora.sampling.grids import (
    SampleResult,
    epoch_files,
    prompt_rows,
    render_grid,
    sweep_columns,
)
from sdlora.sampling.render_cache import RenderCache

# config name -> (diffusers scheduler class, extra config, A1111's sampler name, A1111's schedule type).
# A1111 (1.9+) writes the sampler and its sigma schedule as two fields: "Sampler: DPM++ 2M,
# Schedule type: Karras"; older infotexts said "DPM++ 2M Karras", which it still reads.
SAMPLERS = {
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
                        "DPM++ 2M", "Karras"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False), "DPM++ 2M", "Uniform"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a", "Uniform"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler", "Uniform"),
    "ddim": ("DDIMScheduler", {}, "DDIM", "Automatic"),
}


# A flow-matching base (FLUX.1) renders with the solvers diffusers runs on flow sigmas, built on the base's own
# scheduler config (its shift and dynamic shifting): config name -> (diffusers class, extra config, the name
# Forge writes). Names without a flow form in diffusers (Karras sigmas and the ancestral, DDIM and DDPM
# samplers are SD's noise schedules) render with flow-matching Euler, the base's own sampler.
FLOW_SAMPLERS = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}, "Euler"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2), "DPM++ 2M"),
}
FLOW_SCHEDULE = "Simple"  # Forge's schedule type for FLUX.1's shifted, evenly spaced sigmas


def is_flow(base_scheduler) -> bool:
    import diffusers

    return isinstance(base_scheduler, diffusers.FlowMatchEulerDiscreteScheduler)


def flow_sampler(name: str) -> str:
    """The FLOW_SAMPLERS entry a flow-matching base renders the config's sampler `name` with."""
    return name if name in FLOW_SAMPLERS else "euler"


def sampler_names(name: str, base_scheduler) -> tuple[str, str]:
    """(Sampler, Schedule type) of the infotext for the config's sampler `name` on this base."""
    if is_flow(base_scheduler):
        return FLOW_SAMPLERS[flow_sampler(name)][2], FLOW_SCHEDULE
    return SAMPLERS[name][2], SAMPLERS[name][3]


def make_scheduler(name: str, base_scheduler):
    """The sampler `name` built from the base's scheduler config (same betas and prediction type)."""
    import diffusers

    if is_flow(base_scheduler):
        return _flow_scheduler(flow_sampler(name), base_scheduler.config)
    if name not in SAMPLERS:
        raise UserError(f"[sample] sampler = {name!r}: choose one of {', '.join(SAMPLERS)}")
    cls_name, extra, _, _ = SAMPLERS[name]
    return getattr(diffusers, cls_name).from_config(base_scheduler.config, **extra)


def _flow_scheduler(name: str, config):
    """FLOW_SAMPLERS[name] on the flow-matching config `config`.

    diffusers' multistep solvers on flow sigmas (use_flow_sigmas) step through
    sigma = S s / (1 + (S - 1) s), s evenly spaced from 1, with S = e^mu where the pipeline passes mu, the
    same shift as flow-matching Euler's. FluxPipeline passes mu at every call, which these solvers take only
    with dynamic shifting, so a fixed shift S (schnell's 1.0) becomes dynamic shifting whose line is flat at
    mu = ln S; the pipelines read that line (base_shift, max_shift, ...) from the scheduler's config."""
    import diffusers

    cls_name, extra, _ = FLOW_SAMPLERS[name]
    cls = getattr(diffusers, cls_name)
    if cls is diffusers.FlowMatchEulerDiscreteScheduler:
        return cls.from_config(config)
    line = dict(base_shift=config.base_shift, max_shift=config.max_shift) if config.use_dynamic_shifting else \
        dict.fromkeys(("base_shift", "max_shift"), math.log(config.shift))
    scheduler = cls.from_config({k: v for k, v in config.items() if k != "shift"}, use_flow_sigmas=True,
                                prediction_type="flow_prediction", flow_shift=config.shift, use_dynamic_shifting=True,
                                time_shift_type="exponential", **extra)
    scheduler.register_to_config(**line, base_image_seq_len=config.base_image_seq_len,
                                 max_image_seq_len=config.max_image_seq_len)
    return scheduler


# ---------------------------------------------------------------------------------------------
# Adapters


@dataclass
class Adapter:
    """One adapter file as the sampler uses it."""

    path: Path
    weight: float | None  # FILE:SCALE's fixed weight; None = swept by the grid's column scales
    alias: str  # A1111's alias: ss_output_name, else the file stem
    short_hash: str  # A1111's "Lora hashes" value
    kind: str  # "lora" when every module is a plain LoRA (diffusers loads it), else the other variants found
    modules: dict[str, dict[str, torch.Tensor]]  # kohya key -> tensors
    name: str = ""  # the diffusers adapter name, when loaded through diffusers
    from_prompt: bool = False  # loaded for `<lora:name:w>` tags: its weight is set per prompt row


def read_for_base(path, weight: float | None, pipe) -> Adapter:
    """Read an adapter file and check that every module matches a layer of the pipeline's base (`apply.read_for_model`)."""

    path = Path(path)
    modules, metadata = apply.read_for_model(path, keys.model_parts(pipe))
    plain = all(kinds.is_plain_lora(module) for module in modules.values())
    variants = {kinds.module_variant(module) for module in modules.values() if not kinds.is_plain_lora(module)}
    return Adapter(path=path, weight=weight, alias=metadata.get("ss_output_name") or path.stem,
                   short_hash=short_hash(path), kind="lora" if plain else ", ".join(sorted(variants)),
                   modules=modules)


class AdapterSet:
    """The adapters applied to one pipeline.

    In a grid column of scale c, a swept file (weight None) is applied at c and a fixed one
    (FILE:SCALE) at its own weight. `close()` gives the pipeline back as the base: peft layers
    unloaded, patched weights restored.
    """

    def __init__(self, pipe, fuse: bool):
        self.pipe, self.fuse = pipe, fuse
        self.adapters: list[Adapter] = []
        self.patcher: apply.Patcher | None = None
        self.current: list[float] = []  # the weights applied now, one per adapter
        self._count = 0

    def add(self, path, weight: float | None = None) -> Adapter:
        adapter = read_for_base(path, weight, self.pipe)
        # diffusers reads a transformer's (FLUX.1's) Kohya files only at the full model's widths: patched here.
        denoiser = keys.model_parts(self.pipe)["unet"]
        if (not self.fuse and transformer_keys.names_of(denoiser) is None
                and all(kinds.is_plain_lora(module) for module in adapter.modules.values())):
            self._load_with_diffusers(adapter)
        if not adapter.name:
            if self.patcher is None:
                self.patcher = apply.Patcher(keys.model_parts(self.pipe))
            self.patcher.add(adapter)
        self.adapters.append(adapter)
        self.set_weights(self.current + [0.0])  # a new file starts switched off
        return adapter

    def _load_with_diffusers(self, adapter: Adapter) -> None:
        """Load a LoRA file as peft layers (diffusers' load_lora_weights); if diffusers left any module
        out, unload it again (the caller patches the weights instead)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        name = f"adapter{self._count}"
        self._count += 1
        # The Kohya-named tensors as read (diffusers/peft files converted), not the file again, each module
        # at alpha 1 (diffusers would give every module the most common alpha: `kinds.lora.with_alpha_one`).
        tensors = {f"{key}.{part}": t for key, parts in adapter.modules.items()
                   for part, t in kinds.lora.with_alpha_one(parts, kinds.module_scale(parts)).items()}
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        try:
            with quiet(diffusers_logging, transformers_logging):  # transformers' "Loading weights" bar otherwise
                self.pipe.load_lora_weights(tensors, adapter_name=name)
        except ValueError:  # diffusers 0.42 cannot tell the format of text-encoder attention without out_proj
            pass
        layers = apply.model_layers(keys.model_parts(self.pipe), aliases=False)
        # diffusers drops some modules silently (a text encoder's q/k/v when its file has an mlp module but no
        # out_proj), so every module is checked for its peft layer.
        if all(isinstance(layers[key], BaseTunerLayer) and name in getattr(layers[key], "lora_A", {})
               for key in adapter.modules):
            adapter.name = name
        elif not any(a.name for a in self.adapters):
            self.pipe.unload_lora_weights()  # also the empty peft layers a failed load leaves
        elif any(name in names for names in self.pipe.get_list_adapters().values()):
            self.pipe.delete_adapters(name)

    def remove(self, adapter: Adapter) -> None:
        index = next(i for i, a in enumerate(self.adapters) if a is adapter)
        del self.adapters[index], self.current[index]
        if adapter.name:
            self.pipe.delete_adapters(adapter.name)
        elif self.patcher is not None:
            self.patcher.remove(adapter)

    def _peft_weights(self, adapter: Adapter, weight):
        """diffusers' set_adapters weight: a number, or {component: multiplier} for the components
        that hold this adapter (get_list_adapters), so te and unet reach their own layers."""
        if not isinstance(weight, tuple):
            return weight
        return {component: apply.part_multiplier(weight, component != "unet")
                for component, names in self.pipe.get_list_adapters().items() if adapter.name in names}

    def weights_at(self, scale: float) -> list[float]:
        """Each adapter's weight in a column of scale `scale` (in the order they were added)."""
        return [scale if a.weight is None else a.weight for a in self.adapters]

    def set_weights(self, weights: list[float | tuple[float, float]]) -> None:
        """Each adapter's multiplier: a number, or (te, unet) for the text encoder(s) and the U-Net apart."""
        self.current = list(weights)
        peft = [(a, w) for a, w in zip(self.adapters, weights) if a.name]
        if peft:
            self.pipe.set_adapters([a.name for a, _ in peft], [self._peft_weights(a, w) for a, w in peft])
        if self.patcher is not None:
            self.patcher.apply({id(a): w for a, w in zip(self.adapters, weights) if not a.name})

    def set_scale(self, scale: float) -> list[float]:
        weights = self.weights_at(scale)
        self.set_weights(weights)
        return weights

    def close(self) -> None:
        if any(a.name for a in self.adapters):
            self.pipe.unload_lora_weights()
        if self.patcher is not None:
            self.patcher.restore()
        self.adapters.clear()


# ---------------------------------------------------------------------------------------------
# Rendering


def first_pass_side(cfg, base) -> int:
    """Side of the square area a first pass renders at: `[sample] first_pass_resolution`, else the
    base's native size. An adapter learns the style at the size it is trained at; rendered smaller,
    it draws less of it (the demo, trained at 160 px on a 128 px base: colourfulness ratio 1.36x at
    160x104 against 1.57x at its training size 192x128, 48 images each), so the demo sets it."""
    return cfg.sample.first_pass_resolution or base.resolution


def first_pass_size(width: int, height: int, native: int) -> tuple[int, int]:
    """The area native^2 pixels (`first_pass_side`) at the target's aspect ratio, sides multiples of 8."""
    aspect = width / height
    w = max(8, round(native * math.sqrt(aspect) / 8) * 8)
    h = max(8, round(native / math.sqrt(aspect) / 8) * 8)
    return w, h


def img2img_steps(denoise_steps: int, strength: float) -> int:
    """The n to give diffusers' img2img so that it denoises exactly `denoise_steps` (int(n * strength))."""
    n = math.ceil(denoise_steps / strength)
    while int(n * strength) < denoise_steps:  # float rounding: ceil(29 / 0.29) * 0.29 < 29
        n += 1
    return n


def flow_img2img_steps(denoise_steps: int, strength: float) -> int:
    """The n to give FluxImg2ImgPipeline / StableDiffusion3Img2ImgPipeline so that it denoises exactly
    `denoise_steps`: each runs
    n - int(n - n * strength) of n steps (diffusers' SD img2img runs int(n * strength), `img2img_steps`)."""
    n = max(1, math.floor(denoise_steps / strength))
    while n > 1 and n - int(n - n * strength) > denoise_steps:
        n -= 1
    while n - int(n - n * strength) < denoise_steps:
        n += 1
    return n


def hires_mode(mode: str, width: int, height: int, native: int, tiled_above: float) -> str:
    """The second pass a render gets: "off", "on" (one img2img pass at the target size) or "tiled".
    auto: off up to the native area, tiled above `tiled_above` times it, one pass between."""
    if mode not in ("auto", "on", "tiled", "off"):
        raise UserError(f"--hires {mode!r}: choose on, tiled, off or auto")
    if mode != "auto":
        return mode
    area = width * height / (native * native)
    return "off" if area <= 1 else "tiled" if area > tiled_above else "on"


class Sampler:
    """A base model with adapters, rendering prompts x seeds at a given adapter scale."""

    def __init__(self, cfg, fuse: bool | None = None, base=None):
        self.cfg = cfg
        self.base = base if base is not None else load_base(cfg.model)
        self.family = FAMILIES[self.base.family].with_text_settings(cfg.train)  # T5's length as trained
        s = cfg.sample
        self.device = compute_device()
        self.pipe = self.base.pipeline(scheduler=make_scheduler(s.sampler, self.base.noise_scheduler))
        self.scheduler_name = s.sampler
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.adapters = AdapterSet(self.pipe, s.fuse if fuse is None else fuse)
        self.native = first_pass_side(cfg, self.base)  # the first pass's square side (`first_pass_side`)
        self.upscaler = None  # upscale.ModelUpscaler of [sample] hires_upscaler, loaded when a hires pass needs it

    def encode(self, prompts: list[str]):
        """The U-Net's text conditioning (family.TextConditioning): (B, 77, dim) hidden states with
        the config's clip_skip (Kohya/A1111 semantics), and SDXL's pooled embeddings."""
        return self.encode_ids(tokenize(self.base.tokenizers, prompts, self.family.token_lengths(self.base.tokenizers)))

    def encode_ids(self, ids: list[torch.Tensor]):
        """`encode` from each text encoder's (B, 77) input ids."""
        with torch.no_grad():
            return FAMILIES[self.base.family].encode_text(self.base.text_encoders, [x.to(self.device) for x in ids],
                                                          self.cfg.model.clip_skip)

    def encode_whole(self, prompts: list[str]) -> TextConditioning:
        """The conditioning of a family whose encoders read each prompt whole (FLUX.1), as Forge reads
        A1111's syntax there: emphasis weights the tokens (`Family.emphasized`), BREAK has no meaning, and
        prompt editing, alternation and AND are refused."""
        runs = []
        for prompt in prompts:
            schedule = rules.prompt_schedule(rules.conditioned_text(prompt), 1000)  # any switch shows in 1000 steps
            if len(schedule) > 1:
                raise UserError(f"prompt {prompt!r}: prompt editing and alternation ([a:b:when], [a|b]) are not "
                                f"supported for {self.family.title} prompts yet; (word:1.2) emphasis is")
            runs.append(rules.parse_attention(schedule[0][1]))
        lengths = self.family.token_lengths(self.base.tokenizers)  # T5's as trained ([train] t5_max_length)
        per_tokenizer = [[rules.sequence_tokens(r, tok, n) for r in runs]
                         for tok, n in zip(self.base.tokenizers, lengths)]
        text = self.encode_ids([torch.tensor([c.tokens for c in chunks]) for chunks in per_tokenizer])
        return self.family.emphasized(text, [torch.tensor([c.multipliers for c in chunks], device=text.hidden.device)
                                             for chunks in per_tokenizer])

    def embeds(self, prompts: list[str], negative: list[str]) -> dict:
        """The pipelines' prompt-embedding arguments for prompts and their negative prompts, each
        encoded by A1111's rules (`prompts.encode`: emphasis, BREAK, 75-token chunks) and padded
        to one chunk count."""
        base = self.base
        widths = [te.config.hidden_size for te in base.text_encoders]
        encoded = {t: rules.encode(t, base.tokenizers, self.encode_ids, widths) for t in {*prompts, *negative, ""}}
        padded = rules.pad_to_same_length([encoded[t] for t in [*prompts, *negative]], encoded[""])
        text, neg = padded[:len(prompts)], padded[len(prompts):]
        kwargs = dict(prompt_embeds=torch.cat([e.hidden for e in text]),
                      negative_prompt_embeds=torch.cat([e.hidden for e in neg]))
        if text[0].pooled is not None:  # SDXL; the pipeline adds the size/crop time ids itself
            kwargs.update(pooled_prompt_embeds=torch.cat([e.pooled for e in text]),
                          negative_pooled_prompt_embeds=torch.cat([e.pooled for e in neg]))
        return kwargs

    def step_embeds(self, prompts: list[str], negative: list[str], steps: int,
                    hires_steps: int | None = None) -> list[dict]:
        """`embeds` for each denoising step of a pass, by A1111's prompt editing and alternation
        (`prompts.prompt_schedule`: the first pass, or with hires_steps the hires pass); steps
        with the same texts share one encoding. Prompts are refused for AND (`conditioned_text`)."""
        texts = [rules.conditioned_text(p) for p in prompts] + list(negative)
        n = hires_steps or steps
        schedules = [rules.prompt_schedule(t, steps, hires_steps) for t in texts]
        encoded: dict[tuple, dict] = {}
        per_step = []
        for step in range(n):
            at = tuple(rules.text_at(schedule, step) for schedule in schedules)
            if at not in encoded:
                encoded[at] = self.embeds(list(at[:len(prompts)]), list(at[len(prompts):]))
            per_step.append(encoded[at])
        return per_step

    def render(self, prompts: list[str], seeds: list[int], width: int, height: int, steps: int,
               hires: str = "off", negatives: list[str] | None = None, cfg_scale: float | None = None,
               sampler: str | None = None) -> tuple[list, dict]:
        """One image per (prompt, seed) pair; returns (images, A1111 parameters shared by them).

        negatives, cfg_scale, sampler: per call (a prompt file's --n, --l, --ss); default the config's.
        """
        s = self.cfg.sample
        s = dataclasses.replace(s, cfg_scale=s.cfg_scale if cfg_scale is None else cfg_scale,
                                sampler=sampler or s.sampler)
        if s.sampler != self.scheduler_name:
            self.pipe.scheduler = make_scheduler(s.sampler, self.base.noise_scheduler)
            self.scheduler_name = s.sampler
        if self.family.one_pass:
            return self.render_one_pass(prompts, seeds, width, height, steps, s, negatives, hires)
        for side, v in (("width", width), ("height", height)):
            if v % 8 or v < 8:
                raise UserError(f"[sample] {side} = {v} is not a positive multiple of 8; try {max(8, v - v % 8)}")
        mode = hires_mode(hires, width, height, self.native, s.hires_tiled_above)
        two_pass = mode != "off"
        w0, h0 = first_pass_size(width, height, self.native) if two_pass else (width, height)
        # Noise on the GPU where CUDA draws it (A1111's default); on Apple's GPU from the CPU, as
        # diffusers advises there, so a seed gives the CPU's image.
        noise_device = "cpu" if self.device == "mps" else self.device
        generators = lambda: [torch.Generator(noise_device).manual_seed(int(seed)) for seed in seeds]  # noqa: E731
        negatives = list(negatives) if negatives else [s.negative_prompt] * len(prompts)
        per_step = self.step_embeds(list(prompts), negatives, steps)
        images = self.pipe(**per_step[0], width=w0, height=h0, num_inference_steps=steps, guidance_scale=s.cfg_scale,
                           generator=generators(), **switching(per_step)).images
        # A1111's key order (processing.create_infotext); None values are left out of the text.
        clip_skip = self.cfg.model.clip_skip
        names = sampler_names(s.sampler, self.base.noise_scheduler)
        params = {"Steps": steps, "Sampler": names[0], "Schedule type": names[1],
                  "CFG scale": float(s.cfg_scale), "Seed": None, "Size": f"{w0}x{h0}",
                  "Model hash": self.base.model_hash[:10], "Model": self.base.name,
                  "Denoising strength": None, "Clip skip": clip_skip if clip_skip > 1 else None,
                  "RNG": "CPU" if noise_device == "cpu" else None}  # A1111's field when its noise is drawn on the CPU
        if mode == "tiled":
            images, upscaler = self.upscale(images, width, height)
            if s.hires_denoise > 0:
                # Prompt editing over the hires pass's own steps, as A1111 schedules it.
                per_step = self.step_embeds(list(prompts), negatives, steps, s.hires_steps or steps)
                images = self.refine_tiled(images, per_step, seeds, s, steps, noise_device)
            tile, overlap = self.tile_size(s)
            params.update({"Denoising strength": float(s.hires_denoise), "Hires resize": f"{width}x{height}",
                           "Hires steps": s.hires_steps or None, "Hires upscaler": upscaler, "Hires mode": "tiled",
                           "Hires tile": f"{tile}x{tile}", "Hires tile overlap": overlap})
        elif two_pass:
            from diffusers import AutoPipelineForImage2Image

            img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)  # SD or SDXL img2img, same components
            img2img.set_progress_bar_config(disable=True)
            upscaled, upscaler = self.upscale(images, width, height)
            # As A1111 does, the hires pass denoises for hires_steps steps (or steps): diffusers runs
            # int(n * strength) of n scheduled steps, so n is scaled up by 1 / strength.
            hires_steps = s.hires_steps or steps
            images = upscaled
            if s.hires_denoise > 0:
                # Prompt editing over the hires pass's own steps, as A1111 schedules it.
                per_step = self.step_embeds(list(prompts), negatives, steps, hires_steps)
                images = img2img(**per_step[0], image=upscaled, strength=s.hires_denoise,
                                 num_inference_steps=img2img_steps(hires_steps, s.hires_denoise),
                                 guidance_scale=s.cfg_scale, generator=generators(), **switching(per_step)).images
            params.update({"Denoising strength": float(s.hires_denoise), "Hires resize": f"{width}x{height}",
                           "Hires steps": s.hires_steps or None, "Hires upscaler": upscaler})
        return images, params

    def render_one_pass(self, prompts: list[str], seeds: list[int], width: int, height: int, steps: int,
                        s, negatives: list[str] | None = None, hires: str = "off") -> tuple[list, dict]:
        """`render` for a family that renders with its own pipeline (`family.one_pass`: FLUX.1, SD3.x) and a
        flow-matching solver (`FLOW_SAMPLERS`). The prompts are encoded whole, with A1111's emphasis as Forge
        weights FLUX.1 prompts (`encode_whole`).

        FLUX.1 (no classifier-free guidance) takes no negative prompt; dev takes `sample.guidance_scale` as its
        input, schnell ignores it. SD3.x guides with the negative prompts at `cfg_scale`, and with
        skip-layer guidance when `skip_layer_guidance_scale` > 0 (diffusers' arguments of the same names).

        Sides are rendered at the next multiple of `family.size_multiple` and centre-cropped to the
        requested size (1080x720 -> 1088x720, 4 px off each side); the infotext's Size is the image's
        and "Render size" the pass's.

        hires "on" / "tiled" (asked for: `pass_settings` turns auto off for these families): the first pass
        at the first pass's area (sides multiples of 16), a Lanczos upscale to the render size, then
        FluxImg2ImgPipeline / StableDiffusion3Img2ImgPipeline ("on") or the tiled pass with
        `tiled.FlowDenoiser` ("tiled", tiles on multiples of 16 px), both with flow-matching Euler
        (FluxImg2ImgPipeline passes its own sigmas, which diffusers' multistep solvers do not take) and SD3.x's
        classifier-free guidance (skip-layer guidance stays with the first pass); then the crop. Size is then the first pass's, as in A1111."""
        m = self.family.size_multiple
        w0, h0 = math.ceil(width / m) * m, math.ceil(height / m) * m
        two_pass = hires in ("on", "tiled")
        fw, fh = (math.ceil(x / m) * m for x in first_pass_size(width, height, self.native)) if two_pass \
            else (w0, h0)
        noise_device = "cpu" if self.device == "mps" else self.device
        generators = lambda: [torch.Generator(noise_device).manual_seed(int(seed)) for seed in seeds]  # noqa: E731
        text = self.encode_whole(list(prompts))
        guided = getattr(self.pipe.transformer.config, "guidance_embeds", False)  # FLUX.1 dev's guidance input
        kwargs, guidance, negative = {"guidance_scale": s.guidance_scale}, {"CFG scale": 1.0}, None
        if self.family.classifier_free_guidance:
            negative = self.encode_whole(list(negatives) if negatives else [s.negative_prompt] * len(prompts))
            kwargs = {"guidance_scale": s.cfg_scale, "negative_prompt_embeds": negative.hidden,
                      "negative_pooled_prompt_embeds": negative.pooled, **self.skip_layer_guidance(s)}
            guidance = {"CFG scale": float(s.cfg_scale), "Skip layer guidance": skip_layer_note(s)}
        images = self.pipe(prompt_embeds=text.hidden, pooled_prompt_embeds=text.pooled, width=fw, height=fh,
                           num_inference_steps=steps, generator=generators(), **kwargs).images
        # Forge's names for FLUX.1: CFG scale 1 (none) and the distilled guidance apart.
        names = sampler_names(s.sampler, self.base.noise_scheduler)
        params = {"Steps": steps, "Sampler": names[0], "Schedule type": names[1], **guidance,
                  "Distilled CFG Scale": float(s.guidance_scale) if guided else None, "Seed": None,
                  "Size": f"{width}x{height}",
                  "Render size": f"{w0}x{h0}, centre-cropped" if (w0, h0) != (width, height) else None,
                  "Model hash": self.base.model_hash[:10], "Model": self.base.name,
                  "RNG": "CPU" if noise_device == "cpu" else None}
        if two_pass:
            euler = make_scheduler("euler", self.base.noise_scheduler)
            images, upscaler = self.upscale(images, w0, h0)
            hires_steps = s.hires_steps or steps
            if s.hires_denoise > 0 and hires == "tiled":
                images = self.refine_tiled_flow(images, text, seeds, s, hires_steps, euler, noise_device, negative)
            elif s.hires_denoise > 0:
                from diffusers import AutoPipelineForImage2Image

                # FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline (CFG without skip-layer guidance)
                img2img = AutoPipelineForImage2Image.from_pipe(self.pipe, scheduler=euler)
                img2img.set_progress_bar_config(disable=True)
                guide = {k: v for k, v in kwargs.items() if not k.startswith("skip_")}
                images = img2img(prompt_embeds=text.hidden, pooled_prompt_embeds=text.pooled, image=images, width=w0,
                                 height=h0, strength=s.hires_denoise,
                                 num_inference_steps=flow_img2img_steps(hires_steps, s.hires_denoise),
                                 generator=generators(), **guide).images
            params.update({"Size": f"{fw}x{fh}", "Denoising strength": float(s.hires_denoise),
                           "Hires resize": f"{width}x{height}", "Hires steps": s.hires_steps or None,
                           "Hires upscaler": upscaler,
                           "Hires sampler": FLOW_SAMPLERS["euler"][2] if names[0] != FLOW_SAMPLERS["euler"][2] else None})
            if hires == "tiled":
                tile, overlap = self.tile_size(s)
                params.update({"Hires mode": "tiled", "Hires tile": f"{tile}x{tile}", "Hires tile overlap": overlap})
        left, top = (w0 - width) // 2, (h0 - height) // 2
        return [im.crop((left, top, left + width, top + height)) for im in images], params

    def refine_tiled_flow(self, upscaled: list, text: TextConditioning, seeds: list[int], s, hires_steps: int,
                          scheduler, noise_device, negative: TextConditioning | None = None) -> list:
        """The tiled pass (tiled.py) of a flow family over each upscaled image, its noise drawn from its own
        seed; `text` is the batch's conditioning, one row per image, and `negative` the negative prompts' for
        classifier-free guidance at cfg_scale (SD3.x)."""
        from diffusers.utils.torch_utils import randn_tensor

        tile, overlap = self.tile_size(s)
        family = self.family.for_sampling(s.guidance_scale)
        transformer = getattr(self.pipe, self.family.denoiser_part)
        out = []
        for k, (image, seed) in enumerate(zip(upscaled, seeds)):
            latents = tiled.encode(self.pipe, image)
            noise = randn_tensor(latents.shape, generator=torch.Generator(noise_device).manual_seed(int(seed)),
                                 device=torch.device(self.device), dtype=latents.dtype)
            row = TextConditioning(hidden=text.hidden[k:k + 1], pooled=text.pooled[k:k + 1])
            neg = None if negative is None else TextConditioning(hidden=negative.hidden[k:k + 1],
                                                                 pooled=negative.pooled[k:k + 1])
            denoiser = tiled.FlowDenoiser(family, transformer, row, (image.height, image.width), neg, s.cfg_scale)
            latents = tiled.refine(latents, noise, scheduler, denoiser,
                                   num_steps=img2img_steps(hires_steps, s.hires_denoise), strength=s.hires_denoise,
                                   tile=tile // tiled.LATENT_CELL, overlap=overlap // tiled.LATENT_CELL)
            out.append(tiled.decode(self.pipe, latents))
        return out

    def skip_layer_guidance(self, s) -> dict:
        """StableDiffusion3Pipeline's skip-layer guidance arguments from [sample] (none when its scale is 0):
        from step start x steps to stop x steps, the prediction moves by scale x (text - text with the
        `skip_guidance_layers` transformer blocks skipped)."""
        if not s.skip_layer_guidance_scale:
            return {}
        blocks = len(self.pipe.transformer.transformer_blocks)
        outside = [i for i in s.skip_guidance_layers if i >= blocks]
        if outside or not s.skip_guidance_layers:
            raise UserError(f"[sample] skip_guidance_layers = {list(s.skip_guidance_layers)}: {self.base.name} has "
                            f"transformer blocks 0 to {blocks - 1}; name some of them, or set "
                            "skip_layer_guidance_scale = 0")
        if s.skip_layer_guidance_start >= s.skip_layer_guidance_stop:
            raise UserError(f"[sample] skip_layer_guidance_start = {s.skip_layer_guidance_start:g} is not before "
                            f"skip_layer_guidance_stop = {s.skip_layer_guidance_stop:g}; start must be the smaller")
        return {"skip_guidance_layers": list(s.skip_guidance_layers),
                "skip_layer_guidance_scale": s.skip_layer_guidance_scale,
                "skip_layer_guidance_start": s.skip_layer_guidance_start,
                "skip_layer_guidance_stop": s.skip_layer_guidance_stop}

    def upscale(self, images: list, width: int, height: int) -> tuple[list, str]:
        """The hires pass's upscale step and its name for the infotext: Lanczos, or the model file
        `[sample] hires_upscaler` names (loaded once, on first use)."""
        path = self.cfg.sample.hires_upscaler
        if not path:
            return upscale.lanczos(images, width, height), "Lanczos"
        if self.upscaler is None:
            self.upscaler = upscale.ModelUpscaler(path, self.device, self.cfg.model.allow_pickle)
        return self.upscaler(images, width, height), self.upscaler.name

    def tile_size(self, s) -> tuple[int, int]:
        """(tile side, overlap) of the tiled pass in pixels: the base's native size and a quarter of
        it unless the config says otherwise."""
        tile = s.hires_tile or self.base.resolution
        overlap = s.hires_tile_overlap or tile // 4
        for key, value in (("hires_tile", tile), ("hires_tile_overlap", overlap)):
            if value % tiled.LATENT_CELL:
                raise UserError(f"[sample] {key} = {value} is not a multiple of {tiled.LATENT_CELL}; "
                                f"try {value - value % tiled.LATENT_CELL or tiled.LATENT_CELL}")
        if overlap >= tile:
            raise UserError(f"[sample] hires_tile_overlap = {overlap} must be smaller than the tile ({tile} px)")
        m = self.family.size_multiple
        if tile % m:  # FLUX.1's tiles are packed in 2x2 latent patches
            raise UserError(f"[sample] hires_tile = {tile} is not a multiple of {m}, which {self.family.title} "
                            f"needs; try {tile - tile % m or m}")
        return tile, overlap

    def refine_tiled(self, upscaled: list, per_step: list[dict], seeds: list[int], s, steps: int,
                     noise_device) -> list:
        """The tiled pass (tiled.py) over each upscaled image, its noise drawn from its own seed.
        per_step: `step_embeds` over the hires pass's steps (prompt editing switches them as it does in
        the one-pass hires)."""
        from diffusers.utils.torch_utils import randn_tensor

        def image_text(embeds: dict, k: int) -> TextConditioning:
            # Row 0 the negative prompt, row 1 the prompt (tiled.Denoiser's guidance order).
            pooled = embeds.get("pooled_prompt_embeds")
            return TextConditioning(
                hidden=torch.cat([embeds["negative_prompt_embeds"][k:k + 1], embeds["prompt_embeds"][k:k + 1]]),
                pooled=None if pooled is None else
                torch.cat([embeds["negative_pooled_prompt_embeds"][k:k + 1], pooled[k:k + 1]]))

        tile, overlap = self.tile_size(s)
        num_steps = img2img_steps(s.hires_steps or steps, s.hires_denoise)
        out = []
        for k, (image, seed) in enumerate(zip(upscaled, seeds)):
            latents = tiled.encode(self.pipe, image)
            noise = randn_tensor(latents.shape, generator=torch.Generator(noise_device).manual_seed(int(seed)),
                                 device=torch.device(self.device), dtype=latents.dtype)
            texts = [image_text(embeds, k) for embeds in per_step]
            denoiser = tiled.Denoiser(FAMILIES[self.base.family], self.pipe.unet, texts[0], float(s.cfg_scale),
                                      (image.height, image.width))

            def at_step(i, denoiser=denoiser, texts=texts):
                denoiser.text = texts[min(i, len(texts) - 1)]

            scheduler = make_scheduler(s.sampler, self.base.noise_scheduler)
            latents = tiled.refine(latents, noise, scheduler, denoiser, num_steps=num_steps, strength=s.hires_denoise,
                                   tile=tile // tiled.LATENT_CELL, overlap=overlap // tiled.LATENT_CELL,
                                   on_step=at_step)
            out.append(tiled.decode(self.pipe, latents))
        return out


def switching(per_step: list[dict]) -> dict:
    """The pipeline's step-end callback arguments that switch to each step's conditioning (none
    when one conditioning serves every step).

    At the end of step i the pipelines take the returned `prompt_embeds` (and SDXL's
    `add_text_embeds`) for step i + 1; under classifier-free guidance both are the batch
    [negative, positive], which is how the pipelines concatenate them themselves.
    """
    if all(embeds is per_step[0] for embeds in per_step):
        return {}
    inputs = ["prompt_embeds"] + (["add_text_embeds"] if "pooled_prompt_embeds" in per_step[0] else [])

    def on_step_end(pipe, i, t, tensors):
        if i + 1 >= len(per_step) or per_step[i + 1] is per_step[i]:
            return {}
        embeds, guided = per_step[i + 1], pipe.do_classifier_free_guidance
        pairs = {"prompt_embeds": ("negative_prompt_embeds", "prompt_embeds"),
                 "add_text_embeds": ("negative_pooled_prompt_embeds", "pooled_prompt_embeds")}
        return {name: (torch.cat([embeds[pairs[name][0]], embeds[pairs[name][1]]]) if guided
                       else embeds[pairs[name][1]]).to(tensors[name]) for name in inputs}

    return dict(callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=inputs)

# ---------------------------------------------------------------------------------------------
# Entry points


def sample_prompts(cfg) -> list:
    """The prompts `run_sample` renders: the lines of `sample.prompt_file` (PromptLine) when set, else
    `sample.prompts` (str), each checked as sampling will read it, so that `sdlora run` refuses an
    unusable prompt (AND, a bad <lora:> tag, a weight that is no number) before it trains, not after."""
    s = cfg.sample
    if s.prompt_file:
        prompts = rules.read_prompt_file(s.prompt_file)
        for number, line in enumerate(prompts, 1):
            for text in (line.prompt, line.negative_prompt or ""):
                rules.check_prompt(text, f"{s.prompt_file}: prompt {number}")
        return prompts
    prompts = _prompts(cfg)
    for prompt in prompts:
        rules.check_prompt(prompt, f"{cfg.source or 'the config'}: [sample] prompts")
    return prompts


def _prompts(cfg) -> list[str]:
    if not cfg.sample.prompts:
        where = cfg.source or "the config"
        raise UserError(f"{where}: [sample] prompts is empty; add e.g. prompts = [\"{cfg.trigger or 'a'} landscape\"] "
                        f"or pass --prompt")
    return list(cfg.sample.prompts)


def skip_layer_note(s) -> str | None:
    """The infotext's "Skip layer guidance" value: scale, layers and the share of steps it runs in; None when off."""
    if not s.skip_layer_guidance_scale:
        return None
    layers = ", ".join(str(i) for i in s.skip_guidance_layers)
    return (f"{s.skip_layer_guidance_scale:g} (layers {layers}; steps {s.skip_layer_guidance_start:g}-"
            f"{s.skip_layer_guidance_stop:g})")


def _hires_note(mode: str) -> str:
    return {"off": "", "on": ", hires", "tiled": ", tiled hires"}[mode]


def pass_settings(family, s, hires: str, resolution: int, log) -> tuple[int, str, str]:
    """(steps, hires mode, scheduler name) a family renders `s` ([sample]) with. A one-pass family (FLUX.1,
    SD3.x) renders with a flow-matching solver in its own steps (schnell: 4) where the config leaves `steps`
    at its default, and takes a second pass only when hires says on or tiled (auto: off, and a note says so
    when it would have run)."""
    if not family.one_pass:
        return s.steps, hires, s.sampler
    steps = family.sample_steps if family.sample_steps and s.steps == SampleConfig.steps else s.steps
    if hires == "auto" and hires_mode(hires, s.width, s.height, resolution, s.hires_tiled_above) != "off":
        # FLUX.1 renders up to about 2 megapixels in one pass (BFL's range), SD3.5 up to about 1 (its 1024 px
        # training), so auto leaves the second pass to the user
        log(f"note: {family.title} renders in one pass at the target size (hires = auto), so hires is off; set "
            "hires = \"on\" or \"tiled\" for a second pass")
    hires = hires if hires in ("on", "tiled") else "off"
    name = flow_sampler(s.sampler)
    if name != s.sampler and s.sampler != SampleConfig.sampler:  # SD's default sampler: the base's own, quietly
        log(f"note: [sample] sampler = {s.sampler!r} has no flow-matching form in diffusers; {family.title} renders "
            f"with flow-matching Euler (or set sampler = {' or '.join(map(repr, FLOW_SAMPLERS))})")
    return steps, hires, f"flow-matching {FLOW_SAMPLERS[name][2]}"


def run_sample(cfg, loras=(), *, log, out_dir=None, epochs_dir=None, hires: str | None = None,
               fuse: bool | None = None, lora_dirs=(), native: bool = False,
               setting_notes: bool = True) -> SampleResult:
    """Render the config's prompts x seeds x LoRA scales with the given adapters, and their grids.

    loras: [(path, weight or None)], all applied together. None sweeps the file over
    `sample.lora_scales` (the grid columns, 0 = the base); a number fixes its weight in every
    column. Default: the trained `<output.dir>/<output_name>.safetensors`, swept.
    epochs_dir: the columns are the `NAME-0000NN.safetensors` files there and the final
    `NAME.safetensors` instead, each at weight 1 (`loras` is not used), merged into the weights one at a
    time unless `fuse` says otherwise (as the epoch scoring renders them).
    native: one pass at the first pass's area with the target's aspect ratio (`first_pass_side`), the
    size the epoch scoring renders at: `--epochs-dir` after training then draws nothing new.
    setting_notes: a note for each [sample] key the base's family ignores (`families.unread_settings`); False
    where the training's previews noted them already.
    Images and one grid per seed go to out_dir (default `<output.dir>/samples`).
    Prompts: `sample.prompt_file` (kohya's syntax) when set, else `sample.prompts`; their
    `<lora:name:w>` tags load adapters found in lora_dirs (then no default adapter is needed).
    log: called with each progress line.
    """
    s = cfg.sample
    prompts = sample_prompts(cfg)
    tagged = any(rules.extract_networks(p if isinstance(p, str) else p.prompt)[1] for p in prompts)
    loras = [(Path(p), None if w is None else float(w)) for p, w in loras]
    if not loras and not epochs_dir:
        default = cfg.adapter_path()
        if tagged and not default.is_file():
            pass  # the prompts name their adapters
        elif not default.is_file():
            raise UserError(f"no trained adapter at {default} (output.dir / output_name): train it first "
                            f"(sdlora train CONFIG) or name one with --lora FILE")
        else:
            loras = [(default, None)]
    folder = Path(out_dir) if out_dir else cfg.output_dir / "samples"
    sampler = Sampler(cfg, fuse=True if fuse is None and epochs_dir else fuse)
    if native:
        width, height = first_pass_size(s.width, s.height, sampler.native)
        hires = "off"
    else:
        width, height = s.width, s.height
    steps, hires, scheduler = pass_settings(sampler.family, s, hires or s.hires, sampler.native, log)
    for note in unread_settings(sampler.family, cfg, ("sample",)) if setting_notes else []:
        log(f"note: {note}")
    size = dict(width=width, height=height, steps=steps, hires=hires, cache=RenderCache.of(cfg))
    log(f"sampling {sampler.base.info()} at {width}x{height}, {steps} steps, {scheduler}"
        f"{_hires_note(hires_mode(hires, width, height, sampler.native, s.hires_tiled_above))} -> {folder}")
    try:
        if epochs_dir:
            def column(path):
                def prepare():
                    for a in [a for a in sampler.adapters.adapters if not a.from_prompt]:
                        sampler.adapters.remove(a)
                    sampler.adapters.add(path, 1.0)
                    sampler.adapters.set_scale(1.0)
                    return 1.0, path
                return prepare

            columns = [(label, column(path)) for label, path in epoch_files(epochs_dir, cfg.output_name)]
            return render_grid(sampler, prompts, list(s.seeds), columns, folder, "epochs", log=log,
                               lora_dirs=lora_dirs, **size)
        for path, weight in loras:
            sampler.adapters.add(path, weight)
        stem = "_".join(safe_file_stem(a.alias) for a in sampler.adapters.adapters) or "prompted"  # from files
        rows = prompt_rows(sampler, prompts, lora_dirs, log)  # loads the tags' adapters before the columns
        return render_grid(sampler, [row.line for row in rows], list(s.seeds),
                           sweep_columns(sampler, list(s.lora_scales)), folder, stem, log=log, lora_dirs=lora_dirs,
                           **size)
    finally:
        sampler.adapters.close()


def preview(cfg, adapter_path, epoch: int, out_dir, base=None) -> Path:
    """In-training preview grid: prompts x (base, LoRA x1), the first seed, preview_steps, one pass
    at the first pass's area (`first_pass_side`) with the target's aspect ratio. Returns the grid's path.

    base: an already loaded base to sample from (without training adapters injected); its
    weights are restored afterwards. Default: load cfg.model afresh.
    """
    base = base if base is not None else load_base(cfg.model)
    sample_cfg = dataclasses.replace(cfg.sample, seeds=list(cfg.sample.seeds[:1]) or [1], lora_scales=[0.0, 1.0])
    cfg = dataclasses.replace(cfg, sample=sample_cfg)
    sampler = Sampler(cfg, fuse=True, base=base)  # one adapter, two scales: merging is the fast path
    w, h = first_pass_size(cfg.sample.width, cfg.sample.height, sampler.native)
    try:
        sampler.adapters.add(adapter_path)
        folder = Path(out_dir) / f"epoch{epoch:06d}"
        prompts = [rules.extract_networks(p)[0] for p in _prompts(cfg)]  # the trained adapter alone: no tags
        result = render_grid(sampler, prompts, sample_cfg.seeds, sweep_columns(sampler, [0.0, 1.0]), folder,
                             "preview", width=w, height=h, steps=cfg.sample.preview_steps, hires="off",
                             log=lambda m: None, cache=RenderCache.of(cfg))
    finally:
        sampler.adapters.close()
    return result.grids[0]
