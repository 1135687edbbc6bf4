"""Image transforms of the paper: resize + random crop + flip (train), resize + center crop (eval).

Images are decoded and resized to ``resize`` px on CPU tasks (`fiqa.data.decode`);
the crop happens here, on uint8 arrays, and normalisation happens on the
device that runs the model (`to_model_input`).
"""

from __future__ import annotations

import numpy as np
import torch

from fiqa.models.registry import IMAGENET_MEAN, IMAGENET_STD


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size]


def random_crop_flip(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    out = img[top:top + size, left:left + size]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0


def to_model_input(pixels: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW on the tensor's device."""
    x = pixels.permute(0, 3, 1, 2).float()
    x = (x - _MEAN.to(x.device)) / _STD.to(x.device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
