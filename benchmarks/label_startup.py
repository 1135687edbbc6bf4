"""Where a labeling run's start-up goes: a timeline from `label_shards` to its first commit.

End to end, `fiqa label` on a pool of 20,000 faces spends seconds before its first shard is
committed, which a pool of millions amortises and a small one does not. This prints, in
seconds from the call (a local Ray already up, as in `label_throughput.py`'s (d)):

  - when each decode task and the scoring actor's constructor start (Ray's worker boot);
  - how long the actor's constructor takes to import torch and timm and load the model;
  - its first batch, the first and last committed shard.

    python benchmarks/label_startup.py                    # the student, ../shared real faces
    python benchmarks/label_startup.py --model teacher --synthetic 10240

The actor and the decode function are the engine's own (`fiqa.labeling.Scorer`,
`read_and_decode`), wrapped to note the time; the run is otherwise `fiqa label`'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from label_throughput import MODELS, make_checkpoint, pool_shards

import fiqa.labeling as engine


def timed_engine(events_file: str) -> None:
    """Swap the engine's actor and decode function for ones that append their times to
    ``events_file`` (one JSON line each, wall-clock): they run in other processes."""

    def note(**event) -> None:
        with open(events_file, "a") as f:
            f.write(json.dumps({**event, "pid": os.getpid()}) + "\n")

    class TimedScorer(engine.Scorer):
        def __init__(self, *args, **kwargs):
            start = time.time()
            import torch  # noqa: F401  (what the constructor imports first, timed apart)

            after_torch = time.time()
            import timm  # noqa: F401

            after_timm = time.time()
            super().__init__(*args, **kwargs)
            note(actor_start=start, torch=after_torch, timm=after_timm, actor_ready=time.time())
            self._first = True

        def __call__(self, batch):
            if self._first:
                note(first_batch=time.time())
                self._first = False
            return super().__call__(batch)

    decode = engine.read_and_decode

    def timed_read_and_decode(batch, job):
        note(decode_task=time.time())
        yield from decode(batch, job)

    engine.Scorer = TimedScorer
    engine.read_and_decode = timed_read_and_decode


class Commits(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("committed "):
            self.times.append(time.time())


def main() -> None:
    from fiqa.cluster.local import ensure_ray, shutdown_ray
    from fiqa.config import RayConfig, ScoringConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="student", choices=list(MODELS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--synthetic", type=int, default=0, help="use N synthetic images")
    args = p.parse_args()

    cpus = os.cpu_count() or 2
    work = Path(tempfile.mkdtemp(prefix="fiqa-startup-"))
    try:
        shards = pool_shards(args, work)
        ckpt = make_checkpoint(MODELS[args.model], work / "model")
        events_file = str(work / "events.jsonl")
        timed_engine(events_file)
        commits = Commits()
        log = logging.getLogger("fiqa.labeling")
        log.addHandler(commits)
        log.setLevel(logging.INFO)
        before_ray = time.time()
        ensure_ray(RayConfig(num_cpus=cpus))
        t0 = time.time()
        label = ScoringConfig(
            batch_size=args.batch_size,
            concurrency=1,
            num_cpus=cpus - 1,
            torch_threads=cpus - 1,
            decode_cpus=1,
        )
        stats = engine.label_shards(ckpt, shards, str(work / "out"), label, progress=False)
        end = time.time()
        shutdown_ray()
        events = [json.loads(line) for line in open(events_file)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = stats["scored"] + stats["rejected"]
    actor = next(e for e in events if "actor_start" in e)
    first_batch = next(e["first_batch"] for e in events if "first_batch" in e)
    decodes = sorted(e["decode_task"] for e in events if "decode_task" in e)
    print(
        f"# {MODELS[args.model]}, {len(shards)} shards, {n} images, {cpus} cores; "
        f"ray.init took {t0 - before_ray:.2f} s before the clock starts"
    )
    rows = [
        ("first decode task starts", decodes[0] - t0),
        ("scoring actor's constructor starts", actor["actor_start"] - t0),
        (f"  imports torch ({actor['torch'] - actor['actor_start']:.2f} s)", actor["torch"] - t0),
        (f"  imports timm ({actor['timm'] - actor['torch']:.2f} s)", actor["timm"] - t0),
        (
            f"  loads the model ({actor['actor_ready'] - actor['timm']:.2f} s)",
            actor["actor_ready"] - t0,
        ),
        ("first batch reaches the actor", first_batch - t0),
        ("first shard committed", commits.times[0] - t0),
        (f"last shard committed ({len(commits.times)} shards)", commits.times[-1] - t0),
    ]
    for what, at in rows:
        print(f"  {at:6.2f} s  {what}")
    steady = (n - n / len(shards)) / max(1e-9, commits.times[-1] - commits.times[0])
    print(
        f"  end to end {n / (end - t0):.1f} img/s; after the first commit {steady:.1f} img/s: "
        f"the start-up is {100 * (commits.times[0] - t0) / (end - t0):.0f} % of this run"
    )


if __name__ == "__main__":
    main()
