"""Exactly once across shards: a key scored in several shards is found, exactly, once all
of a job's shards are committed, and kept in one of them.

The reader rejects a key repeated within a shard. Across shards (a crawl that met one face
twice, pools concatenated by hand), one pass over the committed key columns finds every key
scored in more than one shard and keeps it in the first of those shards in URL order (the
same whatever order the shards were committed in); its other copies move to the rejects
table as ``duplicate_key``.

The pass is a map-reduce on Ray tasks: each mapper reads the key column of a group of parts
and routes every key by a hash to one of P partitions; each reducer gathers one partition
from every mapper and compares the keys themselves, so two keys that share a hash only share
a reducer. A process holds one group's keys or one partition's, and P grows with the pool
(`KEYS_PER_PARTITION`): no process holds the pool's keys.
"""

from __future__ import annotations

import hashlib
import logging
import math
import zlib
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fiqa import storage
from fiqa.data.tables import REJECTS_SCHEMA, list_parts, read_part, write_part
from fiqa.scoring.job import ScoreJob

log = logging.getLogger(__name__)

KEYS_PER_PARTITION = 2_000_000
PARTS_PER_MAPPER = 64
CHECKED = "_unique_keys.json"  # the parts the last pass found free of duplicates
DUPLICATE = "duplicate_key"


def reject_duplicate_keys(job: ScoreJob) -> int:
    """Move every cross-shard copy of a scored key to the rejects; the number moved."""
    parts = list_parts(storage.join(job.out_dir, "labels"))
    marker = storage.join(job.out_dir, CHECKED)
    digest = _digest(parts)
    if len(parts) < 2 or (storage.exists(marker) and storage.read_json(marker) == digest):
        return 0
    run = _Runner()
    p = _partitions(parts)
    groups = [parts[i : i + PARTS_PER_MAPPER] for i in range(0, len(parts), PARTS_PER_MAPPER)]
    routed = [run.call(route_keys, g, p, returns=p) for g in groups]
    routed = [r if p > 1 else [r] for r in routed]  # (one return is the table itself)
    found = run.get([run.call(duplicates_in, *[r[j] for r in routed]) for j in range(p)])
    dups = pa.concat_tables(found) if found else None
    moved = 0
    if dups is not None and dups.num_rows:
        losers = _losers(dups)
        moved = sum(run.get([run.call(move_to_rejects, job, s, k) for s, k in losers.items()]))
        log.warning(
            "%d key(s) were scored in more than one shard: kept in the first shard (URL "
            "order), the %d other cop(ies) moved to rejects as %s",
            len(set(dups.column("key").to_pylist())),
            moved,
            DUPLICATE,
        )
    storage.write_json(marker, _digest(list_parts(storage.join(job.out_dir, "labels"))))
    return moved


def route_keys(parts: list[str], partitions: int) -> list[pa.Table] | pa.Table:
    """(key, shard) of ``parts``, split into ``partitions`` tables by a hash of the key."""
    table = pa.concat_tables([read_part(p, ["key", "shard"]) for p in parts])
    if partitions == 1:
        return table
    where = route(table.column("key").to_pylist(), partitions)
    return [table.filter(pa.array(where == j)) for j in range(partitions)]


def route(keys: list[str], partitions: int) -> np.ndarray:
    """The partition of each key: it only decides which reducer compares the key."""
    return np.fromiter((zlib.crc32(k.encode()) % partitions for k in keys), np.int64, len(keys))


def duplicates_in(*tables: pa.Table) -> pa.Table:
    """The (key, shard) rows of the keys that appear in more than one shard, compared exactly."""
    table = pa.concat_tables(tables)
    counts = table.group_by("key").aggregate([("shard", "count_distinct")])
    keys = counts.filter(pc.greater(counts.column("shard_count_distinct"), 1)).column("key")
    return table.filter(pc.is_in(table.column("key"), keys))


def _losers(dups: pa.Table) -> dict[str, list[str]]:
    """Shard -> its keys to reject: each key stays in the first of its shards (URL order)."""
    first: dict[str, str] = {}
    pairs = sorted(
        zip(dups.column("key").to_pylist(), dups.column("shard").to_pylist(), strict=True)
    )
    losers: dict[str, list[str]] = {}
    for key, shard in pairs:
        if key not in first:
            first[key] = shard
        elif shard != first[key]:
            losers.setdefault(shard, []).append(key)
    return losers


def move_to_rejects(job: ScoreJob, shard_url: str, keys: list[str]) -> int:
    """Move ``keys`` of one shard from its scored part to its rejects part: the rejects part is
    written first, so a key is never in neither (a rerun completes an interrupted move)."""
    from fiqa.data.tables import part_name

    name = part_name(shard_url)
    labels_dir = storage.join(job.out_dir, "labels")
    rejects_dir = storage.join(job.out_dir, "rejects")
    labels = read_part(storage.join(labels_dir, name))
    drop = pc.is_in(labels.column("key"), pa.array(keys, pa.string()))
    moved = labels.filter(drop).column("key").to_pylist()
    rejects_url = storage.join(rejects_dir, name)
    rejects = (
        read_part(rejects_url) if storage.exists(rejects_url) else REJECTS_SCHEMA.empty_table()
    )
    listed = {
        k
        for k, r in zip(
            rejects.column("key").to_pylist(), rejects.column("reason").to_pylist(), strict=True
        )
        if r == DUPLICATE
    }
    new = [k for k in moved if k not in listed]
    extra = pa.table(
        {"key": new, "shard": [shard_url] * len(new), "reason": [DUPLICATE] * len(new)},
        schema=REJECTS_SCHEMA,
    )
    write_part(pa.concat_tables([rejects, extra]), rejects_dir, name)
    write_part(labels.filter(pc.invert(drop)), labels_dir, name)
    return len(moved)


def _partitions(parts: list[str]) -> int:
    """Reducers for about `KEYS_PER_PARTITION` keys each (the first part's rows as a guide)."""
    fs, path = storage.filesystem(parts[0])
    rows = storage.retry(lambda: pq.read_metadata(path, filesystem=fs).num_rows, parts[0])
    return max(1, math.ceil(len(parts) * rows / KEYS_PER_PARTITION))


def _digest(parts: list[str]) -> dict:
    names = "\n".join(sorted(p.rsplit("/", 1)[-1] for p in parts))
    return {"parts": len(parts), "sha256": hashlib.sha256(names.encode()).hexdigest()}


class _Runner:
    """Ray tasks where Ray is up (they run where the cluster has room), else plain calls."""

    def __init__(self) -> None:
        import ray

        self.ray = ray if ray.is_initialized() else None
        self.remotes: dict[Callable, object] = {}

    def call(self, fn: Callable, *args, returns: int = 1):
        if self.ray is None:
            return fn(*args)
        if fn not in self.remotes:
            self.remotes[fn] = self.ray.remote(fn)
        return (
            self.remotes[fn]
            .options(num_returns=returns, scheduling_strategy="SPREAD")
            .remote(*args)
        )

    def get(self, refs: list) -> list:
        return refs if self.ray is None else self.ray.get(refs)
