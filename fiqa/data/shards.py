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
from collections.abc import Sequence

import braceexpand

from fiqa import storage
from fiqa.storage import is_remote

ShardSpec = str | Sequence[str]


class ShardSpecError(ValueError):
    """A shard spec names nothing, or names something that is not a shard."""


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
                raise ShardSpecError(f"shard {item!r} does not exist")
            found = [os.path.abspath(p) for p in found]
        if not found:
            raise ShardSpecError(f"{item!r} matches no .tar shard")
        out.extend(found)
    return out


def expand_shard_spec(spec: ShardSpec, storage_options: dict | None = None) -> list[str]:
    """Expand ``spec`` into a sorted list of unique shard URLs or absolute paths."""
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
