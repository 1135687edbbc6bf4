"""Quality-assessment metrics: SRCC, KRCC, PLCC and RMSE after a 4-parameter logistic fit.

The logistic is the VQEG mapping used by IQA papers (and by the paper this
project implements)::

    f(x) = b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|))

PLCC and RMSE are computed between ``f(prediction)`` and the MOS, with ``f``
fitted on the same pairs; SRCC and KRCC are rank statistics, unchanged by it.
The same fit, done on labeled data, maps a model's raw scores to the MOS scale
when pseudo-labeling (`Logistic4`).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np

# scipy is imported where it is used: importing scipy.stats costs seconds, and every
# `fiqa` command and data worker imports this module for `Logistic4`.


@dataclass(frozen=True)
class Logistic4:
    b1: float
    b2: float
    b3: float
    b4: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        z = np.clip(-(x - self.b3) / abs(self.b4), -50.0, 50.0)
        return self.b2 + (self.b1 - self.b2) / (1.0 + np.exp(z))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Logistic4:
        return cls(**{k: float(d[k]) for k in ("b1", "b2", "b3", "b4")})


def fit_logistic(pred: np.ndarray, mos: np.ndarray) -> Logistic4:
    """Least-squares fit of the 4-parameter logistic mapping ``pred`` onto ``mos``."""
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
        if np.all(np.isfinite(fitted(pred))):
            return fitted
    except (RuntimeError, ValueError):
        pass
    # The fit can fail on degenerate inputs (constant predictions); fall back to
    # the initial guess, which is a monotone map with the right range.
    return Logistic4(*p0)


def srcc(pred: np.ndarray, mos: np.ndarray) -> float:
    from scipy import stats

    return float(stats.spearmanr(pred, mos).statistic)


def krcc(pred: np.ndarray, mos: np.ndarray) -> float:
    from scipy import stats

    return float(stats.kendalltau(pred, mos).statistic)


def plcc(pred: np.ndarray, mos: np.ndarray, fit: bool = True) -> float:
    from scipy import stats

    pred = np.asarray(pred, dtype=np.float64)
    if fit:
        pred = fit_logistic(pred, mos)(pred)
    return float(stats.pearsonr(pred, mos).statistic)


def rmse(pred: np.ndarray, mos: np.ndarray, fit: bool = True) -> float:
    pred = np.asarray(pred, dtype=np.float64)
    if fit:
        pred = fit_logistic(pred, mos)(pred)
    return float(np.sqrt(np.mean((pred - np.asarray(mos, dtype=np.float64)) ** 2)))


def quality_metrics(pred: np.ndarray, mos: np.ndarray) -> dict[str, float]:
    """SRCC, PLCC, KRCC and RMSE (the last two after the logistic fit), plus n."""
    from scipy import stats

    pred = np.asarray(pred, dtype=np.float64)
    mos = np.asarray(mos, dtype=np.float64)
    if pred.size < 4 or np.std(pred) == 0 or np.std(mos) == 0:
        return {
            "srcc": 0.0,
            "plcc": 0.0,
            "krcc": 0.0,
            "rmse": float(np.std(mos)) if mos.size else 0.0,
            "n": int(pred.size),
        }
    mapped = fit_logistic(pred, mos)(pred)
    return {
        "srcc": srcc(pred, mos),
        "plcc": float(stats.pearsonr(mapped, mos).statistic),
        "krcc": krcc(pred, mos),
        "rmse": float(np.sqrt(np.mean((mapped - mos) ** 2))),
        "n": int(pred.size),
    }
