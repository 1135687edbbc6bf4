"""Image decoding with an explicit reason for every image that cannot be used.

`decode_image` turns encoded bytes into an upright RGB uint8 array of
``resize`` x ``resize``: the shorter side is resized to ``resize`` (aspect
ratio kept) and the central square kept, so aligned square face crops are
simply resized and other photos are not stretched. With ``crop``, only the
central ``crop`` x ``crop`` of that square is made (the evaluation transform:
resize, then center crop), in one resampling pass. Anything that cannot be decoded raises
`RejectedSample` with a short machine-readable reason that ends up in the
rejects table.

The bytes come from a crawl, so they are hostile: only JPEG, PNG and WebP are decoded,
recognised by their content (whatever the file is named); any other format PIL knows (EPS,
TIFF, PSD, GIF, BMP...) is ``unsupported_format`` without its plugin ever parsing it. The
pixel limit (``max_pixels``) is checked from the header before the image is opened (WebP
allocates its canvas when opened), and again from what PIL parsed before any pixel is
decoded; PIL's own decompression-bomb guard stays on (no PIL setting is changed), and where
it fires the image is ``too_many_pixels`` too.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
FORMATS = ("JPEG", "PNG", "WEBP")  # what is decoded, whatever the file's name says


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
    img = open_checked(data, max_pixels, min_side)
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
    except Image.DecompressionBombError as e:  # PIL's own guard, on a frame or a crop
        raise RejectedSample("too_many_pixels", str(e)[:200]) from None
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


def sniff_format(data: bytes) -> str | None:
    """``JPEG``, ``PNG`` or ``WEBP`` from the first bytes (the signatures PIL's plugins
    accept), or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _other_format(data: bytes) -> str | None:
    """The other image format PIL would take ``data`` for, from its plugins' signature checks
    alone (no plugin opens the bytes); None for bytes no signature matches."""
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        if name in FORMATS or accept is None:  # no signature: PIL would have to try opening
            continue
        try:
            if accept(prefix):
                return name
        except Exception:  # a signature check that cannot read so short a prefix
            continue
    return None


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) as the header of a ``fmt`` image states it, None where it cannot be
    read; for a JPEG the largest frame header before the first scan."""
    if fmt == "PNG":
        if data[12:16] != b"IHDR" or len(data) < 24:
            return None
        w, h = struct.unpack(">II", data[16:24])
        return w, h
    if fmt == "WEBP":  # as PIL's WebP plugin reads it, before it allocates the canvas
        chunk = data[12:16]
        if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
            w, h = struct.unpack("<HH", data[26:30])
            return w & 0x3FFF, h & 0x3FFF
        if chunk == b"VP8X" and len(data) >= 30:
            w = int.from_bytes(data[24:27], "little") + 1
            return w, int.from_bytes(data[27:30], "little") + 1
        if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        return None
    return _jpeg_size(data)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The largest (width, height) of a JPEG's frame headers before its first scan."""
    i, best = 2, None
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return best
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image: no frame header after
            return best
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and i + 9 <= len(data):
            h = int.from_bytes(data[i + 5 : i + 7], "big")
            w = int.from_bytes(data[i + 7 : i + 9], "big")
            if best is None or w * h > best[0] * best[1]:
                best = (w, h)
        if length < 2:
            return best
        i += 2 + length
    return best


def open_checked(data: bytes, max_pixels: int, min_side: int) -> Image.Image:
    """The image's header, parsed (no pixel is decoded), or the reason it cannot be used."""
    if not data:
        raise RejectedSample("empty_image")
    fmt = sniff_format(data)
    if fmt is None:
        other = _other_format(data)
        if other is not None:
            raise RejectedSample("unsupported_format", f"{other}: only {', '.join(FORMATS)}")
        raise RejectedSample("not_an_image")
    size = header_size(data, fmt)
    if size is not None and size[0] * size[1] > max_pixels:
        raise RejectedSample("too_many_pixels", f"{size[0]}x{size[1]} > {max_pixels}")
    if size is None and fmt == "WEBP":  # its plugin would allocate a canvas of unchecked size
        raise RejectedSample("not_an_image", "a WebP without a readable size")
    try:
        with warnings.catch_warnings():
            # PIL's warning threshold may lie below max_pixels: ours decides, checked above.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as e:  # PIL's guard, above its hard limit
        raise RejectedSample("too_many_pixels", str(e)[:200]) from None
    except Exception as e:  # PIL raises a variety of errors on garbage
        raise RejectedSample("not_an_image", type(e).__name__) from None
    w, h = img.size  # what PIL parsed, which a hostile header may make differ from the sniff
    if w * h > max_pixels:
        raise RejectedSample("too_many_pixels", f"{w}x{h} > {max_pixels}")
    if min(w, h) < min_side:
        raise RejectedSample("too_small", f"{w}x{h} < {min_side}")
    return img


# A larger JPEG costs a GPU more memory than decoding it on a CPU at a reduced scale (PIL's
# DCT-domain draft) costs time: beyond this many times the target's pixels it stays on a CPU.
GPU_DECODE_MAX_SCALE = 16


def gpu_decodable(data: bytes, max_pixels: int, min_side: int, resize: int) -> bool:
    """Whether nvJPEG decodes ``data`` as `decode_image` would: a complete baseline JPEG in
    RGB or greyscale with no EXIF rotation, at most ``GPU_DECODE_MAX_SCALE`` times the target's
    pixels. Raises `RejectedSample` for what `decode_image` rejects from the header alone."""
    img = open_checked(data, max_pixels, min_side)
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return False  # PNG, WebP, CMYK, ...: the CPU path converts them
    w, h = img.size
    if w * h > GPU_DECODE_MAX_SCALE * resize * resize:
        return False  # large: PIL decodes it at a reduced scale, the GPU would at full size
    if img.getexif().get(0x0112, 1) != 1:
        return False  # EXIF rotation: applied on the CPU path only
    # A file cut off before its end-of-image marker: PIL names it truncated, nvJPEG may not.
    return data.rstrip(b"\0").endswith(b"\xff\xd9") and _baseline_headers_ok(data)


def _baseline_headers_ok(data: bytes) -> bool:
    """A baseline (or extended) sequential JPEG whose segments up to the first scan are
    well-formed: nvJPEG's hardware decodes these, and decodes garbage headers that libjpeg
    refuses to pixels, so those (and progressive ones) stay on the CPU path."""
    i, components = 2, None
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = data[i + 4 : i + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return False
        if marker in (0xC0, 0xC1):  # sequential DCT
            if len(segment) < 6 or len(segment) != 6 + 3 * segment[5]:
                return False
            components = {segment[6 + 3 * c] for c in range(segment[5])}
        elif 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return False  # progressive, lossless, arithmetic-coded
        elif marker == 0xDA:  # start of scan: the header ends here
            n = segment[0] if segment else 0
            return (
                components is not None
                and 1 <= n <= 4
                and len(segment) == 4 + 2 * n
                and all(segment[1 + 2 * c] in components for c in range(n))
            )
        i += 2 + length
    return False


def square_crop_geometry(w: int, h: int, size: int, crop: int) -> tuple[int, int, int, int]:
    """(width, height, left, top): a ``w`` x ``h`` image with its shorter side resized to
    ``size`` (aspect ratio kept), and the corner of its central ``crop`` square."""
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    # The crop's corner in the resized image: the square's, then the crop's within it.
    return nw, nh, (nw - size) // 2 + (size - crop) // 2, (nh - size) // 2 + (size - crop) // 2


def _resize_square(img: Image.Image, size: int, crop: int) -> Image.Image:
    """Shorter side to ``size``, keeping the aspect ratio; of that, the central ``crop`` square.

    Resampling only the source region that lands in the crop samples the same source
    positions as resizing the whole image and cropping afterwards (a level off here and
    there where filter weights round differently), at the cost of the crop alone.
    """
    w, h = img.size
    nw, nh, left, top = square_crop_geometry(w, h, size, crop)
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
