"""The scoring engine: wires decode tasks, the actor pool and the per-shard commit on Ray Data.

::

    from_arrow(a block of shard URLs per decode task)
        --map_batches(read_and_decode: CPU tasks, a few shards each)--> record batches
        --map_batches(ScoreThenWrite: actor pool, GPU when there is one)--> + raw_score,
          staged where scored (`fragments`) --> one line per fragment
        --iter_batches on the driver: ShardLedger counts rows per shard-->
        ShardCommitter actors, one a node: one rejects part, then one scored part per shard
        --when every shard is committed--> reject_duplicate_keys (`unique_keys`)

Without a model (ingest) the decode tasks stage their own batches. The driver sees a line
per fragment, never a row: its memory and its work do not grow with the images.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from fiqa import storage
from fiqa.cluster.resources import decode_task_slots, plan_scoring
from fiqa.config import ScoringConfig
from fiqa.data.tables import part_name
from fiqa.scoring.commit import Complete, ShardCommitter, ShardLedger, committed_shards
from fiqa.scoring.decode_task import probe_sources, read_and_decode
from fiqa.scoring.fragments import ScoreThenWrite, decode_then_write, staging_dir
from fiqa.scoring.job import ScoreJob
from fiqa.scoring.scorer import Scorer
from fiqa.scoring.stream import Sources, StreamPlan, plan_stream, task_groups
from fiqa.scoring.telemetry import ScoringMetrics
from fiqa.scoring.unique_keys import DUPLICATE, reject_duplicate_keys

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
    `read_and_decode`'s signature, given the plan's ``block_rows``) are seams for benchmarks.
    """
    done = committed_shards(job.out_dir)
    todo = [u for u in job.shards if part_name(u) not in done]
    stats = {"shards_total": len(job.shards), "shards_skipped": len(job.shards) - len(todo)}
    counts = {"shards": 0, "scored": 0, "rejected": 0, "reasons": Counter()}
    if todo:
        if on_start is not None:
            on_start()
        _score(job, todo, counts, progress, scorer, decode)
    moved = reject_duplicate_keys(job)  # (nothing to read again where a pass found none)
    if moved:
        counts["scored"] = max(0, counts["scored"] - moved)
        counts["rejected"] += moved
        counts["reasons"][DUPLICATE] += moved
    return {**stats, **counts, "reasons": dict(counts["reasons"])}


def _score(job: ScoreJob, todo: list[str], counts: dict, progress: bool, scorer, decode) -> None:
    """Stream ``todo`` through decode, scoring and staging; commit each shard once staged."""
    import ray
    from tqdm.auto import tqdm

    cfg = plan_scoring(job.scoring, job.with_model)
    job = dataclasses.replace(job, scoring=cfg)  # the decode tasks read where to decode
    plan = _plan_stream(job, cfg, probe_sources(todo[0], job), len(todo))
    storage.rm(staging_dir(job))  # an earlier attempt's fragments: its shards are staged anew

    # One block of shard URLs per decode task, read in one call: its blocks fill across them.
    groups = task_groups(todo, plan.shards_per_task, plan.decode_tasks)
    ds = ray.data.from_arrow([pa.table({"shard": pa.array(g, pa.string())}) for g in groups])
    # A reservation of their own also keeps the decode tasks a separate operator: Ray Data
    # fuses a task map into an actor map with equal requests, and decoding and inference
    # would then take turns instead of overlapping.
    decoding = {"num_cpus": cfg.decode_cpus, "memory": plan.decode_memory_bytes}
    if not job.with_model:
        kwargs = {"job": job, "decode": decode, "block_rows": plan.block_rows}
        ds = ds.map_batches(decode_then_write, batch_size=None, fn_kwargs=kwargs, **decoding)
    else:
        kwargs = {"job": job, "block_rows": plan.block_rows}
        ds = ds.map_batches(decode, batch_size=None, fn_kwargs=kwargs, **decoding)
        lo, hi = cfg.actor_range()
        ds = ds.map_batches(
            ScoreThenWrite,
            fn_constructor_kwargs={
                "scorer": scorer,
                "job": job,
                "scorer_kwargs": _scorer_kwargs(job),
            },
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            # Two calls at once: one batch is staged while the next is scored.
            compute=ray.data.ActorPoolStrategy(
                min_size=lo,
                max_size=hi,
                max_concurrent_calls_per_actor=2,
                enable_true_multi_threading=True,
            ),
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus or None,
        )
    _bound_stream(ds, plan)
    ledger, commits, metrics = ShardLedger(), Committers(job), ScoringMetrics(job.source)
    bar = tqdm(
        total=len(todo),
        unit="shard",
        desc=job.description or f"score {job.source}",
        disable=not progress,
    )

    def committed(finished: list[tuple[str, dict]]) -> None:
        for url, c in finished:
            log.debug("committed %s: %s", url, storage.join(job.out_dir, "labels", part_name(url)))
            counts["shards"] += 1
            counts["scored"] += c["scored"]
            counts["rejected"] += c["rejected"]
            counts["reasons"].update(c["reasons"])
            metrics.committed(c)
        if finished:
            bar.set_postfix(images=counts["scored"], rejected=counts["rejected"], refresh=False)
            bar.update(len(finished))

    # No prefetch: Ray Data's prefetcher hands a block over only once the next one is ready,
    # so a finished shard would wait a whole shard's scoring to be committed.
    for lines in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        for shard in ledger.add(lines):
            commits.submit(shard)
        committed(commits.finished())
    committed(commits.finished(wait=True))
    metrics.finished()
    bar.close()
    if ledger.open_shards:
        raise RuntimeError(f"stream ended with incomplete shards: {ledger.open_shards[:3]}")


def _scorer_kwargs(job: ScoreJob) -> dict:
    cfg = job.scoring
    return {
        "model_path": job.model_path,
        "threads": cfg.torch_threads or max(1, int(cfg.num_cpus)),
        "compile": cfg.compile,
        "pin_cores": cfg.pin_cores,
        "decode": job.decode_spec() if job.decode_in_actor else None,
        "precision": cfg.precision,
        "batch_size": cfg.batch_size,
        "views": job.views,
    }


class Committers:
    """`commit_shard` in one actor per node with CPUs (started with the stream; on a node
    that joins later, at its first shard), each shard on the node of its last fragment, at
    most `PER_NODE` shards at once on each.

    Actors, not tasks: Ray keeps no more idle task workers on a node than it has CPUs and
    kills the rest after a second, so commit tasks beside the decode tasks had Ray start a
    new worker process every few shards (benchmarks/writer_scaling.py).
    They ask for no CPU: a commit is mostly storage I/O, and one that waited for the
    stream's tasks and actors to free a CPU would hold its shard back for nothing. Pinned to
    their node (Ray's soft affinity placed CPU-less actors on the head, which on KubeRay has
    no CPUs so as to run none, and whose node would then carry every image again); where a
    committer or its node is gone, its shards go to another (a commit is idempotent).
    """

    PER_NODE = 4
    TRIES = 3  # committers a shard may outlive before the job fails

    def __init__(self, job: ScoreJob):
        import ray

        self.ray = ray
        self.job = ray.put(job)  # pickled once, not once a shard on the driver
        self.actor_class = ray.remote(ShardCommitter)
        self.actors: dict[str, Any] = {}  # node id ("": any node) -> its committer
        self.gone: set[str] = set()  # nodes whose committer died
        self.waiting: dict[str, deque[Complete]] = defaultdict(deque)
        self.busy: Counter[str] = Counter()
        self.running: dict = {}  # ObjectRef -> (the shard, its committer's node, the actor)
        self.lost: Counter[str] = Counter()  # shard URL -> committers lost under it
        # Started with the stream, not at its first complete shard: an actor's worker takes
        # a second or two to start, while the shards it should commit pile up.
        for node in self._nodes_with_cpus():
            self._committer(node)

    def submit(self, shard: Complete) -> None:
        node = shard.node or ""
        self.waiting[self._fallback() if node in self.gone else node].append(shard)
        self._start()

    def _nodes_with_cpus(self) -> list[str]:
        return [n["NodeID"] for n in self.ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]

    def _fallback(self) -> str:
        """A node whose committer is alive, else a live node with CPUs, else "" (anywhere)."""
        alive = next((n for n in self.actors if n), None)
        if alive is None:
            alive = next((n for n in self._nodes_with_cpus() if n not in self.gone), "")
        return alive

    def _committer(self, node: str):
        if node not in self.actors:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            where = NodeAffinitySchedulingStrategy(node, soft=False) if node else "DEFAULT"
            self.actors[node] = self.actor_class.options(
                num_cpus=0, max_concurrency=self.PER_NODE, scheduling_strategy=where
            ).remote(self.job)
            log.debug("a shard committer for node %s", node or "(any)")
        return self.actors[node]

    def _start(self) -> None:
        for node, queue in self.waiting.items():
            while queue and self.busy[node] < self.PER_NODE:
                shard, actor = queue.popleft(), self._committer(node)
                self.running[actor.commit.remote(shard.url, shard.total)] = (shard, node, actor)
                self.busy[node] += 1

    def _lost(self, node: str, actor, shard: Complete, error: Exception) -> None:
        """``actor``, the committer of ``node``, died under ``shard``: the node's shards go to
        another committer, and so do its later ones."""
        self.lost[shard.url] += 1
        if self.lost[shard.url] >= self.TRIES:
            raise RuntimeError(f"{self.TRIES} committers died committing {shard.url}") from error
        if self.actors.get(node) is actor:  # not a newer committer of the node
            del self.actors[node]
            if node:  # "" is no node: its next committer goes wherever Ray places it
                self.gone.add(node)
            log.warning("the shard committer of node %s is gone: %s", node or "(any)", error)
        if node in self.gone:
            self.waiting[self._fallback()].extend([shard, *self.waiting.pop(node, ())])
        else:
            self.waiting[node].append(shard)

    def finished(self, wait: bool = False) -> list[tuple[str, dict]]:
        """The commits done since the last call; with ``wait``, all of them."""
        from ray.exceptions import ActorUnschedulableError, RayActorError

        out = []
        while self.running:
            ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=None if wait else 0)
            if not ready:
                break
            for ref in ready:
                shard, node, actor = self.running.pop(ref)
                self.busy[node] -= 1
                try:
                    out.append((shard.url, self.ray.get(ref)))
                except (RayActorError, ActorUnschedulableError) as e:
                    self._lost(node, actor, shard, e)
            self._start()
        return out


def _plan_stream(job: ScoreJob, cfg: ScoringConfig, sources: Sources, shards: int) -> StreamPlan:
    """The stream's blocks, object-store bound and decode tasks' memory, logged."""
    import ray

    ctx = ray.data.DataContext.get_current()
    plan = plan_stream(
        cfg,
        job.decoded_crop,
        actors=cfg.actor_range()[1] if job.with_model else 0,
        decode_tasks=decode_task_slots(cfg, job.with_model),
        object_store=ray.cluster_resources().get("object_store_memory", 0),
        cap_fraction=ctx.override_object_store_memory_limit_fraction or 0.5,
        sources=sources,
        shards=shards,
        with_model=job.with_model,
    )
    log.debug(
        "scoring stream: object store bound %d MiB (Ray Data's cap here: %d MiB) for %d "
        "actor(s) and %d decode task(s) of %d MiB each, %d shard(s) a task, blocks of %d rows, "
        "decoding in the %s",
        plan.buffer_bytes // 2**20,
        plan.cap_bytes // 2**20,
        plan.actors,
        plan.decode_tasks,
        plan.decode_memory_bytes // 2**20,
        plan.shards_per_task,
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
