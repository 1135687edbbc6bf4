"""What a model expects as input: ImageNet normalisation of uint8 NHWC pixels."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalisation(
    mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of shape (1, 3, 1, 1): (x - 255 mean) / (255 std) as x * scale + shift,
    one multiply-add per uint8 pixel value."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return 1.0 / (s * 255.0), -m / s


SCALE, SHIFT = normalisation(IMAGENET_MEAN, IMAGENET_STD)


def to_model_input(pixels: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW, on the tensor's device."""
    # One pass: addcmul reads the uint8 pixels and writes the normalised floats, where
    # converting, subtracting and dividing would be three. The permuted view keeps NHWC
    # memory (channels_last), which CPU convolutions prefer too.
    x = torch.addcmul(SHIFT.to(pixels.device), pixels.permute(0, 3, 1, 2), SCALE.to(pixels.device))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
