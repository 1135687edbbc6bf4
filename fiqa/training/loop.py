"""`train_loop_per_worker`: what each Ray Train worker runs, in named steps.

Per epoch: `train_one_epoch` (micro-batches, one optimizer step per global batch),
`validate` (each worker scores its slice, then all gather), `record_epoch` (the history
row; rank 0 logs it and writes TensorBoard) and `save_and_report` (rank 0 fits the
calibration and writes the checkpoint; every worker reports). Ray Train keeps the best
checkpoint by (SRCC + PLCC) / 2 (`epoch_score`: -inf where validation gives NaN) and
restarts a failed worker group from the latest.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import get_device, prepare_model

from fiqa.calibration import Logistic4, fit_calibration, to_meta
from fiqa.config import TrainConfig, batch_plan, effective_lr
from fiqa.metrics import quality_metrics
from fiqa.models.allocator import retain_freed_memory
from fiqa.models.checkpoint import load_checkpoint
from fiqa.models.inputs import random_crop_flip_batch, to_model_input
from fiqa.models.registry import create_model
from fiqa.training import checkpoints
from fiqa.training.checkpoints import Progress
from fiqa.training.job import TrainJob
from fiqa.training.progress import EpochProgress, duration, steps_per_epoch
from fiqa.training.schedule import lr_factor, position
from fiqa.training.step import GradAccumulator
from fiqa.training.tensorboard import STEP_EVERY, TensorBoardLog, epoch_scalars

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """One worker's setup for the whole run; `progress` is what changes epoch by epoch."""

    job: TrainJob
    sources: list[str]  # source names; a row's source id indexes this list
    target_mean: float
    target_std: float
    rank: int
    world: int
    device: torch.device
    micro: int  # rows per micro-batch
    accum: int  # micro-batches per optimizer step
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    base_lr: float  # the configured lr (scaled to the batch); the schedule multiplies it
    tb: TensorBoardLog | None  # rank 0 only
    progress: Progress
    train_rows: int = 0  # rows of the training tables: the epoch's length, for its ETA

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def bf16(self) -> bool:
        return self.cuda and self.job.train.precision == "bf16"


def train_loop_per_worker(config: dict) -> None:
    w = setup(config)
    for epoch in range(w.progress.start_epoch, w.job.train.epochs):
        train = train_one_epoch(w, epoch)
        pred, target = validate(w)
        val = quality_metrics(pred, target)
        row = record_epoch(w, epoch, train, val)
        save_and_report(w, epoch, row, val, pred, target)
    if w.tb:
        w.tb.close()


def build_model(job: TrainJob) -> torch.nn.Module:
    """The job's starting model: an earlier checkpoint's, else a new one (random or pretrained)."""
    if job.init_checkpoint:
        return load_checkpoint(job.init_checkpoint).model
    return create_model(job.arch, job.image_size, pretrained=job.pretrained_weights)


def setup(config: dict) -> Worker:
    """Threads, device, model (DDP), optimiser; resumed when Ray Train restarts us."""
    job = TrainJob(**{**config["job"], "train": TrainConfig(**config["job"]["train"])})
    t = job.train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(job.seed)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first call
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    torch.set_num_threads(config["torch_threads"])
    retain_freed_memory()  # step after step reuses the same activation and gradient memory
    device = get_device()
    micro, accum = batch_plan(t)

    model = build_model(job)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=effective_lr(t), weight_decay=t.weight_decay)
    progress = Progress()
    resume = ray.train.get_checkpoint()
    if resume:
        progress = checkpoints.restore(resume, job, model, opt)
        if rank == 0:
            log.info(
                "%s: resuming after epoch %d (best %.4f)",
                job.name,
                progress.start_epoch,
                progress.best,
            )
    return Worker(
        job=job,
        sources=config["sources"],
        target_mean=config["target_mean"],
        target_std=config["target_std"],
        rank=rank,
        world=ctx.get_world_size(),
        device=device,
        micro=micro,
        accum=accum,
        model=model,
        opt=opt,
        base_lr=effective_lr(t),
        tb=TensorBoardLog(config["tensorboard_dir"]) if rank == 0 else None,
        progress=progress,
        train_rows=config.get("train_rows", 0),
    )


def train_batches(w: Worker, epoch: int) -> Any:
    """This worker's share of the training stream, in micro-batches on its device
    (deterministic: cropped and flipped here, from the seed, the epoch and the rank)."""
    t = w.job.train
    batches = _stream_batches(w, epoch)
    if not t.deterministic:
        return batches
    rng = torch.Generator().manual_seed(epoch_seed(w, epoch))
    return (
        {**b, "pixels": random_crop_flip_batch(b["pixels"], w.job.image_size, rng, t.hflip)}
        for b in batches
    )


def epoch_seed(w: Worker, epoch: int) -> int:
    """This worker's seed for ``epoch``: its shuffle buffer's and its crops'."""
    return w.job.seed * 1_000_003 + epoch * 1009 + w.rank


def _stream_batches(w: Worker, epoch: int) -> Any:
    t = w.job.train
    return ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=w.micro,
        local_shuffle_buffer_size=t.shuffle_buffer or None,
        local_shuffle_seed=epoch_seed(w, epoch) if t.shuffle_buffer else None,
        drop_last=True,  # equal splits + drop_last: every worker takes the same steps
        device=w.device,
        pin_memory=w.cuda,
    )


def train_one_epoch(w: Worker, epoch: int) -> dict:
    """One pass over the stream, an optimizer step per global batch; the epoch's figures."""
    p = w.progress
    w.model.train()
    acc = GradAccumulator(
        w.model,
        w.accum,
        len(w.sources),
        target_mean=w.target_mean,
        target_std=w.target_std,
        plcc_weight=w.job.train.plcc_loss_weight,
        autocast_bf16=w.bf16,
        channels_last=w.cuda,
    )
    steps_expected = steps_per_epoch(w.train_rows, w.world, w.micro, w.accum)
    lr = set_lr(w, position(epoch, 1, steps_expected))
    steps_before, waited, first_wait = p.step, 0.0, None
    meter = None
    if w.rank == 0:
        meter = EpochProgress(
            w.job.name, epoch + 1, w.job.train.epochs, steps_expected, w.job.train.batch_size
        )
    t0 = time.perf_counter()
    batches = iter(train_batches(w, epoch))
    while True:
        w0 = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - w0
        if first_wait is None:
            first_wait = waited
        if batch is None:
            break
        if acc.backward(batch):
            set_lr(w, position(epoch, p.step - steps_before + 1, steps_expected))
            w.opt.step()
            w.opt.zero_grad(set_to_none=True)
            p.step += 1
            if w.tb and p.step % STEP_EVERY == 0:
                w.tb.scalars({"train/loss_step": float(acc.last_loss)}, p.step)
            if meter:
                meter.step()
    w.opt.zero_grad(set_to_none=True)  # an incomplete last global batch is dropped
    if w.cuda:
        torch.cuda.synchronize()
    train_time = time.perf_counter() - t0
    stats = acc.epoch_stats(w.sources)
    return {
        "train_loss": stats["train_loss"],
        "loss_by_source": stats["loss_by_source"],  # MSE on standardised targets
        "rows_by_source": stats["rows_by_source"],
        "lr": lr,
        "steps": p.step - steps_before,
        "images_per_s": stats["rows"] / max(train_time, 1e-9),  # all workers, training loop
        "data_wait_frac": waited / max(train_time, 1e-9),  # of rank 0's training time
        "first_batch_s": first_wait,  # the epoch's stream start-up, in data_wait_frac
        "train_seconds": train_time,
    }


def set_lr(w: Worker, at: float) -> float:
    """Set the optimizer's lr for the step that ends at ``at`` epochs; that lr."""
    lr = w.base_lr * lr_factor(w.job.train, at)
    for group in w.opt.param_groups:
        group["lr"] = lr
    return lr


def validate(w: Worker) -> tuple[np.ndarray, np.ndarray]:
    """Raw outputs and targets of the whole validation set: each worker scores its slice."""
    w.model.eval()
    preds, targets = [], []
    with torch.inference_mode():
        for batch in ray.train.get_dataset_shard(f"val_{w.rank}").iter_torch_batches(
            batch_size=w.micro, device=w.device
        ):
            with torch.autocast(w.device.type, torch.bfloat16, enabled=w.bf16):
                out = w.model(to_model_input(batch["pixels"], channels_last=w.cuda))
            preds.append(out.float().cpu().numpy())
            targets.append(batch["target"].cpu().numpy())
    local = (
        np.concatenate(preds) if preds else np.zeros(0, np.float32),
        np.concatenate(targets) if targets else np.zeros(0, np.float32),
    )
    if w.world == 1:
        return local
    gathered: list[Any] = [None] * w.world
    dist.all_gather_object(gathered, local)  # every worker needs all of it for the metrics
    return np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered])


def record_epoch(w: Worker, epoch: int, train: dict, val: dict) -> dict:
    """The epoch's history row, appended to `progress`; rank 0 logs it and writes TensorBoard."""
    p = w.progress
    score = epoch_score(val)
    p.best = max(p.best, score)
    row = {
        "epoch": epoch + 1,
        "train_loss": train["train_loss"],
        "loss_by_source": train["loss_by_source"],
        "rows_by_source": train["rows_by_source"],
        "val_srcc": val["srcc"],
        "val_plcc": val["plcc"],
        "val_krcc": val["krcc"],
        "val_rmse": val["rmse"],
        "score": score,
        "best_score": p.best,
        "lr": train["lr"],
        "steps": train["steps"],
        "images_per_s": train["images_per_s"],
        "data_wait_frac": train["data_wait_frac"],
        "first_batch_s": train["first_batch_s"],
        "train_seconds": train["train_seconds"],
        "restarts": p.restarts,  # resumes from a checkpoint so far (worker failure or rerun)
    }
    p.history.append(row)
    if w.tb:
        log.info(
            "%s epoch %d/%d: loss %.4f, val SRCC %.4f PLCC %.4f (%d steps, %.0f img/s, %s)",
            w.job.name,
            epoch + 1,
            w.job.train.epochs,
            row["train_loss"],
            val["srcc"],
            val["plcc"],
            row["steps"],
            row["images_per_s"],
            duration(row["train_seconds"]),
        )
        w.tb.scalars(epoch_scalars(row), epoch + 1)
        w.tb.flush()
    return row


def epoch_score(val: dict) -> float:
    """The epoch's checkpoint score, (SRCC + PLCC) / 2; -inf where a metric is NaN
    (degenerate validation): NaN compares False both ways, so ``max`` over the
    checkpoints (`export_best`) could keep it as the best, and -inf ranks last."""
    score = (val["srcc"] + val["plcc"]) / 2
    return float(score) if np.isfinite(score) else float("-inf")


def save_and_report(
    w: Worker, epoch: int, row: dict, val: dict, pred: np.ndarray, target: np.ndarray
) -> None:
    """Rank 0 fits the calibration and writes the checkpoint; every worker reports the epoch."""
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if w.rank == 0:
            meta = model_meta(w, epoch, val, row["score"], fit_calibration(pred, target))
            checkpoint = checkpoints.save(
                d, w.model, meta, w.opt, w.progress, epoch, w.job.config_fingerprint
            )
        ray.train.report(flat_metrics(row), checkpoint=checkpoint)


def model_meta(
    w: Worker, epoch: int, val: dict, score: float, calibration: Logistic4 | None
) -> dict:
    """This epoch's ``model.json``: what loading, scoring and calibrating the model need."""
    job = w.job
    return {
        "arch": job.arch,
        "image_size": job.image_size,
        "resize": job.resize,
        "name": job.name,
        "epoch": epoch + 1,
        "val": val,
        "score": score,
        "calibration": to_meta(calibration),
        "config_fingerprint": job.config_fingerprint,
        "target_mean": w.target_mean,
        "target_std": w.target_std,
        **job.extra_meta,
    }


def flat_metrics(row: dict) -> dict:
    """Ray Train's metrics are flat: nested per-source dicts become ``mse_<source>`` keys."""
    flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
    flat.update({f"mse_{s}": v for s, v in row["loss_by_source"].items()})
    return flat
