"""Open any model file for scoring: a checkpoint directory, an ONNX or a TorchScript export.

All three answer the same contract (uint8 NHWC pixels in, ``raw_score`` and calibrated
``score`` out; see `fiqa.models.export`). torch and onnxruntime are imported when a model
is opened, not at import time: the CLI stays quick, and an ONNX model never loads torch.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fiqa import storage
from fiqa.models.meta import (
    METADATA_KEY,
    TORCHSCRIPT_META,
    ModelMeta,
    checkpoint_dir,
    read_meta,
    require_onnx,
)
from fiqa.storage import is_remote

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Predictor:
    """A loaded model: ``predictor(pixels)`` -> ``(raw_score, score)`` as float64 arrays.

    ``pixels`` is uint8 ``[N, image_size, image_size, 3]`` (RGB), prepared as
    described in `fiqa.models.export`.
    """

    meta: ModelMeta
    backend: str  # "torch" (checkpoint), "torchscript" or "onnxruntime"
    device: str
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] = field(repr=False)

    @property
    def image_size(self) -> int:
        return self.meta.image_size

    @property
    def resize(self) -> int:
        return self.meta.resize

    @property
    def calibrated(self) -> bool:
        return self.meta.calibrated

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.image_size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(
                f"expected uint8 pixels of shape [N, {s}, {s}, 3], got {pixels.dtype} {pixels.shape}"
            )
        raw, score = self.run(np.ascontiguousarray(pixels))
        return np.asarray(raw, dtype=np.float64), np.asarray(score, dtype=np.float64)


def model_kind(path: str) -> str:
    """``checkpoint``, ``onnx`` or ``torchscript``: what ``path`` holds (a checkpoint's
    ``model.json`` or ``model.safetensors`` names its checkpoint)."""
    if checkpoint_dir(path) != path:
        return "checkpoint"
    if not is_remote(path) and not os.path.exists(path):
        raise FileNotFoundError(
            f"model {path!r} does not exist (expected a checkpoint directory, an .onnx or a "
            "TorchScript .pt export)"
        )
    if path.endswith(".onnx"):
        return "onnx"
    if is_remote(path):
        fs, key = storage.filesystem(path)
        if storage.retry(lambda: fs.isdir(key), path, "stat"):
            return "checkpoint"
        head = storage.retry(lambda: fs.cat_file(key, start=0, end=4), path, "read")
        return "torchscript" if head.startswith(b"PK") else "onnx"
    if os.path.isdir(path):
        return "checkpoint"
    # TorchScript files are zip archives; anything else is given to ONNX Runtime to judge.
    return "torchscript" if zipfile.is_zipfile(path) else "onnx"


def _sidecar(path: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(path + ".json"))
    except (FileNotFoundError, ValueError):
        return None


def _torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: PyTorch sees no CUDA GPU on this machine")
    return device


TRUST_FLAG = "--trust-model-code"


def open_predictor(path: str, device: str = "auto", trust_model_code: bool = False) -> Predictor:
    """Load a checkpoint directory, an ONNX or a TorchScript export for scoring.

    A TorchScript file is a program (loading it can run code the file carries), so it is
    loaded only with ``trust_model_code`` (`TRUST_FLAG` on the command line); a checkpoint
    (safetensors) and an ONNX model are data and need nothing."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"--device {device!r}: expected one of {DEVICES} (or cuda:N)")
    kind = model_kind(path)
    if kind == "onnx":
        return _open_onnx(path, device)
    if kind == "torchscript":
        if not trust_model_code:
            raise ValueError(
                f"{path}: a TorchScript file, which can run code when loaded; pass "
                f"{TRUST_FLAG} if you trust where it came from (or use its ONNX export)"
            )
        return _open_torchscript(path, device)
    return _open_checkpoint(path, device)


def _torch_runner(module: Any, dev: str) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    import torch

    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            raw, score = module(torch.from_numpy(pixels).to(dev))
        return raw.double().cpu().numpy(), score.double().cpu().numpy()

    return run


def _open_checkpoint(path: str, device: str) -> Predictor:
    path = checkpoint_dir(path)
    read_meta(path)  # a missing or unreadable model.json fails here, before torch loads
    from fiqa.models.graph import scoring_module  # imports torch

    dev = _torch_device(device)
    module, meta = scoring_module(path, map_location=dev)
    return Predictor(meta, "torch", dev, _torch_runner(module, dev))


def _open_torchscript(path: str, device: str) -> Predictor:
    import torch

    dev = _torch_device(device)
    extra = {TORCHSCRIPT_META: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        try:
            module = torch.jit.load(
                io.BytesIO(storage.read_bytes(path)), map_location=dev, _extra_files=extra
            )
        except RuntimeError as e:
            raise ValueError(f"{path}: not a TorchScript file ({str(e).splitlines()[0]})") from None
    meta = json.loads(extra[TORCHSCRIPT_META]) if extra[TORCHSCRIPT_META] else _sidecar(path)
    if not meta:
        raise ValueError(f"{path}: a TorchScript file without fiqa metadata (not a `fiqa export`)")
    module.eval()
    return Predictor(ModelMeta.from_dict(meta), "torchscript", dev, _torch_runner(module, dev))


def _open_onnx(path: str, device: str) -> Predictor:
    require_onnx("onnxruntime")
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
        raise ValueError(
            f"--device {device}: this onnxruntime has no CUDAExecutionProvider "
            "(install onnxruntime-gpu, or use --device cpu)"
        )
    use_cuda = device != "cpu" and "CUDAExecutionProvider" in available
    providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT warns about unused initialisers otherwise
    # Decode threads share the cores, and spinning pool threads starve them.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = storage.read_bytes(path) if is_remote(path) else path
    try:
        session = ort.InferenceSession(source, sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises its own error types on files that are not ONNX
        raise ValueError(f"{path}: not an ONNX model ONNX Runtime can load ({e})") from None
    embedded = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    raw_meta = json.loads(embedded) if embedded else _sidecar(path)
    if not raw_meta:
        raise ValueError(f"{path}: an ONNX model without fiqa metadata (not a `fiqa export`)")
    meta = ModelMeta.from_dict(raw_meta)
    input_name = session.get_inputs()[0].name

    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raw, score = session.run(["raw_score", "score"], {input_name: pixels})
        return raw, score

    return Predictor(meta, "onnxruntime", "cuda" if use_cuda else "cpu", run)
