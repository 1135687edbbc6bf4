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


def random_crop_flip_batch(
    pixels: torch.Tensor, crop: int, rng: torch.Generator, flip: bool = True
) -> torch.Tensor:
    """A random ``crop`` x ``crop`` window of each uint8 NHWC image, flipped left-right with
    probability 1/2 where ``flip``: `fiqa.data.transforms.random_crop_flip` on the training
    worker, drawn from ``rng`` (CPU) so that a seeded run draws the same windows again."""
    n, h, w = pixels.shape[:3]
    if not (0 < crop <= h and crop <= w):
        raise ValueError(f"crop {crop} must fit the {h}x{w} images")
    tops = torch.randint(0, h - crop + 1, (n,), generator=rng).tolist()
    lefts = torch.randint(0, w - crop + 1, (n,), generator=rng).tolist()
    flips = (torch.rand(n, generator=rng) < 0.5).tolist() if flip else [False] * n
    windows = []
    for i, (top, left, flipped) in enumerate(zip(tops, lefts, flips, strict=True)):
        window = pixels[i, top : top + crop, left : left + crop]
        windows.append(window.flip(1) if flipped else window)
    return torch.stack(windows)
