"""Training a quality regressor with Ray Train over Parquet tables.

The data flow::

    Parquet parts (image bytes, score, source) --read_parquet--> Ray Data
        --(CPU tasks: decode, resize, random crop + flip, source id, loss weight)-->
        get_dataset_shard("train") on each worker --> DDP model

The loop inside `train_loop_per_worker` is plain PyTorch. A global batch of
``train.batch_size`` rows is ``num_workers`` x ``accumulation steps``
micro-batches of ``micro_batch_size`` rows; gradients synchronise once per
global batch (DDP ``no_sync`` on the other micro-batches), so the update does
not depend on how the batch is split between workers and steps. Loss =
per-source weighted MSE + PLCC loss on standardised targets; AdamW; StepLR.
After every epoch the loop validates on ``labeled_val`` (each worker scores
its slice, predictions are gathered), fits the 4-parameter logistic that maps
raw outputs to the MOS scale, writes TensorBoard scalars (rank 0) and reports
a checkpoint (model, optimiser, scheduler, epoch, step, best score, config
fingerprint, history) through `ray.train.report`. Ray Train keeps the best by
(SRCC + PLCC) / 2 and, when a worker dies, restarts the worker group from the
latest checkpoint (``FailureConfig``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fiqa import storage
from fiqa.cluster.resources import check_training, worker_threads
from fiqa.config import (  # batch_plan, effective_lr: re-exported, their home is the config
    TrainConfig,
    batch_plan,
    effective_lr,
)
from fiqa.data.decode import decode_image
from fiqa.data.tables import list_parts
from fiqa.data.transforms import random_crop_flip

if TYPE_CHECKING:  # the module stays importable by data workers without torch
    import torch

log = logging.getLogger(__name__)

# `*.pretrained_weights: timm` asks for timm's own hub weights: the only code path that downloads.
TIMM_HUB_WEIGHTS = "timm"
TB_STEP_EVERY = 10  # optimizer steps between TensorBoard points of the step loss
MAX_FAILURES = 2  # worker-group restarts from the latest checkpoint before the run fails


@dataclass
class TrainJob:
    name: str  # "teacher", "teacher_plus", "student", "student_labeled_only"
    arch: str
    image_size: int
    resize: int
    train_tables: list[str]  # table directories (labels/ folders) to train on
    val_table: str
    out_dir: str  # Ray Train storage, TensorBoard logs and the exported best model live here
    train: TrainConfig
    seed: int = 0
    init_checkpoint: str | None = None  # start from this model (e.g. the teacher)
    pretrained_weights: str | None = None  # backbone initialisation: a path, or "timm"
    config_fingerprint: str = ""
    max_pixels: int = 40_000_000
    extra_meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Ray Data UDFs (CPU tasks; no torch)


def decode_train_batch(
    batch: dict, resize: int, crop: int, weights: dict[str, float], source_ids: dict[str, int]
) -> dict:
    """Bytes -> randomly cropped and flipped uint8 pixels, target, loss weight, source id."""
    rng = np.random.default_rng()
    n = len(batch["image"])
    pixels = np.empty((n, crop, crop, 3), dtype=np.uint8)
    for i, data in enumerate(batch["image"]):
        pixels[i] = random_crop_flip(decode_image(data, resize), crop, rng)
    sources = [str(s) for s in batch["source"]]
    return {
        "pixels": pixels,
        "target": batch["score"].astype(np.float32),
        "weight": np.array([weights.get(s, 1.0) for s in sources], dtype=np.float32),
        "source_id": np.array([source_ids[s] for s in sources], dtype=np.int64),
    }


def decode_eval_batch(batch: dict, resize: int, crop: int) -> dict:
    n = len(batch["image"])
    pixels = np.empty((n, crop, crop, 3), dtype=np.uint8)
    for i, data in enumerate(batch["image"]):
        pixels[i] = decode_image(data, resize, crop=crop)
    return {"pixels": pixels, "target": batch["score"].astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# The pieces of the train loop (plain PyTorch, testable without Ray)


def build_model(job: TrainJob) -> torch.nn.Module:
    """The job's starting model: an earlier checkpoint, pretrained backbone weights, or random.

    Nothing is downloaded unless ``pretrained_weights`` is ``"timm"``: then timm fetches
    its own pretrained weights for the architecture (network access needed on the workers).
    """
    from fiqa.models import load_checkpoint
    from fiqa.models.checkpoint import load_pretrained_backbone
    from fiqa.models.regressor import QualityRegressor

    if job.init_checkpoint:
        return load_checkpoint(job.init_checkpoint).model
    model = QualityRegressor(job.arch, image_size=job.image_size)
    if job.pretrained_weights == TIMM_HUB_WEIGHTS:
        import timm

        from fiqa.models.regressor import _accepts_img_size

        size = {"img_size": job.image_size} if _accepts_img_size(job.arch) else {}
        hub = timm.create_model(job.arch, pretrained=True, num_classes=0, global_pool="avg", **size)
        model.backbone.load_state_dict(hub.state_dict())
    elif job.pretrained_weights:
        load_pretrained_backbone(model, job.pretrained_weights)
    return model


class GradAccumulator:
    """Forward and backward of micro-batches; gradients synchronise once per global batch.

    Each micro-batch loss is divided by the accumulation steps and DDP averages
    over workers, so a global batch's gradient is the mean of its micro-batch
    gradients however they are split: 2 workers x 1 step and 1 worker x 2 steps
    give the same update. Per-source squared errors and row counts accumulate
    on the device (no host sync per step) for the epoch's metrics.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        accum_steps: int,
        num_sources: int,
        target_mean: float,
        target_std: float,
        plcc_weight: float = 1.0,
        autocast_bf16: bool = False,
        channels_last: bool = False,
    ):
        import torch

        self.model = model
        self.accum_steps = accum_steps
        self.num_sources = num_sources
        self.mean, self.std = target_mean, target_std
        self.plcc_weight = plcc_weight
        self.autocast_bf16 = autocast_bf16
        self.channels_last = channels_last
        self.micro_batches = 0
        device = next(model.parameters()).device
        self.device_type = device.type
        # [loss sum, micro-batches, rows, squared error per source..., rows per source...]
        self.stats = torch.zeros(3 + 2 * num_sources, dtype=torch.float64, device=device)
        self.last_loss: torch.Tensor | None = None

    def backward(self, batch: dict[str, torch.Tensor]) -> bool:
        """Forward + backward one micro-batch; True when a global batch is complete and synced."""
        import torch

        from fiqa.losses import fiqa_loss
        from fiqa.models.inputs import to_model_input

        self.micro_batches += 1
        complete = self.micro_batches % self.accum_steps == 0
        no_sync = getattr(self.model, "no_sync", None)
        # Gradients all-reduce on the last micro-batch of a global batch only.
        sync = contextlib.nullcontext() if complete or no_sync is None else no_sync()
        with sync:
            x = to_model_input(batch["pixels"], channels_last=self.channels_last)
            with torch.autocast(self.device_type, torch.bfloat16, enabled=self.autocast_bf16):
                pred = self.model(x)
            # Standardised targets: no label scale (1-5, 0-100) needs its own learning rate;
            # the logistic fitted after each epoch maps outputs back to MOS.
            target = (batch["target"].float() - self.mean) / self.std
            loss = fiqa_loss(pred, target, batch.get("weight"), self.plcc_weight)
            (loss / self.accum_steps).backward()
        with torch.no_grad():
            se = (pred.detach().float().flatten() - target) ** 2
            sid = batch["source_id"].to(se.device)
            s, k = self.num_sources, len(se)
            self.stats[0] += loss.detach()
            self.stats[1] += 1
            self.stats[2] += k
            self.stats[3 : 3 + s] += torch.bincount(sid, weights=se, minlength=s)[:s]
            self.stats[3 + s :] += torch.bincount(sid, minlength=s)[:s]
        self.last_loss = loss.detach()
        return complete

    def epoch_stats(self, sources: list[str]) -> dict[str, Any]:
        """The epoch's loss and per-source MSE, summed over all workers (a collective call)."""
        import torch.distributed as dist

        stats = self.stats.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        v = stats.cpu().numpy()
        s = len(sources)
        se, rows = v[3 : 3 + s], v[3 + s :]
        return {
            "train_loss": float(v[0] / v[1]) if v[1] else float("nan"),
            "rows": int(v[2]),
            "loss_by_source": {
                src: float(se[i] / rows[i]) for i, src in enumerate(sources) if rows[i]
            },
            "rows_by_source": {src: int(rows[i]) for i, src in enumerate(sources) if rows[i]},
        }


class TensorBoardLog:
    """Rank 0's TensorBoard scalars, complete on disk after every `flush` (once an epoch).

    tensorboardX writes events from a background queue that only `close` drains,
    so each flush closes the current events file and the next scalar opens a new
    one (TensorBoard reads every file in the folder). When the run directory is on
    object storage the files are written locally and copied there on flush.
    """

    def __init__(self, url: str):
        self.url = url
        self.remote = "://" in url and not url.startswith("file://")
        self.local = tempfile.mkdtemp(prefix="fiqa-tb-") if self.remote else url
        self.writer: Any = None
        self.files = 0
        self.uploaded: set[str] = set()

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            from tensorboardX import SummaryWriter

            self.files += 1
            suffix = f".{os.getpid()}.{self.files}"  # unique even within one second
            self.writer = SummaryWriter(self.local, filename_suffix=suffix)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.remote:
            import fsspec

            fs, root = fsspec.core.url_to_fs(self.url)
            for name in sorted(set(os.listdir(self.local)) - self.uploaded):  # closed files only
                fs.put_file(os.path.join(self.local, name), f"{root.rstrip('/')}/{name}")
                self.uploaded.add(name)

    def close(self) -> None:
        self.flush()
        if self.remote:
            import shutil

            shutil.rmtree(self.local, ignore_errors=True)


def _tb_scalars(row: dict) -> dict[str, float]:
    out = {
        "train/loss": row["train_loss"],
        "train/lr": row["lr"],
        "train/images_per_s": row["images_per_s"],
        "train/data_wait_frac": row["data_wait_frac"],
        "val/srcc": row["val_srcc"],
        "val/plcc": row["val_plcc"],
        "val/score": row["score"],
    }
    out.update({f"train/mse_{s}": v for s, v in row["loss_by_source"].items()})
    return out


def _flat_metrics(row: dict) -> dict:
    """Ray Train's metrics are flat: nested per-source dicts become ``mse_<source>`` keys."""
    flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
    flat.update({f"mse_{s}": v for s, v in row["loss_by_source"].items()})
    return flat


STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
# A finished fit: its summary, the config fingerprint and the job's digest, written last.
FIT_FILE = "fit.json"


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    from fiqa.calibration import fit_calibration, to_meta
    from fiqa.metrics import quality_metrics
    from fiqa.models import load_checkpoint, save_checkpoint
    from fiqa.models.allocator import retain_freed_memory
    from fiqa.models.inputs import to_model_input

    job = TrainJob(**{**config["job"], "train": TrainConfig(**config["job"]["train"])})
    t, sources = job.train, config["sources"]
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    torch.manual_seed(job.seed)
    torch.set_num_threads(config["torch_threads"])
    retain_freed_memory()  # step after step reuses the same activation and gradient memory
    device = get_device()
    cuda = device.type == "cuda"
    micro, accum = batch_plan(t)

    model = build_model(job)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=effective_lr(t), weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=t.lr_step_epochs, gamma=t.lr_gamma)
    start_epoch, best, step, restarts, history = 0, -np.inf, 0, 0, []

    resume = ray.train.get_checkpoint()
    if resume:
        with resume.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
            weights = load_checkpoint(d).model.state_dict()
            with open(os.path.join(d, HISTORY_FILE)) as f:
                history = json.load(f)
        if state["config_fingerprint"] != job.config_fingerprint:
            raise RuntimeError(
                f"{job.name}: the checkpoint to resume from was trained with another config "
                f"(fingerprint {state['config_fingerprint']}, now {job.config_fingerprint}); "
                f"remove {job.out_dir}/ray_train to start over"
            )
        getattr(model, "module", model).load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best, step = state["epoch"] + 1, state["best"], state["step"]
        restarts = state["restarts"] + 1
        if rank == 0:
            log.info("%s: resuming after epoch %d (best %.4f)", job.name, start_epoch, best)

    tb = TensorBoardLog(config["tensorboard_dir"]) if rank == 0 else None
    step_kw = dict(
        target_mean=config["target_mean"],
        target_std=config["target_std"],
        plcc_weight=t.plcc_loss_weight,
        autocast_bf16=cuda and t.precision == "bf16",
        channels_last=cuda,
    )
    for epoch in range(start_epoch, t.epochs):
        model.train()
        acc = GradAccumulator(model, accum, len(sources), **step_kw)
        lr = opt.param_groups[0]["lr"]
        steps_before, waited, first_wait = step, 0.0, None
        t0 = time.perf_counter()
        batches = iter(
            ray.train.get_dataset_shard("train").iter_torch_batches(
                batch_size=micro,
                local_shuffle_buffer_size=t.shuffle_buffer or None,
                local_shuffle_seed=(job.seed * 1_000_003 + epoch * 1009 + rank)
                if t.shuffle_buffer
                else None,
                drop_last=True,  # equal splits + drop_last: every worker takes the same steps
                device=device,
                pin_memory=cuda,
            )
        )
        while True:
            w0 = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - w0
            if first_wait is None:
                first_wait = waited
            if batch is None:
                break
            if acc.backward(batch):
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if tb and step % TB_STEP_EVERY == 0:
                    tb.scalars({"train/loss_step": float(acc.last_loss)}, step)
        opt.zero_grad(set_to_none=True)  # an incomplete last global batch is dropped
        if cuda:
            torch.cuda.synchronize()
        train_time = time.perf_counter() - t0
        sched.step()
        stats = acc.epoch_stats(sources)

        model.eval()
        preds, targets = [], []
        with torch.inference_mode():
            for batch in ray.train.get_dataset_shard(f"val_{rank}").iter_torch_batches(
                batch_size=micro, device=device
            ):
                with torch.autocast(device.type, torch.bfloat16, enabled=step_kw["autocast_bf16"]):
                    out = model(to_model_input(batch["pixels"], channels_last=cuda))
                preds.append(out.float().cpu().numpy())
                targets.append(batch["target"].cpu().numpy())
        local = (
            np.concatenate(preds) if preds else np.zeros(0, np.float32),
            np.concatenate(targets) if targets else np.zeros(0, np.float32),
        )
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, local)
            pred_all = np.concatenate([g[0] for g in gathered])
            target_all = np.concatenate([g[1] for g in gathered])
        else:
            pred_all, target_all = local
        m = quality_metrics(pred_all, target_all)
        score = (m["srcc"] + m["plcc"]) / 2
        best = max(best, score)
        row = {
            "epoch": epoch + 1,
            "train_loss": stats["train_loss"],
            "loss_by_source": stats["loss_by_source"],  # MSE on standardised targets
            "rows_by_source": stats["rows_by_source"],
            "val_srcc": m["srcc"],
            "val_plcc": m["plcc"],
            "val_krcc": m["krcc"],
            "val_rmse": m["rmse"],
            "score": score,
            "best_score": best,
            "lr": lr,
            "steps": step - steps_before,
            "images_per_s": stats["rows"] / max(train_time, 1e-9),  # all workers, training loop
            "data_wait_frac": waited / max(train_time, 1e-9),  # of rank 0's training time
            "first_batch_s": first_wait,  # the epoch's stream start-up, in data_wait_frac
            "train_seconds": train_time,
            "restarts": restarts,  # resumes from a checkpoint so far (worker failure or rerun)
        }
        history.append(row)
        if tb:
            log.info(
                "%s epoch %d/%d: loss %.4f val SRCC %.4f PLCC %.4f (%.0f img/s)",
                job.name,
                epoch + 1,
                t.epochs,
                row["train_loss"],
                m["srcc"],
                m["plcc"],
                row["images_per_s"],
            )
            tb.scalars(_tb_scalars(row), epoch + 1)
            tb.flush()
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                calib = fit_calibration(pred_all, target_all)
                meta = {
                    "arch": job.arch,
                    "image_size": job.image_size,
                    "resize": job.resize,
                    "name": job.name,
                    "epoch": epoch + 1,
                    "val": m,
                    "score": score,
                    "calibration": to_meta(calib),
                    "config_fingerprint": job.config_fingerprint,
                    "target_mean": config["target_mean"],
                    "target_std": config["target_std"],
                    **job.extra_meta,
                }
                save_checkpoint(d, model, meta)
                torch.save(
                    {
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "epoch": epoch,
                        "step": step,
                        "best": best,
                        "restarts": restarts,
                        "config_fingerprint": job.config_fingerprint,
                    },
                    os.path.join(d, STATE_FILE),
                )
                with open(os.path.join(d, HISTORY_FILE), "w") as f:
                    json.dump(history, f, indent=2)
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(_flat_metrics(row), checkpoint=checkpoint)
    if tb:
        tb.close()


# ---------------------------------------------------------------------------------------------
# The driver side


@dataclass
class TableStats:
    target_mean: float
    target_std: float
    rows_by_source: dict[str, int]


def table_stats(tables: list[str]) -> TableStats:
    """Mean and standard deviation of ``score`` and row counts per ``source`` over the tables."""
    import fsspec
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total, total_sq, n = 0.0, 0.0, 0
    rows: dict[str, int] = {}
    for d in tables:
        for p in list_parts(d):
            fs, path = fsspec.core.url_to_fs(p)
            tab = pq.read_table(path, columns=["score", "source"], filesystem=fs)
            col = tab.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
            col = col[~np.isnan(col)]
            total, total_sq, n = total + col.sum(), total_sq + (col**2).sum(), n + len(col)
            for vc in pc.value_counts(tab.column("source")).to_pylist():
                rows[str(vc["values"])] = rows.get(str(vc["values"]), 0) + int(vc["counts"])
    if n < 2:
        raise RuntimeError(f"need at least 2 labeled rows to train, found {n} in {tables}")
    mean = total / n
    std = float(max(np.sqrt(max(total_sq / n - mean**2, 0.0)), 1e-6))
    return TableStats(float(mean), std, dict(sorted(rows.items())))


@dataclass
class RunPaths:
    """Where one training run reads and writes: everything storage-specific lives here."""

    storage: str  # Ray Train's storage_path (checkpoints)
    tensorboard: str
    model: str  # the exported best model
    history: str
    fit: str  # FIT_FILE: the summary of a finished fit (its commit marker)


def run_paths(job: TrainJob) -> RunPaths:
    out = job.out_dir.rstrip("/")
    root = out if "://" in out else os.path.abspath(out)
    return RunPaths(
        storage=f"{root}/ray_train",
        tensorboard=f"{root}/tensorboard",
        model=f"{out}/model",
        history=f"{out}/{HISTORY_FILE}",
        fit=f"{out}/{FIT_FILE}",
    )


def job_digest(job: TrainJob) -> str:
    """A hash of everything that defines ``job``: tables, output, training config, seed, ..."""
    text = json.dumps(asdict(job), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fit_marks(job: TrainJob) -> dict:
    """What ``fit.json`` records besides the summary, to tell which job finished."""
    return {"config_fingerprint": job.config_fingerprint, "job_digest": job_digest(job)}


def finished_fit(job: TrainJob, paths: RunPaths) -> dict | None:
    """The summary of a fit of this very job that already finished, or None.

    A finished fit left ``fit.json`` after exporting its model. It counts only when it
    records this job's config fingerprint and digest (a rerun with another config, or
    other epochs, tables or seed, trains) and the exported model is still there.
    """
    try:
        done = storage.read_json(paths.fit)
    except (FileNotFoundError, ValueError):  # absent, or not JSON: not finished
        return None
    if not isinstance(done, dict):
        return None
    marks = {k: done.pop(k, None) for k in fit_marks(job)}
    if marks != fit_marks(job):
        log.info("%s: %s is from another config or job %s; training", job.name, paths.fit, marks)
        return None
    if not storage.exists(storage.join(paths.model, "model.json")):
        log.info("%s: %s found but no model in %s; training", job.name, paths.fit, paths.model)
        return None
    return done


def check_pretrained(path: str | None) -> None:
    """Fail before Ray starts when the pretrained weights file is missing."""
    if not path or path == TIMM_HUB_WEIGHTS:
        return
    if not storage.exists(path):
        raise FileNotFoundError(f"pretrained_weights {path!r} not found")


def check_resumable(paths: RunPaths, job: TrainJob) -> None:
    """Refuse to resume from checkpoints that another config wrote.

    Ray Train resumes a run from the checkpoints under its storage path and name
    (after a crash of the driver, the stage's rerun continues training); they
    must come from the same training config.
    """
    base = f"{paths.storage}/{job.name}"
    fs, root = storage.filesystem(base)
    scheme = base.split("://", 1)[0] + "://" if storage.is_remote(base) else ""
    metas = storage.retry(lambda: fs.glob(f"{root}/checkpoint_*/model.json"), base, "list")
    for meta_path in metas:
        found = storage.read_json(scheme + meta_path).get("config_fingerprint")
        if found != job.config_fingerprint:
            raise RuntimeError(
                f"{job.name}: {paths.storage} holds checkpoints of another config "
                f"(fingerprint {found}, now {job.config_fingerprint}); remove it to start over"
            )


def export_best(result: Any, paths: RunPaths) -> tuple[dict, list[dict]]:
    """Copy the best checkpoint's model to ``paths.model`` and the history to ``paths.history``."""
    best_ckpt, _ = max(result.best_checkpoints, key=lambda cm: cm[1]["score"])
    with best_ckpt.as_directory() as d:
        # weights first, model.json last (and removed first): the JSON marks a complete model
        storage.publish(d, paths.model, ["model.safetensors", "model.json"])
        with open(os.path.join(d, "model.json")) as f:
            meta = json.load(f)
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, HISTORY_FILE)) as f:
            history = json.load(f)
    storage.write_text(paths.history, json.dumps(history, indent=2))
    return meta, history


def read_parts(parts: list[str], **kwargs: Any) -> Any:
    """``ray.data.read_parquet`` of part files already listed, through Ray Data's V1 reader.

    Ray Data's default Parquet reader (V2) lists the files and reads their footers at every
    execution, on FooterReader actors it starts and kills each time: each epoch's stream
    waited 3.7 to 4 s for its first batch on 2 cores, 17 % of an epoch of the training
    benchmark. V1 reads the footers once, when the dataset is made, and each epoch's first
    batch came after 0.6 s. The file shuffle (``FileShuffleConfig``) is per epoch in both.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    before, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(parts, **kwargs)
    finally:
        ctx.use_datasource_v2 = before


def fit(job: TrainJob) -> dict:
    """Train ``job`` with Ray Train; export the best model to ``out_dir/model``; return its summary.

    The summary is also written, last, to ``out_dir/fit.json`` with the job's config
    fingerprint and digest: a fit of the same job that finds it (and the model) returns
    it without starting Ray Train, so a rerun of an interrupted stage does not train again
    a model that finished.
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

    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from fiqa.models.registry import resolve_spec

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
    if job.init_checkpoint:  # keep the target scale the initial weights were trained for
        from fiqa.models.checkpoint import read_meta

        init_meta = read_meta(job.init_checkpoint)
        mean, std = init_meta["target_mean"], init_meta["target_std"]
    else:
        mean, std = stats.target_mean, stats.target_std
    log.info(
        "%s: %d rows %s; global batch %d = %d worker(s) x %d rows x %d step(s); lr %.3g",
        job.name,
        sum(stats.rows_by_source.values()),
        stats.rows_by_source,
        t.batch_size,
        t.num_workers,
        micro,
        accum,
        effective_lr(t),
    )

    # select_columns is pushed down into the Parquet read: only these columns are read.
    train_ds = (
        # Files in a new order every epoch, reproducible from the run's seed (row order across
        # workers still depends on which worker asks first).
        read_parts(parts, shuffle=ray.data.FileShuffleConfig(seed=job.seed))
        .select_columns(["image", "score", "source"])
        .map_batches(
            decode_train_batch,
            batch_size=128,
            fn_kwargs={
                "resize": job.resize,
                "crop": job.image_size,
                "weights": t.source_weights,
                "source_ids": {s: i for i, s in enumerate(sources)},
            },
        )
    )
    # The labeled validation set is small and the same every epoch: decode it once, and
    # give every worker a fixed slice of it (whole rows, none dropped).
    val_ds = (
        read_parts(val_parts)
        .select_columns(["image", "score"])
        .map_batches(
            decode_eval_batch,
            batch_size=128,
            fn_kwargs={"resize": job.resize, "crop": job.image_size},
        )
        .materialize()
    )
    n_val = val_ds.count()
    cuts = [round(n_val * i / t.num_workers) for i in range(1, t.num_workers)]
    val_slices = val_ds.split_at_indices(cuts) if cuts else [val_ds]

    train_path, train_fs = storage.ray_storage(paths.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": asdict(job),
            "target_mean": mean,
            "target_std": std,
            "sources": sources,
            "tensorboard_dir": paths.tensorboard,
            "torch_threads": worker_threads(t),
        },
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
        ),
        datasets={"train": train_ds, **{f"val_{i}": v for i, v in enumerate(val_slices)}},
        # Only the training stream is split; one worker reads it without a split coordinator.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"] if t.num_workers > 1 else []
        ),
    )
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
    }
    storage.write_json(paths.fit, {**summary, **marks})  # the commit: this job finished
    return summary
