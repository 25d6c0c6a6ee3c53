"""images.py: every kind of good and bad file a user's folder can hold."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sdlora.data.images import (
    CONTACT_SHEET,
    REPORT_MARKER,
    ImageRejected,
    load_image,
    scan_images,
)
from sdlora.errors import UserError

LIMITS = dict(max_pixels=40_000_000, min_side=16)


def _noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def bomb_png(width=30000, height=30000) -> bytes:
    """A PNG whose IHDR declares width x height pixels but holds no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_bad_images(folder):
    """Files that must be rejected: {name: a word their reason must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    _noise(64, 64, 1).save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "full.png").unlink()
    _noise(64, 64, 2).save(folder / "full.jpg", quality=95)
    data = (folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "full.jpg").unlink()
    (folder / "notes.png").write_text("this is a text file, not a picture\n")
    Image.new("RGB", (1, 1), "red").save(folder / "pixel.png")
    (folder / "bomb.png").write_bytes(bomb_png())
    return {"empty.png": "empty", "truncated.png": "truncated", "truncated.jpg": "truncated",
            "notes.png": "not an image", "pixel.png": "too small", "bomb.png": "pixels"}


def make_good_images(folder):
    """Odd but valid files: {name: check(PIL RGB image) -> None}."""
    folder.mkdir(parents=True, exist_ok=True)
    checks = {}

    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "grey16.png")  # opens as I;16

    def grey16(img):
        a = np.asarray(img)
        assert a[0, 0, 0] == 0 and a[-1, -1, 0] == 255  # scaled: 65535 -> 255
        assert 120 <= a[32, 0, 0] <= 135  # mid-range stays mid-grey (clipping would give 255)
    checks["grey16.png"] = grey16

    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # pure red in CMYK

    def cmyk(img):
        r, g, b = img.getpixel((32, 32))
        assert r > 200 and g < 60 and b < 60
    checks["cmyk.jpg"] = cmyk

    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 32, 64))  # left half blue, right half the transparent index 0
    pal.save(folder / "palette_alpha.png", transparency=0)

    def palette(img):  # loaded with background "#00ff00"
        assert img.getpixel((10, 10)) == (0, 0, 255)
        assert img.getpixel((50, 10)) == (0, 255, 0)
    checks["palette_alpha.png"] = palette

    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)

    def anim(img):
        r, g, b = img.getpixel((32, 32))
        assert r > 200 and b < 60  # the first frame
    checks["anim.gif"] = anim

    # Stored 80x40 with red on the left; EXIF orientation 6 = "rotate 90 degrees clockwise to display".
    stored = Image.new("RGB", (80, 40), "blue")
    stored.paste((255, 0, 0), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)

    def rotated(img):
        assert img.size == (40, 80)
        top, bottom = img.getpixel((20, 10)), img.getpixel((20, 70))
        assert top[0] > 200 and top[2] < 60, top  # red ends up on top
        assert bottom[2] > 200 and bottom[0] < 60, bottom
    checks["rotated.jpg"] = rotated

    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 32, 64))
    rgba.save(folder / "rgba.webp", lossless=True)

    def webp(img):
        assert img.getpixel((10, 10)) == (255, 0, 0) and img.getpixel((50, 10)) == (0, 255, 0)
    checks["rgba.webp"] = webp

    Image.new("L", (64, 48), 128).save(folder / "grey.tif")
    checks["grey.tif"] = lambda img: img.getpixel((0, 0)) == (128, 128, 128) or pytest.fail("grey")
    Image.new("RGB", (64, 48), "white").save(folder / "plain.BMP")
    checks["plain.BMP"] = lambda img: None
    return checks


def test_odd_but_valid_images_come_out_as_8bit_rgb(tmp_path):
    checks = make_good_images(tmp_path)
    for name, check in checks.items():
        img = load_image(tmp_path / name, background="#00ff00", **LIMITS)
        assert img.mode == "RGB", name
        check(img)


def test_bad_images_are_rejected_with_a_reason(tmp_path):
    expected = make_bad_images(tmp_path)
    for name, word in expected.items():
        with pytest.raises(ImageRejected) as e:
            load_image(tmp_path / name, **LIMITS)
        assert word in e.value.reason, (name, e.value.reason)


def test_pixel_limit_is_checked_from_the_header(tmp_path):
    _noise(200, 100).save(tmp_path / "big.png")
    with pytest.raises(ImageRejected, match="200x100"):
        load_image(tmp_path / "big.png", max_pixels=19_999, min_side=16)
    assert load_image(tmp_path / "big.png", max_pixels=20_000, min_side=16).size == (200, 100)


def test_max_pixels_above_pillows_own_limit_is_honoured(tmp_path, monkeypatch):
    """A user who raises max_pixels past Pillow's bomb limit gets the image, not a bomb error."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # stands in for Pillow's 89 M pixels
    _noise(200, 100).save(tmp_path / "big.png")  # 20 000 pixels > 2 x 5 000: a "bomb" to Pillow
    assert load_image(tmp_path / "big.png", max_pixels=40_000, min_side=16).size == (200, 100)
    with pytest.raises(ImageRejected, match="max_pixels"):
        load_image(tmp_path / "big.png", max_pixels=19_999, min_side=16)


def test_originals_are_not_modified(tmp_path):
    make_good_images(tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    for p in tmp_path.iterdir():
        load_image(p, **LIMITS)
    assert before == {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}


def test_scan_is_recursive_sorted_and_skips_hidden_and_our_outputs(tmp_path):
    for rel in ["b.PNG", "a.jpg", "sub/c.webp", "sub/d.txt", ".hidden.png", ".cache/e.png",
                CONTACT_SHEET, "out/x.png", "x.tiff", "y.Jpeg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "out" / REPORT_MARKER).write_text("{}")
    names = [p.relative_to(tmp_path).as_posix() for p in scan_images(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "sub/c.webp", "x.tiff", "y.Jpeg"]
    with pytest.raises(UserError, match="image_dir"):
        scan_images(tmp_path / "missing")
