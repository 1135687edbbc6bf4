"""The training loss of the paper: MSE plus a PLCC loss."""

from __future__ import annotations

import torch


def plcc_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(1 - PLCC(pred, target)) / 2``: 0 for perfect linear agreement, 1 for perfect inversion."""
    pred = pred.flatten().float()
    target = target.flatten().float()
    if pred.numel() < 2:
        return pred.sum() * 0.0
    p = pred - pred.mean()
    t = target - target.mean()
    r = (p * t).sum() / (p.norm() * t.norm() + eps)
    return (1.0 - r) / 2.0


def fiqa_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    plcc_weight: float = 1.0,
) -> torch.Tensor:
    """Weighted MSE + ``plcc_weight`` * PLCC loss; ``weight`` is a per-sample loss weight."""
    pred = pred.flatten().float()
    target = target.flatten().float()
    se = (pred - target) ** 2
    if weight is None:
        mse = se.mean()
    else:
        weight = weight.flatten().float()
        mse = (se * weight).sum() / weight.sum().clamp_min(1e-8)
    return mse + plcc_weight * plcc_loss(pred, target)
