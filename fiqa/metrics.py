"""Quality-assessment metrics: SRCC, KRCC, PLCC and RMSE after a 4-parameter logistic fit.

The logistic is the VQEG mapping used by IQA papers (and by the paper this
project implements)::

    f(x) = b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|))

PLCC and RMSE are computed between ``f(prediction)`` and the MOS, with ``f``
fitted on the same pairs; SRCC and KRCC are rank statistics, unchanged by it.
The logistic itself, and its use as a model's calibration, is `fiqa.calibration`.
"""

from __future__ import annotations

import numpy as np

from fiqa.calibration import fit_logistic

# scipy is imported where it is used: importing scipy.stats costs seconds.


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
    """SRCC, PLCC, KRCC and RMSE (PLCC and RMSE after the logistic fit), plus n."""
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
