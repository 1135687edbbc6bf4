"""The Ray Data side of training: Parquet parts to decoded batches, and the tables' statistics.

::

    Parquet parts (image bytes, score, source) --read_parquet--> Ray Data
        --(CPU tasks: decode, resize, random crop + flip, source id, loss weight)-->
        get_dataset_shard("train") on each worker

Ray Data tasks import this module: it imports neither torch nor timm.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from fiqa.data.decode import decode_image
from fiqa.data.tables import list_parts, read_part
from fiqa.data.transforms import random_crop_flip
from fiqa.training.job import TrainJob

DECODE_BATCH_ROWS = 128


def decode_train_batch(
    batch: dict,
    resize: int,
    crop: int | None,
    weights: dict[str, float],
    source_ids: dict[str, int],
    hflip: bool = True,
    spread_scale: float | None = None,
) -> dict:
    """Bytes -> randomly cropped (and flipped) uint8 pixels, target, loss weight, source id.

    ``crop`` None: the whole resized images, for the training worker to crop and flip
    (deterministic training). With ``spread_scale`` a row's weight is also
    1 / (1 + (score_spread / spread_scale)^2) (`spread_weight`)."""
    rng = np.random.default_rng()
    n = len(batch["image"])
    side = crop or resize
    pixels = np.empty((n, side, side, 3), dtype=np.uint8)
    for i, data in enumerate(batch["image"]):
        img = decode_image(data, resize)
        pixels[i] = random_crop_flip(img, crop, rng, flip=hflip) if crop else img
    sources = [str(s) for s in batch["source"]]
    weight = np.array([weights.get(s, 1.0) for s in sources], dtype=np.float32)
    if spread_scale:
        weight *= spread_weight(batch["score_spread"], spread_scale)
    return {
        "pixels": pixels,
        "target": batch["score"].astype(np.float32),
        "weight": weight,
        "source_id": np.array([source_ids[s] for s in sources], dtype=np.int64),
    }


def spread_weight(spread: np.ndarray, scale: float) -> np.ndarray:
    """A pseudo-label's confidence weight: 1 at no spread, 1/2 at the tables' RMS spread,
    1 for rows without one (a MOS, or one view)."""
    s = np.nan_to_num(np.asarray(spread, dtype=np.float64), nan=0.0)
    return (1.0 / (1.0 + (s / scale) ** 2)).astype(np.float32)


def decode_eval_batch(batch: dict, resize: int, crop: int) -> dict:
    """Bytes -> centre-cropped uint8 pixels and target."""
    n = len(batch["image"])
    pixels = np.empty((n, crop, crop, 3), dtype=np.uint8)
    for i, data in enumerate(batch["image"]):
        pixels[i] = decode_image(data, resize, crop=crop)
    return {"pixels": pixels, "target": batch["score"].astype(np.float32)}


def read_parts(parts: list[str], **kwargs: Any) -> Any:
    """``ray.data.read_parquet`` of part files already listed, through Ray Data's V1 reader."""
    import ray

    ctx = ray.data.DataContext.get_current()
    # V2 reads every footer again at each epoch's execution; V1 reads them once, here.
    before, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(parts, **kwargs)
    finally:
        ctx.use_datasource_v2 = before


def train_dataset(
    job: TrainJob,
    parts: list[str],
    sources: list[str],
    rows: int,
    spread_rms: float | None = None,
) -> Any:
    """The training stream: files in a new order every epoch (with ``job.epoch_rows``, read
    over again as often as needed, ``rows`` a pass, and cut to exactly that many),
    decoded, cropped and flipped; pseudo-labels weighted by their spread where
    ``train.spread_weighting`` is on (``spread_rms``: the tables' RMS spread)."""
    import ray

    scale = spread_rms if job.train.spread_weighting else None
    columns = ["image", "score", "source"] + (["score_spread"] if scale else [])
    # Reproducible from the run's seed (row order across workers depends on who asks first).
    shuffle = ray.data.FileShuffleConfig(seed=job.seed)
    passes = math.ceil(job.epoch_rows / max(rows, 1)) if job.epoch_rows else 1
    ds = read_parts(parts * passes, shuffle=shuffle)
    # (deterministic: the trainer's DataConfig keeps the order, `ordered_ingest`)
    if job.epoch_rows:
        ds = ds.limit(job.epoch_rows)
    # select_columns is pushed down into the Parquet read: only these columns are read.
    return ds.select_columns(columns).map_batches(
        decode_train_batch,
        batch_size=DECODE_BATCH_ROWS,
        fn_kwargs={
            "resize": job.resize,
            "crop": None if job.train.deterministic else job.image_size,
            "weights": job.train.source_weights,
            "source_ids": {s: i for i, s in enumerate(sources)},
            "hflip": job.train.hflip,
            "spread_scale": scale,
        },
    )


def val_slices(job: TrainJob, parts: list[str]) -> list[Any]:
    """The validation set decoded once, in one fixed slice per worker (whole rows, none dropped)."""
    import ray

    from fiqa.cluster.resources import wait_for_free_cpu

    val_ds = (
        read_parts(parts)
        .select_columns(["image", "score"])
        .map_batches(
            decode_eval_batch,
            batch_size=DECODE_BATCH_ROWS,
            fn_kwargs={"resize": job.resize, "crop": job.image_size},
        )
    )
    val_ds.context.execution_options.preserve_order = job.train.deterministic
    # (a job that just ended may still look as if it held every CPU; see the helper. A
    # cluster with no CPU yet, scaling from zero, gets them from Ray's autoscaler instead.)
    if ray.cluster_resources().get("CPU") and not wait_for_free_cpu():
        logging.getLogger(__name__).warning(
            "no CPU of the cluster has been free for 10 s: decoding the validation set "
            "waits for one"
        )
    val_ds = val_ds.materialize()  # small and the same every epoch
    workers, n = job.train.num_workers, val_ds.count()
    cuts = [round(n * i / workers) for i in range(1, workers)]
    return val_ds.split_at_indices(cuts) if cuts else [val_ds]


def table_rows(tables: list[str]) -> int:
    """Rows of the tables, from their Parquet footers."""
    import pyarrow.parquet as pq

    from fiqa import storage

    total = 0
    for d in tables:
        for p in list_parts(d):
            fs, path = storage.filesystem(p)
            with fs.open(path, "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
    return total


@dataclass
class TableStats:
    target_mean: float
    target_std: float
    rows_by_source: dict[str, int]
    spread_rms: float | None = None  # of the rows with a score_spread; None: none has one


def table_stats(tables: list[str]) -> TableStats:
    """Mean and standard deviation of ``score``, row counts per ``source`` and the RMS of
    ``score_spread`` over the tables."""
    total, total_sq, n = 0.0, 0.0, 0
    spread_sq, spread_n = 0.0, 0
    rows: dict[str, int] = {}
    for d in tables:
        for p in list_parts(d):
            tab = read_part(p, columns=["score", "source", "score_spread"])
            col = tab.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
            col = col[~np.isnan(col)]
            total, total_sq, n = total + col.sum(), total_sq + (col**2).sum(), n + len(col)
            sp = tab.column("score_spread").drop_null().to_numpy().astype(np.float64)
            spread_sq, spread_n = spread_sq + (sp**2).sum(), spread_n + len(sp)
            for vc in pc.value_counts(tab.column("source")).to_pylist():
                rows[str(vc["values"])] = rows.get(str(vc["values"]), 0) + int(vc["counts"])
    if n < 2:
        raise RuntimeError(f"need at least 2 labeled rows to train, found {n} in {tables}")
    mean = total / n
    std = float(max(np.sqrt(max(total_sq / n - mean**2, 0.0)), 1e-6))
    rms = float(np.sqrt(spread_sq / spread_n)) if spread_n and spread_sq > 0 else None
    return TableStats(float(mean), std, dict(sorted(rows.items())), rms)
