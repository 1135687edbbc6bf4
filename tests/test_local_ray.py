"""A run with no ``ray.address`` starts a Ray of its own, whatever an earlier one left."""

import os
import subprocess
import sys
import tempfile

import pytest

START = """
import ray
from fiqa.cluster.local import ensure_ray
from fiqa.config import RayConfig
ensure_ray(RayConfig(num_cpus=1))
print("CPU", ray.cluster_resources()["CPU"])
ray.shutdown()
"""


@pytest.mark.slow
def test_a_stale_address_file_of_a_killed_ray_start_is_ignored():
    # Ray's temp folder of its own (short: Ray's socket paths must fit 107 bytes), holding the
    # address file a `ray start --head` killed rather than stopped leaves behind.
    with tempfile.TemporaryDirectory(prefix="fr", dir="/tmp") as tmp:
        os.makedirs(f"{tmp}/ray")
        with open(f"{tmp}/ray/ray_current_cluster", "w") as f:
            f.write("127.0.0.1:9")  # nothing listens there
        env = {**os.environ, "RAY_TMPDIR": tmp}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(
            [sys.executable, "-c", START], env=env, capture_output=True, text=True, timeout=180
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU 1.0" in proc.stdout
