"""`fit`: a `TrainJob` on Ray Train, on the driver: checks, datasets, the `TorchTrainer`, export."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import asdict
from typing import Any

from fiqa import storage
from fiqa.cluster.resources import check_training, worker_threads
from fiqa.config import batch_plan, effective_lr
from fiqa.data.tables import list_parts
from fiqa.models.meta import read_meta
from fiqa.training.checkpoints import check_resumable, export_best
from fiqa.training.data import table_stats, train_dataset, val_slices
from fiqa.training.job import RunPaths, TrainJob, finished_fit, fit_marks, run_paths

log = logging.getLogger(__name__)

MAX_FAILURES = 2  # worker-group restarts from the latest checkpoint before the run fails


def fit(job: TrainJob) -> dict:
    """Train ``job`` with Ray Train; export the best model to ``out_dir/model``; return its summary.

    The summary is written last to ``out_dir/fit.json`` with the job's marks: a rerun of
    the same job returns it without starting Ray Train.
    """
    paths = run_paths(job)
    done = finished_fit(job, paths)
    if done is not None:
        log.info(
            "%s: already trained (%s, model %s); not training again",
            job.name,
            paths.fit,
            paths.model,
        )
        return done
    marks = fit_marks(job)  # of the job as given, before its arch is resolved

    # torch and timm come with these: imported once there is a model to train
    from fiqa.models.registry import check_pretrained, resolve_spec

    job = dataclasses.replace(job, arch=resolve_spec(job.arch).arch)  # registry name -> timm name
    t = job.train
    micro, accum = batch_plan(t)
    check_pretrained(job.pretrained_weights)
    check_training(t)
    check_resumable(paths, job)

    parts = [p for d in job.train_tables for p in list_parts(d)]
    val_parts = list_parts(job.val_table)
    if not parts or not val_parts:
        raise RuntimeError(
            f"{job.name}: no training or validation data ({job.train_tables}, {job.val_table})"
        )
    stats = table_stats(job.train_tables)
    sources = sorted(stats.rows_by_source)
    mean, std = target_scale(job, stats.target_mean, stats.target_std)
    rows = sum(stats.rows_by_source.values())
    if t.min_epoch_rows and (job.epoch_rows or rows) < t.min_epoch_rows:
        job = dataclasses.replace(job, epoch_rows=t.min_epoch_rows)
    log.info(
        "%s: %d rows %s%s; global batch %d = %d worker(s) x %d rows x %d step(s); lr %.3g",
        job.name,
        rows,
        stats.rows_by_source,
        f", {job.epoch_rows} read per epoch" if job.epoch_rows else "",
        t.batch_size,
        t.num_workers,
        micro,
        accum,
        effective_lr(t),
    )
    loop_config = {
        "job": asdict(job),
        "target_mean": mean,
        "target_std": std,
        "sources": sources,
        "tensorboard_dir": paths.tensorboard,
        "torch_threads": worker_threads(t),
        "train_rows": job.epoch_rows or rows,
    }
    if t.spread_weighting and stats.spread_rms is None:
        log.warning(
            "%s: spread_weighting is on but no row has a score_spread (scoring.views is "
            "center): pseudo-labels are not weighted",
            job.name,
        )
    datasets = {"train": train_dataset(job, parts, sources, rows, stats.spread_rms)}
    datasets.update({f"val_{i}": v for i, v in enumerate(val_slices(job, val_parts))})
    trainer = torch_trainer(job, paths, loop_config, datasets)
    # A marker of another job must not outlive the model this run is about to replace.
    storage.rm(paths.fit, recursive=False)
    result = trainer.fit()
    if result.error:
        raise result.error
    meta, history = export_best(result, paths)
    summary = {
        "model": paths.model,
        "best_epoch": meta["epoch"],
        "val": meta["val"],
        "epochs": len(history),
        "restarts": history[-1].get("restarts", 0) if history else 0,
        "train_parts": len(parts),
        "rows_by_source": stats.rows_by_source,
        "epoch_rows": job.epoch_rows or rows,
        "spread_rms": stats.spread_rms if t.spread_weighting else None,
    }
    storage.write_json(paths.fit, {**summary, **marks})  # the commit: this job finished
    return summary


def target_scale(job: TrainJob, mean: float, std: float) -> tuple[float, float]:
    """The standardisation of targets: the initial model's when there is one, else the tables'."""
    if not job.init_checkpoint:
        return mean, std
    init_meta = read_meta(job.init_checkpoint)
    return init_meta["target_mean"], init_meta["target_std"]


def ordered_ingest() -> Any:
    """Ray Train's ingest options, in order: every run reads the same rows into the same
    batches and, when split, the same workers (deterministic training)."""
    import ray.train

    with warnings.catch_warnings():
        # Ray's own defaults pass the deprecated exclude_resources (Ray 2.60); not ours to fix.
        warnings.filterwarnings("ignore", message=".*exclude_resources.*")
        options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def torch_trainer(job: TrainJob, paths: RunPaths, loop_config: dict, datasets: dict) -> Any:
    """The `TorchTrainer`: workers and their resources, checkpoints kept, restarts on failure."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from fiqa.console import train_logging_config
    from fiqa.training.loop import train_loop_per_worker  # torch: the workers' side

    t = job.train
    logging_config = train_logging_config()
    train_path, train_fs = storage.ray_storage(paths.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=job.name,
            # local path, or bucket path + filesystem: checkpoints go to the run directory
            storage_path=train_path,
            storage_filesystem=train_fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="score", checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
            **({"logging_config": logging_config} if logging_config else {}),
        ),
        datasets=datasets,
        # Only the training stream is split; one worker reads it without a split coordinator.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"] if t.num_workers > 1 else [],
            execution_options={"train": ordered_ingest()} if t.deterministic else None,
        ),
    )
