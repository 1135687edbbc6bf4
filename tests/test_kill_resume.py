"""A run killed mid-stage, rerun, completes without redoing finished stages."""

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from conftest import fiqa_cmd, subprocess_env, tiny_config

pytestmark = pytest.mark.slow


def test_kill_during_pseudo_labeling_then_resume(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(tiny_data, run_dir, distill_student={"epochs": 1})
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [*fiqa_cmd(), "run", str(cfg_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=subprocess_env(),
        start_new_session=True,
    )
    attempt = run_dir / "pseudo_label_1" / "attempt.json"
    deadline = time.time() + 600
    try:
        while not attempt.exists():
            assert proc.poll() is None, "the run ended before pseudo_label_1 started"
            assert time.time() < deadline, "pseudo_label_1 never started"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
        proc.wait()
    teacher = json.loads((run_dir / "train_teacher" / "manifest.json").read_text())
    assert not (run_dir / "pseudo_label_1" / "manifest.json").exists()

    status = subprocess.run(
        [*fiqa_cmd(), "status", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        check=True,
    )
    states = {r["stage"]: r["state"] for r in json.loads(status.stdout)}
    assert states["train_teacher"] == "done" and states["pseudo_label_1"] == "partial"

    rerun = subprocess.run(
        [*fiqa_cmd(), "run", str(cfg_path)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=900,
    )
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    assert "ran 5 stage(s)" in rerun.stdout
    again = json.loads((run_dir / "train_teacher" / "manifest.json").read_text())
    assert again["output_id"] == teacher["output_id"]  # the finished stage was not redone
    assert (run_dir / "evaluate" / "report.json").exists()
