"""Aspect-ratio buckets: no image squashed, crops no larger than the rounding remainder."""

from PIL import Image

from sdlora.data.buckets import Bucket, assign_bucket, fit_to_bucket, make_buckets


def test_buckets_respect_area_step_and_limits():
    buckets = make_buckets((512, 512), 256, 1024, 64)
    assert Bucket(512, 512) in buckets and Bucket(768, 320) in buckets and Bucket(320, 768) in buckets
    for b in buckets:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert b.width * b.height <= 512 * 512
        assert 256 <= b.width <= 1024 and 256 <= b.height <= 1024


def test_image_goes_to_closest_aspect_and_is_cropped_minimally():
    buckets = make_buckets((512, 512), 256, 1024, 64)
    bucket = assign_bucket(1536, 1024, buckets, 512 * 512, 64)  # 3:2
    assert bucket == Bucket(640, 384)  # the nearest in log-aspect (576x448 is farther from 1.5)
    out, _ = fit_to_bucket(Image.new("RGB", (1536, 1024)), bucket)
    assert out.size == (bucket.width, bucket.height)
    # covered, not squashed: the resize keeps the aspect ratio, so the crop takes < 1 bucket step
    scale = max(bucket.width / 1536, bucket.height / 1024)
    assert round(1536 * scale) - bucket.width < 64 and round(1024 * scale) - bucket.height < 64


def test_no_upscale_keeps_small_images_at_their_size():
    buckets = make_buckets((512, 512), 256, 1024, 64)
    assert assign_bucket(300, 200, buckets, 512 * 512, 64, no_upscale=True) == Bucket(256, 192)
    big = assign_bucket(2000, 1000, buckets, 512 * 512, 64, no_upscale=True)
    assert big.width * big.height <= 512 * 512 and big.width > big.height
    assert assign_bucket(300, 200, buckets, 512 * 512, 64) != Bucket(256, 192)  # default: upscaled to the area


def test_tiny_config_buckets_fit_three_to_two_exactly():
    buckets = make_buckets((160, 160), 64, 256, 32)
    assert assign_bucket(384, 256, buckets, 160 * 160, 32) == Bucket(192, 128)
    assert assign_bucket(256, 384, buckets, 160 * 160, 32) == Bucket(128, 192)
