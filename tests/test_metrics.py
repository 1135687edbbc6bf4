import logging
import math

import numpy as np
import pytest
from scipy import stats

from fiqa.calibration import Logistic4, fit_logistic
from fiqa.metrics import krcc, plcc, quality_metrics, rmse, srcc


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    mos = rng.uniform(1, 5, 300)
    pred = np.tanh((mos - 3) / 1.5) + rng.normal(0, 0.1, 300)  # monotone, non-linear, noisy
    return pred, mos


def test_rank_metrics_match_scipy(pairs):
    pred, mos = pairs
    assert srcc(pred, mos) == pytest.approx(stats.spearmanr(pred, mos)[0])
    assert krcc(pred, mos) == pytest.approx(stats.kendalltau(pred, mos)[0])


def test_plcc_without_fit_matches_scipy(pairs):
    pred, mos = pairs
    assert plcc(pred, mos, fit=False) == pytest.approx(stats.pearsonr(pred, mos)[0])


def test_logistic_fit_improves_plcc_and_rmse(pairs):
    pred, mos = pairs
    assert plcc(pred, mos) > plcc(pred, mos, fit=False)
    mapped = fit_logistic(pred, mos)(pred)
    assert rmse(pred, mos) == pytest.approx(np.sqrt(np.mean((mapped - mos) ** 2)))
    assert rmse(pred, mos) < np.std(mos)


def test_fit_recovers_known_logistic():
    true = Logistic4(b1=5.0, b2=1.0, b3=0.2, b4=0.7)
    x = np.linspace(-3, 3, 400)
    fitted = fit_logistic(x, true(x))
    np.testing.assert_allclose(fitted(x), true(x), atol=1e-3)


def test_logistic_round_trips_through_dict():
    f = Logistic4(4.0, 1.5, 0.1, -0.3)
    assert Logistic4.from_dict(f.to_dict()) == f
    assert f(np.array([0.1]))[0] == pytest.approx((4.0 + 1.5) / 2)


# A step at the last point: least squares chases b4 -> 0 and curve_fit stops at maxfev.
STEP_PRED, STEP_MOS = np.arange(8.0), np.r_[np.zeros(7), 1.0]


def test_fit_that_does_not_converge_says_so_and_warns_once(caplog):
    with caplog.at_level(logging.WARNING, logger="fiqa.calibration"):
        f = fit_logistic(STEP_PRED, STEP_MOS)
    assert not f.converged and "maxfev" in f.reason
    # the fallback is the initial guess: MOS range, centred on the predictions
    assert f == Logistic4(1.0, 0.0, 3.5, float(np.std(STEP_PRED)))
    warned = [r for r in caplog.records if r.name == "fiqa.calibration"]
    assert len(warned) == 1 and "did not converge" in warned[0].getMessage()


def test_converged_fit_says_so(pairs):
    f = fit_logistic(*pairs)
    assert f.converged and f.reason is None


def test_quality_metrics_flag_an_unconverged_fit():
    m = quality_metrics(STEP_PRED, STEP_MOS)
    assert m["logistic_fit"].startswith("failed: ") and "maxfev" in m["logistic_fit"]
    assert m["degenerate"] is None
    # the figures are still there, for the caller to mark: rank ones are unaffected
    assert m["srcc"] == pytest.approx(stats.spearmanr(STEP_PRED, STEP_MOS)[0])
    assert math.isfinite(m["plcc"]) and math.isfinite(m["rmse"])


def test_quality_metrics_flag_a_converged_fit(pairs):
    m = quality_metrics(*pairs)
    assert m["logistic_fit"] == "converged" and m["degenerate"] is None


def test_fit_status_is_not_stored_with_the_calibration():
    """model.json's calibration (and the model ids hashed from it) keeps b1..b4 only."""
    f = Logistic4(1.0, 0.0, 3.5, 2.0, converged=False, reason="x")
    assert f.to_dict() == {"b1": 1.0, "b2": 0.0, "b3": 3.5, "b4": 2.0}
    assert Logistic4.from_dict(f.to_dict()) == f and Logistic4.from_dict(f.to_dict()).converged


@pytest.mark.parametrize(
    "pred, mos, reason",
    [
        (np.ones(10), np.arange(10.0), "constant predictions"),
        (np.arange(10.0), np.full(10, 3.0), "constant targets"),
        (np.arange(3.0), np.arange(3.0), "fewer than 4 pairs (3)"),
        (np.zeros(0), np.zeros(0), "fewer than 4 pairs (0)"),
        (np.r_[np.nan, np.arange(9.0)], np.arange(10.0), "non-finite predictions (1 of 10)"),
        (np.arange(10.0), np.r_[np.arange(9.0), np.inf], "non-finite targets (1 of 10)"),
    ],
)
def test_quality_metrics_degenerate_input_is_nan_with_a_reason(pred, mos, reason, caplog):
    with caplog.at_level(logging.WARNING, logger="fiqa.metrics"):
        m = quality_metrics(pred, mos)
    assert all(math.isnan(m[k]) for k in ("srcc", "plcc", "krcc", "rmse")), m
    assert m["degenerate"] == reason and m["logistic_fit"] == f"failed: {reason}"
    assert m["n"] == len(pred)
    assert reason in caplog.text


def test_quality_metrics_refuse_unpaired_input():
    with pytest.raises(ValueError, match="differ in shape"):
        quality_metrics(np.arange(10.0), np.arange(9.0))


def test_quality_metrics_perfect(pairs):
    _, mos = pairs
    m = quality_metrics(mos * 2 + 1, mos)
    assert m["srcc"] == pytest.approx(1.0)
    assert m["plcc"] == pytest.approx(1.0, abs=1e-6)
    assert m["rmse"] == pytest.approx(0.0, abs=1e-3)
