"""Streaming scoring of WebDataset shards into Parquet tables, on Ray Data.

One engine serves pseudo-labeling, evaluation and the conversion of labeled
shards into tables::

    shard URLs --(CPU tasks: read tar, decode, resize, crop)--> pixel batches
               --(actor pool: the model, on GPU when there is one)--> scores
               --(driver: group rows by shard)--> one Parquet part per shard

Every sample of every shard comes out either in the scored table or in the
rejects table, with a reason. A shard is committed when its part files are
written; a rerun skips committed shards, so an interrupted job resumes at
shard granularity. A key is scored once per table: a key already scored in
another shard is rejected as ``duplicate_key`` (the reader does the same
within a shard).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fiqa import storage
from fiqa.calibration import Logistic4
from fiqa.cluster import cores
from fiqa.cluster.resources import decode_task_slots, plan_scoring
from fiqa.config import ConfigError, ScoringConfig
from fiqa.data.decode import RejectedSample, decode_image
from fiqa.data.reader import read_shard
from fiqa.data.tables import (
    REJECTS_SCHEMA,
    SCORED_SCHEMA,
    list_parts,
    part_name,
    read_table,
    write_part,
)

log = logging.getLogger(__name__)

# One decoded block (pixels plus the encoded images they travel with) holds about this much.
# Larger blocks cost the scoring actor less Ray Data overhead per image (on 2 cores its thread
# waited 7-12 % of the time for its next 256-row block of 112 px faces, 5.6 % for 512 rows:
# benchmarks/RESULTS.md); sized in bytes, not rows, so that a block of 448 px images is not
# 16x one of 112 px images (256 rows at 448 px are 158 MB).
BLOCK_BYTES = 32 * 2**20
MEAN_IMAGE_BYTES = 16_384  # an encoded face, for sizing blocks before any is read
BUFFER_ROWS_PER_ACTOR = 1024  # decoded images the stream may hold per actor, at least


def rows_per_block(crop: int | None, batch_size: int) -> int:
    """Rows of one decoded block: whole scoring batches, as many as fit in ``BLOCK_BYTES``
    and at least one (``crop`` None or 0: no pixels, the encoded images only)."""
    row = (crop or 0) ** 2 * 3 + MEAN_IMAGE_BYTES
    return max(1, BLOCK_BYTES // (row * batch_size)) * batch_size


def ray_block_target(crop: int | None, batch_size: int) -> int | None:
    """Ray Data's ``target_max_block_size`` for a scoring stream whose blocks are a single
    batch, so that each travels as the decode task yields it; None otherwise (Ray Data's
    default, 128 MB, which leaves blocks of several batches whole).

    Ray Data merges the blocks a task yields until they exceed the target and slices a
    block of 1.5 times the target. At its default it merged four 64-image blocks of 448 px
    into one of 155 MB, and since a running task is counted as holding two of its blocks,
    the stream admitted about one decode task at a time (benchmarks/decode_admission.py).
    A batch's pixels alone are the target: every block (pixels, keys, encoded images)
    exceeds it, and none is sliced unless its encoded images outweigh half its pixels
    (300 KB an image at 448 px, 200 KB at 352 px, 75 KB at 224 px)."""
    if not crop or rows_per_block(crop, batch_size) != batch_size:
        return None
    return batch_size * crop * crop * 3


@dataclass
class ScoreJob:
    """What to score and where to write it."""

    shards: list[str]
    out_dir: str  # writes out_dir/labels/ and out_dir/rejects/
    source: str  # value of the `source` column (e.g. "pseudo_u1", "labeled")
    label_field: str = "mos"
    require_label: bool = False
    model_path: str | None = None  # None: no model, only read + validate (ingest)
    calibration: Logistic4 | None = None
    model_id: str = ""
    resize: int = 128
    crop: int = 112
    max_pixels: int = 40_000_000
    min_side: int = 16
    label: ScoringConfig = field(default_factory=ScoringConfig)
    # The driver's object-storage settings (`fiqa.storage.configure`), travelling with the
    # job to the Ray tasks that read its shards, whatever environment their workers have.
    storage_options: dict = field(default_factory=storage.options)


def read_and_decode(batch: dict, job: ScoreJob) -> Iterator[dict]:
    """Ray Data UDF: one shard URL in, record batches out (with pixels when a model will run).

    Every batch carries ``shard_total``: -1, except the shard's last batch
    where it is the number of records the shard produced; the driver uses it
    to know when a shard is complete. The last batch is held back so that it
    is never empty.
    """
    with cores.off_claimed_cores():  # those of the scoring actors on this machine (if any)
        yield from _read_and_decode(batch["shard"], job)


def _read_and_decode(urls, job: ScoreJob) -> Iterator[dict]:
    want_pixels = job.model_path is not None
    block_rows = rows_per_block(job.crop if want_pixels else None, job.label.batch_size)
    for url in urls:
        rows: list[dict] = []
        pending: list[dict] | None = None
        total = 0
        for rec in read_shard(url, job.label_field, job.require_label, job.storage_options):
            pix = None
            if rec["reason"] is None:
                try:
                    # Decoded even when no model runs: a sample that cannot be is a reject.
                    crop = job.crop if want_pixels else None
                    pix = decode_image(
                        rec["image"], job.resize, job.max_pixels, job.min_side, crop=crop
                    )
                except RejectedSample as e:
                    rec["reason"] = e.reason
            rec["pixels"] = pix if want_pixels else None
            rows.append(rec)
            total += 1
            if len(rows) == block_rows:
                if pending is not None:
                    yield _to_batch(pending, -1, job.crop, want_pixels)
                pending = rows
                rows = []
        if rows:
            if pending is not None:
                yield _to_batch(pending, -1, job.crop, want_pixels)
            yield _to_batch(rows, total, job.crop, want_pixels)
        elif pending is not None:
            yield _to_batch(pending, total, job.crop, want_pixels)
        else:  # a tar with no members at all
            yield _to_batch(
                [
                    {
                        "key": "",
                        "shard": url,
                        "image": b"",
                        "label": None,
                        "reason": "empty_shard",
                        "pixels": None,
                    }
                ],
                1,
                job.crop,
                want_pixels,
            )


def _to_batch(rows: list[dict], total: int, crop: int, want_pixels: bool) -> dict:
    n = len(rows)
    out = {
        "key": np.array([r["key"] for r in rows], dtype=object),
        "shard": np.array([r["shard"] for r in rows], dtype=object),
        "image": np.array([r["image"] for r in rows], dtype=object),
        "label": np.array(
            [np.nan if r["label"] is None else r["label"] for r in rows], dtype=np.float64
        ),
        "reason": np.array([r["reason"] or "" for r in rows], dtype=object),
        "shard_total": np.full(n, total, dtype=np.int64),
    }
    if want_pixels:
        pix = np.zeros((n, crop, crop, 3), dtype=np.uint8)
        for i, r in enumerate(rows):
            if r["pixels"] is not None:
                pix[i] = r["pixels"]
        out["pixels"] = pix
    return out


class Scorer:
    """Ray Data actor: holds the model and scores pixel batches (rows with a reason are skipped).

    As a Ray actor on CPU it claims ``threads`` cores of its own (`fiqa.cluster.cores`):
    always with ``pin_cores`` True, never with False, and with None where this node's
    cores are all this process may use (a machine, or a pod with a cpuset of its own).
    """

    def __init__(
        self,
        model_path: str,
        threads: int | None = None,
        compile: bool = False,
        pin_cores: bool | None = None,
    ):
        import torch

        from fiqa.models import load_checkpoint
        from fiqa.models.allocator import retain_freed_memory

        if threads:
            torch.set_num_threads(threads)
        retain_freed_memory()  # batch after batch reuses the same activation memory
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cores = None
        if self.device.type == "cpu" and pin_cores is not False:
            self.cores = _claim_cores(threads or torch.get_num_threads(), pin_cores is True)
        self.loaded = load_checkpoint(model_path, map_location=self.device)
        self.model = self.loaded.model
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        if compile:
            # Batches vary in size (a shard's last one), hence dynamic shapes.
            self.model = torch.compile(self.model, dynamic=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Arrow in, Arrow out: the pixels are a zero-copy view of the object store, and the
        other columns (keys, encoded images) pass through without becoming Python objects."""
        import torch

        from fiqa.models.inputs import to_model_input

        ok = pc.equal(batch.column("reason"), "").to_numpy(zero_copy_only=False)
        raw = np.full(len(ok), np.nan, dtype=np.float64)
        if ok.any():
            pixels = _tensor_column(batch.column("pixels"))
            with warnings.catch_warnings():  # never written: to_model_input makes its own copy
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                x = torch.from_numpy(pixels if ok.all() else pixels[ok])
            x = x.to(self.device, non_blocking=True)
            cuda = self.device.type == "cuda"
            with (
                torch.inference_mode(),
                torch.autocast(self.device.type, torch.bfloat16, enabled=cuda),
            ):
                raw[ok] = self.model(to_model_input(x, channels_last=cuda)).float().cpu().numpy()
        return batch.drop_columns(["pixels"]).append_column("raw_score", pa.array(raw))


def _claim_cores(n: int, always: bool) -> list[int] | None:
    """Claim ``n`` cores for this actor (see `Scorer`); logs the outcome."""
    import ray

    if not (ray.is_initialized() and ray.get_runtime_context().get_actor_id()):
        return None  # not a Ray actor (a test, an in-process check): never pin the caller
    if not always:
        node = ray.get_runtime_context().get_node_id()
        cpus = next((x["Resources"].get("CPU", 0) for x in ray.nodes() if x["NodeID"] == node), 0)
        if not cores.cores_are_ours(cpus):
            log.info("scoring actor not pinned: this node's %g CPUs are not all its cores", cpus)
            return None
    got = cores.claim(n)
    if got is None:
        log.info("scoring actor not pinned: fewer than %d of this node's cores are free", n)
    else:
        log.info("scoring actor pinned to cores %s", got)
    return got


def _tensor_column(col: pa.ChunkedArray) -> np.ndarray:
    """A column of fixed-shape tensors as one contiguous array (a view when it is one chunk)."""
    chunks = [c.to_numpy() for c in col.chunks]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


class KeyIndex:
    """The keys already scored in a table, in about 8 bytes per key.

    Keys are kept as 64-bit hashes: a sorted array plus a small set of recent
    ones, merged in batches, so tens of millions of keys fit in a few hundred
    MB on the driver. (Two distinct keys share a hash with probability about
    n^2 / 2^65: 3e-6 for ten million keys.)
    """

    MERGE_EVERY = 200_000

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()

    @staticmethod
    def _hash(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, key: str) -> bool:
        h = self._hash(key)
        if h in self._recent:
            return True
        i = np.searchsorted(self._sorted, np.uint64(h))
        return bool(i < len(self._sorted) and self._sorted[i] == h)

    def add(self, key: str) -> None:
        self._recent.add(self._hash(key))
        if len(self._recent) >= self.MERGE_EVERY:
            self._merge()

    def update(self, keys) -> None:
        for k in keys:
            self.add(k)

    def _merge(self) -> None:
        new = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
        self._sorted = np.union1d(self._sorted, new)
        self._recent.clear()


class ShardCollector:
    """Driver side: gathers rows by shard and commits each shard once all its rows arrived."""

    def __init__(self, job: ScoreJob, scored_keys: KeyIndex | None = None):
        self.job = job
        self.scored_keys = scored_keys if scored_keys is not None else KeyIndex()
        self.parts: dict[str, list[dict]] = defaultdict(list)
        self.seen: dict[str, int] = defaultdict(int)
        self.totals: dict[str, int] = {}
        self.stats = {"shards": 0, "scored": 0, "rejected": 0, "reasons": defaultdict(int)}

    def add(self, batch: dict) -> list[str]:
        """Add a batch; returns the shards it completed (and committed)."""
        if "raw_score" not in batch:  # no model ran (ingest of labeled shards)
            batch["raw_score"] = np.full(len(batch["key"]), np.nan)
        done = []
        shards = batch["shard"]
        for url in np.unique(shards):
            m = shards == url
            sub = {k: v[m] for k, v in batch.items() if k != "pixels"}
            self.parts[url].append(sub)
            self.seen[url] += int(m.sum())
            t = sub["shard_total"].max()
            if t >= 0:
                self.totals[url] = int(t)
            if url in self.totals and self.seen[url] == self.totals[url]:
                self._commit(url)
                done.append(url)
        return done

    def _commit(self, url: str) -> None:
        parts = self.parts.pop(url)
        cols = {
            k: np.concatenate([p[k] for p in parts])
            for k in ("key", "shard", "image", "label", "reason", "raw_score")
        }
        # A key scored in another shard already (or earlier in this one) is a duplicate.
        for i in np.flatnonzero(cols["reason"] == ""):
            key = cols["key"][i]
            if key in self.scored_keys:
                cols["reason"][i] = "duplicate_key"
            else:
                self.scored_keys.add(key)
        ok = cols["reason"] == ""
        n_ok = int(ok.sum())
        rejects = pa.table(
            {
                "key": cols["key"][~ok].tolist(),
                "shard": cols["shard"][~ok].tolist(),
                "reason": cols["reason"][~ok].tolist(),
            },
            schema=REJECTS_SCHEMA,
        )
        name = part_name(url)
        # Rejects first, then the scored part: the scored part's existence commits the shard.
        write_part(rejects, f"{self.job.out_dir}/rejects", name)
        write_part(self._scored_table(cols, ok), f"{self.job.out_dir}/labels", name)
        self.stats["shards"] += 1
        self.stats["scored"] += n_ok
        self.stats["rejected"] += len(ok) - n_ok
        for r in cols["reason"][~ok]:
            self.stats["reasons"][str(r).split(":")[0]] += 1
        self.seen.pop(url)
        self.totals.pop(url)

    def _scored_table(self, cols: dict, ok: np.ndarray) -> pa.Table:
        label = cols["label"][ok].astype(np.float64)
        raw = cols["raw_score"][ok].astype(np.float64)
        score = label.copy()
        missing = np.isnan(score)
        calib = self.job.calibration
        score[missing] = calib(raw[missing]) if calib is not None else raw[missing]
        n = int(ok.sum())
        return pa.table(
            {
                "key": cols["key"][ok].tolist(),
                "shard": cols["shard"][ok].tolist(),
                "image": cols["image"][ok].tolist(),
                "label": _nullable(label),
                "raw_score": _nullable(raw),
                "score": _nullable(score),
                "model_id": [self.job.model_id] * n,
                "source": [self.job.source] * n,
            },
            schema=SCORED_SCHEMA,
        )


def _nullable(a: np.ndarray) -> pa.Array:
    return pa.array(a, type=pa.float32(), mask=np.isnan(a))


def committed_shards(out_dir: str) -> set[str]:
    return {p.rsplit("/", 1)[-1] for p in list_parts(f"{out_dir}/labels")}


def scored_keys_of(out_dir: str) -> KeyIndex:
    """The keys of the committed scored parts (so a resumed job keeps keys unique)."""
    index = KeyIndex()
    parts = list_parts(f"{out_dir}/labels")
    if parts:
        index.update(read_table(f"{out_dir}/labels", columns=["key"]).column("key").to_pylist())
    return index


def job_for_model(
    model_path: str,
    shards: list[str],
    out_dir: str,
    source: str,
    *,
    label: ScoringConfig,
    calibration: Logistic4 | None = None,
    model_id: str | None = None,
    label_field: str = "mos",
    max_pixels: int = 40_000_000,
    min_side: int = 16,
) -> ScoreJob:
    """A scoring job for a trained checkpoint: input size and calibration come from its model.json.

    ``calibration`` overrides the one stored with the model; ``model_id``
    defaults to a digest of the model's metadata (which holds its training
    fingerprint and fitted calibration).
    """
    from fiqa.models.checkpoint import read_meta

    meta = read_meta(model_path)
    if calibration is None and meta.get("calibration"):
        calibration = Logistic4.from_dict(meta["calibration"])
    if model_id is None:
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
        model_id = f"{meta.get('arch', 'model')}:{digest}"
    return ScoreJob(
        shards=shards,
        out_dir=out_dir,
        source=source,
        label_field=label_field,
        model_path=model_path,
        calibration=calibration,
        model_id=model_id,
        resize=int(meta.get("resize", meta["image_size"])),
        crop=int(meta["image_size"]),
        max_pixels=max_pixels,
        min_side=min_side,
        label=label,
    )


def stream_buffer_bytes(cfg: ScoringConfig, crop: int, *, decode_tasks: int, actors: int) -> int:
    """Object store bytes a scoring stream may hold: ``cfg.buffer_mb``, or what the actors
    or the decode tasks need to run at full speed, whichever is more.

    The ``actors``: per actor 4 decoded blocks or 1,024 images, whichever is more (pixels plus
    the encoded images they travel with). The 1,024 images keep a fast actor's slack when its
    blocks are a single batch of large images (448 px: 4 blocks of 64 would be 0.2 s of a
    GPU's work).

    The ``decode_tasks``: Ray Data admits a task only while its operator's budget covers what
    its running tasks hold, two blocks each (Ray's streaming-generator buffer). In Ray 2.60
    an operator's own reservation for tasks is 1/8 of the budget (half of half the budget,
    split between the stream's two operators) and each task beyond it draws on the shared
    half, split with the actors: 16/3 blocks per task admits 15 tasks with room for the
    blocks queued for the actors (about 24 with none queued). Sized for the actors alone,
    the default admitted about 2 decode tasks at a time at 448 px (one-batch blocks),
    whatever the CPUs (benchmarks/decode_admission.py). Not added to the actors' share: on 2 cores at 112 px
    the sum (290 MB against 166) raised the peak memory of a 10x pool by 11 % instead of 3 %
    and gained nothing.
    """
    if cfg.buffer_mb is not None:
        return cfg.buffer_mb * 2**20
    row = crop * crop * 3 + MEAN_IMAGE_BYTES
    rows = rows_per_block(crop, cfg.batch_size)
    per_actor = max(4 * rows, BUFFER_ROWS_PER_ACTOR) * row
    decoding = 16 * max(1, decode_tasks) * rows * row // 3
    return max(actors * per_actor, decoding)


def run_score_job(
    job: ScoreJob, progress: bool = True, on_start: Callable[[], None] | None = None
) -> dict:
    """Score every not-yet-committed shard of ``job``; returns counts for this call.

    ``on_start`` (e.g. starting Ray) is called only when there is work to do.
    """
    import ray
    from tqdm.auto import tqdm

    done = committed_shards(job.out_dir)
    todo = [u for u in job.shards if part_name(u) not in done]
    stats = {"shards_total": len(job.shards), "shards_skipped": len(job.shards) - len(todo)}
    if not todo:
        return {**stats, "shards": 0, "scored": 0, "rejected": 0, "reasons": {}}
    if on_start is not None:
        on_start()
    with_model = job.model_path is not None
    label_cfg = plan_scoring(job.label, with_model)

    ds = ray.data.from_items([{"shard": u} for u in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        read_and_decode,
        batch_size=1,
        fn_kwargs={"job": job},
        num_cpus=job.label.decode_cpus,
        # A memory reservation of their own also keeps the decode tasks a separate operator:
        # Ray Data fuses a task map into the next actor map when their resource requests are
        # equal, and each actor would then decode and infer in turn instead of overlapping.
        memory=job.label.decode_memory_mb * 2**20,
    )
    if with_model:
        lo, hi = label_cfg.actor_range()
        ds = ds.map_batches(
            Scorer,
            fn_constructor_kwargs={
                "model_path": job.model_path,
                "threads": label_cfg.torch_threads or max(1, int(label_cfg.num_cpus)),
                "compile": label_cfg.compile,
                "pin_cores": label_cfg.pin_cores,
            },
            batch_size=label_cfg.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
            num_cpus=label_cfg.num_cpus,
            num_gpus=label_cfg.num_gpus or None,
        )
    # Without a bound, decoding runs ahead of slow actors until Ray Data's share of the object
    # store is full, so memory grows with the pool up to that share; bounded, it stays flat.
    crop = job.crop if with_model else 0
    target = ray_block_target(crop, label_cfg.batch_size)
    if target is not None:
        ds.context.target_max_block_size = target
    actors = label_cfg.actor_range()[1] if with_model else 0
    decoders = decode_task_slots(label_cfg, with_model)
    buffer = stream_buffer_bytes(label_cfg, crop, decode_tasks=decoders, actors=actors)
    ds.context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
        object_store_memory=buffer
    )
    plan = {
        "buffer_bytes": buffer,
        # Ray Data never lets a stream use more than this share of the object store.
        "cap_bytes": int(
            ray.cluster_resources().get("object_store_memory", 0)
            * (ds.context.override_object_store_memory_limit_fraction or 0.5)
        ),
        "actors": actors,
        "decode_tasks": decoders,
        "block_rows": rows_per_block(crop, label_cfg.batch_size),
        "target_block_bytes": target,
    }
    log.info(
        "scoring stream: object store bound %d MiB (Ray Data's cap here: %d MiB) for %d "
        "actor(s) and %d decode task(s), blocks of %d rows",
        buffer // 2**20,
        plan["cap_bytes"] // 2**20,
        actors,
        decoders,
        plan["block_rows"],
        extra={"stream_plan": plan},
    )
    collector = ShardCollector(job, scored_keys_of(job.out_dir) if done else None)
    bar = tqdm(total=len(todo), unit="shard", desc=f"score {job.source}", disable=not progress)
    # No prefetch: Ray Data's prefetcher hands a block over only once the next one is ready,
    # so with its default a finished shard waits a whole shard's scoring to be committed.
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        finished = collector.add(batch)
        for url in finished:
            log.info("committed %s", url)
        if finished:
            s = collector.stats
            bar.set_postfix(images=s["scored"], rejected=s["rejected"], refresh=False)
        bar.update(len(finished))
    bar.close()
    if collector.parts:
        missing = sorted(collector.parts)
        raise RuntimeError(f"stream ended with incomplete shards: {missing[:3]}")
    s = collector.stats
    return {
        **stats,
        "shards": s["shards"],
        "scored": s["scored"],
        "rejected": s["rejected"],
        "reasons": dict(s["reasons"]),
    }


def label_shards(
    model_path: str,
    shard_spec: str | list[str],
    out_dir: str,
    label: ScoringConfig,
    *,
    calibration: Logistic4 | None = None,
    source: str = "pseudo",
    label_field: str = "mos",
    max_pixels: int = 40_000_000,
    min_side: int = 16,
    progress: bool = True,
    on_start: Callable[[], None] | None = None,
) -> dict:
    """`fiqa label`: score any shard spec with any checkpoint into ``out_dir``.

    The same engine as the pseudo-labeling stages. ``out_dir/label_job.json``
    records which model (and calibration) wrote the tables; a rerun with the
    same model resumes (only uncommitted shards are scored), a rerun with
    another model into the same directory is refused rather than mixing the two.
    """
    from fiqa.data.shards import expand_shard_spec

    shards = expand_shard_spec(shard_spec)
    job = job_for_model(
        model_path,
        shards,
        out_dir,
        source,
        label=label,
        calibration=calibration,
        label_field=label_field,
        max_pixels=max_pixels,
        min_side=min_side,
    )
    record = {
        "model": model_path,
        "model_id": job.model_id,
        "calibration": job.calibration.to_dict() if job.calibration else None,
        "source": source,
    }
    record_path = storage.join(out_dir, "label_job.json")
    keys = ("model_id", "calibration", "source")
    try:
        before = storage.read_json(record_path)
    except FileNotFoundError:
        storage.write_json(record_path, record)
    else:
        if {k: before.get(k) for k in keys} != {k: record[k] for k in keys}:
            raise ConfigError(
                f"{out_dir} holds labels from {before.get('model_id')} "
                f"(source {before.get('source')!r}); this job would write {job.model_id} "
                f"(source {source!r}). Use another --output, or delete it to start over."
            )
    stats = run_score_job(job, progress=progress, on_start=on_start)
    stats["model_id"] = job.model_id
    storage.write_json(storage.join(out_dir, "label_summary.json"), stats)
    return stats
