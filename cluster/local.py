"""Connecting to Ray: start a local cluster for a run, or join the one at ``ray.address``."""

from __future__ import annotations

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


def ensure_ray(cfg: RayConfig) -> None:
    """Initialise Ray once per process according to ``cfg``.

    With no address a local Ray is started, sized to this machine (or to
    ``ray.num_cpus``). Inside a Ray job (``RAY_ADDRESS`` set by the Jobs API)
    the job's cluster is joined; it may autoscale (``ray.autoscaling``, by
    default true for a joined cluster), so plans larger than it only warn.
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


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
