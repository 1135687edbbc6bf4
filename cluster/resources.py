"""The resource planner: what a scoring job or a training run asks of the Ray cluster.

One rule for both: the work that holds CPUs for its whole life (scoring actors, Train
workers) must leave at least one decode task's CPUs to the Ray Data tasks that feed it,
or the job hangs; on a fixed cluster such a plan is refused with advice, on one that may
grow (an autoscaler adds nodes, `fiqa.cluster.local.cluster_may_grow`) it only warns.
"""

from __future__ import annotations

import dataclasses
import logging

from fiqa.cluster.local import cluster_may_grow
from fiqa.config import ConfigError, ScoringConfig, TrainConfig

log = logging.getLogger(__name__)

EPS = 1e-9


def _cluster() -> tuple[float, float]:
    """(CPUs, GPUs) of the cluster now."""
    import ray

    res = ray.cluster_resources()
    return res.get("CPU", 0.0), res.get("GPU", 0.0)


def _check_decode_cpus(held: float, decode: float, need: str, who: str, advice: str) -> None:
    """Refuse (or, where the cluster may grow, warn about) ``held`` CPUs that leave fewer
    than ``decode`` CPUs to the decode tasks."""
    total, _ = _cluster()
    if held + decode <= total + EPS:
        return
    need = f"{need} exceeds the cluster's {total:g} CPUs"
    if cluster_may_grow():
        log.warning("%s now; %s start as an autoscaler adds nodes", need, who)
        return
    raise ConfigError(
        f"{need}; the {who} would starve the decode tasks. {advice} (on a cluster that "
        f"autoscales, set ray.autoscaling: true)."
    )


def plan_scoring(cfg: ScoringConfig, with_model: bool) -> ScoringConfig:
    """``cfg`` with GPUs per actor and where to decode filled in; refuses plans that would
    starve or wait for ever. ``decode`` auto: in the actors where they have GPUs (nvJPEG), in
    the CPU decode tasks otherwise.

    A pool whose smallest size needs more GPUs than a fixed cluster has would wait for ever;
    GPUs a growing cluster does not have yet only warn.
    """
    _, total_gpu = _cluster()
    if cfg.num_gpus is None:
        cfg = dataclasses.replace(cfg, num_gpus=1.0 if total_gpu >= 1 else 0.0)
    if cfg.decode == "auto":
        cfg = dataclasses.replace(cfg, decode="actor" if with_model and cfg.num_gpus else "tasks")
    min_actors, max_actors = cfg.actor_range()
    _check_decode_cpus(
        max_actors * cfg.num_cpus if with_model else 0.0,
        cfg.decode_cpus,
        f"scoring: {max_actors} actor(s) x {cfg.num_cpus} CPU + {cfg.decode_cpus} CPU for decoding",
        "actors",
        "Lower scoring.concurrency or scoring.num_cpus",
    )
    if not (with_model and cfg.num_gpus) or max_actors * cfg.num_gpus <= total_gpu + EPS:
        return cfg
    if cluster_may_grow():
        log.warning(
            "scoring asks for up to %d actor(s) x %g GPU but the cluster has %g GPU now; "
            "actors start as an autoscaler adds GPUs",
            max_actors,
            cfg.num_gpus,
            total_gpu,
        )
    elif min_actors * cfg.num_gpus > total_gpu + EPS:
        raise ConfigError(
            f"scoring: {min_actors} actor(s) x {cfg.num_gpus:g} GPU exceeds the "
            f"cluster's {total_gpu:g} GPU(s), and this Ray cannot add nodes. Lower "
            f"scoring.num_gpus (0 scores on the CPU) or scoring.concurrency; "
            f"on a cluster that autoscales, set ray.autoscaling: true."
        )
    else:
        log.warning(
            "scoring asks for up to %d actor(s) x %g GPU but the cluster has %g GPU: "
            "the pool runs %d actor(s)",
            max_actors,
            cfg.num_gpus,
            total_gpu,
            int(total_gpu / cfg.num_gpus + EPS),
        )
    return cfg


def decode_task_slots(cfg: ScoringConfig, with_model: bool) -> int:
    """Decode tasks the cluster's CPUs run beside the scoring actors now (at least 1).

    On a cluster an autoscaler grows from a bare head this is 1: set ``scoring.buffer_mb``
    for the nodes it will have (the job logs its plan)."""
    total, _ = _cluster()
    actors_cpu = cfg.actor_range()[1] * cfg.num_cpus if with_model else 0.0
    return max(1, int((total - actors_cpu) / cfg.decode_cpus + EPS))


def check_training(t: TrainConfig) -> None:
    """Refuse Train workers that would leave no CPU for the decode tasks feeding them (1 CPU
    each); warn about GPU workers the cluster does not have yet."""
    _check_decode_cpus(
        t.num_workers * t.cpus_per_worker,
        1.0,
        f"train: {t.num_workers} worker(s) x {t.cpus_per_worker} CPU + 1 CPU for decoding",
        "workers",
        "Lower num_workers or cpus_per_worker (fractions are fine)",
    )
    _, gpus = _cluster()
    if t.use_gpu and gpus < t.num_workers:
        log.warning(
            "train asks for %d GPU worker(s) but the cluster has %g GPU now; "
            "training starts once an autoscaler adds them",
            t.num_workers,
            gpus,
        )


def worker_threads(t: TrainConfig) -> int:
    """Intra-op threads per Train worker: ``torch_threads``, else the CPUs it reserved (Ray's
    convention for ``OMP_NUM_THREADS``); on the local Ray, whose CPUs are all known, the
    workers share all of them when that is more, since the decode tasks feeding them sleep
    much of the time."""
    if t.torch_threads:
        return t.torch_threads
    reserved = max(1, round(t.cpus_per_worker))
    if t.use_gpu or cluster_may_grow():
        return reserved
    return max(reserved, int(_cluster()[0] or 1) // t.num_workers)


def wait_for_free_cpu(timeout_s: float = 10.0, poll_s: float = 0.02) -> bool:
    """Wait until the cluster's view of its resources shows a free CPU; return whether it did.

    The view lags a finished job's release by tens of milliseconds, and Ray Data checks it
    once before an eager execution (``materialize``), warning that the job "will hang" when
    it sees none: that is the only reason to wait here.
    """
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) <= 0:
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True
