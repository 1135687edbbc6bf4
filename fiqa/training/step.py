"""Forward and backward of micro-batches: gradients synchronise once per global batch."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist

from fiqa.losses import fiqa_loss
from fiqa.models.inputs import to_model_input


class GradAccumulator:
    """Forward and backward of micro-batches; gradients synchronise once per global batch.

    Each micro-batch loss is divided by the accumulation steps and DDP averages
    over workers, so a global batch's gradient is the mean of its micro-batch
    gradients: the same micro-batches give the same update on 2 workers x 1 step
    as on 1 worker x 2 steps. Another split of the global batch (another
    ``micro_batch_size``) keeps the MSE part's gradient where every micro-batch
    has the same weight sum (uniform weights), but not the PLCC part's: that is
    a per-micro-batch estimate of the batch's correlation (`fiqa.losses`).
    Per-source squared errors and row counts accumulate on the device (no host
    sync per step) for the epoch's metrics.
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
