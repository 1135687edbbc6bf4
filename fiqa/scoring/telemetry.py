"""The scoring engine's figures in Ray's metrics, for Ray's dashboard, Prometheus and Grafana.

Recorded by the driver as each shard commits (it learns the counts from the commit task),
tagged with the job's ``source`` (``pseudo_u1``, ``test``, ...):

- ``fiqa_images_scored`` (counter): rows committed to the scored table;
- ``fiqa_images_rejected`` (counter, also tagged ``reason``): rows committed to the rejects;
- ``fiqa_shards_committed`` (counter);
- ``fiqa_images_per_second`` (gauge): committed rows per second over the last minute.

Ray exports them with its ``ray_`` prefix (``ray_fiqa_images_scored_total`` ...) from every
node's metrics agent, where Ray's Prometheus scrape config already looks.
"""

from __future__ import annotations

import time
from collections import deque

WINDOW_S = 60.0


class ScoringMetrics:
    """One scoring job's counters and gauge (Ray's metrics API, in the driver)."""

    def __init__(self, source: str):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"source": source}
        self.scored = Counter(
            "fiqa_images_scored", "Images committed to a scored table.", tag_keys=("source",)
        )
        self.rejected = Counter(
            "fiqa_images_rejected",
            "Images committed to a rejects table, by reason.",
            tag_keys=("source", "reason"),
        )
        self.shards = Counter(
            "fiqa_shards_committed", "Shards committed (both parts written).", tag_keys=("source",)
        )
        self.rate = Gauge(
            "fiqa_images_per_second",
            f"Images committed per second over the last {WINDOW_S:g} s.",
            tag_keys=("source",),
        )
        self.recent: deque[tuple[float, int]] = deque()
        self.t0 = time.monotonic()

    def committed(self, counts: dict) -> None:
        """A shard committed with ``counts`` (scored, rejected, reasons)."""
        self.shards.inc(1, self.tags)
        if counts["scored"]:
            self.scored.inc(counts["scored"], self.tags)
        for reason, n in counts["reasons"].items():
            self.rejected.inc(n, {**self.tags, "reason": reason})
        now = time.monotonic()
        self.recent.append((now, counts["scored"] + counts["rejected"]))
        while self.recent[0][0] < now - WINDOW_S:
            self.recent.popleft()
        span = now - max(self.t0, now - WINDOW_S)  # the window, or the job's time so far
        self.rate.set(sum(n for _, n in self.recent) / max(span, 1e-3), self.tags)

    def finished(self) -> None:
        """The job ended: its rate is 0, not its last value."""
        self.rate.set(0.0, self.tags)
