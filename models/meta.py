"""What a model file says about itself, without torch: `model.json`'s fields and the export formats.

Torch-free so that `fiqa predict model.onnx` and the CLI's parser never load torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fiqa import storage
from fiqa.calibration import Logistic4, from_meta

EXPORT_FORMATS = ("onnx", "torchscript")
ONNX_EXPORTERS = ("auto", "dynamo", "legacy")
METADATA_KEY = "fiqa"  # ONNX metadata_props key
TORCHSCRIPT_META = "fiqa.json"  # TorchScript extra file name
ONNX_EXTRA_HINT = "pip install 'fiqa-pseudolabel[onnx]'"


def read_meta(checkpoint: str) -> dict[str, Any]:
    """A checkpoint directory's ``model.json`` (local or s3://), as read."""
    try:
        return storage.read_json(checkpoint.rstrip("/") + "/model.json")
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {checkpoint!r} (model.json missing)") from None


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
