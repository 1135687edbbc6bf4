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
from collections.abc import Iterator

from webdataset.tariterators import base_plus_ext, tar_file_iterator

from fiqa.data.decode import IMAGE_KEYS
from fiqa.data.shards import filesystem_for


def _parse_label(meta: bytes | None, label_field: str) -> tuple[float | None, str | None]:
    if meta is None:
        return None, "no_json"
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


def _samples(url: str, storage_options: dict | None) -> Iterator[dict]:
    """Group the tar's files into samples by key, as WebDataset does."""
    fs = filesystem_for(url, storage_options)
    with fs.open(url, "rb") as stream:
        current: dict | None = None
        for entry in tar_file_iterator(stream):
            key, ext = base_plus_ext(entry["fname"])
            if key is None:
                continue
            ext = ext.lower()
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": key}
            if ext in current:
                current.setdefault("__dup__", []).append(ext)
            current[ext] = entry["data"]
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
            rec = {"key": key, "shard": url, "image": b"", "label": None, "reason": None}
            image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if key in seen:
                rec["reason"] = "duplicate_key"
            elif image is None:
                rec["reason"] = "no_image"
            else:
                label, why = _parse_label(sample.get("json"), label_field)
                if why is None and require_label and label is None:
                    why = "no_label"
                rec.update(image=image, label=label, reason=why)
            seen.add(key)
            yield rec
    except Exception as e:  # an unreadable or truncated tar: report it, keep what was read
        kind = "truncated_shard" if seen else "unreadable_shard"
        yield {"key": "", "shard": url, "image": b"", "label": None,
               "reason": f"{kind}: {type(e).__name__}: {str(e)[:160]}"}
