"""What a model expects as input: ImageNet normalisation of uint8 NHWC pixels."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (x - 255 mean) / (255 std) as x * SCALE + SHIFT: one multiply-add per element.
SCALE = 1.0 / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)
SHIFT = -torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def to_model_input(pixels: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW, on the tensor's device."""
    # One pass over the batch: addcmul reads the uint8 pixels and writes the normalised floats
    # (converting, subtracting and dividing as three passes cost twice as long on CPU). The
    # permuted view keeps NHWC memory (channels_last), which CPU convolutions prefer too.
    x = torch.addcmul(SHIFT.to(pixels.device), pixels.permute(0, 3, 1, 2), SCALE.to(pixels.device))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
