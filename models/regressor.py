"""The paper's quality regressor: a timm backbone, global pooling, a small MLP head."""

from __future__ import annotations

import timm
import torch
from torch import nn


def timm_backbone(
    arch: str, image_size: int | None = None, pretrained: bool = False, **kwargs
) -> nn.Module:
    """timm's ``arch`` without classifier, globally pooled; ``pretrained`` downloads hub weights."""
    kwargs = dict(pretrained=pretrained, num_classes=0, global_pool="avg", **kwargs)
    if image_size is not None and _accepts_img_size(arch):
        kwargs["img_size"] = image_size
    return timm.create_model(arch, **kwargs)


class QualityRegressor(nn.Module):
    """backbone -> global average pool -> Linear(C, 128) -> Linear(128, 1)."""

    def __init__(self, arch: str, image_size: int | None = None, hidden: int = 128, **timm_kwargs):
        super().__init__()
        self.backbone = timm_backbone(arch, image_size, **timm_kwargs)
        # Models with a pre-logits stage (MobileNetV3's conv_head) emit head_hidden_size features.
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).squeeze(-1)


def _accepts_img_size(arch: str) -> bool:
    # Transformers with absolute position tables or fixed windows take the input size at build time.
    return any(arch.startswith(p) for p in ("swin", "vit", "deit", "beit", "eva", "maxvit", "coat"))
