"""`sdlora tiny build`: regenerate the data and retrain the embedded base family from seeds.
The stages, and what each writes, are described in `sdlora/tiny/__init__.py` (the command's help)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdlora import ASSETS
from sdlora.data.caption import DEFAULT_VOCABULARY, tiny_tagger
from sdlora.errors import UserError
from sdlora.io import atomic_save_file, atomic_write_text
from sdlora.models.families.base import DiffusionObjective
from sdlora.models.tokenizer import clip_tokenizer, write_clip_tokenizer_files
from sdlora.sampling.metrics import colourfulness
from sdlora.tiny import STAGES, configs
from sdlora.tiny.scenery import (
    STYLE_TAGS,
    TIMES,
    make_scene_image,
    random_scene,
    render,
    size_for,
)

REPO = Path(__file__).resolve().parents[2]

# Fixed sizes and step counts: the whole build takes BUILD_MINUTES (tiny/__init__.py) on 2 CPU cores.
N_SQUARE, N_WIDE, N_TALL = 4000, 800, 800
N_VAE_COLOURFUL = 2000
N_CLIP = 3000
VAE_STEPS, VAE_BATCH, VAE_CROP = 1800, 12, 64
CLIP_STEPS, CLIP_BATCH = 700, 64
UNET_STEPS, UNET_BATCH = 2000, 32

# Tags the tagger is trained on; everything else in the vocabulary file is a negative.
TAGGER_TAGS = sorted(set(TIMES) | {"sun", "moon", "stars", "clouds", "mountains", "snow", "hills", "lake", "sea",
                                   "reflection", "trees", "forest", "field", "landscape", "scenery", "outdoors",
                                   "sky", "dark", "muted colors", *STYLE_TAGS})


@dataclass
class Build:
    """One build: where its files go and how large it is. `scale` multiplies every image and step
    count (`--scale 0.01`: a smoke test of the whole build in seconds)."""

    work: Path  # intermediate data and checkpoints
    assets: Path = ASSETS  # the finished models
    demo_dir: Path = REPO / "datasets_cfg" / "colorful_scenery"  # the demo style set
    report_dir: Path = REPO / "samples"  # the build report and base sample grid
    scale: float = 1.0
    log: list = field(default_factory=list)
    echo: Callable[[str], None] = lambda line: None  # each log line as it is written (the command prints it)

    def n(self, count: int) -> int:
        return max(2, int(count * self.scale))

    def say(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        self.echo(line)
        self.log.append(line)


def _render_set(seeds, palette, aspect, short):
    from tqdm import tqdm

    images, tags = [], []
    for s in tqdm(seeds, desc=f"render {palette} {aspect}", leave=False):
        img, t = make_scene_image(int(s), palette, short, aspect)
        images.append(np.asarray(img))
        tags.append(t)
    return np.stack(images), tags


def stage_data(b: Build) -> None:
    work, n = b.work, b.n
    sets = {"square": (range(0, n(N_SQUARE)), "1:1"), "wide": (range(100_000, 100_000 + n(N_WIDE)), "3:2"),
            "tall": (range(200_000, 200_000 + n(N_TALL)), "2:3")}
    for name, (seeds, aspect) in sets.items():
        images, tags = _render_set(seeds, "muted", aspect, 128)
        np.save(work / f"{name}.npy", images)
        (work / f"{name}_tags.json").write_text(json.dumps(tags))
        b.say(f"data: {name} {images.shape}")
    # The VAE sees both palette families: an autoencoder trained on muted scenes alone learns
    # to discard chroma, and then no style adapter can draw saturated colours through it.
    colourful, _ = _render_set(range(500_000, 500_000 + n(N_VAE_COLOURFUL)), "colorful", "1:1", 128)
    np.save(work / "vae_colorful.npy", colourful)
    b.say(f"data: VAE colourful set {colourful.shape}")
    # The tagger sees both palette families at its input size, so style tags are learnable.
    half = n(N_CLIP) // 2
    muted, muted_tags = _render_set(range(300_000, 300_000 + half), "muted", "1:1", 64)
    colorful, colorful_tags = _render_set(range(400_000, 400_000 + half), "colorful", "1:1", 64)
    np.save(work / "clip.npy", np.concatenate([muted, colorful]))
    (work / "clip_tags.json").write_text(json.dumps(muted_tags + colorful_tags))
    b.say(f"data: tagger set {len(muted_tags) + len(colorful_tags)} images")


def stage_demo(b: Build) -> None:
    """25 colourful scenes, mixed aspects and content, 2x the base's native size."""
    out_dir = b.demo_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(25):
        seed = 900_000 + i
        time_of_day = TIMES[i % 4]
        aspect = ("1:1", "3:2", "2:3", "3:2", "1:1")[i % 5]
        scene = random_scene(seed, "colorful", aspect, time_of_day)
        w, h = size_for(aspect, 256)
        name = f"scene_{i:02d}.png"
        render(scene, w, h).save(out_dir / name)
        truth[name] = {"seed": seed, "tags": scene.tags, "time": scene.time, "aspect": aspect}
    (out_dir / ".ground_truth.json").write_text(json.dumps(truth, indent=1))
    b.say(f"demo: 25 images in {out_dir}")


def _to_tensor(images):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _optimizer_step(opt, sched, loss, clip_params=None) -> None:
    """backward, optional gradient clipping at norm 1, optimizer and schedule step."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    sched.step()


def _random_crops(images: np.ndarray, rng):
    """VAE_BATCH random images, one shared random VAE_CROP window: (B, 3, VAE_CROP, VAE_CROP) in [-1, 1]."""
    idx = rng.integers(0, len(images), VAE_BATCH)
    y, x = rng.integers(0, 128 - VAE_CROP + 1, 2)
    return _to_tensor(images[idx, y:y + VAE_CROP, x:x + VAE_CROP])


def _reconstruction_loss(recon, target):
    """(L1, L1 + 0.5 * edge L1): L1 on image gradients keeps ridges and horizons sharp where L1 blurs."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    l1 = (recon - target).abs().mean()
    edge = (dx(recon) - dx(target)).abs().mean() + (dy(recon) - dy(target)).abs().mean()
    return l1, l1 + 0.5 * edge


def stage_vae(b: Build) -> None:
    work, n = b.work, b.n
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image
    from tqdm import tqdm

    torch.manual_seed(1)
    muted = np.load(work / "square.npy")
    images = np.concatenate([muted, np.load(work / "vae_colorful.npy")])
    vae = AutoencoderKL(**configs.VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=n(VAE_STEPS), pct_start=0.05)
    rng = np.random.default_rng(1)
    losses = []
    bar = tqdm(range(n(VAE_STEPS)), desc="vae")
    for step in bar:
        batch = _random_crops(images, rng)  # (B, 3, 64, 64)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        l1, loss = _reconstruction_loss(recon, batch)
        loss = loss + 1e-4 * posterior.kl().mean() / (VAE_CROP * VAE_CROP * 3)
        _optimizer_step(opt, sched, loss, vae.parameters())
        losses.append(float(l1.detach()))
        if step % 20 == 0:
            bar.set_postfix(l1_255=f"{np.mean(losses[-20:]) * 127.5:.2f}")
    vae.eval()

    def round_trip(batch):  # (latent means, reconstructions)
        with torch.no_grad():
            lat = torch.cat([vae.encode(batch[i:i + 32]).latent_dist.mean for i in range(0, len(batch), 32)])
            return lat, torch.cat([vae.decode(lat[i:i + 32]).sample for i in range(0, len(batch), 32)]).clamp(-1, 1)

    sample = _to_tensor(muted[:256])
    lat, recon = round_trip(sample)
    scaling = float(1.0 / lat.std())  # the UNet's training data (muted scenes) sets the latent scale
    err = float((recon - sample).abs().mean() * 127.5)
    vivid = _to_tensor(images[len(muted):][:64])
    vivid_recon = round_trip(vivid)[1]
    to_uint8 = lambda t: ((t.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)  # noqa: E731
    chroma = {"colourful_in": float(np.mean([colourfulness(Image.fromarray(im)) for im in to_uint8(vivid)])),
              "colourful_out": float(np.mean([colourfulness(Image.fromarray(im)) for im in to_uint8(vivid_recon)]))}
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(work / "vae")
    (work / "vae_stats.json").write_text(json.dumps({"scaling_factor": scaling, "mean_abs_error_255": err, **chroma,
                                                     "steps": n(VAE_STEPS), "loss_curve": losses[::10]}))
    b.say(f"vae: {n(VAE_STEPS)} steps, mean reconstruction error {err:.2f}/255, scaling_factor {scaling:.4f}, "
          f"colourfulness of colourful scenes {chroma['colourful_in']:.1f} -> {chroma['colourful_out']:.1f} "
          "after a round trip")


def _clip_model():
    from open_clip.model import CLIP

    cfg = dict(configs.OPEN_CLIP)
    return CLIP(**cfg)


def stage_clip(b: Build) -> None:
    work, n = b.work, b.n
    import open_clip
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    torch.manual_seed(2)
    images = np.load(work / "clip.npy")
    tags = json.loads((work / "clip_tags.json").read_text())
    vocab = _vocabulary()
    texts = sorted(set(vocab) | set(TAGGER_TAGS))
    index = {t: i for i, t in enumerate(texts)}
    labels = np.zeros((len(images), len(texts)), np.float32)
    for i, ts in enumerate(tags):
        for t in ts:
            labels[i, index[t]] = 1.0
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the CLIP BPE tokenizer; no download
    tokens = tokenizer(texts)
    model = _clip_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=n(CLIP_STEPS), pct_start=0.05)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    rng = np.random.default_rng(2)
    known = torch.tensor([index[t] for t in TAGGER_TAGS])
    losses = []
    bar = tqdm(range(n(CLIP_STEPS)), desc="open_clip")
    for step in bar:
        idx = rng.integers(0, len(images), CLIP_BATCH)
        x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255.0
        if rng.random() < 0.5:
            x = x.flip(-1)
        x = (x - mean) / std
        # Texts: all known tags plus a random share of the rest of the vocabulary as negatives.
        others = torch.from_numpy(rng.choice(len(texts), min(96, len(texts)), replace=False))
        cols = torch.unique(torch.cat([known, others]))
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokens[cols]), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias
        target = torch.from_numpy(labels[idx])[:, cols]
        loss = F.binary_cross_entropy_with_logits(logits, target)
        _optimizer_step(opt, sched, loss)
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    model.eval()
    torch.save(model.state_dict(), work / "clip.pt")
    (work / "clip_stats.json").write_text(json.dumps({"steps": n(CLIP_STEPS), "loss_curve": losses[::10]}))
    b.say(f"open_clip: {n(CLIP_STEPS)} steps, final loss {np.mean(losses[-50:]):.4f}")


def _vocabulary() -> list[str]:
    path = DEFAULT_VOCABULARY
    if not path.exists():
        return list(TAGGER_TAGS)
    lines = [ln.split("#", 1)[0].strip().lower() for ln in path.read_text().splitlines()]
    return [ln for ln in lines if ln]


def _caption(tags: list[str], rng: random.Random) -> str:
    """Training captions: the time of day always, other tags shuffled with dropout, 10% empty."""
    if rng.random() < 0.1:
        return ""
    first, rest = tags[0], [t for t in tags[1:] if rng.random() > 0.3]
    rng.shuffle(rest)
    return ", ".join([first, *rest])


def stage_unet(b: Build) -> None:
    work, n = b.work, b.n
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from tqdm import tqdm
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    sets = []
    for name in ("square", "wide", "tall"):
        images = np.load(work / f"{name}.npy")
        tags = json.loads((work / f"{name}_tags.json").read_text())
        with torch.no_grad():
            dists = [vae.encode(_to_tensor(images[i:i + 64])).latent_dist for i in range(0, len(images), 64)]
        mean = torch.cat([d.mean for d in dists])
        std = torch.cat([d.std for d in dists])
        sets.append((mean, std, tags))
        b.say(f"unet: cached {name} latents {tuple(mean.shape)}")
    scaling = vae.config.scaling_factor
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs.TEXT_ENCODER))
    unet = UNet2DConditionModel(**configs.UNET)
    noise_scheduler = DDPMScheduler.from_config(configs.SCHEDULER)
    objective = DiffusionObjective(noise_scheduler)  # epsilon: the SD1.x objective
    params = [{"params": unet.parameters(), "lr": 4e-4}, {"params": text_encoder.parameters(), "lr": 2e-4}]
    opt = torch.optim.AdamW(params, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[4e-4, 2e-4], total_steps=n(UNET_STEPS), pct_start=0.04)
    rng, prng = np.random.default_rng(3), random.Random(3)
    losses = []
    bar = tqdm(range(n(UNET_STEPS)), desc="unet+te")
    for step in bar:
        mean, std, tags = sets[rng.choice(3, p=[0.6, 0.2, 0.2])]
        idx = torch.from_numpy(rng.integers(0, len(mean), UNET_BATCH))
        latents = (mean[idx] + std[idx] * torch.randn_like(std[idx])) * scaling  # (B, 4, h, w)
        if rng.random() < 0.5:
            latents = latents.flip(-1)
        captions = [_caption(tags[i], prng) for i in idx.tolist()]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (UNET_BATCH,))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(ids)[0]
        noise_pred = unet(noisy, timesteps, hidden).sample
        weight = objective.snr_weights(timesteps, 5.0)  # min-SNR-5
        loss = (F.mse_loss(noise_pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        _optimizer_step(opt, sched, loss, list(unet.parameters()) + list(text_encoder.parameters()))
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if (step + 1) % 500 == 0:
            unet.save_pretrained(work / "unet")
            text_encoder.save_pretrained(work / "text_encoder")
    unet.save_pretrained(work / "unet")
    text_encoder.save_pretrained(work / "text_encoder")
    (work / "unet_stats.json").write_text(json.dumps({"steps": n(UNET_STEPS), "loss_curve": losses[::10]}))
    b.say(f"unet: {n(UNET_STEPS)} steps, final loss {np.mean(losses[-100:]):.4f}")


def stage_export(b: Build) -> None:
    work, assets = b.work, b.assets
    import shutil

    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"), unet=UNet2DConditionModel.from_pretrained(work / "unet"),
        text_encoder=CLIPTextModel.from_pretrained(work / "text_encoder"), tokenizer=clip_tokenizer(),
        scheduler=DDPMScheduler.from_config(configs.SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    target = assets / "tiny"
    tmp = assets / ".tiny.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    # vocab.json + merges.txt (2 MB) instead of the fast tokenizer.json (3.5 MB): same tokenizer.
    shutil.rmtree(tmp / "tokenizer")
    write_clip_tokenizer_files(tmp / "tokenizer")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    clip_dir = assets / "open_clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    state = torch.load(work / "clip.pt", weights_only=True)
    atomic_save_file({k: v.half() for k, v in state.items()}, clip_dir / "tiny.safetensors")
    # known_tags: the tagger was trained on these alone and scores other tags arbitrarily;
    # min_duplicate_cosine: distinct scenes reach 0.985 in its coarse embedding, copies >= 0.9995.
    tagger_json = dict(configs.OPEN_CLIP, known_tags=TAGGER_TAGS, min_duplicate_cosine=0.995)
    atomic_write_text(clip_dir / "tiny.json", json.dumps(tagger_json, indent=2))
    total = sum(f.stat().st_size for f in assets.rglob("*") if f.is_file())
    b.say(f"export: assets {total / 1e6:.1f} MB")


REPORT_PROMPTS = {"day": "day, sun, mountains, lake", "sunset": "sunset, sun, hills",
                  "night": "night, moon, stars, mountains, lake", "overcast": "overcast, clouds, forest, field"}


def render_base_samples(folder: Path, seeds=(0, 1, 2, 3), steps: int = 20):
    """{time of day: [PIL images]} from the base at its native size, one per seed."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    return {time_of_day: [pipe(prompt, num_inference_steps=steps, guidance_scale=7.0, width=configs.NATIVE,
                               height=configs.NATIVE, generator=torch.Generator().manual_seed(s)).images[0]
                          for s in seeds]
            for time_of_day, prompt in REPORT_PROMPTS.items()}


def prompt_following(samples: dict, tagger) -> dict:
    """Zero-shot time of day of each sample (the tagger's best of the four) and mean brightness."""
    hits, total, brightness = 0, 0, {}
    for time_of_day, images in samples.items():
        scores = tagger.score(tagger.embed_images(images), list(TIMES))  # (n, 4) probabilities
        hits += sum(TIMES[int(row.argmax())] == time_of_day for row in scores)
        total += len(images)
        brightness[time_of_day] = float(np.mean([np.asarray(im.convert("L")).mean() for im in images]))
    return {"time_of_day_agreement": hits / total, "n": total, "brightness": brightness}


def stage_report(b: Build) -> None:
    work, assets, out = b.work, b.assets, b.report_dir
    from PIL import Image

    samples = render_base_samples(assets / "tiny")
    cell = configs.NATIVE + 4
    grid = Image.new("RGB", (cell * 4, cell * len(samples)), "white")
    for r, images in enumerate(samples.values()):
        for c, im in enumerate(images):
            grid.paste(im, (c * cell, r * cell))
    out.mkdir(parents=True, exist_ok=True)
    grid.save(out / "tiny_base_grid.png")
    figures = prompt_following(samples, tiny_tagger())
    stats = {name: json.loads((work / f"{name}_stats.json").read_text())
             for name in ("vae", "clip", "unet") if (work / f"{name}_stats.json").exists()}
    lines = ["# Embedded base build report", "",
             f"- VAE: {stats.get('vae', {}).get('steps')} steps, mean reconstruction error "
             f"{stats.get('vae', {}).get('mean_abs_error_255', float('nan')):.2f}/255; colourfulness of "
             f"colourful scenes {stats.get('vae', {}).get('colourful_in', float('nan')):.0f} before, "
             f"{stats.get('vae', {}).get('colourful_out', float('nan')):.0f} after a round trip",
             f"- open_clip tagger: {stats.get('clip', {}).get('steps')} steps",
             f"- UNet + text encoder: {stats.get('unet', {}).get('steps')} steps",
             f"- prompt following: the tagger agrees with the prompted time of day on "
             f"{figures['time_of_day_agreement']:.0%} of {figures['n']} samples",
             "- mean brightness: " + ", ".join(f"{k} {v:.0f}" for k, v in figures["brightness"].items()),
             "", "Rows: " + " | ".join(REPORT_PROMPTS.values()) + "; columns: seeds 0-3.", "",
             "![base samples](tiny_base_grid.png)", "", "## Build log", "", "```",
             *_build_log(b)[-40:], "```", ""]
    atomic_write_text(out / "tiny_build_report.md", "\n".join(lines))
    b.say(f"report: {figures}")


def _build_log(b: Build) -> list[str]:
    """Earlier builds' log lines (build_log.txt) and this build's so far."""
    path = b.work / "build_log.txt"
    return (path.read_text().splitlines() if path.exists() else []) + b.log


STAGE_FUNCTIONS = {"data": stage_data, "demo": stage_demo, "vae": stage_vae, "unet": stage_unet,
                   "clip": stage_clip, "export": stage_export, "report": stage_report}
assert list(STAGE_FUNCTIONS) == STAGES


def build(stages: list[str], b: Build) -> None:
    import torch

    unknown = [s for s in stages if s not in STAGE_FUNCTIONS]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    b.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for stage in stages:
        t = time.time()
        STAGE_FUNCTIONS[stage](b)
        b.say(f"stage {stage} took {time.time() - t:.0f}s")
    with open(b.work / "build_log.txt", "a") as f:
        f.write("\n".join(b.log) + f"\n[total {time.time() - t0:.0f}s]\n")
