"""Progress within a training epoch: rank 0 logs a line every `PROGRESS_EVERY_S` seconds
(steps, images/s, ETA), so a long epoch is not silent and a short one adds no line at all.

A line, not a bar: it reaches the driver's console through Ray's log streaming, and reads
the same in a terminal, a file or a Kubernetes pod's log. No torch here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0


def steps_per_epoch(rows: int, world: int, micro: int, accum: int) -> int:
    """Optimizer steps of an epoch: each worker's equal share of ``rows`` in whole
    micro-batches (the last partial one dropped), in whole global batches."""
    return rows // max(world, 1) // max(micro, 1) // max(accum, 1)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class EpochProgress:
    """Counts an epoch's optimizer steps; every ``every_s`` seconds, one line through ``emit``."""

    def __init__(
        self,
        name: str,
        epoch: int,
        epochs: int,
        total_steps: int,
        images_per_step: int,
        every_s: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] = log.info,
    ):
        self.name, self.epoch, self.epochs = name, epoch, epochs
        self.total, self.images_per_step = total_steps, images_per_step
        self.every_s, self.clock, self.emit = every_s, clock, emit
        self.done = 0
        self.t0 = self.last = clock()

    def step(self) -> None:
        self.done += 1
        if 0 < self.total <= self.done:
            return  # the epoch's own line follows
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self.emit(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done * self.images_per_step / elapsed
        head = f"{self.name} epoch {self.epoch}/{self.epochs}: step {self.done}"
        if self.total <= 0:
            return f"{head}, {rate:.0f} img/s"
        left = max(self.total - self.done, 0) * elapsed / max(self.done, 1)
        pct = 100 * min(self.done, self.total) / self.total
        return f"{head}/{self.total} ({pct:.0f}%), {rate:.0f} img/s, ETA {duration(left)}"
