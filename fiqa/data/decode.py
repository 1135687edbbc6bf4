"""Image decoding with an explicit reason for every image that cannot be used.

`decode_image` turns encoded bytes into an upright RGB uint8 array of
``resize`` x ``resize``: the shorter side is resized to ``resize`` (aspect
ratio kept) and the central square kept, so aligned square face crops are
simply resized and other photos are not stretched. With ``crop``, only the
central ``crop`` x ``crop`` of that square is made (the evaluation transform:
resize, then center crop), in one resampling pass. Anything that cannot be decoded raises
`RejectedSample` with a short machine-readable reason that ends up in the
rejects table.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

# Decompression bombs are bounded by our own pixel limit (checked before any
# pixel is decoded), so PIL's global guard is turned into our check.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class RejectedSample(Exception):
    """A sample that cannot be used; ``reason`` is what the rejects table records."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def pick_image(sample: dict[str, bytes]) -> bytes:
    """The encoded image of a WebDataset sample (first of jpg, jpeg, png, webp)."""
    for k in IMAGE_KEYS:
        if k in sample:
            return sample[k]
    raise RejectedSample("no_image", f"sample has keys {sorted(sample)}")


def decode_image(
    data: bytes,
    resize: int,
    max_pixels: int = 40_000_000,
    min_side: int = 16,
    crop: int | None = None,
) -> np.ndarray:
    """Decode ``data`` to an upright RGB array of shape (resize, resize, 3), dtype uint8.

    With ``crop`` (at most ``resize``): the central (crop, crop, 3) of that array.
    """
    if crop is not None and not 0 < crop <= resize:
        raise ValueError(f"crop {crop} must be between 1 and resize {resize}")
    if not data:
        raise RejectedSample("empty_image")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises a variety of errors on garbage
        raise RejectedSample("not_an_image", type(e).__name__) from None
    w, h = img.size
    if w * h > max_pixels:
        raise RejectedSample("too_many_pixels", f"{w}x{h} > {max_pixels}")
    if min(w, h) < min_side:
        raise RejectedSample("too_small", f"{w}x{h} < {min_side}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if img.format == "JPEG":
                # DCT-domain downscale: decoding a large JPEG costs what its target size does.
                img.draft("RGB", (resize, resize))
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            img = _resize_square(img, resize, crop or resize)
    except RejectedSample:
        raise
    except Exception as e:
        # PIL says "image file is truncated" (or "broken data stream") for cut-off files.
        msg = str(e)
        reason = (
            "truncated_image"
            if "truncated" in msg or "broken data stream" in msg
            else "corrupt_image"
        )
        raise RejectedSample(reason, f"{type(e).__name__}: {msg}"[:200]) from None
    return np.asarray(img, dtype=np.uint8)


def _resize_square(img: Image.Image, size: int, crop: int) -> Image.Image:
    """Shorter side to ``size``, keeping the aspect ratio; of that, the central ``crop`` square.

    Resampling only the source region that lands in the crop samples the same source
    positions as resizing the whole image and cropping afterwards (a level off here and
    there where filter weights round differently), at the cost of the crop alone.
    """
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    # The crop's corner in the resized image: the square's, then the crop's within it.
    left = (nw - size) // 2 + (size - crop) // 2
    top = (nh - size) // 2 + (size - crop) // 2
    if (nw, nh) == (w, h):  # already the size: only the crop
        return img if (w, h) == (crop, crop) else img.crop((left, top, left + crop, top + crop))
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return img.resize((crop, crop), Image.BILINEAR, box=box, reducing_gap=2.0)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale (PIL opens 16-bit PNGs as I;16 or I): map 0..65535 onto 0..255,
        # so a dark photo stays dark rather than being stretched to its own range.
        arr = np.asarray(img, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (0, 0, 0))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")
