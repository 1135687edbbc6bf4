"""The multi-node test bed's own tools (`ray_cluster.py`): a node held to a share of a core."""

import resource
import subprocess
import sys
import time

import pytest
from ray_cluster import CpuCap

BUSY = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"


@pytest.mark.skipif(not CpuCap.available(), reason="no writable cgroup CPU controller (not root)")
def test_a_cap_holds_a_process_and_its_children_to_their_share(tmp_path):
    cap = CpuCap(f"fiqa-test-{tmp_path.name}", 0.2)
    try:
        # a parent that spins while its child spins too: both count against one share
        script = (
            f"import subprocess, sys\nc = subprocess.Popen([sys.executable, '-c', {BUSY!r}])\n"
            f"{BUSY}\nc.wait()"
        )
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.time()
        proc = subprocess.Popen([sys.executable, "-c", script], preexec_fn=cap.join)
        proc.wait(timeout=60)
        wall = time.time() - start
        used = resource.getrusage(resource.RUSAGE_CHILDREN)  # of the children waited for
        cpu = used.ru_utime + used.ru_stime - before.ru_utime - before.ru_stime
        # two spinning processes uncapped would use 2x the wall; held, about 0.2x
        assert cpu < 0.35 * wall, (cpu, wall)
        assert cap.throttled() > 0.5
    finally:
        cap.remove()
    assert not cap.path.exists()


def test_a_share_must_be_positive():
    with pytest.raises(ValueError, match="above 0"):
        CpuCap("fiqa-never-made", 0)
