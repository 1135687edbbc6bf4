"""The scoring actor keeps freed activation memory for the next batch (fiqa.models.allocator).

Counted in page faults, not in seconds: with glibc's default settings every
batch of a small CNN maps fresh pages for its activations (thousands of
faults per batch); in a process that built a `Scorer`, batches reuse them.
Each measure runs in a fresh interpreter, since the settings are process-wide.
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

# Builds a checkpoint; then scores the same Arrow batch 8 times, either through a `Scorer`
# (as the Ray Data actor does, called on this thread or on another) or through the bare
# model, and prints faults per batch.
MEASURE = """
import resource, sys
import numpy as np, torch
from ray.data.block import BlockAccessor
from fiqa.models import create_model, load_checkpoint, save_checkpoint
from fiqa.models.inputs import to_model_input

ckpt, how = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
meta = {"arch": "mobilenetv3_small_100", "image_size": 112, "resize": 128}
save_checkpoint(ckpt, create_model("mobilenetv3_small_100", 112).eval(), meta)
n = 64
pixels = np.random.default_rng(0).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)
batch = BlockAccessor.batch_to_block({
    "key": np.array([f"k{i}" for i in range(n)], dtype=object),
    "reason": np.array([""] * n, dtype=object),
    "pixels": pixels,
})
if how.startswith("scorer"):
    from fiqa.labeling import Scorer
    score = Scorer(ckpt, threads=1)
    if how == "scorer-thread":  # as Ray Data calls it: on a thread started after the actor
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(1)
        call = score
        score = lambda b: pool.submit(call, b).result()
else:
    torch.set_num_threads(1)
    model = load_checkpoint(ckpt).model.eval()
    def score(_):
        with torch.inference_mode():
            return model(to_model_input(torch.from_numpy(pixels)))
score(batch)
score(batch)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    score(batch)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
"""


def faults_per_batch(tmp_path, how: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / how), how],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.strip().splitlines()[-1])


def test_scoring_batches_reuse_their_memory(tmp_path):
    default = faults_per_batch(tmp_path, "bare")
    scorer = faults_per_batch(tmp_path, "scorer")
    # Mapped afresh every batch, the activations of one batch come to over 10,000 pages here.
    assert scorer < 300, f"{scorer:.0f} page faults per batch in a Scorer (default: {default:.0f})"
    assert default > 10 * max(scorer, 100), (
        f"glibc's defaults gave only {default:.0f} faults per batch (Scorer: {scorer:.0f}): "
        "the settings may no longer be needed"
    )


def test_scoring_on_another_thread_reuses_its_memory(tmp_path):
    # Ray Data calls the actor on a thread of its own; glibc would give that thread a heap
    # of its own, deleted or shrunk whenever it empties (hundreds of faults per batch here).
    faults = faults_per_batch(tmp_path, "scorer-thread")
    assert faults < 100, f"{faults:.0f} page faults per batch in a Scorer called on a thread"
