"""The scoring engine's metrics, read back from Ray's own Prometheus endpoint."""

import json
import os
import pickle
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from ray_cluster import LocalCluster

from fiqa.scoring import ScoreJob

from conftest import labeled_members, write_tar


@pytest.fixture
def cluster():
    """A one-node Ray (2 CPUs) whose metrics agent serves before a driver connects.

    A driver started with its node can give up on a metrics agent still starting (on a
    loaded machine) and never export its metrics."""
    cluster = LocalCluster({**os.environ, "RAY_metrics_report_interval_ms": "500"}, head_cpus=2)
    try:
        cluster.wait_for_metrics("head")
        yield cluster
    finally:
        cluster.stop()


def score_in_a_driver(cluster: LocalCluster, job: ScoreJob) -> dict:
    """``run_score_job(job)`` in a driver process of its own connected to ``cluster``: this
    process may hold an earlier in-process Ray's settings (its auth token)."""
    script = (
        "import json, pickle, sys, ray\n"
        "from fiqa.scoring import run_score_job\n"
        f"ray.init(address={cluster.gcs_address!r})\n"
        "stats = run_score_job(pickle.loads(sys.stdin.buffer.read()), progress=False)\n"
        "print(json.dumps({k: stats[k] for k in ('scored', 'rejected')}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        input=pickle.dumps(job),
        env=cluster.env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def scrape(cluster: LocalCluster, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric on the head's Prometheus endpoint."""
    url = f"http://127.0.0.1:{cluster.metrics_ports['head']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} ([0-9.e+-]+)$", text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def test_images_scored_rejected_and_shards_reach_prometheus(tmp_path, cluster):
    a = write_tar(tmp_path / "a.tar", labeled_members(6) + [("bad.jpg", b"junk")])
    b = write_tar(tmp_path / "b.tar", labeled_members(3, prefix="b"))
    job = ScoreJob(shards=[a, b], out_dir=str(tmp_path / "out"), source="metrics_test")
    stats = score_in_a_driver(cluster, job)
    assert (stats["scored"], stats["rejected"]) == (9, 1)

    wanted = {
        "ray_fiqa_images_scored_total": 9,
        "ray_fiqa_images_rejected_total": 1,
        "ray_fiqa_shards_committed_total": 2,
    }
    deadline, seen = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        seen = {
            name: sum(
                v
                for labels, v in scrape(cluster, name).items()
                if 'source="metrics_test"' in labels
            )
            for name in wanted
        }
        if seen == wanted:
            break
        time.sleep(1)
    exporter = [  # why a driver's metrics would be missing
        line
        for log in Path(cluster.tmp).glob("session_latest/logs/python-core-driver-*.log")
        for line in log.read_text(errors="replace").splitlines()
        if "xporter" in line
    ]
    assert seen == wanted, exporter
    rejected = scrape(cluster, "ray_fiqa_images_rejected_total")
    assert any('reason="not_an_image"' in labels for labels in rejected)
    assert any(
        'source="metrics_test"' in labels
        for labels in scrape(cluster, "ray_fiqa_images_per_second")
    )
