"""`ScoringModule`: uint8 NHWC pixels in, ``(raw_score, score)`` out; what an export traces.

Normalisation and calibration live in the graph, so a deployer needs no Python of ours
(the contract is described in `fiqa.models.export`).
"""

from __future__ import annotations

import torch
from torch import nn

from fiqa.calibration import IDENTITY_PARAMS, Logistic4
from fiqa.models.checkpoint import load_checkpoint
from fiqa.models.inputs import IMAGENET_MEAN, IMAGENET_STD, normalisation
from fiqa.models.meta import ModelMeta


class ScoringModule(nn.Module):
    """uint8 NHWC pixels -> (raw_score, score): normalisation and calibration in the graph."""

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        calibration: Logistic4 | None = None,
    ):
        super().__init__()
        self.model = model
        scale, shift = normalisation(mean, std)  # as fiqa.models.inputs.to_model_input does
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.calibrated = calibration is not None
        c = calibration or IDENTITY_PARAMS
        self.register_buffer(
            "calib", torch.tensor([c.b1, c.b2, c.b3, abs(c.b4)], dtype=torch.float64)
        )

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The same arithmetic as fiqa.models.inputs.to_model_input, so scores match the engine's.
        x = pixels.permute(0, 3, 1, 2).float() * self.scale + self.shift
        raw = self.model(x)
        if not self.calibrated:
            return raw, raw.clone()
        # fiqa.calibration.Logistic4 in float64: fitted logistics can have large, cancelling terms.
        b1, b2, b3, b4 = self.calib[0], self.calib[1], self.calib[2], self.calib[3]
        z = torch.clamp(-(raw.double() - b3) / b4, -50.0, 50.0)
        score = b2 + (b1 - b2) / (1.0 + torch.exp(z))
        return raw, score.float()


def scoring_module(
    checkpoint: str, map_location: str | torch.device = "cpu"
) -> tuple[ScoringModule, ModelMeta]:
    """``(ScoringModule, the checkpoint's metadata)`` for a checkpoint directory (local or s3://)."""
    loaded = load_checkpoint(checkpoint, map_location=map_location)
    meta = loaded.meta
    module = ScoringModule(
        loaded.model,
        tuple(meta.get("mean", IMAGENET_MEAN)),
        tuple(meta.get("std", IMAGENET_STD)),
        loaded.calibration,
    )
    return module.to(map_location).eval(), loaded.info
