"""benchmarks/label_ratio_sweep.py without the recipe: its regimes, its split plan, its builds'
shared test set (on generated stand-in faces), and its table, JSON and plot from report.json
files written here. No recipe run (the pipeline's own tests run it); the real faces never
enter a test."""

import importlib
import json
import sys
from pathlib import Path

import pytest
from test_benchmarks import _stand_in_faces  # generated faces laid out as the real ones

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import their neighbours as top-level modules
sweep = importlib.import_module("label_ratio_sweep")
rfq = importlib.import_module("real_face_quality")

# Images per identity of ../shared/data/real-faces (24 public figures, 10,240 faces): counts
# only, so the default regimes are checked against the pool they are meant for.
REAL_COUNTS = [22, 66, 71, 109, 157, 169, 240, 252, 258, 261, 283, 435, 443, 491, 493, 496, 558,
               695, 729, 751, 752, 768, 805, 936]  # fmt: skip


def _sources(counts: list[int]) -> list:
    return [
        rfq.Source(f"shard-{i % 20:04d}.tar", f"face{n:06d}", 0, 1, f"id{i:02d}")
        for i, c in enumerate(counts)
        for n in range(sum(counts[:i]), sum(counts[:i]) + c)
    ]


def test_regimes_parse_and_split_the_pool_in_halves():
    r = sweep.parse_regime("250:8000")
    assert (r.labeled, r.pool, r.name, r.ratio, r.pool_per_label) == (
        250,
        8000,
        "l250-p8000",
        "1:32",
        32.0,
    )
    assert r.sizes(1000, 150) == {
        "labeled_train": 250,
        "labeled_val": 150,
        "test": 1000,
        "unlabeled_1": 4000,
        "unlabeled_2": 4000,
    }
    odd = sweep.parse_regime("10:7").sizes(5, 5)
    assert (odd["unlabeled_1"], odd["unlabeled_2"]) == (3, 4)
    defaults = sweep.parse_regimes(list(sweep.DEFAULT_REGIMES))
    assert [r.ratio for r in defaults] == ["1:32", "1:16", "1:4", "1:1"]
    assert max(r.labeled + r.pool for r in defaults) + 1000 + 150 <= 10_240
    for bad in ("250", "a:8000", "0:8000", "250:0", "1:2:3", "-1:5", ""):
        with pytest.raises(ValueError, match="LABELED:POOL"):
            sweep.parse_regime(bad)
    with pytest.raises(ValueError, match="twice"):
        sweep.parse_regimes(["1:2", "1:2"])


def test_default_plan_fits_the_real_pool_with_one_identity_disjoint_test_set():
    sources = _sources(REAL_COUNTS)
    regimes = sweep.parse_regimes(list(sweep.DEFAULT_REGIMES))
    plan = sweep.plan_sweep(sources, regimes, seed=0, test=1000, labeled_val=150)
    assert set(plan["regimes"]) == {r.name for r in regimes}
    assert all(r["unused"] >= 0 for r in plan["regimes"].values())
    assert not set(plan["test_identities"]) & set(plan["labeled_val_identities"])
    # plan_splits itself: test and labeled_val the same images whatever the other sizes ask
    held = []
    for r in regimes:
        split, ids = rfq.plan_splits(sources, r.sizes(1000, 150), 0)
        held.append({s: [x.name for x in split[s]] for s in sweep.HELD_OUT})
        rest = set(ids["labeled_train"]) | set(ids["unlabeled_1"]) | set(ids["unlabeled_2"])
        assert not rest & (set(ids["test"]) | set(ids["labeled_val"])), r.name
        assert len(split["test"]) == 1000 and len(split["labeled_val"]) == 150
    assert all(h == held[0] for h in held)
    # a regime the identities left cannot hold is refused by name, before anything is built
    with pytest.raises(ValueError, match="regime l4000-p6000"):
        sweep.plan_sweep(sources, [sweep.Regime(4000, 6000)], 0, 1000, 150)


def test_builds_share_test_and_val_bytes_and_are_kept_on_a_rerun(tmp_path, monkeypatch):
    faces = tmp_path / "faces"
    _stand_in_faces(faces)  # 120 faces: test takes ada (20), labeled_val bo (15)
    regimes = [sweep.Regime(10, 40), sweep.Regime(40, 40)]
    builds = [tmp_path / "data" / r.name for r in regimes]
    sweep.plan_sweep(rfq.scan_faces(faces), regimes, seed=3, test=20, labeled_val=15)
    for r, data in zip(regimes, builds, strict=True):
        sweep.ensure_build(faces, data, 3, r.sizes(20, 15), workers=1)
    sweep.check_same_splits(builds)
    assert (builds[0] / "test").is_dir() and (builds[0] / "unlabeled_2").is_dir()

    def no_build(*args, **kwargs):
        raise AssertionError("a finished build is built again")

    monkeypatch.setattr(rfq, "build", no_build)
    sweep.ensure_build(faces, builds[0], 3, regimes[0].sizes(20, 15), workers=1)
    with pytest.raises(SystemExit, match="another build"):
        sweep.ensure_build(faces, builds[0], 4, regimes[0].sizes(20, 15), workers=1)
    shard = sorted((builds[1] / "test").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes() + b"\0")
    with pytest.raises(SystemExit, match="differs"):
        sweep.check_same_splits(builds)


def _report(srcc: dict[str, float], intervals: bool = True) -> dict:
    report = {m: {"srcc": v, "plcc": v + 0.01, "gflops": 0.1, "n": 1000} for m, v in srcc.items()}
    if intervals:
        deltas = {}
        for name, (a, b) in sweep.DELTAS.items():
            d = srcc[a] - srcc[b]
            deltas[name] = {
                m: {"value": d, "low": d - 0.01, "high": d + 0.01} for m in ("srcc", "plcc")
            }
        report["intervals"] = {"deltas": deltas, "resamples": 1000, "seed": 0}
    return report


def test_table_json_and_plot_from_the_runs_reports(tmp_path, capsys):
    runs = tmp_path / "runs"
    models = ("teacher", "teacher_plus", "student", "student_labeled_only")
    written = {
        ("l250-p8000", 0): (0.70, 0.72, 0.69, 0.66),
        ("l250-p8000", 1): (0.72, 0.73, 0.71, 0.70),
        ("l4000-p4000", 0): (0.80, 0.80, 0.78, 0.79),  # seed 1 not finished
        ("l500-p8000", 0): (0.75, 0.76, 0.74, 0.72),  # a report from before the intervals
    }
    for (regime, seed), values in written.items():
        path = runs / regime / f"seed-{seed}" / "evaluate" / "report.json"
        path.parent.mkdir(parents=True)
        report = _report(dict(zip(models, values, strict=True)), regime != "l500-p8000")
        path.write_text(json.dumps(report))
    meta = {"identities": {"test": ["ada", "cy"], "labeled_val": ["bo"]}}  # a build's, in part
    (tmp_path / "data" / "l500-p8000").mkdir(parents=True)
    (tmp_path / "data" / "l500-p8000" / "dataset.json").write_text(json.dumps(meta))
    out, md = tmp_path / "plots" / "sweep.png", tmp_path / "table.md"
    rc = sweep.main(
        ["--no-run", "--runs", str(runs), "--regimes", "250:8000", "500:8000", "4000:4000"]
        + ["--seeds", "0", "1", "--out", str(out), "--markdown", str(md)]
        + ["--data", str(tmp_path / "data")]
    )
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figures = json.loads(out.with_suffix(".json").read_text())
    assert figures["held_out"] == {
        "test_identities": ["ada", "cy"],
        "labeled_val_identities": ["bo"],
    }
    low, mid, high = figures["regimes"]
    assert (low["pool_per_label"], mid["pool_per_label"], high["pool_per_label"]) == (32, 16, 1)
    assert low["seeds_done"] == [0, 1] and high["seeds_missing"] == [1]
    d = low["gains"]["distillation"]
    assert d["per_seed"]["0"] == pytest.approx({"value": 0.03, "low": 0.02, "high": 0.04})
    assert (d["mean"], d["n"]) == (pytest.approx(0.02), 2)
    assert d["std"] == pytest.approx(0.0141421, abs=1e-6)  # ddof 1 of 0.03 and 0.01
    assert low["gains"]["self_training"]["mean"] == pytest.approx(0.015)
    assert low["models"]["teacher"]["srcc"] == pytest.approx(0.71)
    assert high["gains"]["distillation"]["per_seed"]["0"]["value"] == pytest.approx(-0.01)
    assert high["gains"]["distillation"]["std"] == 0.0  # one seed
    old = mid["gains"]["distillation"]["per_seed"]["0"]
    assert old["value"] == pytest.approx(0.02) and old["low"] is None

    text = capsys.readouterr().out
    assert "+0.0300 [+0.0200, +0.0400]" in text and "+0.0200 ± 0.0141" in text
    assert "+0.0200 (no interval)" in text
    assert "not finished: l500-p8000 seed(s) [1]; l4000-p4000 seed(s) [1]" in text
    rows = md.read_text().splitlines()
    assert rows[0].startswith("| labeled:pool | pool/label | seed | distillation gain")
    # per regime a row per finished seed and one of the mean: 3 + 2 + 2, after the header
    assert len(rows) == 2 + 7 and rows[2].startswith("| 250:8000 | 32 | 0 | +0.0300")
    assert rows[4].startswith("|  |  | mean ± std (2) | +0.0200 ± 0.0141")
