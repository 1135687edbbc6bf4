"""What a model file says about itself, without torch: `model.json`'s fields and the export formats.

Torch-free so that `fiqa predict model.onnx` and the CLI's parser never load torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from fiqa import storage
from fiqa.calibration import Logistic4, from_meta

EXPORT_FORMATS = ("onnx", "torchscript")
ONNX_EXPORTERS = ("auto", "dynamo", "legacy")
METADATA_KEY = "fiqa"  # ONNX metadata_props key
TORCHSCRIPT_META = "fiqa.json"  # TorchScript extra file name
ONNX_EXTRA_HINT = "pip install 'fiqa-pseudolabel[onnx]'"


# The files of a checkpoint directory; naming either names the checkpoint.
CHECKPOINT_FILES = ("model.json", "model.safetensors")


def checkpoint_dir(path: str) -> str:
    """The checkpoint directory ``path`` names: ``path`` itself, or the folder of the
    ``model.json`` or ``model.safetensors`` it points at (the file a user sees), local or s3://."""
    head, _, name = path.rstrip("/").rpartition("/")
    return head if name in CHECKPOINT_FILES and head else path


def read_meta(checkpoint: str) -> dict[str, Any]:
    """A checkpoint's ``model.json`` (local or s3://), as read; ``checkpoint`` is its
    directory or one of its files (`checkpoint_dir`)."""
    root = checkpoint_dir(checkpoint)
    if not storage.is_remote(root) and os.path.isfile(root):
        raise FileNotFoundError(
            f"{checkpoint!r} is a file, not a checkpoint directory (model.json + "
            "model.safetensors); an export (.onnx, .pt) is for fiqa predict"
        )
    try:
        return storage.read_json(root.rstrip("/") + "/model.json")
    except FileNotFoundError:
        what = "no such directory" if is_missing_local(root) else "model.json missing"
        raise FileNotFoundError(f"no checkpoint at {checkpoint!r} ({what})") from None


def is_missing_local(path: str) -> bool:
    """A local path (not a URL) that does not exist: cheap, before anything heavy is loaded."""
    return not storage.is_remote(path) and not os.path.exists(path)


@dataclass(frozen=True)
class ModelMeta:
    """A checkpoint's ``model.json`` (or an export's embedded contract), typed.

    ``raw`` keeps every field, including those read by one consumer only (mean, std, epoch...).
    """

    arch: str
    image_size: int
    resize: int
    calibration: Logistic4 | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, meta: dict[str, Any]) -> ModelMeta:
        missing = [k for k in ("arch", "image_size") if k not in meta]
        if missing:
            raise ValueError(f"model metadata lacks {', '.join(map(repr, missing))}")
        size = int(meta["image_size"])
        return cls(
            arch=str(meta["arch"]),
            image_size=size,
            resize=int(meta.get("resize", size)),
            calibration=from_meta(meta),
            raw=dict(meta),
        )

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is not installed (a ValueError too, so the CLI reports it plainly)."""


def require_onnx(*modules: str) -> None:
    """Import-check the ONNX extra's packages; a clear error naming the extra if one is missing."""
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(
            f"ONNX support needs {', '.join(missing)}, which is not installed: {ONNX_EXTRA_HINT}"
        )
