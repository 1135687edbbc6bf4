"""The CPU side of a scoring stream: a Ray Data task reads shards and decodes their images.

Shard URLs in (a few a task, read one after another), record batches out (with pixels when
a model will run). Every sample of a shard leaves as a row, the unusable ones with a
``reason``, numbered by its place in the shard (``row``). Every row carries
``shard_total``: -1, except a shard's last row, where it is the number of rows the shard
produced, so the driver knows when a shard is complete. No torch here: a decode worker
starts in a fraction of a second.

Where the actors decode (``job.decode_in_actor``: nvJPEG on their GPUs) this task only reads
headers: a JPEG nvJPEG decodes as the CPU would leaves with empty ``pixels`` and its bytes,
anything else (PNG, CMYK, EXIF rotation, a large photo) is decoded here, its pixels as bytes.
A task holds one block at a time, its pixels written in place as they are decoded.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fiqa.cluster import cores
from fiqa.data.decode import RejectedSample, decode_image, gpu_decodable
from fiqa.data.reader import read_shard
from fiqa.scoring.job import ScoreJob
from fiqa.scoring.stream import MEAN_IMAGE_BYTES, Sources, rows_per_block


def read_and_decode(batch: dict, job: ScoreJob, block_rows: int | None = None) -> Iterator[dict]:
    """Ray Data UDF over a batch of shard URLs; ``block_rows``: the stream's plan (by default
    `rows_per_block` of the job's crop and batch)."""
    with cores.off_claimed_cores():  # those of the scoring actors on this machine (if any)
        yield from decode_shards(batch["shard"], job, block_rows)


class _Block:
    """The rows of one block, their pixels decoded straight into one array."""

    def __init__(self, job: ScoreJob, rows: int):
        self.job = job
        self.records: list[dict] = []
        in_task = job.with_model and not job.decode_in_actor
        self.pixels = np.zeros((rows, job.crop, job.crop, 3), np.uint8) if in_task else None
        self.sent: list[bytes] = []  # actor-decoding: pixels decoded here, as bytes
        self.totals: list[int] = []  # each row's shard_total: -1 but on its shard's last row

    def add(self, rec: dict) -> None:
        job = self.job
        if rec["reason"] is None:
            try:
                if job.decode_in_actor and gpu_decodable(
                    rec["image"], job.max_pixels, job.min_side, job.resize
                ):
                    pix = None
                else:
                    # Decoded even when no model runs: a sample that cannot be is a reject.
                    pix = decode_image(
                        rec["image"], job.resize, job.max_pixels, job.min_side, crop=job.crop
                    )
            except RejectedSample as e:
                rec["reason"] = e.reason
                pix = None
            if self.pixels is not None and pix is not None:
                self.pixels[len(self.records)] = pix
            if job.decode_in_actor:
                self.sent.append(b"" if pix is None else pix.tobytes())
        elif job.decode_in_actor:
            self.sent.append(b"")
        self.records.append(rec)
        self.totals.append(-1)

    def end_shard(self, total: int) -> None:
        """The shard being read ended with ``total`` rows, the last of them here."""
        self.totals[-1] = total

    def __len__(self) -> int:
        return len(self.records)

    def batch(self) -> dict:
        """The block as one column batch."""
        out = _columns(self.records, np.array(self.totals, dtype=np.int64))
        if self.pixels is not None:
            out["pixels"] = self.pixels[: len(self.records)]
        elif self.job.decode_in_actor:
            out["pixels"] = np.array(self.sent, dtype=object)
        return out


def decode_shards(urls, job: ScoreJob, block_rows: int | None = None) -> Iterator[dict]:
    """The blocks of ``urls``' rows, the shards read one after another: every block is full
    but the task's last, so a block may end one shard and start the next (Ray Data would
    otherwise merge a shard's short last block into the next one). A full block is yielded
    when the next record comes, so that a shard's last row, which carries its total, may
    still be marked."""
    block_rows = block_rows or rows_per_block(job.decoded_crop, job.scoring.batch_size)
    block = _Block(job, block_rows)
    for url in urls:
        total = 0
        for rec in _shard_records(url, job):
            if len(block) == block_rows:
                yield block.batch()
                block = _Block(job, block_rows)
            rec["row"] = total
            block.add(rec)
            total += 1
        block.end_shard(total)
    if len(block):
        yield block.batch()


def _shard_records(url: str, job: ScoreJob) -> Iterator[dict]:
    """A shard's records; a tar with no members at all, one reject row of its own."""
    empty = True
    records = read_shard(
        url, job.label_field, job.require_label, job.storage_options, job.max_member_bytes
    )
    for rec in records:
        empty = False
        yield rec
    if empty:
        yield {"key": "", "shard": url, "image": b"", "mos": None, "reason": "empty_shard"}


def probe_sources(url: str, job: ScoreJob, samples: int = 16) -> Sources:
    """The mean encoded size and the largest pixel count of a shard's first images, read
    from their headers (a shard that cannot be read says nothing: the defaults)."""
    from itertools import islice

    from fiqa.data.decode import open_checked

    sizes, pixels = [], [0]
    try:
        records = read_shard(url, job.label_field, False, job.storage_options, job.max_member_bytes)
        for rec in islice(records, samples):
            if rec["image"]:
                sizes.append(len(rec["image"]))
                try:
                    w, h = open_checked(rec["image"], job.max_pixels, job.min_side).size
                    pixels.append(w * h)
                except RejectedSample:
                    pass
    except Exception:  # the decode tasks report an unreadable shard; this is only a hint
        return Sources()
    return Sources(int(np.mean(sizes)) if sizes else MEAN_IMAGE_BYTES, max(pixels))


def to_batch(rows: list[dict], total: int | np.ndarray, job: ScoreJob, start: int = 0) -> dict:
    """Records that carry their own ``pixels`` (None: zeros) as the batch a decode task
    yields, for code that stands in for one (a benchmark, a test); ``start``: the first
    record's place in its shard (where the records carry no ``row``); ``total``: the rows'
    ``shard_total``, one for all or one a row."""
    out = _columns([{"row": start + i, **r} for i, r in enumerate(rows)], total)
    if job.with_model:
        pix = np.zeros((len(rows), job.crop, job.crop, 3), dtype=np.uint8)
        for i, r in enumerate(rows):
            if r.get("pixels") is not None:
                pix[i] = r["pixels"]
        out["pixels"] = pix
    return out


def _columns(rows: list[dict], total: int | np.ndarray) -> dict:
    """Records as one column batch (no pixels); ``total``: the rows' ``shard_total``."""
    n = len(rows)
    return {
        "key": np.array([r["key"] for r in rows], dtype=object),
        "shard": np.array([r["shard"] for r in rows], dtype=object),
        "image": np.array([r["image"] for r in rows], dtype=object),
        "mos": np.array([np.nan if r["mos"] is None else r["mos"] for r in rows], dtype=np.float64),
        "reason": np.array([r["reason"] or "" for r in rows], dtype=object),
        "row": np.array([r["row"] for r in rows], dtype=np.int64),
        "shard_total": np.full(n, total, dtype=np.int64),
    }
