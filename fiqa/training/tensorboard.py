"""Rank 0's TensorBoard scalars, uploaded to the run directory after every epoch."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from fiqa import storage

STEP_EVERY = 10  # optimizer steps between TensorBoard points of the step loss


class TensorBoardLog:
    """Rank 0's TensorBoard scalars, complete on disk after every `flush` (once an epoch).

    tensorboardX writes events from a background queue that only `close` drains,
    so each flush closes the current events file and the next scalar opens a new
    one (TensorBoard reads every file in the folder). When the run directory is on
    object storage the files are written locally and copied there on flush.
    """

    def __init__(self, url: str):
        self.url = url
        self.remote = storage.is_remote(url)
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
            for name in sorted(set(os.listdir(self.local)) - self.uploaded):  # closed files only
                storage.put_file(os.path.join(self.local, name), storage.join(self.url, name))
                self.uploaded.add(name)

    def close(self) -> None:
        self.flush()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def epoch_scalars(row: dict) -> dict[str, float]:
    """An epoch's history row as TensorBoard tags."""
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
