"""The scoring engine's metrics, read back from Ray's own Prometheus endpoint."""

import re
import socket
import time
import urllib.request

import pytest

from fiqa.scoring import ScoreJob, run_score_job

from conftest import labeled_members, write_tar


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_with_metrics():
    import ray

    port = free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 500},
    )
    yield port
    ray.shutdown()


def scrape(port: int, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric on the node's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} ([0-9.e+-]+)$", text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def test_images_scored_rejected_and_shards_reach_prometheus(tmp_path, ray_with_metrics):
    a = write_tar(tmp_path / "a.tar", labeled_members(6) + [("bad.jpg", b"junk")])
    b = write_tar(tmp_path / "b.tar", labeled_members(3, prefix="b"))
    job = ScoreJob(shards=[a, b], out_dir=str(tmp_path / "out"), source="metrics_test")
    stats = run_score_job(job, progress=False)
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
                for labels, v in scrape(ray_with_metrics, name).items()
                if 'source="metrics_test"' in labels
            )
            for name in wanted
        }
        if seen == wanted:
            break
        time.sleep(1)
    assert seen == wanted
    rejected = scrape(ray_with_metrics, "ray_fiqa_images_rejected_total")
    assert any('reason="not_an_image"' in labels for labels in rejected)
    assert any(
        'source="metrics_test"' in labels
        for labels in scrape(ray_with_metrics, "ray_fiqa_images_per_second")
    )
