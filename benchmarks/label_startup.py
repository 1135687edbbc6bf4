"""Where a labeling run's start-up goes: a timeline from `label_shards` to its first commit.

End to end, `fiqa label` on a pool of 20,000 faces spends seconds before its first shard is
committed, which a pool of millions amortises and a small one does not. This prints, in
seconds from the call (a local Ray already up, as in `label_throughput.py`'s (d)):

  - when each decode task and the scoring actor's constructor start (Ray's worker boot);
  - how long the actor's constructor takes to import torch and timm and load the model;
  - its first batch, the first and last committed shard.

    python benchmarks/label_startup.py                    # the student, ../shared real faces
    python benchmarks/label_startup.py --model teacher --synthetic 10240

The actor and the decode task are the engine's own (`fiqa.scoring.scorer.Scorer`,
`fiqa.scoring.decode_task.read_and_decode`), subclassed and wrapped to note the time and
passed through the engine's seams; the run is otherwise `fiqa label`'s.
"""

from __future__ import annotations

import argparse
import json
import os

from harness import MODELS, label_run, make_checkpoint, pool_shards, scratch, timed_seams


def main() -> None:
    from fiqa.config import ScoringConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="student", choices=list(MODELS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--synthetic", type=int, default=0, help="use N synthetic images")
    args = p.parse_args()

    cpus = os.cpu_count() or 2
    with scratch(None, "fiqa-startup-") as work:
        shards = pool_shards(work, args.synthetic)
        ckpt = make_checkpoint(MODELS[args.model], work / "model")
        events_file = str(work / "events.jsonl")
        scorer, decode = timed_seams(events_file)
        scoring = ScoringConfig(
            batch_size=args.batch_size,
            concurrency=1,
            num_cpus=cpus - 1,
            torch_threads=cpus - 1,
            decode_cpus=1,
        )
        run = label_run(ckpt, shards, work / "out", scoring, scorer=scorer, decode=decode)
        with open(events_file) as f:
            events = [json.loads(line) for line in f]

    def at(wall: float) -> float:  # seconds from the call, for a time.time() of a worker
        return wall - run.wall_t0

    commits = [t - run.t0 for t in run.commit_times]
    actor = next(e for e in events if "actor_start" in e)
    first_batch = next(e["first_batch"] for e in events if "first_batch" in e)
    decodes = sorted(e["decode_task"] for e in events if "decode_task" in e)
    n = run.images
    print(
        f"# {MODELS[args.model]}, {len(shards)} shards, {n} images, {cpus} cores; "
        f"ray.init took {run.ray_start_s:.2f} s before the clock starts"
    )
    rows = [
        ("first decode task starts", at(decodes[0])),
        ("scoring actor's constructor starts", at(actor["actor_start"])),
        (f"  imports torch ({actor['torch'] - actor['actor_start']:.2f} s)", at(actor["torch"])),
        (f"  imports timm ({actor['timm'] - actor['torch']:.2f} s)", at(actor["timm"])),
        (
            f"  loads the model ({actor['actor_ready'] - actor['timm']:.2f} s)",
            at(actor["actor_ready"]),
        ),
        ("first batch reaches the actor", at(first_batch)),
        ("first shard committed", commits[0]),
        (f"last shard committed ({len(commits)} shards)", commits[-1]),
    ]
    for what, when in rows:
        print(f"  {when:6.2f} s  {what}")
    steady = (n - n / len(shards)) / max(1e-9, commits[-1] - commits[0])
    print(
        f"  end to end {n / run.seconds:.1f} img/s; after the first commit {steady:.1f} img/s: "
        f"the start-up is {100 * commits[0] / run.seconds:.0f} % of this run"
    )


if __name__ == "__main__":
    main()
