"""Ray Train checkpoints: an epoch's save, resuming, refusing another config's, the best's export.

A checkpoint directory holds the model (``model.safetensors`` + ``model.json``), the
training state (`STATE_FILE`: optimiser, `Progress`; the lr follows from the position) and the history so far.
The driver imports this module without torch; the worker-side functions import it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fiqa import storage
from fiqa.training.job import HISTORY_FILE, RunPaths, TrainJob

STATE_FILE = "train_state.pt"


@dataclass
class Progress:
    """Where training stands: what a checkpoint restores besides weights and optimiser."""

    start_epoch: int = 0  # the next epoch to train (0-based)
    step: int = 0  # optimizer steps so far
    best: float = -np.inf  # best validation score so far
    restarts: int = 0  # resumes from a checkpoint so far (worker failure or rerun)
    history: list[dict] = field(default_factory=list)  # one row per epoch


def save(
    directory: str,
    model: Any,
    meta: dict,
    opt: Any,
    progress: Progress,
    epoch: int,
    config_fingerprint: str,
) -> Any:
    """Write epoch ``epoch``'s checkpoint into ``directory``; the Ray Train `Checkpoint` of it."""
    import torch
    from ray.train import Checkpoint

    from fiqa.models.checkpoint import save_checkpoint

    save_checkpoint(directory, model, meta)
    state = {
        "optimizer": opt.state_dict(),
        "epoch": epoch,
        "step": progress.step,
        "best": progress.best,
        "restarts": progress.restarts,
        "config_fingerprint": config_fingerprint,
    }
    torch.save(state, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, HISTORY_FILE), "w") as f:
        json.dump(progress.history, f, indent=2)
    return Checkpoint.from_directory(directory)


def restore(checkpoint: Any, job: TrainJob, model: Any, opt: Any) -> Progress:
    """Load a Ray Train checkpoint into ``model`` and ``opt``; the progress it saved."""
    import torch

    from fiqa.models.checkpoint import load_checkpoint

    with checkpoint.as_directory() as d:
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
    return Progress(
        start_epoch=state["epoch"] + 1,
        step=state["step"],
        best=state["best"],
        restarts=state["restarts"] + 1,
        history=history,
    )


def check_resumable(paths: RunPaths, job: TrainJob) -> None:
    """Refuse to resume from checkpoints that another config wrote.

    Ray Train resumes a run from the checkpoints under its storage path and name
    (after a crash of the driver, the stage's rerun continues training); they
    must come from the same training config.
    """
    for meta_path in storage.glob(storage.join(paths.storage, job.name, "checkpoint_*/model.json")):
        found = storage.read_json(meta_path).get("config_fingerprint")
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
