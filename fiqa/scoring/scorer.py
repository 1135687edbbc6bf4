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
from fiqa.config import PRECISIONS
from fiqa.scoring.job import DecodeSpec

log = logging.getLogger(__name__)


class Scorer:
    """As a Ray actor on CPU it claims ``threads`` cores of its own (`fiqa.cluster.cores`):
    always with ``pin_cores`` True, never with False, and with None where this node's cores
    are all this process may use (a machine, or a pod with a cpuset of its own).

    ``decode``: the actor decodes the rows that arrive without pixels from their JPEG bytes
    (`fiqa.scoring.device_decode`). ``precision`` on a GPU (`fiqa.config.PRECISIONS`): autocast
    to fp16 or bf16 (``16-mixed``, ``bf16-mixed``: fp32 weights and normalisations), the whole
    model in fp16 or bf16 (``16-true``, ``bf16-true``), or fp32; a CPU always runs fp32. A mixed
    batch that overflows fp16 is scored again in fp32. ``compile``: torch.compile for one batch
    shape, every batch padded to ``batch_size`` (a shard's last is shorter): it compiles once.
    ``views`` (`views_of`): a row's ``raw_score`` is the mean over its views, ``raw_spread``
    their standard deviation (NaN from one view). ``device``: None is the GPU where there is one.
    """

    def __init__(
        self,
        model_path: str,
        threads: int | None = None,
        compile: bool = False,
        pin_cores: bool | None = None,
        decode: DecodeSpec | None = None,
        precision: str = "16-mixed",
        batch_size: int | None = None,
        views: str = "center",
        device: str | None = None,
    ):
        import torch

        from fiqa.models import load_checkpoint
        from fiqa.models.allocator import retain_freed_memory

        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
        if threads:
            torch.set_num_threads(threads)
        retain_freed_memory()  # batch after batch reuses the same activation memory
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cores = None
        if self.device.type == "cpu" and pin_cores is not False:
            self.cores = claim_cores(threads or torch.get_num_threads(), pin_cores is True)
        self.decode = decode
        self.views = views
        cuda = self.device.type == "cuda"
        half = {"16": torch.float16, "bf16": torch.bfloat16}.get(precision.split("-")[0])
        self.precision = precision if cuda else "32-true"
        self.autocast = half if cuda and precision.endswith("-mixed") else None
        self.dtype = half if cuda and precision.endswith("-true") and half else torch.float32
        self.loaded = load_checkpoint(model_path, map_location=self.device)
        self.model = self.loaded.model.to(self.dtype)
        if cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.pad_to = batch_size if compile else None
        if compile:
            self.model = torch.compile(self.model, dynamic=False)
        if cuda and batch_size:
            # Compilation and cuDNN's algorithm search happen here, while the decode tasks
            # fill the stream, rather than on the first batch.
            self.score(torch.zeros((batch_size, *self.input_shape), dtype=torch.uint8).cuda())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = self.loaded.meta["image_size"]
        return (size, size, 3)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        reason = batch.column("reason")
        ok = pc.equal(reason, "").to_numpy(zero_copy_only=False)
        raw = np.full(len(ok), np.nan, dtype=np.float64)
        spread = raw.copy()
        if self.decode is not None and ok.any():
            x, refused = self._pixels_decoding(batch, np.flatnonzero(ok))
            if refused:  # the CPU path rejected what the device decoder refused
                reasons = reason.to_pylist()
                for i, r in refused.items():
                    reasons[i] = r
                reason = pa.array(reasons, pa.string())
                keep = ~np.isin(np.flatnonzero(ok), list(refused))
                x = x[torch.from_numpy(keep).to(x.device)]
                ok[list(refused)] = False
        elif ok.any():
            pixels = tensor_column(batch.column("pixels"))
            with warnings.catch_warnings():  # never written: to_model_input makes its own copy
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                x = torch.from_numpy(pixels if ok.all() else pixels[ok])
            x = x.to(self.device, non_blocking=True)
        if ok.any():
            raw[ok], spread[ok] = self.score_views(x)
        out = batch.drop_columns(["pixels"]).append_column("raw_score", pa.array(raw))
        out = out.append_column("raw_spread", pa.array(spread))
        return out.set_column(out.schema.get_field_index("reason"), "reason", reason)

    def score_views(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of the raw scores of ``x``'s views (NaN from one);
        ``x`` is uint8 NHWC at the model's size, or at its resize for ``crops``."""
        views = views_of(x, self.loaded.meta["image_size"], self.views)
        if len(views) == 1:
            return self.score(views[0]), np.full(len(x), np.nan)
        scores = np.stack([self.score(v) for v in views])  # one batch per view: bounded memory
        return scores.mean(axis=0), scores.std(axis=0)

    def score(self, x) -> np.ndarray:
        """Raw scores of uint8 NHWC pixels on this actor's device."""
        import torch

        from fiqa.models.inputs import to_model_input

        n = len(x)
        if self.pad_to and n < self.pad_to:  # one shape for the compiled model
            x = torch.cat([x, x.new_zeros((self.pad_to - n, *x.shape[1:]))])
        x = to_model_input(x, channels_last=self.device.type == "cuda").to(self.dtype)
        y = self.forward(x, self.autocast)[:n].float().cpu().numpy()
        if self.autocast is not None and not np.isfinite(y).all():
            log.warning("a batch overflowed %s: scored again in fp32", self.precision)
            y = self.forward(x, None)[:n].float().cpu().numpy()
        if not np.isfinite(y).all():
            raise FloatingPointError(
                f"the model's scores are not finite at precision {self.precision}; "
                "set scoring.precision to 16-mixed or 32-true"
            )
        return y

    def forward(self, x, autocast):
        """The model on normalised input ``x`` on this actor's device, autocast to the dtype
        ``autocast`` (None: none); the result stays there."""
        import torch

        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, autocast or torch.float32, enabled=bool(autocast)),
        ):
            return self.model(x)

    def _pixels_decoding(self, batch: pa.Table, idx: np.ndarray):
        """Pixels of rows ``idx`` on this actor's device, decoding here those the decode task
        sent as bytes alone (an empty ``pixels`` value); {row: reason} for those it rejected."""
        import torch

        from fiqa.scoring.device_decode import decode_batch

        spec = self.decode
        sent = pc.binary_length(batch.column("pixels")).to_numpy(zero_copy_only=False)[idx] > 0
        x = torch.empty((len(idx), spec.crop, spec.crop, 3), dtype=torch.uint8, device=self.device)
        refused: dict[int, str] = {}
        here = np.flatnonzero(~sent)
        if len(here):
            images = batch.column("image").take(pa.array(idx[here]))
            views = [v.as_buffer() for v in images]  # zero-copy views of the Arrow column
            pix, reasons = decode_batch(
                views, spec.resize, spec.crop, self.device, spec.max_pixels, spec.min_side
            )
            x[torch.from_numpy(here).to(self.device)] = pix
            refused = {int(idx[here[j]]): r for j, r in enumerate(reasons) if r}
        there = np.flatnonzero(sent)
        if len(there):
            rows = batch.column("pixels").take(pa.array(idx[there])).to_pylist()
            arr = np.frombuffer(b"".join(rows), np.uint8).reshape(-1, spec.crop, spec.crop, 3)
            x[torch.from_numpy(there).to(self.device)] = torch.from_numpy(arr.copy()).to(
                self.device
            )
        return x, refused


def views_of(x, crop: int, views: str) -> list:
    """The views of uint8 NHWC pixels ``x`` a pseudo-label averages (`fiqa.config.VIEWS`):
    ``center`` x itself; ``flip`` x and its mirror image; ``crops`` the centre and four corner
    ``crop`` squares of x (the resized image) and their mirror images. Crops and flips only:
    they keep the image's quality, which blur, noise or recompression would change."""
    if views == "crops":
        m = x.shape[1] - crop
        corners = [(m // 2, m // 2), (0, 0), (0, m), (m, 0), (m, m)]
        base = [x[:, t : t + crop, left : left + crop] for t, left in corners]
    else:
        base = [x]
    return base if views == "center" else base + [v.flip(2) for v in base]


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
