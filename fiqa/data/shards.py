"""Shard specs: the public way to name a set of WebDataset tar shards.

A spec is a local path, a directory (all ``*.tar`` in it), a glob
(``data/*.tar``), a brace pattern (``faces-{000000..000099}.tar``), an
``s3://`` URL of any of these, or a list of them. ``expand_shard_spec`` turns
a spec into a sorted, de-duplicated list of concrete shard URLs and fails
loudly when something names no shard.
"""

from __future__ import annotations

import glob as globlib
import os
import re
from collections.abc import Sequence

import braceexpand

from fiqa import storage
from fiqa.storage import is_remote

ShardSpec = str | Sequence[str]


class ShardSpecError(ValueError):
    """A shard spec names nothing, or names something that is not a shard."""


# Any URL scheme: what `pathlib.Path` would silently turn into a local folder ("s3:/bucket").
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_output_dir(path: str | os.PathLike, what: str = "out") -> str:
    """``path`` as the local directory shards are written to (``file://`` stripped).

    A URL (``s3://``...) is refused: the writers (webdataset's ``TarWriter``) write local
    files only. So is an existing file. Both messages name ``what`` (the flag or argument).
    """
    path = os.fspath(path)
    if path.startswith("file://"):
        path = path[len("file://") :]
    elif _SCHEME.match(path):
        bucket = path if path.startswith("s3://") else "s3://BUCKET/PREFIX"
        raise ValueError(
            f"{what} {path!r}: shards are written to a local directory only; write them to "
            f"one, then copy it to the bucket, e.g. `aws s3 sync DIR {bucket}`"
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a file; give a directory to write the shards to")
    return path


def _where(item: str) -> str:
    """Where a relative local path was looked for: a spec in a config is not relative to it."""
    if os.path.isabs(item):
        return ""
    return (
        f" (looked for {os.path.abspath(item)}: a relative path resolves from the working "
        "directory)"
    )


def _expand_remote(item: str, storage_options: dict | None) -> list[str]:
    fs, path = storage.filesystem(item, storage_options)
    scheme = item.split("://", 1)[0]
    if _has_glob(path):
        return [f"{scheme}://{p}" for p in fs.glob(path) if p.endswith(".tar")]
    try:
        kind = fs.info(path)["type"]
    except FileNotFoundError:
        raise ShardSpecError(f"shard {item!r} does not exist") from None
    if kind == "directory":
        return [f"{scheme}://{p}" for p in fs.find(path) if p.endswith(".tar")]
    return [item]


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _expand_one(pattern: str, storage_options: dict | None) -> list[str]:
    if pattern.startswith("file://"):
        pattern = pattern[len("file://") :]
    remote = is_remote(pattern)
    out: list[str] = []
    for item in braceexpand.braceexpand(pattern):
        if remote:  # listing errors name the spec; transient ones are retried
            found = storage.retry(lambda i=item: _expand_remote(i, storage_options), item, "list")
        else:
            item = os.path.expanduser(item)
            if _has_glob(item):
                found = [p for p in globlib.glob(item, recursive=True) if os.path.isfile(p)]
            elif os.path.isdir(item):
                found = [
                    os.path.join(root, f)
                    for root, _, files in os.walk(item)
                    for f in files
                    if f.endswith(".tar")
                ]
            elif os.path.isfile(item):
                found = [item]
            else:
                raise ShardSpecError(f"shard {item!r} does not exist{_where(item)}")
            found = [os.path.abspath(p) for p in found]
        if not found:
            where = "" if remote else _where(item)
            raise ShardSpecError(f"{item!r} matches no .tar shard{where}")
        out.extend(found)
    return out


def expand_shard_spec(
    spec: ShardSpec, storage_options: dict | None = None, what: str | None = None
) -> list[str]:
    """Expand ``spec`` into a sorted list of unique shard URLs or absolute paths.

    ``what`` names where the spec came from (``data.labeled_train``, ``INPUT``); a
    `ShardSpecError` starts with it.
    """
    try:
        return _expand(spec, storage_options)
    except ShardSpecError as e:
        if what is None:
            raise
        raise ShardSpecError(f"{what}: {e}") from None


def _expand(spec: ShardSpec, storage_options: dict | None) -> list[str]:
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise ShardSpecError("empty shard spec")
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise ShardSpecError("empty list of shard specs")
    urls: list[str] = []
    for p in patterns:
        if not isinstance(p, str):
            raise ShardSpecError(f"a shard spec must be a string or a list of strings, got {p!r}")
        urls.extend(_expand_one(p.strip(), storage_options))
    return sorted(set(urls))
