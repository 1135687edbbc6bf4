"""Training a quality regressor with Ray Train over Parquet tables.

The data flow::

    Parquet parts (image bytes, score, source) --read_parquet--> Ray Data
        --(CPU tasks: decode, resize, random crop + flip, per-source weight)-->
        get_dataset_shard("train") on each worker --> DDP model

The loop inside `train_loop_per_worker` is plain PyTorch: loss = weighted
MSE + PLCC loss, AdamW, StepLR; after every epoch it validates on
``labeled_val`` (predictions gathered from all workers), fits the
4-parameter logistic that maps raw outputs to the MOS scale, and reports a
checkpoint (model, optimiser, scheduler, epoch, best score, history) through
`ray.train.report`. Ray Train keeps the best by (SRCC + PLCC) / 2 and
restarts from the latest one after a failure.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np

from fiqa.config import TrainConfig
from fiqa.data.decode import decode_image
from fiqa.data.tables import list_parts
from fiqa.data.transforms import center_crop, random_crop_flip

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    name: str  # "teacher", "teacher_plus", "student", "student_labeled_only"
    arch: str
    image_size: int
    resize: int
    train_tables: list[str]  # table directories (labels/ folders) to train on
    val_table: str
    out_dir: str  # Ray Train storage and the exported best model live here
    train: TrainConfig
    seed: int = 0
    init_checkpoint: str | None = None  # start from this model (e.g. the teacher)
    pretrained_weights: str | None = None  # backbone initialisation
    config_fingerprint: str = ""
    max_pixels: int = 40_000_000
    extra_meta: dict = field(default_factory=dict)


def decode_train_batch(batch: dict, resize: int, crop: int, weights: dict[str, float]) -> dict:
    """Ray Data UDF: bytes -> randomly cropped and flipped uint8 pixels, target, loss weight."""
    rng = np.random.default_rng()
    n = len(batch["image"])
    pixels = np.empty((n, crop, crop, 3), dtype=np.uint8)
    for i, data in enumerate(batch["image"]):
        pixels[i] = random_crop_flip(decode_image(data, resize), crop, rng)
    return {
        "pixels": pixels,
        "target": batch["score"].astype(np.float32),
        "weight": np.array([weights.get(s, 1.0) for s in batch["source"]], dtype=np.float32),
    }


def decode_eval_batch(batch: dict, resize: int, crop: int) -> dict:
    n = len(batch["image"])
    pixels = np.empty((n, crop, crop, 3), dtype=np.uint8)
    for i, data in enumerate(batch["image"]):
        pixels[i] = center_crop(decode_image(data, resize), crop)
    return {"pixels": pixels, "target": batch["score"].astype(np.float32)}


def _state_path(d: str) -> str:
    return os.path.join(d, "train_state.pt")


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    from fiqa.losses import fiqa_loss
    from fiqa.metrics import fit_logistic, quality_metrics
    from fiqa.models import load_checkpoint, save_checkpoint
    from fiqa.models.checkpoint import load_pretrained_backbone
    from fiqa.models.inputs import to_model_input
    from fiqa.models.regressor import QualityRegressor

    job = TrainJob(**{**config["job"], "train": TrainConfig(**config["job"]["train"])})
    t = job.train
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    torch.manual_seed(job.seed)
    torch.set_num_threads(t.torch_threads or max(1, (os.cpu_count() or 1) // t.num_workers))
    device = get_device()
    cuda = device.type == "cuda"

    if job.init_checkpoint:
        model = load_checkpoint(job.init_checkpoint).model
    else:
        model = QualityRegressor(job.arch, image_size=job.image_size)
        if job.pretrained_weights:
            load_pretrained_backbone(model, job.pretrained_weights)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=t.lr_step_epochs, gamma=t.lr_gamma)
    start_epoch, best, history = 0, -np.inf, []

    resume = ray.train.get_checkpoint()
    if resume:
        with resume.as_directory() as d:
            state = torch.load(_state_path(d), map_location="cpu", weights_only=True)
            weights = load_checkpoint(d).model.state_dict()
        getattr(model, "module", model).load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        history = json.loads(state["history"])
        if rank == 0:
            log.info("%s: resuming from epoch %d (best %.4f)", job.name, start_epoch, best)

    per_worker = t.batch_size // t.num_workers
    for epoch in range(start_epoch, t.epochs):
        import time

        t0 = time.perf_counter()
        model.train()
        losses, seen = [], 0
        for batch in ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=per_worker,
            local_shuffle_buffer_size=t.shuffle_buffer or None,
            drop_last=True,
            device=device,
        ):
            x = to_model_input(batch["pixels"], channels_last=cuda)
            with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                pred = model(x)
            # The network regresses standardised targets, so no label scale (1-5, 0-100)
            # needs its own learning rate; the logistic fitted below maps back to MOS.
            target = (batch["target"] - config["target_mean"]) / config["target_std"]
            loss = fiqa_loss(pred, target, batch["weight"], t.plcc_loss_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            seen += len(x)
        sched.step()
        train_time = time.perf_counter() - t0

        model.eval()
        preds, targets = [], []
        with torch.inference_mode():
            for batch in ray.train.get_dataset_shard("val").iter_torch_batches(
                batch_size=per_worker, device=device
            ):
                with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                    out = model(to_model_input(batch["pixels"], channels_last=cuda))
                preds.append(out.float().cpu().numpy())
                targets.append(batch["target"].cpu().numpy())
        local = (
            np.concatenate(preds) if preds else np.zeros(0),
            np.concatenate(targets) if targets else np.zeros(0),
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
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "val_srcc": m["srcc"],
            "val_plcc": m["plcc"],
            "val_krcc": m["krcc"],
            "val_rmse": m["rmse"],
            "score": score,
            "best_score": best,
            "lr": opt.param_groups[0]["lr"],
            "images_per_s": seen * world / max(train_time, 1e-9),
        }
        history.append(row)
        if rank == 0:
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
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                calib = fit_logistic(pred_all, target_all) if len(pred_all) >= 4 else None
                meta = {
                    "arch": job.arch,
                    "image_size": job.image_size,
                    "resize": job.resize,
                    "name": job.name,
                    "epoch": epoch + 1,
                    "val": m,
                    "calibration": calib.to_dict() if calib else None,
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
                        "best": best,
                        "history": json.dumps(history),
                    },
                    _state_path(d),
                )
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(row, checkpoint=checkpoint)


def target_stats(tables: list[str]) -> tuple[float, float]:
    """Mean and standard deviation of the ``score`` column over the training tables."""
    import pyarrow.parquet as pq

    total, total_sq, n = 0.0, 0.0, 0
    for d in tables:
        for p in list_parts(d):
            col = pq.read_table(p, columns=["score"]).column("score").to_numpy(zero_copy_only=False)
            col = col.astype(np.float64)
            col = col[~np.isnan(col)]
            total, total_sq, n = total + col.sum(), total_sq + (col**2).sum(), n + len(col)
    if n < 2:
        raise RuntimeError(f"need at least 2 labeled rows to train, found {n} in {tables}")
    mean = total / n
    return float(mean), float(max(np.sqrt(max(total_sq / n - mean**2, 0.0)), 1e-6))


def fit(job: TrainJob) -> dict:
    """Train ``job`` with Ray Train; export the best model to ``out_dir/model``; return its summary."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from fiqa.models.registry import resolve_spec

    job = dataclasses.replace(job, arch=resolve_spec(job.arch).arch)  # registry name -> timm name
    t = job.train
    parts = [p for d in job.train_tables for p in list_parts(d)]
    val_parts = list_parts(job.val_table)
    if not parts or not val_parts:
        raise RuntimeError(
            f"{job.name}: no training or validation data ({job.train_tables}, {job.val_table})"
        )
    columns = ["image", "score", "source"]
    train_ds = ray.data.read_parquet(parts, columns=columns, shuffle="files").map_batches(
        decode_train_batch,
        batch_size=128,
        fn_kwargs={"resize": job.resize, "crop": job.image_size, "weights": t.source_weights},
    )
    # The labeled validation set is small and the same every epoch: decode it once.
    val_ds = (
        ray.data.read_parquet(val_parts, columns=["image", "score"])
        .map_batches(
            decode_eval_batch,
            batch_size=128,
            fn_kwargs={"resize": job.resize, "crop": job.image_size},
        )
        .materialize()
    )
    if job.init_checkpoint:  # keep the target scale the initial weights were trained for
        from fiqa.models.checkpoint import read_meta

        init_meta = read_meta(job.init_checkpoint)
        mean, std = init_meta["target_mean"], init_meta["target_std"]
    else:
        mean, std = target_stats(job.train_tables)
    storage = os.path.abspath(os.path.join(job.out_dir, "ray_train"))
    job_dict = asdict(job)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job_dict, "target_mean": mean, "target_std": std},
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="score", checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=2),
        ),
        datasets={"train": train_ds, "val": val_ds},
        # One worker reads the whole dataset: no split coordinator between it and the data.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train", "val"] if t.num_workers > 1 else []
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    best_ckpt, _ = max(result.best_checkpoints, key=lambda cm: cm[1]["score"])
    model_dir = os.path.join(job.out_dir, "model")
    shutil.rmtree(model_dir, ignore_errors=True)
    with best_ckpt.as_directory() as d:
        os.makedirs(model_dir)
        for f in ("model.safetensors", "model.json"):
            shutil.copy(os.path.join(d, f), model_dir)
    with result.checkpoint.as_directory() as d:
        import torch

        history = json.loads(torch.load(_state_path(d), weights_only=True)["history"])
    with open(os.path.join(job.out_dir, "history.json"), "w") as f:
        json.dump(history, f, indent=2)
    with open(os.path.join(model_dir, "model.json")) as f:
        meta = json.load(f)
    return {
        "model": model_dir,
        "best_epoch": meta["epoch"],
        "val": meta["val"],
        "epochs": len(history),
        "train_parts": len(parts),
    }
