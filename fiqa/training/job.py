"""What a fit trains (`TrainJob`), where it writes (`RunPaths`), and the mark of a finished fit."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field

from fiqa import storage
from fiqa.config import TrainConfig

log = logging.getLogger(__name__)

HISTORY_FILE = "history.json"
# A finished fit: its summary, the config fingerprint and the job's digest, written last.
FIT_FILE = "fit.json"


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
    # Rows per epoch, the tables read over again and cut to make them: an ablation on fewer
    # rows takes exactly as many optimizer steps as the model it is compared with. None: once.
    epoch_rows: int | None = None


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

    It counts only when it records this job's config fingerprint and digest (a rerun with
    another config, or other epochs, tables or seed, trains) and the exported model is
    still there.
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


def fit_headline(summary: dict) -> str:
    """``val SRCC 0.8139 PLCC 0.8218 (epoch 8/10)``: a finished fit's best epoch."""
    val = summary["val"]
    return (
        f"val SRCC {val['srcc']:.4f} PLCC {val['plcc']:.4f} "
        f"(epoch {summary['best_epoch']}/{summary['epochs']})"
    )
