"""Quality-assessment metrics: SRCC, KRCC, PLCC and RMSE after a 4-parameter logistic fit.

The logistic is the VQEG mapping used by IQA papers (and by the paper this
project implements)::

    f(x) = b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|))

PLCC and RMSE are computed between ``f(prediction)`` and the MOS, with ``f``
fitted on the same pairs; SRCC and KRCC are rank statistics, unchanged by it.
The logistic itself, and its use as a model's calibration, is `fiqa.calibration`.

`quality_metrics` says when its figures are not what they claim: ``logistic_fit`` is
``"converged"``, or ``"failed: <reason>"`` where PLCC and RMSE are those of the fit's
initial guess; on degenerate input (fewer than 4 pairs, NaN or infinite values, constant
predictions or targets) every figure is NaN and ``degenerate`` names why.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fiqa.calibration import fit_logistic

# scipy is imported where it is used: importing scipy.stats costs seconds.

log = logging.getLogger(__name__)


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


def degenerate(pred: np.ndarray, mos: np.ndarray) -> str | None:
    """Why (``pred``, ``mos``) has no SRCC, PLCC, KRCC or RMSE after the fit; None if it has."""
    if pred.size < 4:
        return f"fewer than 4 pairs ({pred.size})"
    for name, v in (("predictions", pred), ("targets", mos)):
        if not np.all(np.isfinite(v)):
            return f"non-finite {name} ({int(np.sum(~np.isfinite(v)))} of {v.size})"
    for name, v in (("predictions", pred), ("targets", mos)):
        if np.all(v == v[0]):
            return f"constant {name}"
    return None


def quality_metrics(pred: np.ndarray, mos: np.ndarray) -> dict[str, Any]:
    """SRCC, PLCC, KRCC and RMSE (PLCC and RMSE after the logistic fit), plus n;
    ``logistic_fit``: ``"converged"`` or ``"failed: <reason>"`` (PLCC and RMSE then come
    from the unfitted initial guess); ``degenerate``: None, or why every figure is NaN."""
    from scipy import stats

    pred = np.asarray(pred, dtype=np.float64)
    mos = np.asarray(mos, dtype=np.float64)
    if pred.shape != mos.shape:
        raise ValueError(f"predictions {pred.shape} and targets {mos.shape} differ in shape")
    why = degenerate(pred, mos)
    if why is not None:
        # NaN, not 0.0: a zero would read as a measured "no correlation" and could be ranked.
        log.warning("quality metrics on %d pairs are undefined: %s", pred.size, why)
        nan = float("nan")
        return {
            "srcc": nan,
            "plcc": nan,
            "krcc": nan,
            "rmse": nan,
            "n": int(pred.size),
            "logistic_fit": f"failed: {why}",
            "degenerate": why,
        }
    logistic = fit_logistic(pred, mos)
    mapped = logistic(pred)
    return {
        "srcc": srcc(pred, mos),
        "plcc": float(stats.pearsonr(mapped, mos).statistic),
        "krcc": krcc(pred, mos),
        "rmse": float(np.sqrt(np.mean((mapped - mos) ** 2))),
        "n": int(pred.size),
        "logistic_fit": "converged" if logistic.converged else f"failed: {logistic.reason}",
        "degenerate": None,
    }
