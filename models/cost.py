"""Cost accounting: parameters and GFLOPs per image.

GFLOPs follow the convention of the FIQA and mobile-vision papers (and of the
0.33 "GFLOPs" quoted for EdgeNeXt-XXS): multiply-accumulates, i.e. half of
what `torch.utils.flop_counter` counts as floating-point operations.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def model_cost(model: nn.Module, image_size: int) -> dict[str, float]:
    """``{"params_m": ..., "gflops": ...}`` for one image of ``image_size`` px."""
    params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return {"params_m": params / 1e6, "gflops": counter.get_total_flops() / 2 / 1e9}
