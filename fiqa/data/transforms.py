"""The paper's training transform: random crop + flip of the resized image (eval: `fiqa.data.decode`).

Images are decoded and resized to ``resize`` px on CPU tasks (`fiqa.data.decode`,
which also makes the evaluation's center crop, in the same resampling pass); the
training crop happens here, on uint8 arrays (numpy only: data workers never import
torch), and normalisation happens on the device that runs the model
(`fiqa.models.inputs.to_model_input`).
"""

from __future__ import annotations

import numpy as np


def random_crop_flip(
    img: np.ndarray, size: int, rng: np.random.Generator, flip: bool = True
) -> np.ndarray:
    h, w = img.shape[:2]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    out = img[top : top + size, left : left + size]
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return out
