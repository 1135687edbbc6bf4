"""How many decode tasks Ray Data lets run at once behind a scoring actor as fast as a GPU,
for each stream buffer: whether the engine's resource plan can keep a fast GPU fed.

A GPU node decodes on every CPU the actors leave (15 of 16 on one H200); the scoring actor
takes a 448 px batch in a fraction of the time a core decodes it, so the stream is only as
fast as the decode tasks Ray Data admits. It admits a task when the operator's share of the
stream's object-store budget (`fiqa.scoring.stream.stream_buffer_bytes`) covers the output
the task will hold (Ray Data's estimate: its last blocks' size, two blocks per task), so
large decoded blocks and a small buffer admit few tasks whatever the CPUs.

What runs is the engine's own `label_shards` on a local Ray of ``--cpus`` logical CPUs, with
one change, passed through the engine's ``scorer`` seam: the scoring actor is a stand-in
that sleeps ``--rate`` images/s instead of running a model (no GPU here; the stand-in's
speed is a GPU's, the decode tasks are the real ones). The decode tasks running at once are
counted from the Ray workers' process titles. The count is of tasks admitted (one paused by
Ray Data's backpressure still counts) while decoding is the bottleneck, as it is behind a
fast GPU: on a machine with fewer cores than ``--cpus`` the stand-in is never short of work,
no decoded blocks queue for it, and admission depends on the stream's budget and its blocks'
size alone, as on a GPU node whose decoding cannot keep up. (Where decoding outruns the GPU,
queued blocks count against the decode tasks' budget and fewer run: that is the
backpressure meant to happen.) The images/s printed beside it are this machine's decode
speed, not a GPU's. Ray Data caps a stream at half the object store whatever its bound;
each line prints the bound and the cap.

    python benchmarks/decode_admission.py                      # 448 px, 16 CPUs, 800 img/s
    python benchmarks/decode_admission.py --buffer-mb 0 2048 8192
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from harness import MIN_STEADY_SHARDS, RunningTasks, label_run, make_pool, scratch, steady_window


class PacedScorer:
    """Stands in for the engine's scoring actor (`fiqa.scoring.scorer.Scorer`) on a GPU:
    holds no model, takes ``len(batch) / RATE`` s a batch and returns the columns the
    engine's actor returns (raw_score 0, NaN for the rows decoding rejected)."""

    RATE = 800.0

    def __init__(self, model_path: str, **_):
        self.model_path = model_path

    def __call__(self, batch: pa.Table) -> pa.Table:
        time.sleep(len(batch) / self.RATE)
        ok = pc.equal(batch.column("reason"), "").to_numpy(zero_copy_only=False)
        raw = pa.array(np.where(ok, 0.0, np.nan))
        return batch.drop_columns(["pixels"]).append_column("raw_score", raw)


def main() -> None:
    from fiqa.config import ScoringConfig
    from fiqa.models import create_model, save_checkpoint
    from fiqa.scoring.stream import rows_per_block

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crop", type=int, default=448, help="the model's input size (Swin-B: 448)")
    p.add_argument("--cpus", type=int, default=16, help="logical CPUs of the local Ray")
    p.add_argument("--rate", type=float, default=800.0, help="the stand-in actor's images/s")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=4096, help="distinct synthetic images")
    p.add_argument("--copies", type=int, default=8, help="the pool is these many copies")
    p.add_argument("--source-size", type=int, default=128, help="side of the pool's JPEGs")
    p.add_argument("--buffer-mb", type=int, nargs="+", default=[0, 8192], help="0: default")
    p.add_argument("--work", default=None, help="keep the pool here (default: a temp dir)")
    args = p.parse_args()

    with scratch(args.work, "fiqa-admission-") as work:
        shards = make_pool(work, args.images, args.source_size, args.copies)
        ckpt = str(work / "model")  # never loaded: its model.json gives the engine the crop
        resize = args.crop * 8 // 7
        meta = {"arch": "resnet10t", "image_size": args.crop, "resize": resize}
        save_checkpoint(ckpt, create_model("resnet10t"), meta)
        PacedScorer.RATE = args.rate  # a class attribute travels with the class to the actor
        scoring = ScoringConfig(
            batch_size=args.batch_size, num_gpus=0.0, num_cpus=1.0, torch_threads=1
        )
        slots = args.cpus - 1
        print(
            f"# {os.cpu_count()} cores here, a local Ray of {args.cpus} logical CPUs: 1 "
            f"stand-in actor at {args.rate:g} img/s, {slots} CPUs for decode tasks; "
            f"{len(shards)} shards, {args.images * args.copies} JPEGs of {args.source_size} px "
            f"decoded to {args.crop} px, blocks of {rows_per_block(args.crop, args.batch_size)} "
            f"rows",
            flush=True,
        )
        for mb in args.buffer_mb:
            cfg = dataclasses.replace(scoring, buffer_mb=mb or None)
            tasks = RunningTasks()
            run = label_run(
                ckpt, shards, work / "out", cfg, [tasks], cpus=args.cpus, scorer=PacedScorer
            )
            window = steady_window(run.commit_times)
            steady = (
                f"{np.mean(tasks.between(*(run.commit_times[i] for i in window))):5.1f} in "
                f"steady state (the middle half of the shards)"
                if window
                else f"n/a in steady state ({len(shards)} shards; it needs "
                f"{MIN_STEADY_SHARDS} or more)"
            )
            plan = run.plan
            buffer, cap = plan["buffer_bytes"] / 2**20, plan["cap_bytes"] / 2**20
            print(
                f"stream buffer {buffer:6.0f} MiB{' (default)' if not mb else ''}"
                + (f" capped at {cap:.0f} MiB by Ray Data" if buffer > cap else "")
                + f": decode tasks at once {steady}, at most {tasks.peak} of "
                f"{plan['decode_tasks']}, each at most {tasks.peak_uss / 2**20:.0f} MiB (USS; "
                f"reserved {plan['decode_memory_bytes'] // 2**20} MiB)   {run.images / run.seconds:6.1f} "
                f"img/s on this machine, {run.images} images in {run.seconds:.1f} s, "
                f"{run.stats['rejected']} rejected",
                flush=True,
            )


if __name__ == "__main__":
    main()
