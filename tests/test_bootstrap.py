"""Bootstrap intervals: reproducible from a seed, centred on the whole-set statistic, paired."""

import numpy as np
from scipy import stats

from fiqa.bootstrap import interval, model_intervals, resample_indices, srcc_samples
from fiqa.calibration import fit_logistic


def _models(n=300, seed=0):
    rng = np.random.default_rng(seed)
    mos = rng.uniform(1, 5, n)
    good = mos + rng.normal(0, 0.3, n)
    poor = mos + rng.normal(0, 2.0, n)
    return mos, {"good": good, "poor": poor, "good_again": good.copy()}


def _intervals(mos, preds, seed=7, resamples=300):
    mapped = {k: fit_logistic(v, mos)(v) for k, v in preds.items()}
    pairs = {"good-poor": ("good", "poor"), "same": ("good_again", "good")}
    return model_intervals(preds, mapped, mos, pairs, resamples=resamples, seed=seed)


def test_the_same_seed_gives_the_same_intervals_and_another_seed_others():
    mos, preds = _models()
    a, b, c = _intervals(mos, preds), _intervals(mos, preds), _intervals(mos, preds, seed=8)
    assert a == b
    assert a["models"]["good"]["srcc"] != c["models"]["good"]["srcc"]
    assert a["seed"] == 7 and a["resamples"] == 300


def test_intervals_hold_the_whole_set_statistic():
    mos, preds = _models()
    r = _intervals(mos, preds)
    for name in preds:
        for metric in ("srcc", "plcc"):
            d = r["models"][name][metric]
            assert d["low"] <= d["value"] <= d["high"] and d["low"] < d["high"]
    assert np.isclose(r["models"]["poor"]["srcc"]["value"], stats.spearmanr(preds["poor"], mos)[0])


def test_paired_differences_tell_a_real_gap_from_none():
    mos, preds = _models()
    r = _intervals(mos, preds)
    gap = r["deltas"]["good-poor"]["srcc"]
    assert gap["low"] > 0  # a clear gap: the interval excludes 0
    same = r["deltas"]["same"]["srcc"]
    assert same["low"] == same["high"] == same["value"] == 0  # paired: identical models cancel


def test_a_resample_srcc_is_spearman_on_those_images():
    rng = np.random.default_rng(3)
    pred, mos = rng.normal(size=50), rng.normal(size=50)
    idx = resample_indices(50, resamples=4, seed=1)
    got = srcc_samples(pred, mos, idx)
    want = [stats.spearmanr(pred[i], mos[i])[0] for i in idx]
    assert np.allclose(got, want)


def test_within_noise_when_the_interval_contains_zero():
    assert interval(0.01, np.array([-0.02, 0.0, 0.03])).within_noise
    assert not interval(0.05, np.array([0.01, 0.04, 0.09])).within_noise
