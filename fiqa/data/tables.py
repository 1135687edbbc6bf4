"""The Arrow/Parquet tables a run produces, one part file per input shard.

A table is a directory of Parquet part files, one per input shard, named
after the shard, each written whole and only then renamed into place (or
PUT in one request on object storage), so a part that exists is complete.

Scored table (``labels/``): key, shard, image, label, raw_score, score, model_id, source
Rejects table (``rejects/``): key, shard, reason
"""

from __future__ import annotations

import hashlib
import os
import posixpath

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

SCORED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("image", pa.binary()),
        ("label", pa.float32()),  # MOS from the shard's json (labeled data) or null
        ("raw_score", pa.float32()),  # the model's output (null when no model ran)
        ("score", pa.float32()),  # on the MOS scale: label if present, else calibrated raw_score
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


def write_part(table: pa.Table, directory: str, name: str) -> str:
    """Write ``table`` as ``directory/name`` so that it appears complete or not at all."""
    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    final = posixpath.join(root, name)
    if isinstance(fs, LocalFileSystem):
        tmp = final + ".tmp"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, final)
    else:  # object stores: one PUT of the whole object is atomic
        with fs.open(final, "wb") as f:
            pq.write_table(table, f, compression="zstd")
    return final


def list_parts(directory: str) -> list[str]:
    """Complete part files of a table directory (full paths / URLs), sorted."""
    fs, root = fsspec.core.url_to_fs(directory)
    if not fs.exists(root):
        return []
    paths = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))
    if "://" in directory:
        scheme = directory.split("://", 1)[0]
        return [f"{scheme}://{p}" if "://" not in p else p for p in paths]
    return paths


def read_table(directory: str, columns: list[str] | None = None) -> pa.Table:
    parts = list_parts(directory)
    if not parts:
        raise FileNotFoundError(f"no parquet parts in {directory!r}")
    fs, _ = fsspec.core.url_to_fs(directory)
    tables = [
        pq.read_table(fsspec.core.url_to_fs(p)[1], columns=columns, filesystem=fs) for p in parts
    ]
    return pa.concat_tables(tables)
