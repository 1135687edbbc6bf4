"""The scoring engine: wires decode tasks, the actor pool and the per-shard commit on Ray Data.

::

    from_items(shard URLs) --map_batches(read_and_decode: CPU tasks)--> record batches
        --map_batches(scorer: actor pool, GPU when there is one)--> + raw_score
        --iter_batches on the driver--> ShardCollector: one Parquet part per shard
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from fiqa.cluster.resources import decode_task_slots, plan_scoring
from fiqa.config import ScoringConfig
from fiqa.data.tables import part_name
from fiqa.scoring.commit import ShardCollector, committed_shards, scored_keys_of
from fiqa.scoring.decode_task import probe_sources, read_and_decode
from fiqa.scoring.job import ScoreJob
from fiqa.scoring.scorer import Scorer
from fiqa.scoring.stream import Sources, StreamPlan, plan_stream

log = logging.getLogger(__name__)


def run_score_job(
    job: ScoreJob,
    progress: bool = True,
    on_start: Callable[[], None] | None = None,
    scorer: type = Scorer,
    decode: Callable = read_and_decode,
) -> dict:
    """Score every not-yet-committed shard of ``job``; returns counts for this call.

    ``on_start`` (e.g. starting Ray) is called only when there is work to do. ``scorer`` (the
    actor class: `Scorer`'s constructor and call) and ``decode`` (the decode task:
    `read_and_decode`'s signature) are seams for benchmarks.
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
    cfg = plan_scoring(job.scoring, job.with_model)
    job = dataclasses.replace(job, scoring=cfg)  # the decode tasks read where to decode
    plan = _plan_stream(job, cfg, probe_sources(todo[0], job))

    ds = ray.data.from_items([{"shard": u} for u in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        decode,
        batch_size=1,
        fn_kwargs={"job": job},
        num_cpus=cfg.decode_cpus,
        # A reservation of their own also keeps the decode tasks a separate operator: Ray Data
        # fuses a task map into an actor map with equal requests, and decoding and inference
        # would then take turns instead of overlapping.
        memory=plan.decode_memory_bytes,
    )
    if job.with_model:
        lo, hi = cfg.actor_range()
        ds = ds.map_batches(
            scorer,
            fn_constructor_kwargs={
                "model_path": job.model_path,
                "threads": cfg.torch_threads or max(1, int(cfg.num_cpus)),
                "compile": cfg.compile,
                "pin_cores": cfg.pin_cores,
                "decode": job.decode_spec() if job.decode_in_actor else None,
                "precision": cfg.precision,
                "batch_size": cfg.batch_size,
            },
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus or None,
        )
    _bound_stream(ds, plan)
    collector = ShardCollector(job, scored_keys_of(job.out_dir) if done else None)
    bar = tqdm(total=len(todo), unit="shard", desc=f"score {job.source}", disable=not progress)
    # No prefetch: Ray Data's prefetcher hands a block over only once the next one is ready,
    # so a finished shard would wait a whole shard's scoring to be committed.
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
        raise RuntimeError(f"stream ended with incomplete shards: {sorted(collector.parts)[:3]}")
    s = collector.stats
    return {
        **stats,
        "shards": s["shards"],
        "scored": s["scored"],
        "rejected": s["rejected"],
        "reasons": dict(s["reasons"]),
    }


def _plan_stream(job: ScoreJob, cfg: ScoringConfig, sources: Sources) -> StreamPlan:
    """The stream's blocks, object-store bound and decode tasks' memory, logged."""
    import ray

    ctx = ray.data.DataContext.get_current()
    plan = plan_stream(
        cfg,
        job.crop if job.with_model and not job.decode_in_actor else 0,
        actors=cfg.actor_range()[1] if job.with_model else 0,
        decode_tasks=decode_task_slots(cfg, job.with_model),
        object_store=ray.cluster_resources().get("object_store_memory", 0),
        cap_fraction=ctx.override_object_store_memory_limit_fraction or 0.5,
        sources=sources,
    )
    log.info(
        "scoring stream: object store bound %d MiB (Ray Data's cap here: %d MiB) for %d "
        "actor(s) and %d decode task(s) of %d MiB each, blocks of %d rows, decoding in the %s",
        plan.buffer_bytes // 2**20,
        plan.cap_bytes // 2**20,
        plan.actors,
        plan.decode_tasks,
        plan.decode_memory_bytes // 2**20,
        plan.block_rows,
        "actors" if job.decode_in_actor else "decode tasks",
        extra={"stream_plan": plan.as_dict()},
    )
    return plan


def _bound_stream(ds, plan: StreamPlan) -> None:
    """Bound the stream's object store (memory stays flat however large the pool: decoding
    cannot run ahead of slow actors) and keep Ray Data's blocks at the engine's size."""
    import ray

    if plan.target_block_bytes is not None:
        ds.context.target_max_block_size = plan.target_block_bytes
    ds.context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
        object_store_memory=plan.buffer_bytes
    )
