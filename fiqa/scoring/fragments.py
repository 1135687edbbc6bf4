"""Rows written where they are: each scored batch is staged by the process that holds it.

The scoring actors (or, when no model runs, the decode tasks) write every batch they finish
as one staged fragment per shard it holds, ``<out_dir>/_staging/<part>/<first row>-<n>``,
and pass on only a line per fragment (shard, rows, ``shard_total``, the writer's node). The
driver counts those lines (`fiqa.scoring.commit.ShardLedger`) and, once a shard's rows are
all staged, has the committer of a node that staged them merge its fragments into the
shard's parts (`fiqa.scoring.commit.commit_shard`). No image byte goes through the driver
or its node.

A fragment is written whole (`fiqa.data.tables.write_part`) before its line leaves, so a
counted row is a staged row. A batch retried after its actor died may stage its rows
twice; the commit keeps one copy of each row number.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fiqa import storage
from fiqa.data.tables import part_name, write_part
from fiqa.scoring.job import ScoreJob

STAGING = "_staging"
# What a fragment holds of each row (its shard is in its path).
FRAGMENT_COLUMNS = ("key", "row", "image", "mos", "reason", "raw_score", "raw_spread")


def staging_dir(job: ScoreJob, shard_url: str | None = None) -> str:
    """Where the fragments of one shard (or, without a shard, of the whole job) are staged."""
    base = storage.join(job.out_dir, STAGING)
    return base if shard_url is None else storage.join(base, part_name(shard_url)[:-8])


def write_fragments(batch: pa.Table | dict, job: ScoreJob) -> dict[str, np.ndarray]:
    """Stage ``batch`` (one fragment per shard in it); returns one line per fragment."""
    table = _as_table(batch)
    lines: dict[str, list] = {"shard": [], "rows": [], "shard_total": []}
    node = _node_id()
    shards = table.column("shard")
    urls = pc.unique(shards).to_pylist()
    for url in urls:
        sub = table if len(urls) == 1 else table.filter(pc.equal(shards, url))
        rows = sub.column("row").to_numpy()
        name = f"{int(rows.min()):09d}-{len(rows)}.parquet"
        write_part(sub.select(list(FRAGMENT_COLUMNS)), staging_dir(job, url), name, "none")
        lines["shard"].append(url)
        lines["rows"].append(len(rows))
        lines["shard_total"].append(int(pc.max(sub.column("shard_total")).as_py()))
    return {
        "shard": np.array(lines["shard"], dtype=object),
        "rows": np.array(lines["rows"], dtype=np.int64),
        "shard_total": np.array(lines["shard_total"], dtype=np.int64),
        "node": np.array([node] * len(urls), dtype=object),
    }


def _node_id() -> str:
    """This process's Ray node ("" outside Ray), where its shards' commits should run."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _as_table(batch: pa.Table | dict) -> pa.Table:
    """A decode task's (numpy) or an actor's (Arrow) batch as a table, without pixels and
    with ``raw_score`` and ``raw_spread`` columns (null where no model ran or one view)."""
    if isinstance(batch, dict):
        cols = {k: v for k, v in batch.items() if k != "pixels"}
        table = pa.table(
            {k: pa.array(list(v) if v.dtype == object else v) for k, v in cols.items()}
        )
    else:
        table = batch.drop_columns([c for c in ("pixels",) if c in batch.column_names])
    for name in ("raw_score", "raw_spread"):
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.float64()))
    return table


class ScoreThenWrite:
    """The scoring actor: a scorer (`fiqa.scoring.scorer.Scorer` or a stand-in) whose scored
    batches are staged here, in the actor, instead of travelling to the driver.

    Ray Data runs two calls of an actor at once (``max_concurrent_calls_per_actor=2``): one
    batch is written while the next is scored; the lock keeps scoring one batch at a time.
    """

    def __init__(self, scorer: type, job: ScoreJob, scorer_kwargs: dict[str, Any]):
        self.scorer = scorer(**scorer_kwargs)
        self.job = job
        self.scoring = threading.Lock()

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        with self.scoring:
            scored = self.scorer(batch)
        return write_fragments(scored, self.job)


def decode_then_write(
    batch: dict, job: ScoreJob, decode: Callable, block_rows: int | None = None
) -> Iterator[dict]:
    """The decode task of a job without a model (ingest): its batches staged where decoded."""
    for block in decode(batch, job, block_rows):
        yield write_fragments(block, job)
