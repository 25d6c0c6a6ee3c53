"""Rendering far above a base's native size: the artefact and seam measures, and the tiled pass
(MultiDiffusion) on the embedded base, a test-size SD1.x base and a test-size SDXL base."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.config import config_from_dict
from sdlora.errors import UserError
from sdlora.sampling import metrics, tiled
from sdlora.sampling import sampler as sample

H, W = 720, 1080
Y, X = np.mgrid[0:H, 0:W]
SMOOTH = 128 + 50 * np.sin(X / 170) + 35 * np.cos(Y / 130)  # composition-scale shading only


def picture(values) -> Image.Image:
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")


def lanczos_reference(image: Image.Image, factor: float = 6.75) -> Image.Image:
    """What the measures compare against: a native-size render, Lanczos-upscaled to the target."""
    small = image.resize((round(W / factor), round(H / factor)), Image.LANCZOS)
    return small.resize((W, H), Image.LANCZOS)


def share(image: Image.Image) -> float:
    """The share of an image's own spectral energy in the off-axis fine band: the measure's first form."""
    band, total = metrics.offaxis_hf_power(image)
    return band / total


def tile_borders(boxes, cell=tiled.LATENT_CELL):
    xs = sorted({x * cell for _, left, _, tw in boxes for x in (left, left + tw)})
    ys = sorted({y * cell for top, _, th, _ in boxes for y in (top, top + th)})
    return xs, ys


def test_diagonal_hatching_scores_high_and_smooth_or_axis_aligned_texture_low():
    smooth = picture(SMOOTH)
    hatched = picture(SMOOTH + 20 * np.sin(2 * np.pi * (X + 2 * Y) / 25))  # the OOD denoiser's diagonal stripes
    banded = picture(SMOOTH + 20 * np.sin(2 * np.pi * Y / 25))  # horizontal bands: horizons, cloud layers
    reference = lanczos_reference(smooth)
    assert metrics.artefact_ratio(smooth, reference) < 1.5
    assert metrics.artefact_ratio(hatched, reference) > 20
    assert share(banded) < 0.1 * share(hatched)
    with pytest.raises(ValueError, match="sizes differ"):
        metrics.artefact_ratio(smooth, smooth.resize((540, 360)))


def test_invisible_grain_on_a_featureless_render_is_no_artefact_and_faint_hatching_is():
    """A night sea: almost no energy of its own. Grain under one grey level RMS is not seen (a
    share of the image's own energy made it many times the reference's); hatching of 4 levels is."""
    flat = 60 + 4 * np.sin(X / 400)
    rng = np.random.default_rng(0)
    grain = picture(np.round(flat + 0.3 * rng.standard_normal(flat.shape) + 0.5 * np.sin(2 * np.pi * (X + Y) / 9)))
    hatched = picture(flat + 4 * np.sin(2 * np.pi * (X + 2 * Y) / 25))
    reference = lanczos_reference(picture(flat))
    assert share(grain) > 5 * share(reference)
    assert metrics.artefact_ratio(grain, reference) < 1.5 < metrics.artefact_ratio(hatched, reference)


def test_hard_seams_at_tile_borders_score_high_and_blended_ones_about_one():
    boxes = tiled.tile_boxes(H // 8, W // 8, 16, 4)
    xs, ys = tile_borders(boxes)
    # Each tile brightened by its own offset and pasted over its neighbours: a cut at every border.
    rng = np.random.default_rng(0)
    seamed = SMOOTH.copy()
    for top, left, th, tw in boxes:
        seamed[top * 8:(top + th) * 8, left * 8:(left + tw) * 8] = \
            SMOOTH[top * 8:(top + th) * 8, left * 8:(left + tw) * 8] + rng.uniform(-12, 12)
    textured = SMOOTH + 6 * rng.standard_normal(SMOOTH.shape)  # no seams, fine grain everywhere
    assert metrics.seam_score(picture(seamed), xs, ys) > 3
    assert metrics.seam_score(picture(textured), xs, ys) < 1.2


def test_tiles_cover_the_latent_and_overlap_by_at_least_the_overlap():
    for length, tile, overlap in [(135, 16, 4), (90, 16, 4), (16, 16, 4), (10, 16, 4), (17, 8, 2), (128, 64, 16)]:
        starts = tiled.spans(length, tile, overlap)
        size = min(tile, length)
        assert starts[0] == 0 and starts[-1] + size == length
        assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:])), (length, starts)


def test_blended_tiles_of_a_pointwise_denoiser_equal_the_whole_latent_denoised_at_once():
    """The blend is a weighted average with weights that sum to one at every cell: a denoiser that
    treats each cell alone gives the same latents tiled or not, for a multistep sampler too."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    config = DDPMScheduler(num_train_timesteps=1000).config
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(1, 4, 37, 53, generator=gen), torch.randn(1, 4, 37, 53, generator=gen)

    class Pointwise(tiled.Denoiser):
        def __init__(self):
            pass

        def __call__(self, tiles, t, boxes):
            return 0.3 * tiles + 0.01 * t.float()

    def run(tile):
        scheduler = DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)
        return tiled.refine(latents, noise, scheduler, Pointwise(), num_steps=10, strength=0.5, tile=tile,
                            overlap=4, batch=3)

    whole, tiled_result = run(64), run(16)
    assert not torch.equal(whole, latents)
    torch.testing.assert_close(tiled_result, whole, rtol=1e-5, atol=1e-5)


def test_auto_tiles_far_above_the_native_area_and_keeps_one_pass_near_it():
    above = config_from_dict({}).sample.hires_tiled_above  # 4: twice the native size per side
    assert sample.hires_mode("auto", 1080, 720, 128, above) == "tiled"  # the embedded base: 47x its area
    assert sample.hires_mode("auto", 1080, 720, 512, above) == "on"  # SD1.5: 3x, A1111's usual hires fix
    assert sample.hires_mode("auto", 1536, 1024, 512, above) == "tiled"  # SD1.5 at 6x
    assert sample.hires_mode("auto", 1080, 720, 1024, above) == "off"  # SDXL's own area
    assert sample.hires_mode("on", 1080, 720, 128, above) == "on"
    with pytest.raises(UserError, match="tiled"):
        sample.hires_mode("tiles", 1080, 720, 128, above)


def test_tiled_pass_on_the_embedded_base_at_1080x720_has_no_hatching_and_no_seams():
    cfg = config_from_dict({
        "sample": {"prompts": ["clrscn, mountains, lake, sunset"], "steps": 3, "hires_steps": 1,
                   "hires_denoise": 0.4, "seeds": [1]}})
    sampler = sample.Sampler(cfg)
    assert sampler.base.resolution == 128
    prompt = cfg.sample.prompts
    w0, h0 = sample.first_pass_size(1080, 720, 128)
    native = sampler.render(prompt, [1], w0, h0, 3, hires="off")[0][0]
    images, params = sampler.render(prompt, [1], 1080, 720, 3, hires=cfg.sample.hires)
    image = images[0]
    assert image.size == (1080, 720)
    assert params["Hires mode"] == "tiled" and params["Hires tile"] == "128x128" and params["Hires tile overlap"] == 32
    assert params["Size"] == f"{w0}x{h0}" and params["Denoising strength"] == 0.4
    reference = native.resize((1080, 720), Image.LANCZOS)
    xs, ys = tile_borders(tiled.tile_boxes(90, 135, 16, 4))
    assert metrics.artefact_ratio(image, reference) <= 1.5
    assert metrics.seam_score(image, xs, ys) < 1.2


def test_tiled_pass_on_a_test_size_sd1_base_keeps_the_exact_size(mini_base_dir, tmp_path):
    cfg = config_from_dict({"model": {"base": str(mini_base_dir)}, "output": {"dir": str(tmp_path)},
                            "sample": {"prompts": ["a red house"], "steps": 2, "hires_denoise": 0.5}})
    sampler = sample.Sampler(cfg)
    images, params = sampler.render(["a red house"], [3], 200, 136, 2, hires="auto")  # 6.6x the 64 px area
    assert images[0].size == (200, 136) and params["Hires mode"] == "tiled" and params["Hires tile"] == "64x64"
    again = sampler.render(["a red house"], [3], 200, 136, 2, hires="auto")[0][0]
    other = sampler.render(["a red house"], [4], 200, 136, 2, hires="auto")[0][0]
    assert np.array_equal(np.asarray(again), np.asarray(images[0]))  # the seed decides the picture
    assert not np.array_equal(np.asarray(other), np.asarray(images[0]))


def test_tiled_pass_on_a_test_size_sdxl_base_gives_each_tile_its_crop_coordinates(mini_sdxl_dir, tmp_path):
    cfg = config_from_dict({"model": {"base": str(mini_sdxl_dir)}, "output": {"dir": str(tmp_path)},
                            "sample": {"prompts": ["clrscn, hills"], "steps": 2, "hires_denoise": 0.5,
                                       "hires_tile_overlap": 16}})
    sampler = sample.Sampler(cfg)
    seen = []
    forward = sampler.pipe.unet.forward

    def recording(*args, **kwargs):
        if "added_cond_kwargs" in kwargs:
            seen.extend(tuple(int(v) for v in row) for row in kwargs["added_cond_kwargs"]["time_ids"])
        return forward(*args, **kwargs)

    sampler.pipe.unet.forward = recording
    images, params = sampler.render(["clrscn, hills"], [2], 200, 136, 2, hires="tiled")
    assert images[0].size == (200, 136) and params["Hires mode"] == "tiled"
    boxes = tiled.tile_boxes(136 // 8, 200 // 8, 8, 2)
    tiles = {(136, 200, top * 8, left * 8, th * 8, tw * 8) for top, left, th, tw in boxes}
    assert tiles <= set(seen)  # (original h, w, crop top, left, target h, w) of every tile
    assert len(boxes) > 4
