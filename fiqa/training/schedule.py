"""The learning rate at any point of training, as a pure function of the position.

``step`` (the paper's StepLR: ``lr_gamma`` every ``lr_step_epochs`` epochs) or
``cosine`` (down to 0 at the last step), each optionally after a linear warm-up of
``warmup_epochs`` (fractions allowed). The position is the epoch plus the fraction of
it done, so the lr is set before every optimizer step and a resumed run needs no
scheduler state: it recomputes the lr from where it is. No torch here.
"""

from __future__ import annotations

import math

from fiqa.config import TrainConfig


def lr_factor(t: TrainConfig, position: float) -> float:
    """The multiplier of the base lr at ``position`` epochs into training (0 <= position)."""
    warm = max(t.warmup_epochs, 0.0)
    ramp = min(1.0, (position + 1e-12) / warm) if warm > 0 else 1.0
    if t.schedule == "step":
        return ramp * t.lr_gamma ** int(position // max(t.lr_step_epochs, 1))
    span = max(t.epochs - warm, 1e-9)
    done = min(max(position - warm, 0.0) / span, 1.0)
    return ramp * 0.5 * (1.0 + math.cos(math.pi * done))


def position(epoch: int, step_in_epoch: int, steps_in_epoch: int) -> float:
    """Epochs done at an epoch's ``step_in_epoch``-th step (of about ``steps_in_epoch``)."""
    frac = step_in_epoch / steps_in_epoch if steps_in_epoch > 0 else 0.0
    return epoch + min(frac, 1.0 - 1e-9)  # the epoch's last step is still in the epoch
