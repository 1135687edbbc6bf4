"""The driver's commit ceiling: how many rows/s the scoring engine commits when nothing else limits it.

With a stand-in actor that returns at once and a stand-in decode task that reads the tar but
decodes nothing (both passed to the engine through its seams), only the commit path is left:
this prints the rows/s and MB/s of encoded images it sustains, for small (112 px) and large
(512 px) source images, the driver's CPU per 1,000 rows (the rows/s one core of driver could
carry: its ceiling) and where the driver's time goes (cProfile of the driver). On a machine
too small for the driver to fill its core, ``--rates`` paces the stand-in actor to several row
rates and fits the driver's CPU as a fixed cost plus a cost per row: the rows/s at which it
would fill one core is the ceiling, extrapolated from a measured slope. The actors stage
their rows and commit tasks merge them, so the driver only counts a line per staged fragment;
run on an engine where the driver wrote every part (before 46a5702), the same benchmark shows
that engine's ceiling side by side.

    python benchmarks/commit_ceiling.py --scale 2                    # 81,920 x 112 px, 20,480 x 512 px
    python benchmarks/commit_ceiling.py --scale 2 --batch-size 1024  # fewer, larger blocks
    python benchmarks/commit_ceiling.py --scale 2 --rates 500 1000 2000 0  # the fitted ceiling
    python benchmarks/commit_ceiling.py --scale 0.1                  # a quick check
    python benchmarks/commit_ceiling.py --sources 112 --rates 1000 2000 0 --shards-per-task 1 8
    python benchmarks/commit_ceiling.py --sources 112 32 --rates 1000 2000 0 --block-mb 32 128

``--shards-per-task`` caps the shards one decode task reads (the engine's rule plans up to
`fiqa.scoring.stream.MAX_SHARDS_PER_TASK`), run after run: 1 is the engine before decode tasks
read several shards. ``--block-mb`` sizes the decoded blocks (`fiqa.scoring.stream.BLOCK_BYTES`;
32 is the engine before its blocks followed Ray Data's own 128 MB target).
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from harness import cpu_model, label_run, make_checkpoint, make_pool

from fiqa.config import ScoringConfig
from fiqa.data.reader import read_shard
from fiqa.scoring import stream
from fiqa.scoring.decode_task import to_batch


class InstantScorer:
    """The scoring actor's interface, scoring nothing: raw_score 0 at once."""

    def __init__(self, model_path: str, **_):
        pass

    def __call__(self, batch: pa.Table) -> pa.Table:
        zeros = pa.array(np.zeros(batch.num_rows))
        return batch.drop_columns(["pixels"]).append_column("raw_score", zeros)


def paced(rows_per_s: float) -> type:
    """An `InstantScorer` that holds each batch long enough to pass ``rows_per_s`` rows a
    second (one actor): the driver's load at a row rate of our choosing."""

    class PacedScorer(InstantScorer):
        def __call__(self, batch: pa.Table) -> pa.Table:
            time.sleep(batch.num_rows / rows_per_s)
            return super().__call__(batch)

    return PacedScorer


def read_only(batch: dict, job, block_rows: int):
    """The decode task's output shape (pixels included, all zero) from the tar alone: full
    blocks of ``block_rows`` across the task's shards, a shard's last row carrying its row
    count."""
    rows_per = block_rows
    recs, totals = [], []
    for url in batch["shard"]:
        shard = list(read_shard(url, job.label_field))
        recs += [{**r, "pixels": None, "row": i} for i, r in enumerate(shard)]
        totals += [-1] * (len(shard) - 1) + [len(shard)]
    for i in range(0, len(recs), rows_per):
        yield to_batch(recs[i : i + rows_per], np.array(totals[i : i + rows_per]), job)


def driver_profile(stats: pstats.Stats, total: float) -> dict[str, float]:
    """Shares of the driver's wall time (start-up included) spent on the commit path."""

    def cumulative(name: str) -> float:
        return max((v[3] for (_, _, fn), v in stats.stats.items() if fn == name), default=0.0)

    add, writes = cumulative("add"), cumulative("write_part")
    return {
        "commit code: rows or lines by shard (parts, if it writes)": add / total,
        "  of which Parquet writes": writes / total,
        "the rest: start-up, waiting for and converting batches": 1 - add / total,
    }


def measure(
    name: str,
    shards: list[str],
    ckpt: str,
    work: Path,
    batch: int,
    scorer: type = InstantScorer,
    profiled: bool = True,
) -> tuple[float, float] | None:
    """One run; prints its figures and returns (rows/s, the driver's busy share of one core)
    after the first commit, or None where too few shards committed to tell. ``profiled``:
    with cProfile on the driver's main thread (which adds to its CPU)."""
    cfg = ScoringConfig(batch_size=batch, concurrency=1, num_cpus=0.5, num_gpus=0.0)
    bytes_ = sum(os.path.getsize(s) for s in shards)
    prof = cProfile.Profile() if profiled else None
    if prof:
        prof.enable()
    run = label_run(ckpt, shards, work / "out", cfg, scorer=scorer, decode=read_only)
    if prof:
        prof.disable()
    steady = run.commit_times
    rows = run.images
    print(
        f"{name}: {rows} rows, {bytes_ / 2**20:.0f} MiB of shards in {run.seconds:.1f} s: "
        f"{rows / run.seconds:,.0f} rows/s, {bytes_ / 2**20 / run.seconds:.1f} MiB/s end to end"
    )
    if prof:
        for label, share in driver_profile(pstats.Stats(prof), run.seconds).items():
            print(f"  {label:<56} {100 * share:5.1f} % of the driver's time")
    if len(steady) <= 2:
        return None
    shards_after = len(steady) - 1  # those committed after the first commit
    span = steady[-1] - steady[0]
    cpu = run.commit_cpu_times[-1] - run.commit_cpu_times[0]
    rate, busy = shards_after * rows / len(shards) / span, cpu / span
    print(
        f"  after the first commit: {rate:,.0f} rows/s, "
        f"{shards_after * bytes_ / len(shards) / 2**20 / span:.1f} MiB/s; the driver's "
        f"CPU {1e6 * busy / rate:.1f} ms per 1,000 rows, busy {100 * busy:.0f} % of one "
        f"core: its ceiling, were all of it per row, {rate / max(busy, 1e-9):,.0f} rows/s"
    )
    return rate, busy


def fit_ceiling(points: list[tuple[float, float]]) -> str:
    """The driver's busy share as fixed + marginal x rows/s (least squares over the paced
    runs): the rows/s at which it would fill one core is (1 - fixed) / marginal."""
    if len({round(r) for r, _ in points}) < 2:
        return "too few runs at distinct rates to fit"
    rates, busy = np.array(points).T
    marginal, fixed = np.polyfit(rates, busy, 1)
    spread = np.abs(busy - (fixed + marginal * rates)).max()
    fit = (
        f"driver busy = {100 * fixed:.1f} % + {1e6 * marginal:.2f} ms per 1,000 rows "
        f"(largest residual {100 * spread:.1f} points of one core)"
    )
    if marginal <= 0:
        return fit + ": no cost per row measurable between these rates"
    return fit + f": one core full at {(1 - fixed) / marginal:,.0f} rows/s"


# Pools per source size: images per copy and shard size (10 copies at --scale 1).
POOLS = {32: (8192, 2048), 112: (2048, 512), 512: (512, 512)}


def make_ceiling_pool(work: Path, source: int, scale: float) -> tuple[list[str], int]:
    """`POOLS`' pool of ``source`` px at ``scale``: its shards and its rows."""
    images, shard = POOLS[source]
    n, copies = max(256, int(images * scale)), max(1, round(10 * scale))
    return make_pool(work / f"pool{source}", n, source, copies, shard_size=shard), n * copies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="multiply the pools' sizes")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--sources", type=int, nargs="+", default=[112, 512], choices=sorted(POOLS))
    p.add_argument(
        "--rates",
        type=float,
        nargs="+",
        help="pace the stand-in actor to these rows/s (0: unpaced) and fit the driver's "
        "fixed and per-row CPU over the runs",
    )
    p.add_argument(
        "--shards-per-task",
        type=int,
        nargs="+",
        default=[stream.MAX_SHARDS_PER_TASK],
        help="at most this many shards a decode task (the driver's plan), one setting after another",
    )
    p.add_argument(
        "--block-mb",
        type=int,
        nargs="+",
        default=[stream.BLOCK_BYTES // 2**20],
        help="decoded blocks of whole batches within this many MB (the driver's plan), one "
        "setting after another",
    )
    args = p.parse_args()
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs")
    work = Path(tempfile.mkdtemp(prefix="fiqa-ceiling-"))
    try:
        ckpt = make_checkpoint("mobilenetv3_small_100", work / "model")
        for source in args.sources:
            shards, _ = make_ceiling_pool(work, source, args.scale)
            for k, mb in itertools.product(args.shards_per_task, args.block_mb):
                stream.MAX_SHARDS_PER_TASK, stream.BLOCK_BYTES = k, mb * 2**20
                name = f"{source} px sources, up to {k} shard(s) a decode task, {mb} MB blocks"
                if not args.rates:
                    measure(name, shards, ckpt, work, args.batch_size)
                    continue
                points = []
                for r in args.rates:
                    scorer = paced(r) if r > 0 else InstantScorer
                    label = f"{name}, paced to {r:,.0f} rows/s" if r > 0 else f"{name}, unpaced"
                    point = measure(
                        label, shards, ckpt, work, args.batch_size, scorer, profiled=False
                    )
                    points += [point] if point else []
                print(f"  {name}, batch {args.batch_size}: {fit_ceiling(points)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
