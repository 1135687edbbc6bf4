"""`fiqa shard`: a folder of images plus a ``name,score`` CSV -> labeled WebDataset shards."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import webdataset as wds

from fiqa.data.decode import IMAGE_KEYS
from fiqa.data.shards import local_output_dir

EXT_ALIASES = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}


def _key(name: str) -> str:
    # WebDataset splits a file name at its first dot: keys must not contain one.
    return re.sub(r"[^A-Za-z0-9_\-]", "_", os.path.splitext(name)[0])


def read_label_csv(path: str | Path) -> dict[str, float]:
    """``name,score`` rows (a header row is optional) -> {name: score}."""
    labels: dict[str, float] = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f), start=1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{i}: expected name,score, got {row!r}")
            name, raw = row[0].strip(), row[1].strip()
            try:
                score = float(raw)
            except ValueError:
                if i == 1:
                    continue  # header
                raise ValueError(f"{path}:{i}: score {raw!r} is not a number") from None
            if name in labels:
                raise ValueError(f"{path}:{i}: {name!r} is listed twice")
            labels[name] = score
    if not labels:
        raise ValueError(f"{path}: no name,score rows")
    return labels


def shard_folder(
    images: str | Path,
    labels: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    label_field: str = "mos",
    prefix: str = "labeled",
) -> dict:
    """Write ``out/<prefix>-NNNNNN.tar`` shards; returns counts and the names left out."""
    images, out = Path(images), Path(local_output_dir(out))
    if not images.is_dir():
        raise ValueError(f"--images {str(images)!r} is not a directory")
    scores = read_label_csv(labels)
    out.mkdir(parents=True, exist_ok=True)
    missing, written, keys = [], 0, set()
    sink = None
    shard_paths = []
    for name, score in sorted(scores.items()):
        path = images / name
        ext = EXT_ALIASES.get(path.suffix.lower())
        if not path.is_file() or ext not in IMAGE_KEYS:
            missing.append(name)
            continue
        key = _key(name)
        if key in keys:
            raise ValueError(f"{name!r} maps to key {key!r}, already used by another file")
        keys.add(key)
        if written % shard_size == 0:
            if sink:
                sink.close()
            shard_paths.append(out / f"{prefix}-{len(shard_paths):06d}.tar")
            sink = wds.TarWriter(str(shard_paths[-1]))
        meta = {label_field: score, "file": name}
        sink.write({"__key__": key, ext: path.read_bytes(), "json": json.dumps(meta).encode()})
        written += 1
    if sink:
        sink.close()
    if not written:
        raise ValueError(f"none of the {len(scores)} CSV rows names an image in {str(images)!r}")
    return {"written": written, "shards": [str(p) for p in shard_paths], "missing": missing}
