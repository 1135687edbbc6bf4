"""The whole recipe through a real local Ray, on tiny data: every stage, a kill and its resume,
reruns, and a single stage."""

import hashlib
import json
import os
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest
import yaml

from fiqa.data.tables import list_parts
from fiqa.pipelines.evaluate import MODELS

from conftest import fiqa_cmd, subprocess_env, tiny_config

pytestmark = pytest.mark.slow

STAGES = [
    "train_teacher",
    "pseudo_label_1",
    "train_teacher_plus",
    "pseudo_label_2",
    "distill_student",
    "evaluate",
]


def fiqa(*args, timeout=900):
    proc = subprocess.run(
        [*fiqa_cmd(), *args], capture_output=True, text=True, timeout=timeout, env=subprocess_env()
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def run_until_killed_in(stage: str, cfg_path, run_dir) -> None:
    """Start `fiqa run`, SIGKILL the driver and every Ray process it started once `stage` began."""
    proc = subprocess.Popen(
        [*fiqa_cmd(), "run", str(cfg_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=subprocess_env(),
        start_new_session=True,
    )
    attempt = run_dir / stage / "attempt.json"
    deadline = time.time() + 600
    try:
        while not attempt.exists():
            assert proc.poll() is None, f"the run ended before {stage} started"
            assert time.time() < deadline, f"{stage} never started"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """One run, killed during pseudo_label_1 and rerun: the tests below check what it made."""
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    cfg_path = run_dir.parent / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(tiny_data, run_dir)))
    run_until_killed_in("pseudo_label_1", cfg_path, run_dir)
    killed = {
        "teacher_output_id": manifest(run_dir, "train_teacher")["output_id"],
        "status": json.loads(fiqa("status", str(run_dir), "--json").stdout),
        "pl1_manifest": (run_dir / "pseudo_label_1" / "manifest.json").exists(),
    }
    proc = fiqa("run", str(cfg_path))
    return {"cfg": cfg_path, "run_dir": run_dir, "data": tiny_data, "out": proc.stdout, **killed}


def manifest(run_dir, stage):
    return json.loads((run_dir / stage / "manifest.json").read_text())


def test_a_run_killed_mid_stage_resumes_without_redoing_finished_stages(finished_run):
    states = {r["stage"]: r["state"] for r in finished_run["status"]}
    assert states["train_teacher"] == "done" and states["pseudo_label_1"] == "partial"
    assert not finished_run["pl1_manifest"]
    assert "ran 5 stage(s)" in finished_run["out"]
    again = manifest(finished_run["run_dir"], "train_teacher")["output_id"]
    assert again == finished_run["teacher_output_id"]  # the finished stage was not redone


def test_every_stage_ran_and_wrote_its_manifest(finished_run):
    for stage in STAGES:
        m = manifest(finished_run["run_dir"], stage)
        assert m["stage"] == stage and m["fingerprint"] and m["seconds"] > 0
    assert "report: " in finished_run["out"]


def test_labeled_tables_account_for_every_sample(finished_run):
    m = manifest(finished_run["run_dir"], "train_teacher")["summary"]
    assert m["labeled_train"]["scored"] + m["labeled_train"]["rejected"] == 256
    assert m["labeled_val"]["scored"] == 64
    assert m["training"]["epochs"] == 2


def test_pseudo_label_tables(finished_run):
    run_dir = finished_run["run_dir"]
    for stage, source in (("pseudo_label_1", "pseudo_u1"), ("pseudo_label_2", "pseudo_u2")):
        parts = list_parts(str(run_dir / stage / "labels"))
        assert len(parts) == 3  # one part per input shard
        table = pq.read_table(parts)
        assert table.num_rows == 192
        assert set(table.column_names) >= {
            "key",
            "shard",
            "image",
            "raw_score",
            "score",
            "model_id",
        }
        assert set(table.column("source").to_pylist()) == {source}
        assert table.column("key").null_count == 0 and table.column("score").null_count == 0
        assert len(set(table.column("key").to_pylist())) == 192
        assert pq.read_table(list_parts(str(run_dir / stage / "rejects"))).num_rows == 0


def test_models_and_histories(finished_run):
    run_dir = finished_run["run_dir"]
    for sub in (
        "train_teacher",
        "train_teacher_plus",
        "distill_student/student",
        "distill_student/student_labeled_only",
    ):
        meta = json.loads((run_dir / sub / "model" / "model.json").read_text())
        assert meta["calibration"] and set(meta["calibration"]) == {"b1", "b2", "b3", "b4"}
        assert json.loads((run_dir / sub / "history.json").read_text())


def test_report(finished_run):
    ev = finished_run["run_dir"] / "evaluate"
    report = json.loads((ev / "report.json").read_text())
    for model in ("teacher", "teacher_plus", "student", "student_labeled_only"):
        r = report[model]
        for k in ("srcc", "plcc", "krcc", "rmse", "gflops", "params_m"):
            assert isinstance(r[k], float), (model, k)
        assert -1 <= r["srcc"] <= 1 and r["n"] == 64
        weights = finished_run["run_dir"] / MODELS[model] / "model" / "model.safetensors"
        assert r["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert report["student"]["gflops"] < report["teacher"]["gflops"]
    for pool, round_, by in (
        ("unlabeled_1", 1, "train_teacher"),
        ("unlabeled_2", 2, "train_teacher_plus"),
    ):
        p = report["pseudo_label"][pool]
        assert p["labeled"] == 192 and p["rejected"] == 0
        assert "srcc" in p["agreement"]
        # provenance: every row names the model that labeled it
        assert (p["round"], p["labeled_by"]) == (round_, by)
        assert len(p["model_ids"]) == 1 and p["model_ids"][0].startswith(f"{by}:")
    # the labeled-only ablation takes exactly as many optimizer steps as the distilled student
    steps = {m: report[m]["optimizer_steps"] for m in ("student", "student_labeled_only")}
    assert steps["student"] == steps["student_labeled_only"], steps
    for png in ("pred_vs_mos.png", "pseudo_label_hist.png", "training_curves.png"):
        assert (ev / "plots" / png).stat().st_size > 5000
    md = (ev / "report.md").read_text()
    assert "| teacher |" in md
    assert "unlabeled_2 was pseudo-labeled by train_teacher_plus in the run's labeling pass 2" in md


def test_rerun_of_a_finished_run_does_no_work(finished_run):
    before = {s: manifest(finished_run["run_dir"], s)["output_id"] for s in STAGES}
    t0 = time.time()
    proc = fiqa("run", str(finished_run["cfg"]))
    assert time.time() - t0 < 60
    assert "ran 0 stage(s)" in proc.stdout
    assert {s: manifest(finished_run["run_dir"], s)["output_id"] for s in STAGES} == before


def test_status(finished_run):
    proc = fiqa("status", str(finished_run["run_dir"]), "--json")
    assert [r["state"] for r in json.loads(proc.stdout)] == ["done"] * 6


def test_changed_config_reruns_that_stage_and_those_after_it(finished_run):
    """A second self-training round: the teacher and PL(U1) are reused, round 2 relabels U1
    with round 1's teacher-plus, and the student and the report follow round 2; without the
    labeled-only student this time, which the report then does not judge against."""
    run_dir = finished_run["run_dir"]
    before = {s: manifest(run_dir, s)["output_id"] for s in STAGES}
    proc = fiqa(
        "run",
        str(finished_run["cfg"]),
        "--set",
        "train_teacher_plus.rounds=2",
        "--set",
        "distill_student.labeled_only_baseline=false",
    )
    assert "ran 4 stage(s) (train_teacher_plus, pseudo_label_2, distill_student, evaluate)" in (
        proc.stdout
    )
    after = {s: manifest(run_dir, s)["output_id"] for s in STAGES}
    assert [s for s in STAGES if after[s] != before[s]] == STAGES[2:]
    # the override is now the run's config; status sees the original config file as stale
    status = json.loads(fiqa("status", str(run_dir), "--json").stdout)
    assert [r["state"] for r in status] == ["done"] * 6

    tp = run_dir / "train_teacher_plus"
    assert (tp / "round_1" / "model" / "model.json").exists() and (tp / "model").exists()
    relabeled = pq.read_table(list_parts(str(tp / "round_2" / "labels")))
    round_1_id = set(relabeled.column("model_id").to_pylist())
    assert relabeled.num_rows == 192 and len(round_1_id) == 1
    assert next(iter(round_1_id)).startswith("train_teacher_plus/round_1:")
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    u1 = report["pseudo_label"]["unlabeled_1"]
    assert (u1["round"], u1["labeled_by"]) == (2, "train_teacher_plus round 1")
    assert set(u1["model_ids"]) == round_1_id
    assert report["pseudo_label"]["unlabeled_2"]["round"] == 3
    rounds = report["self_training"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["labeled_by"].startswith("train_teacher:")
    assert all("srcc" in r["pseudo_u1_agreement"] and "srcc" in r["val"] for r in rounds)
    md = (run_dir / "evaluate" / "report.md").read_text()
    assert "Self-training round 2: U1 labeled by train_teacher_plus/round_1:" in md
    assert "student_labeled_only" not in report and "Distillation: not judged" in md


def test_single_stage_alone(finished_run):
    before = manifest(finished_run["run_dir"], "pseudo_label_2")["output_id"]
    proc = fiqa(
        "stage",
        "pseudo_label_2",
        str(finished_run["cfg"]),
        "--force",
        "--set",
        "train_teacher_plus.rounds=2",
    )
    assert "ran 1 stage(s) (pseudo_label_2)" in proc.stdout
    assert manifest(finished_run["run_dir"], "pseudo_label_2")["output_id"] != before
