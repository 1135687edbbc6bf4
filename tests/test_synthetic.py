import csv
import io
import json
import tarfile

import numpy as np
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
