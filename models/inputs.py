"""What a model expects as input: ImageNet normalisation of uint8 NHWC pixels."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0


def to_model_input(pixels: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW, on the tensor's device."""
    # In place on the fresh float copy: one pass less over the batch than (x - m) / s.
    # The permuted view keeps NHWC memory (channels_last), which CPU convolutions prefer too.
    x = pixels.permute(0, 3, 1, 2).to(torch.float32, copy=True)
    x.sub_(_MEAN.to(x.device)).div_(_STD.to(x.device))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
