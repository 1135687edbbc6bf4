"""Reading one WebDataset shard into records, accounting for every sample.

The unit of work everywhere is the shard. `read_shard` streams a shard's
samples as records ``{key, shard, image, mos, reason}``; a sample that
cannot be used still yields a record, with ``reason`` set, so that for every
shard *used + rejected == samples read*. Shard-level failures (unreadable or
truncated tar) yield a record with an empty key and the failure as reason, after the
record of the sample the failure cut (``truncated_member``, with its key).

A sample whose files include a link, a device, a FIFO or a directory (``not_a_file``) or a
member over the size cap (``member_too_large``) is a reject naming that member: its data is
never read into memory.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator

from fiqa import storage
from fiqa.data.decode import IMAGE_KEYS, RejectedSample, pick_image
from fiqa.data.tar_stream import DEFAULT_MAX_MEMBER_BYTES, Skipped, TruncatedShard, iter_tar

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


# The files of a sample `read_shard` reads; the bytes of any other are not held.
_KEPT = frozenset((*IMAGE_KEYS, "json"))
_REJECT = "__reject__"  # a sample's member-level reject reason (the first one met)
REASON_CHARS = 200  # a reason names a member, and member names are the shard's to choose


def _samples(
    url: str, storage_options: dict | None, max_member_bytes: int | None
) -> Iterator[dict]:
    """Group the tar's files into samples by key, the WebDataset way.

    `iter_tar` makes truncation visible: a member shorter than its header
    says, or an archive without its end-of-archive blocks, raises. Every file with a key
    lands in a sample: one that is not a regular file, or is over ``max_member_bytes``,
    or is cut short, marks its sample rejected (``__reject__``) instead of being dropped.
    """
    fs, path = storage.filesystem(url, storage_options)
    size = storage.retry(lambda: fs.size(path), url, "stat")
    current: dict | None = None
    with fs.open(path, "rb") as stream:
        try:
            for name, data in iter_tar(stream, size, max_member_bytes, skipped=True):
                key, ext = _sample_key(name)
                if key is None:
                    continue
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                if isinstance(data, Skipped):
                    current.setdefault(_REJECT, f"{data.reason}: {name}: {data.detail}")
                elif ext in _KEPT:
                    current[ext] = data
        except Exception as e:
            if _store_failed(e):
                raise  # nothing to say about the shard's samples: read_shard fails the task
            # The sample before the failure is whole unless the cut member is one of its
            # files; a cut member of a new sample is that sample's reject.
            cut = _sample_key(e.member)[0] if isinstance(e, TruncatedShard) and e.member else None
            if current is not None and cut == current["__key__"]:
                current.setdefault(_REJECT, f"truncated_member: {e}")
            if current is not None:
                yield current
            if cut is not None and (current is None or cut != current["__key__"]):
                yield {"__key__": cut, _REJECT: f"truncated_member: {e}"}
            raise
        if current is not None:
            yield current


def _sample_key(name: str) -> tuple[str | None, str]:
    """A member's sample key and lower-case extension; no key for a name that is no
    sample's file (no extension, or WebDataset's ``__`` names). A trailing slash (how tar
    names directories) is no part of it: a directory named ``x.jpg/`` is a reject of x."""
    key, ext = split_key(name.rstrip("/"))
    if key is None or key.startswith("__"):
        return None, ""
    return key, (ext or "").lower()


def _store_failed(e: BaseException) -> bool:
    """The store failed, not the shard (a retry may read it whole)."""
    return storage.is_transient(e) or isinstance(e, PermissionError)


def read_shard(
    url: str,
    label_field: str = "mos",
    require_label: bool = False,
    storage_options: dict | None = None,
    max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[dict]:
    """Yield one record per sample of shard ``url`` (see module docstring); a member over
    ``max_member_bytes`` rejects its sample (``member_too_large``) unread."""
    seen: set[str] = set()
    try:
        for sample in _samples(url, storage_options, max_member_bytes):
            key = sample["__key__"]
            rec = {"key": key, "shard": url, "image": b"", "mos": None, "reason": None}
            if key in seen:
                rec["reason"] = "duplicate_key"
            elif _REJECT in sample:
                rec["reason"] = sample[_REJECT][:REASON_CHARS]
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
        if _store_failed(e):
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
