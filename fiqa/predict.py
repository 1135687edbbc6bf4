"""Score images with a model in-process, no Ray: what `fiqa predict` runs on a laptop or edge box.

- The model is anything `fiqa.models.predictor.open_predictor` opens: a checkpoint
  directory (local or s3://), an ONNX or a TorchScript export.
- Inputs are image files, folders (searched recursively for images and
  ``.tar`` shards), and shard specs (a tar path, glob, brace pattern or
  ``s3://`` URL, as in the run config).
- Images are prepared exactly as the scoring engine prepares them
  (`fiqa.data.decode.decode_image`: ``resize`` px, center crop of ``image_size``), so a
  checkpoint scores an image here as it did when it pseudo-labeled it (in float32; the
  engine uses bfloat16 on GPU). Decoding runs on a small thread pool (PIL releases the
  GIL) while the model scores the previous batch.
- An input that cannot be used (not an image, truncated, too small, a bad
  shard) gets a row with a ``reason`` instead of scores; it never stops the run.
"""

from __future__ import annotations

import csv
import glob as globlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import braceexpand
import numpy as np

from fiqa import storage
from fiqa.data.decode import RejectedSample, decode_image
from fiqa.data.reader import read_shard
from fiqa.data.shards import expand_shard_spec
from fiqa.models.predictor import Predictor
from fiqa.storage import is_remote

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
OUTPUT_FORMATS = (".csv", ".parquet", ".json", ".jsonl")
# Label problems in a shard's json do not stop an image from being scored.
_LABEL_REASONS = ("bad_json", "bad_label", "no_label")


# --------------------------------------------------------------------------- the inputs


def _walk(root: str) -> list[tuple[str, str]]:
    found = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for f in sorted(files):
            low = f.lower()
            if low.endswith(IMAGE_EXTENSIONS):
                found.append(("file", os.path.join(dirpath, f)))
            elif low.endswith(".tar"):
                found.append(("shard", os.path.join(dirpath, f)))
    return found


def _classify_local(path: str, named: bool) -> list[tuple[str, str]]:
    if os.path.isdir(path):
        return _walk(path)
    if path.lower().endswith(".tar"):
        return [("shard", path)]
    # A file named on the command line is always tried; from a pattern, only images.
    return [("file", path)] if named or path.lower().endswith(IMAGE_EXTENSIONS) else []


def resolve_inputs(items: Iterable[str]) -> list[tuple[str, str]]:
    """Command-line inputs -> ``[("file" | "shard", location), ...]`` in order, without repeats.

    A folder contributes its images and ``.tar`` shards (recursively); a local
    glob or brace pattern the files it matches; an ``s3://`` URL is a shard spec
    (or one image when it ends with an image extension).
    """
    out: list[tuple[str, str]] = []
    for item in items:
        if is_remote(item):
            if item.lower().endswith(IMAGE_EXTENSIONS):
                if not storage.exists(item):
                    raise FileNotFoundError(f"input {item!r} does not exist")
                out.append(("file", item))
            else:
                out.extend(("shard", url) for url in expand_shard_spec(item))
            continue
        if os.path.exists(item):
            found = _classify_local(item, named=True)
        else:
            matches = [
                m
                for pattern in braceexpand.braceexpand(os.path.expanduser(item))
                for m in (
                    sorted(globlib.glob(pattern, recursive=True))
                    if any(c in pattern for c in "*?[")
                    else ([pattern] if os.path.exists(pattern) else [])
                )
            ]
            if not matches:
                raise FileNotFoundError(f"input {item!r} names no file, folder or shard")
            found = [x for m in matches for x in _classify_local(m, named=False)]
        if not found:
            raise FileNotFoundError(f"input {item!r} holds no image (or .tar shard)")
        out.extend(found)
    return list(dict.fromkeys(out))


def iter_records(inputs: list[tuple[str, str]]) -> Iterator[dict]:
    """One record per image: ``path``, ``key`` (sample key in a shard, else ""), ``image``, ``reason``.

    A file's bytes are read later, on the decode threads (``image`` is None).
    """
    for kind, loc in inputs:
        if kind == "file":
            yield {"path": loc, "key": "", "image": None, "reason": None}
            continue
        n = 0
        for rec in read_shard(loc):
            n += 1
            reason = rec["reason"]
            if reason in _LABEL_REASONS and rec["image"]:
                reason = None
            yield {"path": loc, "key": rec["key"], "image": rec["image"], "reason": reason}
        if n == 0:
            yield {"path": loc, "key": "", "image": b"", "reason": "empty_shard"}


def prepare(
    rec: dict, resize: int, crop: int, max_pixels: int = 40_000_000, min_side: int = 16
) -> tuple[np.ndarray | None, str | None]:
    """A record's pixels (uint8, crop x crop x 3) as the scoring engine makes them, or a reason."""
    if rec["reason"]:
        return None, rec["reason"]
    data = rec["image"]
    if data is None:
        try:
            data = storage.read_bytes(rec["path"])
        except OSError as e:  # named by the OS or store error, not by storage's wrapper
            cause = e.__cause__ if isinstance(e, storage.StorageError) and e.__cause__ else e
            return None, f"unreadable_file: {type(cause).__name__}"
    try:
        return decode_image(data, resize, max_pixels, min_side, crop=crop), None
    except RejectedSample as e:
        return None, e.reason


def _batched(it: Iterable[dict], n: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def predict(
    predictor: Predictor,
    inputs: list[tuple[str, str]],
    batch_size: int = 64,
    workers: int | None = None,
    max_pixels: int = 40_000_000,
    min_side: int = 16,
    stats: dict | None = None,
) -> Iterator[dict]:
    """Score ``inputs`` (from `resolve_inputs`); yields one row per image, in input order.

    A row has ``path``, ``key``, ``raw_score``, ``score`` (None when rejected)
    and ``reason`` (None when scored). Decoding of the next batch overlaps with
    the model's work on the current one. ``stats``, when given, receives the
    seconds spent in the model (``model_s``).
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    workers = workers or min(4, os.cpu_count() or 1)
    size, resize = predictor.image_size, predictor.resize
    stats = stats if stats is not None else {}
    stats.setdefault("model_s", 0.0)

    with ThreadPoolExecutor(workers, thread_name_prefix="fiqa-decode") as pool:

        def submit(chunk: list[dict] | None) -> list[tuple[dict, Future]] | None:
            if chunk is None:
                return None
            return [(r, pool.submit(prepare, r, resize, size, max_pixels, min_side)) for r in chunk]

        chunks = _batched(iter_records(inputs), batch_size)
        pending = submit(next(chunks, None))
        while pending is not None:
            upcoming = submit(next(chunks, None))  # decode the next batch meanwhile
            prepared = [(r, *f.result()) for r, f in pending]
            ok = [i for i, (_, pix, _) in enumerate(prepared) if pix is not None]
            raw = score = np.zeros(0)
            if ok:
                t0 = time.perf_counter()
                raw, score = predictor(np.stack([prepared[i][1] for i in ok]))
                stats["model_s"] += time.perf_counter() - t0
            pos = {i: j for j, i in enumerate(ok)}
            for i, (rec, _, reason) in enumerate(prepared):
                j = pos.get(i)
                yield {
                    "path": rec["path"],
                    "key": rec["key"],
                    "raw_score": None if j is None else float(raw[j]),
                    "score": None if j is None else float(score[j]),
                    "reason": reason,
                }
            pending = upcoming


# --------------------------------------------------------------------------- the outputs


def check_output_path(out: str) -> None:
    if not out.lower().endswith(OUTPUT_FORMATS):
        raise ValueError(f"--output {out!r}: expected a file ending in one of {OUTPUT_FORMATS}")


def write_predictions(rows: list[dict], out: str) -> None:
    """Write rows to ``out``: .csv, .parquet, .json (an array) or .jsonl (one object a line)."""
    check_output_path(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    cols = ("path", "key", "raw_score", "score", "reason")
    low = out.lower()
    tmp = out + ".tmp"
    if low.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "path": pa.array([r["path"] for r in rows], pa.string()),
                "key": pa.array([r["key"] for r in rows], pa.string()),
                "raw_score": pa.array([r["raw_score"] for r in rows], pa.float64()),
                "score": pa.array([r["score"] for r in rows], pa.float64()),
                "reason": pa.array([r["reason"] for r in rows], pa.string()),
            }
        )
        pq.write_table(table, tmp)
    elif low.endswith(".csv"):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in rows:
                w.writerow(["" if r[c] is None else r[c] for c in cols])
    else:
        with open(tmp, "w") as f:
            if low.endswith(".jsonl"):
                for r in rows:
                    f.write(json.dumps({c: r[c] for c in cols}) + "\n")
            else:
                json.dump([{c: r[c] for c in cols} for r in rows], f, indent=1)
    os.replace(tmp, out)  # a reader never sees half a file


def _name(row: dict) -> str:
    return f"{row['path']}:{row['key']}" if row["key"] else row["path"]


def format_table(rows: list[dict]) -> str:
    width = min(60, max([len(_name(r)) for r in rows] + [5]))
    lines = [f"{'image':<{width}} {'score':>9} {'raw_score':>10}  reason"]
    for r in rows:
        name = _name(r)
        name = name if len(name) <= width else "..." + name[-(width - 3) :]
        if r["reason"]:
            lines.append(f"{name:<{width}} {'-':>9} {'-':>10}  {r['reason']}")
        else:
            lines.append(f"{name:<{width}} {r['score']:>9.4f} {r['raw_score']:>10.4f}")
    return "\n".join(lines)
