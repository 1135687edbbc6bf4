import io

import numpy as np
import pytest
from PIL import Image

from fiqa.data.decode import RejectedSample, decode_image, pick_image

from conftest import jpeg_bytes


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rgb_jpeg_is_resized():
    out = decode_image(jpeg_bytes((200, 150)), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


@pytest.mark.parametrize(
    "img,fmt",
    [
        (Image.new("L", (40, 40), 128), "PNG"),
        (Image.new("RGBA", (40, 40), (10, 20, 30, 128)), "PNG"),
        (Image.new("P", (40, 40), 3), "PNG"),
        (Image.new("CMYK", (40, 40), (0, 50, 100, 0)), "JPEG"),
        (Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)), "PNG"),
    ],
)
def test_other_modes_become_rgb(img, fmt):
    out = decode_image(encode(img, fmt), 32)
    assert out.shape == (32, 32, 3)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 30), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 30, 30))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = decode_image(encode(img, "JPEG", exif=exif, quality=95), 30)
    top, bottom = out[:5].mean(axis=(0, 1)), out[-5:].mean(axis=(0, 1))
    assert top[2] > top[0] and bottom[0] > bottom[2]  # blue is now on top


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty_image"),
        (b"definitely not an image", "not_an_image"),
        (jpeg_bytes((300, 300))[:400], "not_an_image"),
        (jpeg_bytes((300, 300))[:1500], "truncated_image"),
        (jpeg_bytes((8, 8)), "too_small"),
    ],
)
def test_rejects_have_reasons(data, reason):
    with pytest.raises(RejectedSample) as e:
        decode_image(data, 32)
    assert e.value.reason == reason


def test_pixel_limit_is_checked_before_decoding():
    big = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(RejectedSample, match="too_many_pixels"):
        decode_image(big, 32, max_pixels=1_000_000)


def test_pick_image():
    assert pick_image({"png": b"x", "json": b"{}"}) == b"x"
    with pytest.raises(RejectedSample, match="no_image"):
        pick_image({"json": b"{}"})


def test_non_square_photos_are_not_stretched():
    img = Image.new("RGB", (200, 100), (0, 0, 255))
    img.paste((255, 0, 0), (50, 0, 150, 100))  # a red central square on blue
    out = decode_image(encode(img, "PNG"), 32)
    assert out.shape == (32, 32, 3)
    assert out[:, :, 0].mean() > 250 and out[:, :, 2].mean() < 5  # only the centre is kept
