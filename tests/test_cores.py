"""Cores of their own for CPU scoring actors: claims between real processes, and the masks."""

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from fiqa.cluster import cores

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="claiming a core needs 2 or more cores"
)

# A process that starts a thread, claims N cores, reports its cores and every thread's mask,
# then holds the claim until its stdin closes.
HOLDER = textwrap.dedent(
    """
    import json, os, sys, threading
    from fiqa.cluster import cores
    started = threading.Event()
    threading.Thread(target=lambda: (started.set(), sys.stdin.read()), daemon=True).start()
    started.wait()
    got = cores.claim(int(sys.argv[1]))
    masks = [sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")]
    print(json.dumps({"cores": got, "masks": masks}), flush=True)
    sys.stdin.read()
    """
)


def start_holder(n: int):
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return p, json.loads(p.stdout.readline())


def stop(p) -> None:
    p.stdin.close()
    p.wait(timeout=30)


def test_a_claim_pins_every_thread_and_ends_with_its_process():
    everything = sorted(os.sched_getaffinity(0))
    p, got = start_holder(1)
    try:
        assert got["cores"] == [everything[-1]]  # highest number first
        assert all(m == got["cores"] for m in got["masks"])  # the thread started before, too
        assert cores.claimed_cores() == set(got["cores"])
    finally:
        stop(p)
    assert cores.claimed_cores() == set()  # the kernel released the lock with the process


def test_claims_never_overlap_and_always_leave_a_core_unclaimed():
    everything = os.sched_getaffinity(0)
    holders, claimed = [], []
    try:
        for _ in range(len(everything)):
            p, got = start_holder(1)
            holders.append(p)
            if got["cores"] is not None:
                claimed += got["cores"]
            else:  # unpinned: the mask it started with
                assert all(set(m) == everything for m in got["masks"])
        assert len(claimed) == len(set(claimed)) == len(everything) - 1
    finally:
        for p in holders:
            stop(p)


def test_more_cores_than_are_free_is_no_claim():
    p, got = start_holder(len(os.sched_getaffinity(0)))
    try:
        assert got["cores"] is None
        assert cores.claimed_cores() == set()
    finally:
        stop(p)


def test_work_off_claimed_cores_then_back_on_all_of_them():
    everything = os.sched_getaffinity(0)
    with cores.off_claimed_cores() as used:
        assert used == everything  # nothing claimed: nothing changes
    p, got = start_holder(1)
    try:
        seen = {}
        with cores.off_claimed_cores() as used:
            assert used == everything - set(got["cores"])
            t = threading.Thread(target=lambda: seen.update(mask=os.sched_getaffinity(0)))
            t.start()
            t.join()
            assert os.sched_getaffinity(0) == used
        assert seen["mask"] == used  # a thread started meanwhile runs there too
        assert os.sched_getaffinity(0) == everything
    finally:
        stop(p)


@pytest.mark.parametrize(
    "mask, node_cpus, ours",
    [
        (4, 4.0, True),  # a machine, or a pod with a cpuset of its own
        (64, 4.0, False),  # a pod limited by a CPU quota on a 64-core host
        (4, 0.0, False),
    ],
)
def test_cores_are_ours_only_when_the_mask_is_the_node(monkeypatch, mask, node_cpus, ours):
    monkeypatch.setattr(cores, "allowed_cores", lambda: set(range(mask)))
    assert cores.cores_are_ours(node_cpus) is ours


@pytest.fixture(scope="module")
def ray_on_every_core():
    import ray

    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False)
    yield ray
    ray.shutdown()


def test_a_cpu_scoring_actor_claims_a_core_and_decoding_keeps_off_it(ray_on_every_core, tmp_path):
    """The real actor class and decode UDF on a local Ray whose CPUs are this machine's cores."""
    import time

    from fiqa.models import create_model, save_checkpoint
    from fiqa.scoring import ScoreJob
    from fiqa.scoring.decode_task import read_and_decode
    from fiqa.scoring.scorer import Scorer

    from conftest import labeled_members, write_tar

    ray = ray_on_every_core
    everything = sorted(os.sched_getaffinity(0))
    ckpt = str(tmp_path / "model")
    save_checkpoint(
        ckpt,
        create_model("mobilenetv3_small_100"),
        {"arch": "mobilenetv3_small_100", "image_size": 32},
    )
    shard = write_tar(tmp_path / "s.tar", labeled_members(3))
    job = ScoreJob([shard], str(tmp_path / "out"), "pseudo", model_path=ckpt, resize=32, crop=32)

    def masks_while_decoding() -> list[list[int]]:
        return [sorted(os.sched_getaffinity(0)) for _ in read_and_decode({"shard": [shard]}, job)]

    def cores_and_mask(actor):
        return ray.get(
            actor.__ray_call__.remote(lambda self: (self.cores, sorted(os.sched_getaffinity(0)))),
            timeout=120,
        )

    # Two actors and a task within 2 logical CPUs: a task left without one would wait forever.
    scorer = ray.remote(num_cpus=0.5)(Scorer)
    pinned = scorer.remote(ckpt, threads=1)  # pin_cores None: this node's cores are ours
    unpinned = scorer.remote(ckpt, threads=1, pin_cores=False)
    assert cores_and_mask(pinned) == ([everything[-1]], [everything[-1]])
    assert cores_and_mask(unpinned) == (None, everything)
    decode = ray.remote(num_cpus=1)(masks_while_decoding)
    # One batch, decoded off the claimed core.
    assert ray.get(decode.remote(), timeout=120) == [everything[:-1]]

    ray.kill(pinned)
    deadline = time.monotonic() + 30
    while cores.claimed_cores() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cores.claimed_cores() == set()  # released with the actor's process
    assert ray.get(decode.remote(), timeout=120) == [everything]
    ray.kill(unpinned)
