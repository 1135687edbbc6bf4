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


def _crop_of(arr, crop):
    top, left = (arr.shape[0] - crop) // 2, (arr.shape[1] - crop) // 2
    return arr[top : top + crop, left : left + crop]


@pytest.mark.parametrize(
    "size,resize,crop,tolerance",
    [
        ((112, 112), 128, 112, 0),  # the demo: upscale, then crop
        ((250, 250), 128, 112, 0),  # downscale
        ((112, 112), 112, 100, 0),  # no resampling: only the crop
        ((40, 40), 40, 40, 0),
        # Not square: the scale is not a round number, and the filter weights round a level
        # differently here and there.
        ((200, 131), 64, 56, 1),
        ((97, 131), 64, 57, 1),  # and odd margins
    ],
)
def test_crop_is_the_center_of_the_resized_square(size, resize, crop, tolerance):
    """One resampling pass straight to the crop gives the pixels of resize-then-crop."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        size, Image.BICUBIC
    )
    data = encode(smooth, "PNG")
    out = decode_image(data, resize, crop=crop)
    assert out.shape == (crop, crop, 3)
    diff = np.abs(out.astype(int) - _crop_of(decode_image(data, resize), crop))
    assert diff.max() <= tolerance and diff.mean() < 0.05


def test_crop_after_a_reducing_pass_is_within_a_level():
    """A large photo is first reduced by an integer factor: within one level of resize-then-crop."""
    img = Image.linear_gradient("L").resize((2000, 1400)).convert("RGB")
    data = encode(img, "PNG")
    out = decode_image(data, 128, crop=112).astype(int)
    assert np.abs(out - _crop_of(decode_image(data, 128), 112)).max() <= 1


@pytest.mark.parametrize("crop", [0, 65])
def test_crop_larger_than_the_square_is_refused(crop):
    with pytest.raises(ValueError, match="crop"):
        decode_image(jpeg_bytes((100, 100)), 64, crop=crop)
