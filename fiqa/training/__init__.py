"""The training engine: a quality regressor trained with Ray Train over Parquet tables.

- `job`: what to train (`TrainJob`), where a fit writes (`RunPaths`), the finished-fit mark,
  its headline;
- `data`: the Ray Data side: Parquet parts to decoded, cropped, flipped batches; table stats;
- `step`: forward and backward of micro-batches (gradient accumulation, DDP ``no_sync``);
- `progress`: rank 0's line every 30 s within an epoch (steps, images/s, ETA);
- `loop`: `train_loop_per_worker`: resume, then per epoch train, validate, calibrate, checkpoint;
- `checkpoints`: Ray Train checkpoints: save, resume, refuse another config's, export the best;
- `tensorboard`: rank 0's scalars, uploaded to the run directory after every epoch;
- `trainer`: `fit`, which wires them on a `TorchTrainer`.

Importing the package imports neither torch nor timm (Ray Data tasks import `data`).
"""

from fiqa.config import batch_plan, effective_lr  # the batch and lr rules training applies
from fiqa.training.checkpoints import check_resumable
from fiqa.training.job import RunPaths, TrainJob, fit_headline, run_paths
from fiqa.training.trainer import fit

__all__ = [
    "RunPaths",
    "TrainJob",
    "batch_plan",
    "check_resumable",
    "effective_lr",
    "fit",
    "fit_headline",
    "run_paths",
]
