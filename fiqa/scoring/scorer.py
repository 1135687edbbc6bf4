"""The scoring actor: holds the model and scores pixel batches (rows with a reason are skipped).

Ray Data calls it with Arrow batches: the pixels are a zero-copy view of the object store,
and the other columns (keys, encoded images) pass through without becoming Python objects.
`fiqa.scoring.engine.run_score_job` takes the class as a parameter, so a benchmark can pass
a stand-in with the same constructor and call.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fiqa.cluster import cores

log = logging.getLogger(__name__)


class Scorer:
    """As a Ray actor on CPU it claims ``threads`` cores of its own (`fiqa.cluster.cores`):
    always with ``pin_cores`` True, never with False, and with None where this node's cores
    are all this process may use (a machine, or a pod with a cpuset of its own)."""

    def __init__(
        self,
        model_path: str,
        threads: int | None = None,
        compile: bool = False,
        pin_cores: bool | None = None,
    ):
        import torch

        from fiqa.models import load_checkpoint
        from fiqa.models.allocator import retain_freed_memory

        if threads:
            torch.set_num_threads(threads)
        retain_freed_memory()  # batch after batch reuses the same activation memory
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cores = None
        if self.device.type == "cpu" and pin_cores is not False:
            self.cores = claim_cores(threads or torch.get_num_threads(), pin_cores is True)
        self.loaded = load_checkpoint(model_path, map_location=self.device)
        self.model = self.loaded.model
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        if compile:
            # Batches vary in size (a shard's last one), hence dynamic shapes.
            self.model = torch.compile(self.model, dynamic=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from fiqa.models.inputs import to_model_input

        ok = pc.equal(batch.column("reason"), "").to_numpy(zero_copy_only=False)
        raw = np.full(len(ok), np.nan, dtype=np.float64)
        if ok.any():
            pixels = tensor_column(batch.column("pixels"))
            with warnings.catch_warnings():  # never written: to_model_input makes its own copy
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                x = torch.from_numpy(pixels if ok.all() else pixels[ok])
            x = x.to(self.device, non_blocking=True)
            cuda = self.device.type == "cuda"
            with (
                torch.inference_mode(),
                torch.autocast(self.device.type, torch.bfloat16, enabled=cuda),
            ):
                raw[ok] = self.model(to_model_input(x, channels_last=cuda)).float().cpu().numpy()
        return batch.drop_columns(["pixels"]).append_column("raw_score", pa.array(raw))


def claim_cores(n: int, always: bool) -> list[int] | None:
    """Claim ``n`` cores for this actor (see `Scorer`); logs the outcome."""
    import ray

    if not (ray.is_initialized() and ray.get_runtime_context().get_actor_id()):
        return None  # not a Ray actor (a test, an in-process check): never pin the caller
    if not always:
        node = ray.get_runtime_context().get_node_id()
        cpus = next((x["Resources"].get("CPU", 0) for x in ray.nodes() if x["NodeID"] == node), 0)
        if not cores.cores_are_ours(cpus):
            log.info("scoring actor not pinned: this node's %g CPUs are not all its cores", cpus)
            return None
    got = cores.claim(n)
    if got is None:
        log.info("scoring actor not pinned: fewer than %d of this node's cores are free", n)
    else:
        log.info("scoring actor pinned to cores %s", got)
    return got


def tensor_column(col: pa.ChunkedArray) -> np.ndarray:
    """A column of fixed-shape tensors as one contiguous array (a view when it is one chunk)."""
    chunks = [c.to_numpy() for c in col.chunks]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
