"""Manifests, fingerprints and reruns, with stand-in stages (no Ray needed)."""

import dataclasses

import pytest

from fiqa.config import from_dict
from fiqa.data.shards import ShardSpecError
from fiqa.runner import Stage, run_stages, stage_states

from conftest import labeled_members, write_tar


@pytest.fixture
def setup(tmp_path):
    shards = {}
    for key in ("labeled_train", "labeled_val", "test", "unlabeled_1", "unlabeled_2"):
        shards[key] = write_tar(tmp_path / f"{key}.tar", labeled_members(2))
    calls = []

    def stage(name, sections, data=(), after=()):
        def run(ctx):
            calls.append(name)
            return {"ok": 1}

        return Stage(name, run, sections, data, (), after)

    stages = [
        stage("a", ("train_teacher",), ("labeled_train",)),
        stage("b", ("scoring",), ("unlabeled_1",), ("a",)),
        stage("c", ("distill_student",), (), ("a", "b")),
    ]
    raw = {"run_dir": str(tmp_path / "run"), "data": shards}
    return raw, stages, calls


def test_reruns_skip_and_cascade(setup):
    raw, stages, calls = setup
    assert run_stages(from_dict(raw), stages) == {"a": "ran", "b": "ran", "c": "ran"}
    assert run_stages(from_dict(raw), stages) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    # a change in b's section reruns b and, through b's new output id, c
    out = run_stages(from_dict(raw, ["scoring.views=flip"]), stages)
    assert out == {"a": "skipped", "b": "ran", "c": "ran"}
    assert calls == ["a", "b", "c", "b", "c"]
    cfg = from_dict(raw, ["scoring.views=flip", "distill_student.epochs=2"])
    assert [r["state"] for r in stage_states(cfg, stages)] == ["done", "done", "stale"]
    # a's change: a run would redo a, then b and c with a's new output; status says so
    cfg = from_dict(raw, ["scoring.views=flip", "train_teacher.epochs=2"])
    assert [r["state"] for r in stage_states(cfg, stages)] == ["stale", "stale", "stale"]


def test_how_the_work_runs_is_not_what_it_computes(setup):
    """Fewer actors or a smaller buffer after an out-of-memory error: nothing is redone."""
    raw, stages, calls = setup
    run_stages(from_dict(raw), stages)
    resources = ["scoring.concurrency=3", "scoring.buffer_mb=500", "scoring.batch_size=7"]
    cfg = from_dict(raw, [*resources, "data.unlabeled_1_truth=/elsewhere/truth.csv"])
    assert [r["state"] for r in stage_states(cfg, stages)] == ["done"] * 3
    assert run_stages(cfg, stages) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert calls == ["a", "b", "c"]


def test_a_refused_run_keeps_the_runs_config(setup, tmp_path):
    raw, stages, calls = setup
    fresh = {**raw, "run_dir": str(tmp_path / "fresh")}
    with pytest.raises(ValueError, match="needs stage a"):  # one stage, its upstream not run
        run_stages(from_dict(fresh, ["distill_student.epochs=3"]), stages, only="b")
    assert not (tmp_path / "fresh" / "config.yaml").exists()
    run_stages(from_dict(raw), stages)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    bad = from_dict({**raw, "data": {**raw["data"], "unlabeled_1": "/nonexistent/shard.tar"}})
    with pytest.raises(ShardSpecError, match=r"^data\.unlabeled_1: "):
        run_stages(bad, stages)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved
    assert [r["state"] for r in stage_states(from_dict(raw), stages)] == ["done"] * 3


def test_a_run_fingerprinted_by_an_earlier_version_is_not_redone(setup, tmp_path):
    """Manifests and attempts hashed with every key (before the resource keys were set apart)
    still match the same config: finished stages are kept, and their manifests migrate."""
    import json

    from fiqa.runner import _digest

    raw, stages, calls = setup
    cfg = from_dict(raw, ["scoring.concurrency=3"])  # not at its default: the hashes differ
    run_stages(cfg, stages)
    manifests = {}
    for stage in stages:
        path = tmp_path / "run" / stage.name / "manifest.json"
        m = json.loads(path.read_text())
        m["fingerprint"] = _digest(cfg, stage, m["inputs"], legacy=True)
        path.write_text(json.dumps(m))
        manifests[stage.name] = m
    assert [r["state"] for r in stage_states(cfg, stages)] == ["done"] * 3
    assert run_stages(cfg, stages) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert calls == ["a", "b", "c"]
    for stage in stages:  # b's (the scoring stage's) rewritten as this version hashes it
        m = json.loads((tmp_path / "run" / stage.name / "manifest.json").read_text())
        changed = m["fingerprint"] != manifests[stage.name]["fingerprint"]
        assert (
            changed == (stage.name == "b") and m["output_id"] == manifests[stage.name]["output_id"]
        )
    # a half-done attempt of b from the earlier version keeps what it wrote
    b = tmp_path / "run" / "b"
    (b / "manifest.json").unlink()
    attempt = json.loads((b / "attempt.json").read_text())
    attempt["fingerprint"] = _digest(cfg, stages[1], manifests["b"]["inputs"], legacy=True)
    (b / "attempt.json").write_text(json.dumps(attempt))
    (b / "committed-part").write_text("kept")
    assert run_stages(cfg, stages) == {"a": "skipped", "b": "ran", "c": "ran"}
    assert (b / "committed-part").read_text() == "kept"


def test_changed_input_shard_reruns(setup, tmp_path):
    raw, stages, calls = setup
    run_stages(from_dict(raw), stages)
    write_tar(tmp_path / "unlabeled_1.tar", labeled_members(3))  # new content, same path
    assert run_stages(from_dict(raw), stages) == {"a": "skipped", "b": "ran", "c": "ran"}


def test_missing_shards_fail_before_any_stage_runs(setup):
    raw, stages, calls = setup
    raw["data"]["unlabeled_1"] = "/nonexistent/shard.tar"
    with pytest.raises(ShardSpecError):
        run_stages(from_dict(raw), stages)
    assert calls == []


def test_a_stage_alone_needs_its_upstream(setup):
    raw, stages, calls = setup
    with pytest.raises(ValueError, match="needs stage a"):
        run_stages(from_dict(raw), stages, only="b")
    run_stages(from_dict(raw), stages)
    assert run_stages(from_dict(raw), stages, only="b", force=True) == {"b": "ran"}


def test_a_run_until_a_stage_stops_there_and_the_next_goes_on(setup):
    raw, stages, calls = setup
    assert run_stages(from_dict(raw), stages, until="b") == {"a": "ran", "b": "ran"}
    assert [r["state"] for r in stage_states(from_dict(raw), stages)] == [
        "done",
        "done",
        "pending",
    ]
    assert run_stages(from_dict(raw), stages) == {"a": "skipped", "b": "skipped", "c": "ran"}
    assert calls == ["a", "b", "c"]
    with pytest.raises(ValueError, match="unknown stage 'z'"):
        run_stages(from_dict(raw), stages, until="z")


def test_a_stage_reads_the_shards_listed_and_fingerprinted_at_the_start(setup, tmp_path):
    """A run lists each shard spec once, when it starts; its stages read and fingerprint
    exactly those shards, and one that lands in the pool meanwhile waits for the next run."""
    raw, _, _ = setup
    pool = tmp_path / "pool"
    pool.mkdir()
    write_tar(pool / "p0.tar", labeled_members(2))
    raw["data"]["unlabeled_1"] = str(pool / "*.tar")
    seen = []

    def grow_pool(ctx):  # the first stage: meanwhile a producer adds a shard
        write_tar(pool / "p1.tar", labeled_members(2))
        return {}

    def label_pool(ctx):
        seen.append([u.rsplit("/", 1)[-1] for u in ctx.shards("unlabeled_1")])
        return {}

    stages = [
        Stage("a", grow_pool, ("train_teacher",)),
        Stage("b", label_pool, ("scoring",), ("unlabeled_1",), (), ("a",)),
    ]
    assert run_stages(from_dict(raw), stages) == {"a": "ran", "b": "ran"}
    # the next run sees the new shard, so b's inputs changed and it runs again
    assert run_stages(from_dict(raw), stages) == {"a": "skipped", "b": "ran"}
    assert seen == [["p0.tar"], ["p0.tar", "p1.tar"]]


def test_a_manifest_names_its_fields_honestly_with_iso_times(setup):
    import json
    from datetime import datetime
    from pathlib import Path

    raw, stages, _ = setup
    stages[0] = dataclasses.replace(stages[0], headline=lambda s: f"ok={s['ok']}")
    run_stages(from_dict(raw), stages)
    m = json.loads((Path(raw["run_dir"]) / "a" / "manifest.json").read_text())
    assert m["summary"] == {"ok": 1} and "counts" not in m
    assert m["headline"] == "ok=1"
    started = datetime.fromisoformat(m["started_at"].replace("Z", "+00:00"))
    finished = datetime.fromisoformat(m["finished_at"].replace("Z", "+00:00"))
    assert started <= finished and finished.tzinfo is not None
    rows = stage_states(from_dict(raw), stages)
    assert [r["headline"] for r in rows] == ["ok=1", "", ""]
    assert rows[0]["summary"] == {"ok": 1} and rows[0]["finished_at"] == m["finished_at"]


def test_status_reads_manifests_written_before_summary_and_iso_times(setup):
    import json
    from pathlib import Path

    raw, stages, _ = setup
    stages[0] = dataclasses.replace(stages[0], headline=lambda s: f"ok={s['ok']}")
    run_stages(from_dict(raw), stages)
    path = Path(raw["run_dir"]) / "a" / "manifest.json"
    m = json.loads(path.read_text())
    m["counts"] = m.pop("summary")
    del m["headline"]
    m["finished_at"] = 1764867565.0
    path.write_text(json.dumps(m))
    row = stage_states(from_dict(raw), stages)[0]
    assert row["state"] == "done" and row["headline"] == "ok=1" and row["summary"] == {"ok": 1}
