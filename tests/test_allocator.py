"""The scoring actor keeps freed activation memory for the next batch (fiqa.models.allocator).

Counted in page faults, not in seconds: with glibc's default settings every
batch of a small CNN maps fresh pages for its activations (thousands of
faults per batch); in a process that built a `Scorer`, batches reuse them,
and threads that allocate at once share that one heap rather than getting
heaps of their own. Each measure runs in a fresh interpreter, since the
settings are process-wide.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from conftest import subprocess_env

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the malloc settings are glibc's",
)

# Builds a checkpoint; then scores the same Arrow batch 9 times, either through a `Scorer`
# (as the Ray Data actor does) or through the bare model, and prints the median faults
# per batch (now and then one batch grows the heap once, by a few thousand pages: steady
# state is what counts).
MEASURE = """
import resource, sys
import numpy as np, torch
from ray.data.block import BlockAccessor
from fiqa.models import create_model, load_checkpoint, save_checkpoint
from fiqa.models.inputs import to_model_input

ckpt, how, arch = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
meta = {"arch": arch, "image_size": 112, "resize": 128}
save_checkpoint(ckpt, create_model(arch, 112).eval(), meta)
n = 64
pixels = np.random.default_rng(0).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)
batch = BlockAccessor.batch_to_block({
    "key": np.array([f"k{i}" for i in range(n)], dtype=object),
    "reason": np.array([""] * n, dtype=object),
    "pixels": pixels,
})
if how == "scorer":
    from fiqa.scoring.scorer import Scorer
    score = Scorer(ckpt, threads=1)
else:
    torch.set_num_threads(1)
    model = load_checkpoint(ckpt).model.eval()
    def score(_):
        with torch.inference_mode():
            return model(to_model_input(torch.from_numpy(pixels)))
score(batch)
score(batch)
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    score(batch)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[len(faults) // 2])  # the median: one batch's one-off heap growth aside
"""


def last_line(script: str, *args: str) -> str:
    """What ``script`` printed last, run in a fresh interpreter (the settings are process-wide)."""
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def faults_per_batch(tmp_path, how: str, arch: str) -> float:
    return float(last_line(MEASURE, str(tmp_path / how), how, arch))


# The student's activations are small blocks; the teacher's include blocks over the largest
# mmap threshold glibc allows (32 MiB: one conv output at batch 64 is 51 MB), which only the
# no-mmap setting keeps in the heap.
@pytest.mark.parametrize("arch", ["mobilenetv3_small_100", "resnet10t"])
def test_scoring_batches_reuse_their_memory(tmp_path, arch):
    default = faults_per_batch(tmp_path, "bare", arch)
    scorer = faults_per_batch(tmp_path, "scorer", arch)
    # Mapped afresh every batch, the activations of one batch come to over 10,000 pages here.
    assert scorer < 300, f"{scorer:.0f} page faults per batch in a Scorer (default: {default:.0f})"
    assert default > 10 * max(scorer, 100), (
        f"glibc's defaults gave only {default:.0f} faults per batch (Scorer: {scorer:.0f}): "
        "the settings may no longer be needed"
    )


# Eight threads allocate and free at once (ctypes releases the GIL, so they contend for the
# heap's lock, as Ray's threads and the one Ray Data calls the actor on do); prints how many
# heaps (arenas) glibc's malloc_info then reports.
ARENAS = """
import ctypes, os, re, sys, tempfile, threading

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
if sys.argv[1] == "settings":
    from fiqa.models.allocator import retain_freed_memory
    assert retain_freed_memory()

def churn():
    for _ in range(20000):
        libc.free(ctypes.c_void_p(libc.malloc(4096)))

threads = [threading.Thread(target=churn) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
fd, path = tempfile.mkstemp()
os.close(fd)
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(f))
libc.fclose(ctypes.c_void_p(f))
with open(path) as report:
    print(len(re.findall("<heap nr=", report.read())))
os.remove(path)
"""


def arenas(settings: str) -> int:
    return int(last_line(ARENAS, settings))


def test_threads_share_one_heap():
    # With glibc's defaults, a thread that meets a locked heap gets a heap of its own, which
    # glibc deletes or shrinks whenever it empties, whatever the main heap's settings: the
    # demo student's scoring actor then took 13,000 to 26,000 page faults a second.
    default = arenas("default")
    shared = arenas("settings")
    assert shared == 1, f"{shared} heaps after retain_freed_memory (glibc's defaults: {default})"
    assert default > 1, "with glibc's defaults the threads shared one heap: the setting may be moot"
