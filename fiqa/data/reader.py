"""Reading one WebDataset shard into records, accounting for every sample.

The unit of work everywhere is the shard. `read_shard` streams a shard's
samples as records ``{key, shard, image, label, reason}``; a sample that
cannot be used still yields a record, with ``reason`` set, so that for every
shard *used + rejected == samples read*. Shard-level failures (unreadable or
truncated tar) yield a record with an empty key and the failure as reason.
"""

from __future__ import annotations

import json
import math
import re
import tarfile
from collections.abc import Iterator

from fiqa import storage
from fiqa.data.decode import RejectedSample, pick_image
from fiqa.data.shards import filesystem_for


def _parse_label(meta: bytes | None, label_field: str) -> tuple[float | None, str | None]:
    if meta is None:  # metadata is optional; a label requirement is checked by the caller
        return None, None
    try:
        obj = json.loads(meta)
    except (ValueError, UnicodeDecodeError):
        return None, "bad_json"
    if not isinstance(obj, dict):
        return None, "bad_json"
    if label_field not in obj:
        return None, None
    try:
        value = float(obj[label_field])
    except (TypeError, ValueError):
        return None, "bad_label"
    if not math.isfinite(value):
        return None, "bad_label"
    return value, None


# WebDataset's naming convention: a sample's files share the path up to the
# first dot of the file name; the rest is the extension. (Importing webdataset
# itself would import torch into every data worker, for one regular expression.)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_key(name: str) -> tuple[str | None, str | None]:
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


class TruncatedShard(Exception):
    pass


def _samples(url: str, storage_options: dict | None) -> Iterator[dict]:
    """Group the tar's files into samples by key, the WebDataset way.

    Python's tarfile treats a tar cut short at a header as a clean end, so
    two checks make truncation visible: every member's data has its declared
    size, and the archive ends with its end-of-archive blocks.
    """
    fs = filesystem_for(url, storage_options)
    size = storage.retry(lambda: fs.size(url), url, "stat")
    with fs.open(url, "rb") as stream:
        tar = tarfile.open(fileobj=stream, mode="r|")
        current: dict | None = None
        for info in tar:
            if not info.isreg():
                continue
            key, ext = split_key(info.name)
            data = tar.extractfile(info).read()
            if len(data) != info.size:
                raise TruncatedShard(f"{info.name}: {len(data)} of {info.size} bytes")
            if key is None or key.startswith("__"):
                continue
            ext = ext.lower()
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = data
        if current is not None:
            yield current
        if size < tar.offset + 2 * tarfile.BLOCKSIZE:
            raise TruncatedShard(f"no end-of-archive marker after byte {tar.offset} of {size}")


def read_shard(
    url: str,
    label_field: str = "mos",
    require_label: bool = False,
    storage_options: dict | None = None,
) -> Iterator[dict]:
    """Yield one record per sample of shard ``url`` (see module docstring)."""
    seen: set[str] = set()
    try:
        for sample in _samples(url, storage_options):
            key = sample["__key__"]
            rec = {"key": key, "shard": url, "image": b"", "label": None, "reason": None}
            if key in seen:
                rec["reason"] = "duplicate_key"
            else:
                try:
                    image = pick_image(sample)
                except RejectedSample as e:
                    rec["reason"] = e.reason
                else:
                    label, why = _parse_label(sample.get("json"), label_field)
                    if why is None and require_label and label is None:
                        why = "no_label"
                    rec.update(image=image, label=label, reason=why)
            seen.add(key)
            yield rec
    except Exception as e:  # an unreadable or truncated tar: report it, keep what was read
        if storage.is_transient(e) or isinstance(e, PermissionError):
            # The store failed, not the shard: fail the task rather than commit a wrong
            # reject (nothing of this shard is committed; a retry or rerun reads it again).
            raise storage.StorageError(
                f"cannot read shard {url}: {type(e).__name__}: {storage.redact(str(e))[:200]}"
            ) from e
        kind = "truncated_shard" if seen else "unreadable_shard"
        yield {
            "key": "",
            "shard": url,
            "image": b"",
            "label": None,
            "reason": f"{kind}: {type(e).__name__}: {str(e)[:160]}",
        }
