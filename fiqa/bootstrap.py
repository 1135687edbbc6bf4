"""Bootstrap 95 % intervals for the report: SRCC and PLCC per model, and paired differences.

Every model is scored on the same test images, so one set of resamples (images drawn with
replacement) serves all of them: a difference between two models is computed on each
resample from the same images (a paired bootstrap), which is what tells a real difference
from the luck of the test set.

PLCC is taken after each model's 4-parameter logistic, fitted once on the whole test set
(``mapped``); refitting it on every resample would cost a curve fit each and move the
interval little. SRCC is recomputed from ranks within each resample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95
# Resamples per batch: bounds the (batch, n) working arrays for large test sets.
CELLS_PER_BATCH = 4_000_000


@dataclass(frozen=True)
class Interval:
    """A statistic on the whole set and its percentile interval over the resamples."""

    value: float
    low: float
    high: float

    @property
    def within_noise(self) -> bool:
        """The interval contains 0: a difference of this size is what resampling gives."""
        return self.low <= 0.0 <= self.high

    def as_dict(self) -> dict:
        return asdict(self)


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``(resamples, n)`` indices drawn with replacement, the same for a given seed."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=1) / np.where(den > 0, den, 1), 0.0)


def _rowwise_ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=1)  # average ranks for ties, as Spearman's definition has


def _batches(idx: np.ndarray) -> list[np.ndarray]:
    per = max(1, CELLS_PER_BATCH // max(idx.shape[1], 1))
    return [idx[i : i + per] for i in range(0, len(idx), per)]


def srcc_samples(pred: np.ndarray, mos: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """SRCC on each resample (a row of ``idx``)."""
    pred, mos = np.asarray(pred, np.float64), np.asarray(mos, np.float64)
    out = [_rowwise_pearson(_rowwise_ranks(pred[b]), _rowwise_ranks(mos[b])) for b in _batches(idx)]
    return np.concatenate(out) if out else np.zeros(0)


def plcc_samples(mapped: np.ndarray, mos: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """PLCC of the already mapped predictions on each resample."""
    mapped, mos = np.asarray(mapped, np.float64), np.asarray(mos, np.float64)
    out = [_rowwise_pearson(mapped[b], mos[b]) for b in _batches(idx)]
    return np.concatenate(out) if out else np.zeros(0)


def interval(value: float, samples: np.ndarray, level: float = LEVEL) -> Interval:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail]) if len(samples) else (value, value)
    return Interval(float(value), float(low), float(high))


def model_intervals(
    preds: dict[str, np.ndarray],
    mapped: dict[str, np.ndarray],
    mos: np.ndarray,
    pairs: dict[str, tuple[str, str]],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict:
    """Intervals of SRCC and PLCC per model and of the differences ``pairs`` name.

    ``preds``: raw outputs per model, ``mapped``: the same after each model's logistic, all
    aligned on the same images, whose truth is ``mos``. ``pairs``: a name for each
    difference -> (model, baseline). Returns, ready for JSON, ``{"models": {model: {"srcc":
    {"value", "low", "high"}, "plcc": {...}}}, "deltas": {name: {...}}, "resamples", "seed"}``.
    """
    mos = np.asarray(mos, np.float64)
    idx = resample_indices(len(mos), resamples, seed)
    whole = np.arange(len(mos))[None, :]  # the set itself, computed as the resamples are
    samples, values = {}, {}
    for name in preds:
        samples[name] = {
            "srcc": srcc_samples(preds[name], mos, idx),
            "plcc": plcc_samples(mapped[name], mos, idx),
        }
        values[name] = {
            "srcc": float(srcc_samples(preds[name], mos, whole)[0]),
            "plcc": float(plcc_samples(mapped[name], mos, whole)[0]),
        }
    models = {
        name: {m: interval(values[name][m], samples[name][m]).as_dict() for m in ("srcc", "plcc")}
        for name in preds
    }
    deltas = {}
    for label, (a, b) in pairs.items():
        if a in preds and b in preds:
            deltas[label] = {
                m: interval(values[a][m] - values[b][m], samples[a][m] - samples[b][m]).as_dict()
                for m in ("srcc", "plcc")
            }
    return {"models": models, "deltas": deltas, "resamples": resamples, "seed": seed}
