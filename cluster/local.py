"""Connecting to Ray: start a local cluster for a run, or join the one at ``ray.address``."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from fiqa import console, storage
from fiqa.config import RayConfig

log = logging.getLogger(__name__)

_may_grow = False  # set by ensure_ray; a Ray started elsewhere in this process counts as fixed


def cluster_may_grow() -> bool:
    """Whether the joined cluster may add nodes: resource checks then warn instead of refusing."""
    return _may_grow


def may_grow(cfg: RayConfig, address: str | None) -> bool:
    """``ray.autoscaling`` when set; else a joined cluster may grow and a local Ray may not."""
    return cfg.autoscaling if cfg.autoscaling is not None else bool(address)


def ensure_ray(cfg: RayConfig, shared: dict[str, str] | None = None) -> None:
    """Initialise Ray once per process according to ``cfg``.

    With no address a local Ray is started, sized to this machine (or to
    ``ray.num_cpus``). Inside a Ray job (``RAY_ADDRESS`` set by the Jobs API)
    the job's cluster is joined; it may autoscale (``ray.autoscaling``, by
    default true for a joined cluster), so plans larger than it only warn.
    ``shared`` (what -> path) names the paths every node must see: see `check_shared`.
    """
    import ray

    global _may_grow
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    _may_grow = may_grow(cfg, address)
    console.quiet_ray_in_driver()
    # The driver's working directory is the project checkout: keep Ray from
    # shipping it to workers, which already import the installed package.
    kwargs: dict = {"log_to_driver": True, "configure_logging": False}
    if address:
        # Workers need the driver's storage settings (endpoint, region, retries): a
        # local cluster inherits its environment, a remote one gets them here. Never
        # credentials: there those come from the cluster's own environment (a
        # Kubernetes Secret, an instance role).
        info = ray.init(address=address, runtime_env={"env_vars": storage.worker_env()}, **kwargs)
    else:
        info = ray.init(
            # "local": a new Ray of our own, even where a killed `ray start` left its
            # address file behind (plain ray.init would try to join that dead cluster)
            address="local",
            num_cpus=cfg.num_cpus or os.cpu_count(),
            object_store_memory=cfg.object_store_memory,
            include_dashboard=True,  # the State API, which Ray Train uses to watch its actors
            dashboard_host="127.0.0.1",
            **kwargs,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    # Ray Data's per-operator bars help at a terminal and flood logs elsewhere; by default
    # the run's own bars say enough.
    ctx.enable_progress_bars = console.verbose() and sys.stderr.isatty()
    res = ray.cluster_resources()
    log.info("Ray: %g CPU, %g GPU", res.get("CPU", 0), res.get("GPU", 0))
    note = console.ray_logs_note(info.address_info.get("session_dir"))
    if note:
        log.info(note)
    check_shared(shared or {})


_MARK = ".fiqa-shared-check-"


def check_shared(paths: dict[str, str]) -> None:
    """Refuse local ``paths`` (what -> path) that a node of this cluster cannot see.

    On a cluster of several nodes a local ``run_dir``, input or checkpoint works only on a
    filesystem every node mounts at the same path. A directory gets a marker file from the
    driver, which a zero-CPU task on each alive node looks for (a node-local directory of
    the same name does not pass); a file must exist. Nodes that join later are not checked.
    Object-store URLs and a single-node cluster need no check.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from fiqa.config import ConfigError

    local = {
        what: os.path.abspath(p) for what, p in paths.items() if p and not storage.is_remote(p)
    }
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not local or len(nodes) < 2:
        return
    probes, marks = {}, []
    for what, path in local.items():
        if os.path.isdir(path):
            mark = os.path.join(path, f"{_MARK}{uuid.uuid4().hex}")
            open(mark, "w").close()
            marks.append(mark)
            probes[what] = (path, mark)
        else:
            probes[what] = (path, path)
    try:
        look = ray.remote(num_cpus=0, max_retries=0)(_visible)
        futures = {
            n["NodeManagerAddress"] + " " + n["NodeID"][:8]: look.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote([m for _, m in probes.values()])
            for n in nodes
        }
        for node, future in futures.items():
            try:
                seen = ray.get(future, timeout=120)
            except Exception as e:  # noqa: BLE001 - a node gone meanwhile is not the user's error
                log.warning("could not check the paths on node %s: %s", node, e)
                continue
            for (what, (path, _)), ok in zip(probes.items(), seen, strict=True):
                if not ok:
                    raise ConfigError(
                        f"{what} {path!r} is a local path that node {node} cannot see: on a "
                        "cluster of several nodes, put it in object storage (s3://...) or on "
                        "a filesystem every node mounts at the same path"
                    )
    finally:
        for mark in marks:
            with contextlib.suppress(OSError):
                os.remove(mark)


def _visible(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
