"""The CPU side of a scoring stream: a Ray Data task reads a shard and decodes its images.

One shard URL in, record batches out (with pixels when a model will run). Every sample of
the shard leaves as a row, the unusable ones with a ``reason``. Every batch carries
``shard_total``: -1, except the shard's last batch, where it is the number of rows the shard
produced, so the driver knows when a shard is complete. No torch here: a decode worker
starts in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fiqa.cluster import cores
from fiqa.data.decode import RejectedSample, decode_image
from fiqa.data.reader import read_shard
from fiqa.scoring.job import ScoreJob
from fiqa.scoring.stream import rows_per_block


def read_and_decode(batch: dict, job: ScoreJob) -> Iterator[dict]:
    """Ray Data UDF over a batch of shard URLs."""
    with cores.off_claimed_cores():  # those of the scoring actors on this machine (if any)
        for url in batch["shard"]:
            yield from decode_shard(url, job)


def decode_shard(url: str, job: ScoreJob) -> Iterator[dict]:
    """The batches of one shard; the last is held back so that it is never empty."""
    crop = job.crop if job.with_model else None
    block_rows = rows_per_block(crop, job.scoring.batch_size)
    rows: list[dict] = []
    pending: list[dict] | None = None
    total = 0
    for rec in read_shard(url, job.label_field, job.require_label, job.storage_options):
        rec["pixels"] = None
        if rec["reason"] is None:
            try:
                # Decoded even when no model runs: a sample that cannot be is a reject.
                pix = decode_image(
                    rec["image"], job.resize, job.max_pixels, job.min_side, crop=crop
                )
                rec["pixels"] = pix if job.with_model else None
            except RejectedSample as e:
                rec["reason"] = e.reason
        rows.append(rec)
        total += 1
        if len(rows) == block_rows:
            if pending is not None:
                yield to_batch(pending, -1, job)
            pending, rows = rows, []
    if rows:
        if pending is not None:
            yield to_batch(pending, -1, job)
        yield to_batch(rows, total, job)
    elif pending is not None:
        yield to_batch(pending, total, job)
    else:  # a tar with no members at all
        empty = {"key": "", "shard": url, "image": b"", "mos": None, "reason": "empty_shard"}
        yield to_batch([{**empty, "pixels": None}], 1, job)


def to_batch(rows: list[dict], total: int, job: ScoreJob) -> dict:
    """Records as one column batch; ``total`` is the shard's ``shard_total`` (-1: not last)."""
    n = len(rows)
    out = {
        "key": np.array([r["key"] for r in rows], dtype=object),
        "shard": np.array([r["shard"] for r in rows], dtype=object),
        "image": np.array([r["image"] for r in rows], dtype=object),
        "mos": np.array([np.nan if r["mos"] is None else r["mos"] for r in rows], dtype=np.float64),
        "reason": np.array([r["reason"] or "" for r in rows], dtype=object),
        "shard_total": np.full(n, total, dtype=np.int64),
    }
    if job.with_model:
        pix = np.zeros((n, job.crop, job.crop, 3), dtype=np.uint8)
        for i, r in enumerate(rows):
            if r["pixels"] is not None:
                pix[i] = r["pixels"]
        out["pixels"] = pix
    return out
