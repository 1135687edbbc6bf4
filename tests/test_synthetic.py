import csv
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from fiqa.data.synthetic import DISTORTION_WEIGHTS, make_demo_data, make_sample, mos_formula


def test_samples_are_deterministic_and_seed_dependent():
    a, b = make_sample(3, "test", 7), make_sample(3, "test", 7)
    assert a.jpeg == b.jpeg and a.mos == b.mos
    assert make_sample(4, "test", 7).jpeg != a.jpeg
    img = Image.open(io.BytesIO(a.jpeg))
    assert img.size == (112, 112) and img.mode == "RGB"


def test_mos_formula_is_monotone_in_severity():
    assert mos_formula({}, 0.0, 0.0) == 5.0
    for name in DISTORTION_WEIGHTS:
        scores = [mos_formula({name: s}, 0.0, 0.0) for s in (0.0, 0.3, 0.6, 1.0)]
        assert scores == sorted(scores, reverse=True)
    assert mos_formula({}, 0.35, 20.0) < mos_formula({}, 0.0, 0.0)


def test_labels_span_the_scale():
    mos = np.array([make_sample(0, "labeled_train", i).mos for i in range(200)])
    assert 1.0 <= mos.min() < 2.5 and 4.0 < mos.max() <= 5.0
    assert mos.std() > 0.6


def test_make_demo_data_layout(tmp_path):
    sizes = {"labeled_train": 10, "labeled_val": 4, "test": 4, "unlabeled_1": 7, "unlabeled_2": 3}
    summary = make_demo_data(tmp_path, seed=5, sizes=sizes, shard_size=4, workers=1)
    assert summary["sizes"] == sizes
    assert len(list((tmp_path / "labeled_train").glob("*.tar"))) == 3
    with tarfile.open(next((tmp_path / "unlabeled_1").glob("*000000.tar"))) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile([n for n in names if n.endswith(".json")][0]).read())
    assert "mos" not in meta  # unlabeled pools carry no label ...
    with open(tmp_path / "ground_truth" / "unlabeled_1.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and all(1 <= float(r["mos"]) <= 5 for r in rows)  # ... it is kept aside
    with tarfile.open(next((tmp_path / "labeled_train").glob("*000000.tar"))) as tar:
        meta = json.loads(
            tar.extractfile([n for n in tar.getnames() if n.endswith(".json")][0]).read()
        )
    assert 1 <= meta["mos"] <= 5


def test_same_bytes_whatever_the_number_of_workers(tmp_path):
    sizes = {"labeled_train": 6, "labeled_val": 2, "test": 2, "unlabeled_1": 2, "unlabeled_2": 2}
    make_demo_data(tmp_path / "a", sizes=sizes, shard_size=3, workers=1)
    make_demo_data(tmp_path / "b", sizes=sizes, shard_size=3, workers=2)
    for p in (tmp_path / "a").rglob("*.tar"):
        q = tmp_path / "b" / p.relative_to(tmp_path / "a")
        with tarfile.open(p) as ta, tarfile.open(q) as tb:
            assert [ta.extractfile(m).read() for m in ta] == [tb.extractfile(m).read() for m in tb]


def test_a_bucket_or_a_file_as_out_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """pathlib once turned s3://b/x into a local ./s3:/b/x, and webdataset then failed in it."""
    monkeypatch.chdir(tmp_path)
    sizes = {"labeled_train": 1, "labeled_val": 1, "test": 1, "unlabeled_1": 1, "unlabeled_2": 1}
    with pytest.raises(ValueError, match=r"'s3://bucket/x': shards are written to a local dir"):
        make_demo_data("s3://bucket/x", sizes=sizes, workers=1)
    with pytest.raises(ValueError, match="'gs://b/x'.*aws s3 sync DIR s3://BUCKET/PREFIX"):
        make_demo_data("gs://b/x", sizes=sizes, workers=1)
    (tmp_path / "taken").write_text("")
    with pytest.raises(ValueError, match="'taken' is a file; give a directory"):
        make_demo_data("taken", sizes=sizes, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    summary = make_demo_data(f"file://{tmp_path}/demo", sizes=sizes, shard_size=1, workers=1)
    assert summary["sizes"] == sizes and (tmp_path / "demo" / "dataset.json").is_file()
