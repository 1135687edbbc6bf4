"""The per-shard commit: a shard's staged fragments become its parts, once all have arrived.

The commit protocol: a shard's rejects part is written first, then its scored part
(``labels/``); each part is written whole (`fiqa.data.tables.write_part`), and the scored
part's existence is what commits the shard. A commit task is idempotent: retried after its
node died, it finds the shard committed (the staged fragments may be gone) and reports it. A rerun skips committed shards
(`committed_shards`) and stages the others again, so an interrupted job resumes at shard
granularity.

The driver holds only a count per shard in flight (`ShardLedger`); the rows themselves were
staged where they were scored (`fiqa.scoring.fragments`) and are merged by `commit_shard`,
in an actor (`ShardCommitter`) on a node that staged them. Keys repeated across shards are
settled once all shards are committed (`fiqa.scoring.unique_keys`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from fiqa import storage
from fiqa.calibration import spread_on_mos_scale, to_mos_scale
from fiqa.data.tables import (
    REJECTS_SCHEMA,
    SCORED_SCHEMA,
    list_parts,
    part_name,
    read_part,
    write_part,
)
from fiqa.scoring.fragments import staging_dir
from fiqa.scoring.job import ScoreJob


class Complete(NamedTuple):
    """A shard whose rows are all staged: its row count, and the node that staged its last
    fragment (None where the lines do not say)."""

    url: str
    total: int
    node: str | None


class ShardLedger:
    """The driver's view of the stream: rows staged per shard, until each is complete."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = defaultdict(int)
        self.totals: dict[str, int] = {}

    def add(self, lines: dict) -> list[Complete]:
        """Count the fragments' ``lines``; returns the shards now complete."""
        done = []
        nodes = lines.get("node", [None] * len(lines["shard"]))
        for url, rows, total, node in zip(
            lines["shard"], lines["rows"], lines["shard_total"], nodes, strict=True
        ):
            self.seen[url] += int(rows)
            if total >= 0:
                self.totals[url] = int(total)
            if url in self.totals and self.seen[url] == self.totals[url]:
                done.append(Complete(url, self.totals.pop(url), node or None))
                self.seen.pop(url)
        return done

    @property
    def open_shards(self) -> list[str]:
        return sorted(self.seen)


def commit_shard(job: ScoreJob, url: str, total: int) -> dict:
    """Merge the staged fragments of shard ``url`` (``total`` rows) into its rejects part and
    its scored part, in that order; returns its counts: scored, rejected, reasons."""
    stage = staging_dir(job, url)
    name = part_name(url)
    labels = storage.join(job.out_dir, "labels", name)
    if storage.exists(labels):  # an earlier attempt committed it, then died (its node lost)
        storage.rm(stage)
        return _committed_counts(job, name)
    try:
        table = _staged_rows(stage, url, total)
    except (FileNotFoundError, RuntimeError):
        # An attempt taken for lost may still have been running: its fragments go only after
        # its parts are written, so a shard whose fragments went missing is committed.
        if storage.exists(labels):
            return _committed_counts(job, name)
        raise
    reason = table.column("reason").to_numpy(zero_copy_only=False)
    ok = reason == ""
    rejected = table.filter(pa.array(~ok))
    rejects = pa.table(
        {
            "key": rejected.column("key"),
            "shard": pa.array([url] * rejected.num_rows, pa.string()),
            "reason": rejected.column("reason"),
        },
        schema=REJECTS_SCHEMA,
    )
    write_part(rejects, storage.join(job.out_dir, "rejects"), name)
    write_part(_scored_table(job, url, table.filter(pa.array(ok))), f"{job.out_dir}/labels", name)
    storage.rm(stage)
    reasons = Counter(str(r).split(":")[0] for r in reason[~ok])
    return {"scored": int(ok.sum()), "rejected": int((~ok).sum()), "reasons": dict(reasons)}


def _staged_rows(stage: str, url: str, total: int) -> pa.Table:
    """The rows staged for shard ``url``, one copy of each of its ``total``, in its order."""
    parts = list_parts(stage)
    if not parts:
        raise RuntimeError(f"{url}: nothing staged of {total} rows")
    table = pa.concat_tables([read_part(f) for f in parts])
    rows, first = np.unique(table.column("row").to_numpy(), return_index=True)
    if len(rows) != total or (total and (rows[0] != 0 or rows[-1] != total - 1)):
        raise RuntimeError(f"{url}: {len(rows)} distinct rows staged of {total}")
    return table.take(pa.array(first))


class ShardCommitter:
    """`commit_shard` for one job, as a Ray actor the stream keeps on a node while it runs
    (`fiqa.scoring.engine.Committers`)."""

    def __init__(self, job: ScoreJob):
        self.job = job

    def commit(self, url: str, total: int) -> dict:
        return commit_shard(self.job, url, total)


def _committed_counts(job: ScoreJob, name: str) -> dict:
    """`commit_shard`'s counts, read back from the committed parts ``name``."""
    scored = read_part(storage.join(job.out_dir, "labels", name), columns=["key"]).num_rows
    reason = read_part(storage.join(job.out_dir, "rejects", name), columns=["reason"])
    reasons = Counter(str(r).split(":")[0] for r in reason.column("reason").to_pylist())
    return {"scored": scored, "rejected": reason.num_rows, "reasons": dict(reasons)}


def _scored_table(job: ScoreJob, url: str, t: pa.Table) -> pa.Table:
    n = t.num_rows
    mos = _floats(t.column("mos"))
    raw = _floats(t.column("raw_score"))
    spread = spread_on_mos_scale(mos, raw, _floats(t.column("raw_spread")), job.calibration)
    return pa.table(
        {
            "key": t.column("key"),
            "shard": pa.array([url] * n, pa.string()),
            "image": t.column("image"),
            "mos": _nullable(mos),
            "raw_score": _nullable(raw),
            "score": _nullable(to_mos_scale(mos, raw, job.calibration)),
            "score_spread": _nullable(spread),
            "model_id": pa.array([job.model_id] * n, pa.string()),
            "source": pa.array([job.source] * n, pa.string()),
        },
        schema=SCORED_SCHEMA,
    )


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """A float column as float64 with NaN for null."""
    return column.cast(pa.float64()).fill_null(np.nan).to_numpy()


def _nullable(a: np.ndarray) -> pa.Array:
    return pa.array(a, type=pa.float32(), mask=np.isnan(a))


def committed_shards(out_dir: str) -> set[str]:
    """Part names of the shards already committed to ``out_dir``."""
    return {p.rsplit("/", 1)[-1] for p in list_parts(f"{out_dir}/labels")}
