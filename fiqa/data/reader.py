"""Reading one WebDataset shard into records, accounting for every sample.

The unit of work everywhere is the shard. `read_shard` streams a shard's
samples as records ``{key, shard, image, mos, reason}``; a sample that
cannot be used still yields a record, with ``reason`` set, so that for every
shard *used + rejected == samples read*. Shard-level failures (unreadable or
truncated tar) yield a record with an empty key and the failure as reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator

from fiqa import storage
from fiqa.data.decode import RejectedSample, pick_image
from fiqa.data.tar_stream import TruncatedShard, iter_tar

__all__ = ["TruncatedShard", "read_shard", "split_key"]


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


def _samples(url: str, storage_options: dict | None) -> Iterator[dict]:
    """Group the tar's files into samples by key, the WebDataset way.

    `iter_tar` makes truncation visible: a member shorter than its header
    says, or an archive without its end-of-archive blocks, raises.
    """
    fs, path = storage.filesystem(url, storage_options)
    size = storage.retry(lambda: fs.size(path), url, "stat")
    current: dict | None = None
    with fs.open(path, "rb") as stream:
        try:
            for name, data in iter_tar(stream, size):
                key, ext = split_key(name)
                if key is None or key.startswith("__"):
                    continue
                ext = ext.lower()
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                current[ext] = data
        except TruncatedShard as e:
            # The sample before the cut is whole unless the cut member is one of its files.
            if current is not None and (
                e.member is None or split_key(e.member)[0] != current["__key__"]
            ):
                yield current
            raise
        if current is not None:
            yield current


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
            rec = {"key": key, "shard": url, "image": b"", "mos": None, "reason": None}
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
                    rec.update(image=image, mos=label, reason=why)
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
            "mos": None,
            "reason": f"{kind}: {type(e).__name__}: {str(e)[:160]}",
        }
