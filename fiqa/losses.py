"""The training loss of the paper: MSE plus a PLCC loss, both weighted per row.

Training computes it per micro-batch (`fiqa.training.step`). The MSE part is a weighted
mean of per-row terms, so with equal weight sums per micro-batch (always so when the
weights are uniform) the accumulated gradient is the same however the global batch is
split into micro-batches and workers. The PLCC part is a correlation within the
micro-batch: a per-micro-batch estimate, which changes with ``micro_batch_size``.
"""

from __future__ import annotations

import torch


def plcc_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(1 - PLCC(pred, target)) / 2``: 0 for perfect linear agreement, 1 for perfect inversion.

    With ``weight`` the correlation is the weighted Pearson correlation (weighted means,
    covariance and variances), so a row of weight 0 has no effect on the loss or its
    gradient; weights of 1 give the unweighted loss, bit for bit on CPU.
    """
    pred = pred.flatten().float()
    target = target.flatten().float()
    if pred.numel() < 2:
        return pred.sum() * 0.0
    if weight is None:
        p = pred - pred.mean()
        t = target - target.mean()
    else:
        w = weight.flatten().float()
        total = w.sum().clamp_min(eps)
        # sqrt(w) on both deviations: their dot product and norms are the weighted
        # covariance and variances, and sqrt(1) leaves the unweighted arithmetic unchanged.
        root = w.sqrt()
        p = root * (pred - (w * pred).sum() / total)
        t = root * (target - (w * target).sum() / total)
    r = (p * t).sum() / (p.norm() * t.norm() + eps)
    return (1.0 - r) / 2.0


def fiqa_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    plcc_weight: float = 1.0,
) -> torch.Tensor:
    """Weighted MSE + ``plcc_weight`` * weighted PLCC loss; ``weight`` is a per-row loss
    weight applied to both terms (a row of weight 0 contributes nothing)."""
    pred = pred.flatten().float()
    target = target.flatten().float()
    se = (pred - target) ** 2
    if weight is None:
        mse = se.mean()
    else:
        weight = weight.flatten().float()
        mse = (se * weight).sum() / weight.sum().clamp_min(1e-8)
    return mse + plcc_weight * plcc_loss(pred, target, weight)
