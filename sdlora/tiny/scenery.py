"""Procedural landscapes with ground-truth tags, deterministic from a seed.

Two palette families: `muted` (natural, desaturated; the base model's pretraining data)
and `colorful` (pastel, saturated; the demo style set). A scene is drawn back to front
in numpy: sky gradient, stars, sun or moon, clouds, mountain layers (snow caps), hills,
fields, water with the sky and ridges reflected, trees or forest.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

TIMES = ("day", "sunset", "night", "overcast")
ASPECTS = {"1:1": (1, 1), "3:2": (3, 2), "2:3": (2, 3)}
STYLE_TAGS = ("colorful", "pastel colors", "vibrant colors", "saturated")
MUTED_TAGS = ("muted colors",)

# Per time of day: sky top, sky horizon, far-mountain, ground base colours (RGB 0..1), brightness.
_BASE = {
    "day": dict(top=(0.30, 0.50, 0.78), horizon=(0.70, 0.80, 0.88), mountain=(0.42, 0.47, 0.55),
                ground=(0.36, 0.50, 0.28), light=1.0),
    "sunset": dict(top=(0.30, 0.30, 0.52), horizon=(0.92, 0.58, 0.32), mountain=(0.35, 0.27, 0.35),
                   ground=(0.33, 0.30, 0.22), light=0.75),
    "night": dict(top=(0.03, 0.04, 0.10), horizon=(0.10, 0.13, 0.24), mountain=(0.07, 0.08, 0.13),
                  ground=(0.05, 0.08, 0.07), light=0.28),
    "overcast": dict(top=(0.58, 0.60, 0.63), horizon=(0.74, 0.75, 0.76), mountain=(0.45, 0.47, 0.49),
                     ground=(0.36, 0.42, 0.33), light=0.8),
}


@dataclass
class Scene:
    time: str
    palette: str
    aspect: str
    sun: bool = False
    moon: bool = False
    clouds: int = 0
    stars: bool = False
    mountain_layers: int = 0
    snow: bool = False
    hills: bool = False
    water: str = ""  # "", "lake", "sea"
    trees: str = ""  # "", "trees", "forest"
    fields: bool = False
    horizon: float = 0.6
    seed: int = 0
    hue_shift: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def tags(self) -> list[str]:
        """Ground truth, most salient first."""
        t = [self.time]
        if self.sun:
            t.append("sun")
        if self.moon:
            t.append("moon")
        if self.stars:
            t.append("stars")
        if self.clouds:
            t.append("clouds")
        if self.mountain_layers:
            t.append("mountains")
        if self.snow:
            t.append("snow")
        if self.hills:
            t.append("hills")
        if self.water:
            t += [self.water, "reflection"]
        if self.trees:
            t.append(self.trees)
        if self.fields:
            t.append("field")
        t += ["landscape", "scenery", "outdoors", "sky"]
        if self.time == "night":
            t.append("dark")
        t += list(STYLE_TAGS if self.palette == "colorful" else MUTED_TAGS)
        return t


def random_scene(seed: int, palette: str = "muted", aspect: str | None = None, time: str | None = None) -> Scene:
    rng = np.random.default_rng(seed)
    time = time or TIMES[rng.integers(len(TIMES))]
    aspect = aspect or ("1:1", "3:2", "2:3")[rng.choice(3, p=[0.5, 0.3, 0.2])]
    s = Scene(time=time, palette=palette, aspect=aspect, seed=seed)
    s.sun = time in ("day", "sunset") and rng.random() < 0.75
    s.moon = time == "night" and rng.random() < 0.7
    s.stars = time == "night" and rng.random() < 0.75
    s.clouds = int(rng.integers(3, 7)) if time == "overcast" else int(rng.integers(1, 4)) * (rng.random() < 0.5)
    s.mountain_layers = int(rng.choice(4, p=[0.2, 0.3, 0.3, 0.2]))
    s.snow = s.mountain_layers > 0 and rng.random() < 0.45
    s.hills = rng.random() < 0.5
    s.water = ("", "lake", "sea")[rng.choice(3, p=[0.4, 0.35, 0.25])]
    s.trees = ("", "trees", "forest")[rng.choice(3, p=[0.45, 0.3, 0.25])]
    s.fields = not s.water and rng.random() < 0.6
    s.horizon = float(rng.uniform(0.5, 0.68) if aspect != "2:3" else rng.uniform(0.58, 0.75))
    s.hue_shift = float(rng.uniform(-0.5, 0.5))
    return s


def _style(rgb, palette: str, hue_shift: float, light: float, amount: float = 1.0):
    """Map a natural colour into the palette family (muted: greyer; colorful: pastel, saturated)."""
    r, g, b = (float(np.clip(c, 0, 1)) for c in rgb)
    h, l, s = colorsys.rgb_to_hls(r, g, b)
    if palette == "colorful":
        h = (h + hue_shift * 0.35 * amount) % 1.0
        s = min(1.0, 0.55 + 0.6 * s)
        l = 0.25 + 0.55 * l if light < 0.5 else 0.45 + 0.4 * l  # pastel: lifted, never muddy
    else:
        s = s * 0.6
    return np.array(colorsys.hls_to_rgb(h, l, s), dtype=np.float32)


def _ridge(x: np.ndarray, rng, base: float, amp: float, roughness: float) -> np.ndarray:
    """A mountain/hill silhouette height (fraction of image height from the top) along x."""
    y = np.full_like(x, base)
    for octave in range(5):
        freq = (1.5 + rng.random()) * (2.1 ** octave)
        y -= amp * (roughness ** octave) * np.abs(np.sin(freq * x + rng.uniform(0, 2 * np.pi)))
    peak = rng.uniform(0.2, 0.8) * x.max()
    y -= amp * 0.8 * np.exp(-((x - peak) / (0.25 + 0.2 * rng.random())) ** 2)
    return y


def render(scene: Scene, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(scene.seed + 7919)
    pal, hs = scene.palette, scene.hue_shift
    base = _BASE[scene.time]
    light = base["light"]
    H, W = height, width
    ys = (np.arange(H, dtype=np.float32) + 0.5) / H
    xs = (np.arange(W, dtype=np.float32) + 0.5) / H  # x in units of height
    Y, X = np.meshgrid(ys, xs, indexing="ij")
    hz = scene.horizon
    col = lambda c, amount=1.0: _style(c, pal, hs, light, amount)  # noqa: E731

    # Sky: vertical gradient from top to horizon colour.
    top, hor = col(base["top"]), col(base["horizon"], 1.6)
    t = np.clip(Y / hz, 0, 1)[..., None] ** 1.3
    img = top * (1 - t) + hor * t

    if scene.stars:
        n = int(W * H * 0.004)
        sy, sx = rng.integers(0, max(1, int(H * hz * 0.9)), n), rng.integers(0, W, n)
        img[sy, sx] = np.clip(img[sy, sx] + rng.uniform(0.4, 0.9, (n, 1)), 0, 1)

    if scene.sun or scene.moon:
        cx, cy = rng.uniform(0.15, 0.85) * X.max(), hz * rng.uniform(0.25, 0.75 if scene.sun else 0.6)
        if scene.time == "sunset":
            cy = hz * rng.uniform(0.75, 0.92)
        r = rng.uniform(0.05, 0.08)
        d = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2)
        disc_c = col((1.0, 0.95, 0.75) if scene.sun and scene.time == "day" else
                     (1.0, 0.62, 0.35) if scene.sun else (0.92, 0.92, 0.85), 0.5)
        glow = np.exp(-np.maximum(d - r, 0) / (0.12 if scene.sun else 0.05))[..., None] * (0.55 if scene.sun else 0.3)
        img = img * (1 - glow) + disc_c * glow
        disc = np.clip((r - d) / (0.006 + 0.002), 0, 1)[..., None]
        img = img * (1 - disc) + disc_c * disc

    for _ in range(scene.clouds):
        cx, cy = rng.uniform(0, X.max()), hz * rng.uniform(0.1, 0.7)
        w, h = rng.uniform(0.15, 0.4), rng.uniform(0.03, 0.07)
        cloud_c = col((0.95, 0.95, 0.97) if scene.time == "day" else (0.98, 0.75, 0.7) if scene.time == "sunset"
                      else (0.25, 0.27, 0.33) if scene.time == "night" else (0.82, 0.83, 0.85), 0.7)
        a = np.zeros((H, W), np.float32)
        for _ in range(4):
            ox, oy = rng.uniform(-w, w) * 0.6, rng.uniform(-h, h) * 0.5
            a = np.maximum(a, np.exp(-(((X - cx - ox) / w) ** 2 + ((Y - cy - oy) / h) ** 2) * 2.5))
        a = (np.clip(a * 1.4, 0, 1) * 0.9)[..., None]
        img = img * (1 - a) + cloud_c * a

    x1 = xs
    far = col(base["mountain"])
    for i in range(scene.mountain_layers):
        depth = (scene.mountain_layers - i) / max(scene.mountain_layers, 1)  # 1 = farthest
        ridge = _ridge(x1, rng, hz + 0.02 * i, rng.uniform(0.12, 0.24) * (1.2 - 0.25 * i), 0.5)
        c = far * (0.75 + 0.35 * depth) * (1 - 0.15 * i) + hor * 0.25 * depth
        shade = 1 - 0.25 * ((X * 7 + Y * 3) % 1.0 < 0.5) * 0.3  # crude facets
        mask = (Y >= ridge[None, :]).astype(np.float32)[..., None]
        layer = np.broadcast_to(c, img.shape) * shade[..., None]
        if scene.snow:
            snow_line = ridge + rng.uniform(0.03, 0.06)
            snow_c = col((0.93, 0.94, 0.97), 0.3) * (0.35 + 0.65 * light)
            sm = ((Y < snow_line[None, :]) & (ridge.min() < hz - 0.05)).astype(np.float32)[..., None]
            layer = layer * (1 - sm) + snow_c * sm
        img = img * (1 - mask) + layer * mask

    ground = col(base["ground"])
    if scene.hills:
        ridge = _ridge(x1, rng, hz + 0.06, 0.05, 0.35)
        c = col((base["ground"][0] * 0.9, base["ground"][1] * 1.1, base["ground"][2] * 0.8))
        mask = (Y >= ridge[None, :]).astype(np.float32)[..., None]
        grad = np.clip((Y - ridge[None, :]) * 3, 0, 0.3)[..., None]
        img = img * (1 - mask) + (c * (1 - grad)) * mask

    below = Y >= hz + 0.02
    gmask = below[..., None].astype(np.float32)
    gshade = (1 - 0.35 * np.clip((Y - hz) / (1 - hz), 0, 1))[..., None]
    if scene.fields:
        stripe = (np.sin((X - X.max() / 2) * 40 / (Y - hz + 0.08) * 0.2 + Y * 30) > 0)[..., None]
        c2 = col((base["ground"][0] * 1.3, base["ground"][1] * 1.15, base["ground"][2] * 0.6))
        gcol = np.where(stripe, ground, c2) * gshade
    else:
        gcol = ground * gshade
    if not scene.hills:
        img = img * (1 - gmask) + gcol * gmask
    else:
        img = np.where(below[..., None] & (Y > hz + 0.12)[..., None], gcol, img)

    if scene.water:
        top_w = hz + (0.02 if scene.water == "sea" else rng.uniform(0.04, 0.1))
        wmask = Y >= top_w
        # Mirror the picture above the water line into the water: reflection.
        rows = np.clip((2 * top_w - ys) * H, 0, H - 1).astype(int)
        refl = img[rows]
        water_c = col((0.2, 0.35, 0.5) if scene.time != "night" else (0.04, 0.06, 0.12))
        ripple = 0.93 + 0.07 * np.sin(Y * 120 + np.sin(X * 20) * 2)[..., None]
        wcol = (0.55 * refl + 0.45 * water_c) * ripple
        if scene.water == "lake":
            x0 = rng.uniform(0.0, 0.3) * X.max()
            x1e = X.max() - rng.uniform(0.0, 0.3) * X.max()
            bulge = np.sqrt(np.clip(1 - ((X - (x0 + x1e) / 2) / ((x1e - x0) / 2 + 1e-6)) ** 2, 0, 1))
            wmask = wmask & (Y < top_w + bulge * (1 - top_w) * 1.2)
        img = np.where(wmask[..., None], wcol, img)

    if scene.trees:
        n = int(rng.integers(4, 9)) if scene.trees == "trees" else int(rng.integers(25, 45))
        tree_c = col((0.13, 0.28, 0.16)) * (0.4 + 0.6 * light)
        for _ in range(n):
            tx = rng.uniform(0, X.max())
            base_y = hz + rng.uniform(0.02, 0.12 if scene.trees == "forest" else 0.25)
            if scene.water and base_y > hz + 0.02:
                base_y = hz + rng.uniform(0.0, 0.03)
            th = rng.uniform(0.06, 0.14) * (1 + (base_y - hz) * 2)
            tw = th * 0.35
            inside = (Y <= base_y) & (Y >= base_y - th) & (np.abs(X - tx) <= tw * (Y - (base_y - th)) / th)
            shade = 0.85 + 0.15 * rng.random()
            img = np.where(inside[..., None], tree_c * shade, img)

    img = img * (0.6 + 0.4 * light) if scene.time == "night" else img
    noise = rng.normal(0, 0.012, img.shape).astype(np.float32)
    img = np.clip(img + noise, 0, 1)
    return Image.fromarray((img * 255 + 0.5).astype(np.uint8), "RGB")


def size_for(aspect: str, short_side: int) -> tuple[int, int]:
    a, b = ASPECTS[aspect]
    if a >= b:
        return short_side * a // b, short_side
    return short_side, short_side * b // a


def make_scene_image(seed: int, palette: str = "muted", short_side: int = 128, aspect: str | None = None,
                     time: str | None = None) -> tuple[Image.Image, list[str]]:
    scene = random_scene(seed, palette, aspect, time)
    w, h = size_for(scene.aspect, short_side)
    return render(scene, w, h), scene.tags
