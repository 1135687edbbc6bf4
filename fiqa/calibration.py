"""Calibration: the 4-parameter logistic that maps a model's raw scores to the MOS scale.

The VQEG mapping used by IQA papers (and by the paper this project implements)::

    f(x) = b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|))

Where it lives in a run, end to end:

- **fit**: `fit_logistic`, on the validation set after every training epoch
  (`fiqa.training`); the best epoch's fit is the model's calibration;
- **store**: under ``calibration`` in the checkpoint's ``model.json``
  (`to_meta` / `from_meta`), and inside exported ONNX / TorchScript graphs;
- **apply**: `to_mos_scale`, when a scoring job writes its tables (a row's
  ``score`` is its MOS where it has one, else its calibrated raw score).

`fiqa.metrics` fits the same logistic to compute PLCC and RMSE.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# scipy is imported where it is used: importing scipy.optimize costs seconds, and data
# workers import this module.


PARAMS = ("b1", "b2", "b3", "b4")


@dataclass(frozen=True)
class Logistic4:
    """The map's four parameters; ``converged`` False (with its ``reason``) marks
    `fit_logistic`'s fallback, its initial guess, where the least-squares fit failed."""

    b1: float
    b2: float
    b3: float
    b4: float
    # compare=False: two maps with the same parameters are the same map, however obtained.
    converged: bool = field(default=True, compare=False)
    reason: str | None = field(default=None, compare=False)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.b2 + (self.b1 - self.b2) * self._sigmoid(x)

    def _sigmoid(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(np.clip(-(x - self.b3) / abs(self.b4), -50.0, 50.0)))

    def slope(self, x: np.ndarray) -> np.ndarray:
        """df/dx at ``x``: how far a raw-score spread moves on the MOS scale."""
        s = self._sigmoid(x)
        return (self.b1 - self.b2) * s * (1.0 - s) / abs(self.b4)

    def to_dict(self) -> dict[str, float]:
        # The parameters only: model.json's calibration (and model ids hashed from it) keeps
        # its format.
        return {k: getattr(self, k) for k in PARAMS}

    @classmethod
    def from_dict(cls, d: dict) -> Logistic4:
        return cls(**{k: float(d[k]) for k in PARAMS})


IDENTITY_PARAMS = Logistic4(1.0, 0.0, 0.0, 1.0)  # placeholder where a graph needs parameters


def fit_logistic(pred: np.ndarray, mos: np.ndarray) -> Logistic4:
    """Least-squares fit of the 4-parameter logistic mapping ``pred`` onto ``mos``.

    Where the fit fails (curve_fit raises, e.g. at ``maxfev``, or gives non-finite
    parameters or values) the result is the initial guess, a monotone map with the right
    range, with ``converged=False`` and the ``reason``; a warning is logged.
    """
    from scipy import optimize

    pred = np.asarray(pred, dtype=np.float64)
    mos = np.asarray(mos, dtype=np.float64)
    if pred.shape != mos.shape or pred.size < 4:
        raise ValueError(f"need >= 4 paired values, got {pred.shape} and {mos.shape}")
    scale = float(np.std(pred)) or 1.0
    p0 = [float(mos.max()), float(mos.min()), float(np.mean(pred)), scale]

    def f(x, b1, b2, b3, b4):
        return Logistic4(b1, b2, b3, b4)(x)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = optimize.curve_fit(f, pred, mos, p0=p0, maxfev=20000)
        fitted = Logistic4(*map(float, params))
        if not np.all(np.isfinite(params)):
            reason = f"non-finite parameters {fitted.to_dict()}"
        elif not np.all(np.isfinite(fitted(pred))):
            reason = "non-finite values on the input"
        else:
            return fitted
    except (RuntimeError, ValueError) as e:  # RuntimeError: maxfev reached, or no progress
        reason = f"curve_fit: {e}"
    log.warning(
        "4-parameter logistic fit on %d pairs did not converge (%s); using the initial "
        "guess: PLCC and RMSE after it are not those of a fitted map",
        pred.size,
        reason,
    )
    return Logistic4(*p0, converged=False, reason=reason)


def fit_calibration(pred: np.ndarray, mos: np.ndarray) -> Logistic4 | None:
    """The calibration of a model validated on (``pred``, ``mos``); None below 4 pairs."""
    return fit_logistic(pred, mos) if len(pred) >= 4 else None


def to_meta(calibration: Logistic4 | None) -> dict[str, float] | None:
    """The ``calibration`` entry of ``model.json``."""
    return calibration.to_dict() if calibration is not None else None


def from_meta(meta: dict[str, Any]) -> Logistic4 | None:
    """The calibration stored in a ``model.json`` (or a bare ``{b1..b4}`` mapping), or None."""
    c = meta.get("calibration", meta if "b1" in meta else None)
    return Logistic4.from_dict(c) if c else None


def to_mos_scale(mos: np.ndarray, raw: np.ndarray, calibration: Logistic4 | None) -> np.ndarray:
    """A table's ``score``: the MOS where a row has one, else its calibrated raw score."""
    score = np.asarray(mos, dtype=np.float64).copy()
    missing = np.isnan(score)
    raw = np.asarray(raw, dtype=np.float64)[missing]
    score[missing] = calibration(raw) if calibration is not None else raw
    return score


def spread_on_mos_scale(
    mos: np.ndarray, raw: np.ndarray, raw_spread: np.ndarray, calibration: Logistic4 | None
) -> np.ndarray:
    """A table's ``score_spread``: the raw scores' spread over views carried to the MOS scale
    through the calibration's slope at the raw score; NaN where a row has a MOS (no guess)."""
    spread = np.asarray(raw_spread, dtype=np.float64).copy()
    if calibration is not None:
        spread *= np.abs(calibration.slope(raw))
    spread[~np.isnan(np.asarray(mos, dtype=np.float64))] = np.nan
    return spread
