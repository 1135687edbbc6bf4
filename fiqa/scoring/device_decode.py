"""Decoding in the scoring actor: JPEG bytes to model-ready pixels on the actor's device.

On a GPU, torchvision's ``decode_jpeg`` hands a batch to nvJPEG (the hardware JPEG engines
where the GPU has them, beside the cores that run the model), and resizing and cropping run on
the GPU too, so the CPUs only read tar bytes. On a CPU the same code runs with libjpeg-turbo,
which is how the tests check it everywhere. The geometry is `fiqa.data.decode`'s (shorter
side to ``resize``, central ``crop``); the filter is bilinear with antialiasing, as PIL's
resize is, so the pixels differ from the CPU path's by about a level (JPEG decoders round
differently too). Whatever this decoder refuses goes to `decode_image`, image by image, with
the CPU path's reject reasons: a batch never fails as a whole. Bytes that are not a JPEG by
their content never reach nvJPEG at all: the CPU path rejects them (``unsupported_format``...).
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from fiqa.data.decode import RejectedSample, decode_image, sniff_format, square_crop_geometry

log = logging.getLogger(__name__)

RESAMPLE_CHUNK = 64  # images resampled at once

_batch_failures: list[int] = []  # batches the device decoder refused in this process


def decode_batch(
    encoded: list,
    resize: int,
    crop: int,
    device: torch.device,
    max_pixels: int = 40_000_000,
    min_side: int = 16,
) -> tuple[torch.Tensor, list[str | None]]:
    """``encoded`` JPEGs (bytes-like) as uint8 (n, crop, crop, 3) on ``device``, and for each
    image None or the reason it was rejected (its pixels are then zeros)."""
    out = torch.zeros((len(encoded), crop, crop, 3), dtype=torch.uint8, device=device)
    reasons: list[str | None] = [None] * len(encoded)
    if not encoded:
        return out, reasons
    images = _decode_jpegs(encoded, device)
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        if img is None:  # refused by the device decoder: the CPU path decides
            try:
                pix = decode_image(bytes(encoded[i]), resize, max_pixels, min_side, crop=crop)
                out[i] = torch.from_numpy(pix).to(device)
            except RejectedSample as e:
                reasons[i] = e.reason
        else:
            by_size[tuple(img.shape[1:])].append(i)
    for same_size in by_size.values():
        # Faces of a pool often share one size: one resampling call per size, not per image,
        # in chunks: in float32, 1,024 large photos would take tens of GB of GPU memory.
        for c in range(0, len(same_size), RESAMPLE_CHUNK):
            idx = same_size[c : c + RESAMPLE_CHUNK]
            out[idx] = resize_crop(torch.stack([images[i] for i in idx]), resize, crop)
    return out, reasons


def resize_crop(chw: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """uint8 (n, 3, h, w) to uint8 (n, crop, crop, 3): shorter side to ``resize``, central crop."""
    h, w = chw.shape[2:]
    nw, nh, left, top = square_crop_geometry(w, h, resize, crop)
    x = chw
    if (nw, nh) != (w, h):
        x = F.interpolate(
            chw.float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True
        )
        x = x.add_(0.5).clamp_(0, 255).to(torch.uint8)  # rounded, as PIL rounds
    return x[:, :, top : top + crop, left : left + crop].permute(0, 2, 3, 1)


def _decode_jpegs(encoded: list, device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG as uint8 (3, h, w) on ``device``, None where the decoder refuses it or the
    bytes are no JPEG (never given to it: one parser fewer for hostile bytes to reach).

    torchvision returns nothing from a batch with one bad image in it, so a failed batch is
    retried image by image."""
    jpeg = [i for i, b in enumerate(encoded) if sniff_format(bytes(b[:16])) == "JPEG"]
    out: list[torch.Tensor | None] = [None] * len(encoded)
    if jpeg:
        for i, img in zip(jpeg, _decode_on_device([encoded[i] for i in jpeg], device), strict=True):
            out[i] = img
    return out


def _decode_on_device(encoded: list, device: torch.device) -> list[torch.Tensor | None]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # read only: decode_jpeg copies the bytes it is given
        warnings.filterwarnings("ignore", "The given buffer is not writable")
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        warnings.filterwarnings("ignore", ".*deprecated.*", category=UserWarning)
        data = [torch.from_numpy(np.frombuffer(b, dtype=np.uint8)) for b in encoded]
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as e:
            # Once per process, loud: a decoder that fails every batch (nvJPEG's start-up,
            # GPU memory) would otherwise leave the actor decoding on its one CPU, silently.
            level = logging.DEBUG if _batch_failures else logging.WARNING
            _batch_failures.append(1)
            log.log(level, "%s refused a batch (%s); decoding it image by image", device, e)
        out: list[torch.Tensor | None] = []
        for d in data:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out
