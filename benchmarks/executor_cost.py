"""What Ray Data's executor costs the driver per task and per block, without the project's code.

A stream shaped like the scoring engine's (`fiqa.scoring.engine`): ``from_items`` → a map
task yielding blocks (the decode task's place) → an actor pool of one (the scoring actor's
place) → ``iter_batches`` on the driver. Nothing is decoded or scored; blocks are 1 MB of
zeros and the block target passes each on as yielded, as the engine sets it. Printed side
by side in one run: the driver's CPU (all its threads) for the same number of blocks in
tasks of 1, 4 or 8 blocks, and for fewer tasks of one block, and how many actor tasks took
them (a task's blocks that arrive together go to the actor in one call). The cost follows
the tasks more than the blocks: what `fiqa.scoring.stream.shards_per_task` rests on.

    python benchmarks/executor_cost.py                # 400 blocks, 2 rounds
    python benchmarks/executor_cost.py --blocks 80 --rounds 1   # a quick check
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from harness import cpu_model

BLOCK_BYTES = 1_000_000


def yield_blocks(batch: dict):
    """The decode task's place: ``blocks`` blocks of 1 MB, one after another."""
    for _ in range(int(batch["blocks"][0])):
        yield {"x": np.zeros((1, BLOCK_BYTES), np.uint8)}


class Count:
    """The scoring actor's place: a line per call."""

    def __call__(self, batch: dict) -> dict:
        return {"n": np.array([len(batch["x"])])}


def driver_cpu() -> float:
    t = os.times()
    return t.user + t.system


def run(tasks: int, blocks_per_task: int) -> tuple[float, float, int]:
    """Driver CPU seconds, wall seconds and the actor's outputs (its calls' lines, one block
    per actor task) to stream ``tasks`` tasks of ``blocks_per_task`` blocks."""
    import ray

    ds = ray.data.from_items([{"blocks": blocks_per_task}] * tasks, override_num_blocks=tasks)
    ds.context.target_max_block_size = int(0.8 * BLOCK_BYTES)  # as the engine: no merging
    ds = ds.map_batches(yield_blocks, batch_size=1, num_cpus=0.5)
    ds = ds.map_batches(
        Count, batch_size=1, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5
    )
    cpu, wall, outputs = driver_cpu(), time.perf_counter(), 0
    for _ in ds.iter_batches(batch_size=None, prefetch_batches=0):
        outputs += 1
    return driver_cpu() - cpu, time.perf_counter() - wall, outputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=400, help="blocks in each stream")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    import ray

    print(f"# {cpu_model()}, {os.cpu_count()} CPUs, Ray {ray.__version__}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    run(8, 1)  # workers and the actor started once, outside the measurements
    n = args.blocks
    shapes = [(n, 1), (n // 4, 4), (n // 8, 8), (n // 4, 1)]
    for r in range(args.rounds):
        base = None
        for tasks, per in shapes:
            cpu, wall, actor_tasks = run(tasks, per)
            base = base or cpu / tasks
            print(
                f"round {r + 1}: {tasks} tasks x {per} block(s), {actor_tasks} actor tasks: "
                f"driver CPU {cpu:.2f} s in {wall:.1f} s, {1e3 * cpu / tasks:.1f} ms a task "
                f"({cpu / tasks / base:.2f}x the one-block task's), "
                f"{1e3 * cpu / (tasks * per):.1f} ms a block"
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
