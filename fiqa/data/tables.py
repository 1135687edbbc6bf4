"""The Arrow/Parquet tables a run produces, one part file per input shard.

A table is a directory (local or ``s3://``) of Parquet part files, one per
input shard, named after the shard, each written whole and only then renamed
into place (or PUT in one request on object storage; see `fiqa.storage`), so
a part that exists is complete.

Scored table (``labels/``): key, shard, image, mos, raw_score, score, score_spread, model_id,
source
Rejects table (``rejects/``): key, shard, reason
"""

from __future__ import annotations

import hashlib
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from fiqa import storage

# Part of every stage's fingerprint: a run made with older tables rebuilds them.
# 2: the MOS column is ``mos`` (was ``label``). 3: ``score_spread``.
TABLES_VERSION = 3

SCORED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("image", pa.binary()),
        ("mos", pa.float32()),  # from the shard's json (labeled data), else null
        ("raw_score", pa.float32()),  # the model's output (null when no model ran)
        ("score", pa.float32()),  # on the MOS scale: mos if present, else calibrated raw_score
        # The pseudo-label's spread over views on the MOS scale (scoring.views); null for a
        # row with a MOS or scored from one view. A confidence users may filter on.
        ("score_spread", pa.float32()),
        ("model_id", pa.string()),
        ("source", pa.string()),
    ]
)
REJECTS_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("reason", pa.string())])


def part_name(shard_url: str) -> str:
    """A stable, unique part-file name for a shard: its stem plus a hash of its URL."""
    stem = posixpath.basename(shard_url.rstrip("/")).removesuffix(".tar")
    digest = hashlib.sha1(shard_url.encode()).hexdigest()[:8]
    return f"{stem}-{digest}.parquet"


def write_part(table: pa.Table, directory: str, name: str, compression: str = "zstd") -> str:
    """Write ``table`` as ``directory/name`` so that it appears complete or not at all."""
    url = storage.join(directory, name)
    storage.atomic_write(url, lambda f: pq.write_table(table, f, compression=compression))
    return url


def list_parts(directory: str) -> list[str]:
    """Complete part files of a table directory (full paths / URLs), sorted."""
    return [p for p in storage.listdir(directory) if p.endswith(".parquet")]


def read_part(url: str, columns: list[str] | None = None) -> pa.Table:
    """One part file (local or s3://), only ``columns``; transient errors are retried."""
    fs, path = storage.filesystem(url)
    return storage.retry(lambda: pq.read_table(path, columns=columns, filesystem=fs), url, "read")


def read_table(directory: str, columns: list[str] | None = None) -> pa.Table:
    parts = list_parts(directory)
    if not parts:
        raise FileNotFoundError(f"no parquet parts in {directory!r}")
    return pa.concat_tables([read_part(p, columns) for p in parts])
