"""Pseudo-labels over several views (``scoring.views``) and the confidence they carry.

A score averaged over flips and crops, its spread on the MOS scale in ``score_spread``, and
training's weight of a pseudo-label by that spread (``train.spread_weighting``).
"""

import numpy as np
import pyarrow as pa
import pytest
import test_device_decode
import torch
from test_device_decode import faces

from fiqa.calibration import Logistic4, spread_on_mos_scale
from fiqa.config import ConfigError, ScoringConfig, check_scoring_config
from fiqa.data.decode import decode_image
from fiqa.data.tables import SCORED_SCHEMA, write_part
from fiqa.scoring.scorer import Scorer, views_of
from fiqa.training.data import decode_train_batch, spread_weight, table_stats

from conftest import write_tar

checkpoint = test_device_decode.checkpoint  # the fixture: a small resnet10t at 64 px of 72


def test_views_are_the_training_crops_extremes_and_their_mirror_images():
    x = torch.arange(2 * 72 * 72 * 3, dtype=torch.int64).reshape(2, 72, 72, 3)
    assert [v.shape for v in views_of(x[:, 4:68, 4:68], 64, "center")] == [(2, 64, 64, 3)]
    flip = views_of(x[:, :64, :64], 64, "flip")
    assert len(flip) == 2 and torch.equal(flip[1], x[:, :64, :64].flip(2))
    crops = views_of(x, 64, "crops")
    assert len(crops) == 10 and all(v.shape == (2, 64, 64, 3) for v in crops)
    assert torch.equal(crops[0], x[:, 4:68, 4:68])  # the centre crop comes first
    assert torch.equal(crops[1], x[:, :64, :64]) and torch.equal(crops[4], x[:, 8:, 8:])
    assert torch.equal(crops[3], x[:, 8:, :64]) and torch.equal(crops[2], x[:, :64, 8:])
    assert all(torch.equal(crops[5 + i], crops[i].flip(2)) for i in range(5))


def test_a_score_is_the_mean_of_its_views_and_its_spread_their_deviation(checkpoint):
    x = torch.from_numpy(np.stack([decode_image(d, 72, crop=72) for d in faces(12)]))
    single = Scorer(checkpoint)
    each = np.stack([single.score(v) for v in views_of(x, 64, "crops")])
    mean, spread = Scorer(checkpoint, views="crops").score_views(x)
    np.testing.assert_allclose(mean, each.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(spread, each.std(axis=0), rtol=1e-5, atol=1e-6)
    assert (spread > 0).all()
    centre, none = single.score_views(x[:, 4:68, 4:68])
    np.testing.assert_allclose(centre, each[0], rtol=1e-6, atol=1e-6)
    assert np.isnan(none).all()


def test_a_spread_reaches_the_mos_scale_through_the_logistics_slope():
    f = Logistic4(5.0, 1.0, 0.3, 0.7)
    x = np.linspace(-2, 2, 9)
    numeric = (f(x + 1e-6) - f(x - 1e-6)) / 2e-6
    np.testing.assert_allclose(f.slope(x), numeric, rtol=1e-5)
    mos = np.array([np.nan, 3.0, np.nan])
    got = spread_on_mos_scale(mos, np.array([0.0, 0.1, 1.0]), np.array([0.2, 0.2, np.nan]), f)
    assert got[0] == pytest.approx(0.2 * f.slope(0.0)) and np.isnan(got[1:]).all()
    np.testing.assert_array_equal(spread_on_mos_scale(mos[:1], [0.0], [0.2], None), [0.2])


def test_a_pseudo_label_counts_less_the_more_its_views_disagree():
    w = spread_weight(np.array([0.0, 0.5, 1.0, 3.0, np.nan]), scale=1.0)
    np.testing.assert_allclose(w, [1.0, 0.8, 0.5, 0.1, 1.0], rtol=1e-6)
    jpeg = faces(1)[0]
    batch = {
        "image": np.array([jpeg] * 3, dtype=object),
        "score": np.array([3.0, 2.0, 4.0]),
        "source": np.array(["labeled", "pseudo_u1", "pseudo_u1"], dtype=object),
        "score_spread": np.array([np.nan, 0.2, 0.4]),
    }
    out = decode_train_batch(
        batch, 72, 64, {"pseudo_u1": 0.5}, {"labeled": 0, "pseudo_u1": 1}, True, 0.2
    )
    np.testing.assert_allclose(out["weight"], [1.0, 0.25, 0.1], rtol=1e-6)


def test_table_stats_give_the_rms_spread_of_the_rows_that_have_one(tmp_path):
    table = pa.table(
        {
            "key": ["a", "b", "c"],
            "shard": ["s"] * 3,
            "image": [b""] * 3,
            "mos": [3.0, None, None],
            "raw_score": [None, 0.1, 0.2],
            "score": [3.0, 2.0, 4.0],
            "score_spread": [None, 0.3, 0.4],
            "model_id": ["m"] * 3,
            "source": ["labeled", "pseudo_u1", "pseudo_u1"],
        },
        schema=SCORED_SCHEMA,
    )
    write_part(table, str(tmp_path / "t"), "p.parquet")
    assert table_stats([str(tmp_path / "t")]).spread_rms == pytest.approx(np.sqrt(0.125))
    one_view = table.set_column(6, "score_spread", pa.nulls(3, pa.float32()))
    write_part(one_view, str(tmp_path / "u"), "p.parquet")
    assert table_stats([str(tmp_path / "u")]).spread_rms is None


def test_an_unknown_view_is_refused_by_name():
    with pytest.raises(ConfigError, match="scoring.views: one of center, flip, crops"):
        check_scoring_config(ScoringConfig(views="tencrop"), "scoring")


@pytest.mark.slow
def test_fiqa_label_writes_the_spread_of_each_pseudo_label(checkpoint, tmp_path):
    """`fiqa label`'s engine on a local Ray: ``center`` and ``crops`` on the same shards."""
    import ray

    from fiqa.cli.label import label_shards
    from fiqa.data.tables import read_table

    members = [(f"face{i:03d}.jpg", d) for i, d in enumerate(faces(48))]
    shards = [write_tar(tmp_path / f"pool-{i}.tar", members[i::2]) for i in range(2)]
    tables = {}
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        for views in ("center", "crops"):
            out = str(tmp_path / views)
            scoring = ScoringConfig(batch_size=16, num_cpus=1, views=views)
            assert label_shards(checkpoint, shards, out, scoring, progress=False)["scored"] == 48
            tables[views] = read_table(f"{out}/labels").sort_by("key")
        with pytest.raises(ConfigError, match="views center"):
            label_shards(checkpoint, shards, out, ScoringConfig(batch_size=16), progress=False)
    finally:
        ray.shutdown()
    centre, crops = tables["center"], tables["crops"]
    assert centre.column("score_spread").null_count == 48
    spread = crops.column("score_spread").to_numpy()
    assert np.isfinite(spread).all() and (spread > 0).all()
    # The mean over ten views stays near the centre crop's score (raw scale: no calibration).
    a, b = centre.column("raw_score").to_numpy(), crops.column("raw_score").to_numpy()
    assert np.corrcoef(a, b)[0, 1] > 0.9


def test_the_report_says_whether_the_spread_finds_the_bad_labels():
    from fiqa.pipelines.evaluate import confidence

    rng = np.random.default_rng(0)
    truth = rng.uniform(1, 5, 2000)
    spread = rng.uniform(0.05, 1.0, 2000)
    got = confidence(truth + rng.normal(0, 1, 2000) * spread, spread, truth)
    assert got["srcc_spread_error"] > 0.3 and got["spread_mean"] == pytest.approx(spread.mean())
    rmse = got["rmse_by_spread_quartile"]
    assert len(rmse) == 4 and rmse == sorted(rmse) and rmse[3] > 3 * rmse[0]
