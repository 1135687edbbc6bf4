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


def test_quality_metrics_degenerate_predictions_do_not_crash():
    m = quality_metrics(np.ones(10), np.arange(10.0))
    assert m["srcc"] == 0.0 and m["n"] == 10


def test_quality_metrics_perfect(pairs):
    _, mos = pairs
    m = quality_metrics(mos * 2 + 1, mos)
    assert m["srcc"] == pytest.approx(1.0)
    assert m["plcc"] == pytest.approx(1.0, abs=1e-6)
    assert m["rmse"] == pytest.approx(0.0, abs=1e-3)
