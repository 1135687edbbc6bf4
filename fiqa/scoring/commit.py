"""The per-shard commit, on the driver: rows gathered by shard, each shard written once whole.

The commit protocol: a shard's rejects part is written first, then its scored part
(``labels/``); each part is written whole (`fiqa.data.tables.write_part`), and the scored
part's existence is what commits the shard. A rerun skips committed shards
(`committed_shards`), so an interrupted job resumes at shard granularity. A key is scored
once per table: a key already scored in another shard is rejected as ``duplicate_key``
(the reader does the same within a shard); a resumed job reloads the committed keys.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import pyarrow as pa

from fiqa.calibration import to_mos_scale
from fiqa.data.tables import (
    REJECTS_SCHEMA,
    SCORED_SCHEMA,
    list_parts,
    part_name,
    read_table,
    write_part,
)
from fiqa.scoring.job import ScoreJob

COLUMNS = ("key", "shard", "image", "mos", "reason", "raw_score")


class KeyIndex:
    """The keys already scored in a table, in about 8 bytes per key.

    Keys are kept as 64-bit hashes (a sorted array plus a set of recent ones, merged in
    batches), so tens of millions fit in a few hundred MB. Two distinct keys share a hash
    with probability about n^2 / 2^65: 3e-6 for ten million keys.
    """

    MERGE_EVERY = 200_000

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()

    @staticmethod
    def _hash(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, key: str) -> bool:
        h = self._hash(key)
        if h in self._recent:
            return True
        i = np.searchsorted(self._sorted, np.uint64(h))
        return bool(i < len(self._sorted) and self._sorted[i] == h)

    def add(self, key: str) -> None:
        self._recent.add(self._hash(key))
        if len(self._recent) >= self.MERGE_EVERY:
            self._merge()

    def update(self, keys) -> None:
        for k in keys:
            self.add(k)

    def _merge(self) -> None:
        new = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
        self._sorted = np.union1d(self._sorted, new)
        self._recent.clear()


class ShardCollector:
    """Gathers the stream's rows by shard and commits each shard once all its rows arrived."""

    def __init__(self, job: ScoreJob, scored_keys: KeyIndex | None = None):
        self.job = job
        self.scored_keys = scored_keys if scored_keys is not None else KeyIndex()
        self.parts: dict[str, list[dict]] = defaultdict(list)
        self.seen: dict[str, int] = defaultdict(int)
        self.totals: dict[str, int] = {}
        self.stats = {"shards": 0, "scored": 0, "rejected": 0, "reasons": defaultdict(int)}

    def add(self, batch: dict) -> list[str]:
        """Add a batch; returns the shards it completed (and committed)."""
        if "raw_score" not in batch:  # no model ran (ingest of labeled shards)
            batch["raw_score"] = np.full(len(batch["key"]), np.nan)
        done = []
        shards = batch["shard"]
        for url in np.unique(shards):
            m = shards == url
            sub = {k: v[m] for k, v in batch.items() if k != "pixels"}
            self.parts[url].append(sub)
            self.seen[url] += int(m.sum())
            t = sub["shard_total"].max()
            if t >= 0:
                self.totals[url] = int(t)
            if url in self.totals and self.seen[url] == self.totals[url]:
                self._commit(url)
                done.append(url)
        return done

    def _commit(self, url: str) -> None:
        parts = self.parts.pop(url)
        cols = {k: np.concatenate([p[k] for p in parts]) for k in COLUMNS}
        self._reject_duplicates(cols)
        ok = cols["reason"] == ""
        rejects = pa.table(
            {k: cols[k][~ok].tolist() for k in ("key", "shard", "reason")}, schema=REJECTS_SCHEMA
        )
        name = part_name(url)
        write_part(rejects, f"{self.job.out_dir}/rejects", name)
        write_part(self._scored_table(cols, ok), f"{self.job.out_dir}/labels", name)  # commits
        n_ok = int(ok.sum())
        self.stats["shards"] += 1
        self.stats["scored"] += n_ok
        self.stats["rejected"] += len(ok) - n_ok
        for r in cols["reason"][~ok]:
            self.stats["reasons"][str(r).split(":")[0]] += 1
        self.seen.pop(url)
        self.totals.pop(url)

    def _reject_duplicates(self, cols: dict) -> None:
        """A key scored in another shard already (or earlier in this one) is a duplicate."""
        for i in np.flatnonzero(cols["reason"] == ""):
            key = cols["key"][i]
            if key in self.scored_keys:
                cols["reason"][i] = "duplicate_key"
            else:
                self.scored_keys.add(key)

    def _scored_table(self, cols: dict, ok: np.ndarray) -> pa.Table:
        mos = cols["mos"][ok].astype(np.float64)
        raw = cols["raw_score"][ok].astype(np.float64)
        n = int(ok.sum())
        return pa.table(
            {
                "key": cols["key"][ok].tolist(),
                "shard": cols["shard"][ok].tolist(),
                "image": cols["image"][ok].tolist(),
                "mos": _nullable(mos),
                "raw_score": _nullable(raw),
                "score": _nullable(to_mos_scale(mos, raw, self.job.calibration)),
                "model_id": [self.job.model_id] * n,
                "source": [self.job.source] * n,
            },
            schema=SCORED_SCHEMA,
        )


def _nullable(a: np.ndarray) -> pa.Array:
    return pa.array(a, type=pa.float32(), mask=np.isnan(a))


def committed_shards(out_dir: str) -> set[str]:
    """Part names of the shards already committed to ``out_dir``."""
    return {p.rsplit("/", 1)[-1] for p in list_parts(f"{out_dir}/labels")}


def scored_keys_of(out_dir: str) -> KeyIndex:
    """The keys of the committed scored parts (so a resumed job keeps keys unique)."""
    index = KeyIndex()
    if list_parts(f"{out_dir}/labels"):
        index.update(read_table(f"{out_dir}/labels", columns=["key"]).column("key").to_pylist())
    return index
