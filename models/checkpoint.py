"""One checkpoint format: ``model.safetensors`` + ``model.json``, local or s3://.

``model.json`` says what built the weights (architecture, input size,
normalisation), how to read its output (calibration to the MOS scale) and
where it came from (training config fingerprint). Loading never unpickles:
weights are safetensors, metadata is JSON. Reads go through `fiqa.storage`,
so a checkpoint in object storage is read with its retries of transient errors.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from fiqa import storage
from fiqa.calibration import Logistic4
from fiqa.models.inputs import IMAGENET_MEAN, IMAGENET_STD
from fiqa.models.meta import ModelMeta, checkpoint_dir, read_meta
from fiqa.models.regressor import QualityRegressor

FORMAT_VERSION = 1

__all__ = [
    "FORMAT_VERSION",
    "LoadedModel",
    "ModelMeta",
    "load_checkpoint",
    "load_pretrained_backbone",
    "read_meta",
    "save_checkpoint",
]


@dataclass
class LoadedModel:
    model: nn.Module
    info: ModelMeta

    @property
    def meta(self) -> dict[str, Any]:
        """``model.json`` as read."""
        return self.info.raw

    @property
    def image_size(self) -> int:
        return self.info.image_size

    @property
    def resize(self) -> int:
        return self.info.resize

    @property
    def calibration(self) -> Logistic4 | None:
        return self.info.calibration


def _join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def save_checkpoint(path: str, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``path/model.safetensors`` and then ``path/model.json`` (the JSON marks it complete)."""
    model = getattr(model, "module", model)  # unwrap DDP
    for k in ("arch", "image_size"):
        if k not in meta:
            raise ValueError(f"checkpoint metadata needs {k!r}")
    meta = {"format_version": FORMAT_VERSION, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, **meta}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Each object is written whole (with retries on object storage), model.json last.
    storage.write_bytes(_join(path, "model.safetensors"), save_safetensors(state))
    storage.write_json(_join(path, "model.json"), meta)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model a checkpoint (its directory, or one of its files) describes and
    load its weights."""
    path = checkpoint_dir(path)
    info = ModelMeta.from_dict(read_meta(path))
    model = QualityRegressor(info.arch, image_size=info.image_size)
    state = load_safetensors(storage.read_bytes(_join(path, "model.safetensors")))
    model.load_state_dict(state)
    model.to(map_location).eval()
    return LoadedModel(model, info)


def load_pretrained_backbone(model: QualityRegressor, path: str) -> None:
    """Initialise the backbone from a local or s3:// safetensors or timm checkpoint.

    Head and classifier weights in the file are ignored; a file that matches
    none of the backbone's parameters is an error rather than a silent no-op.
    """
    blob = storage.read_bytes(path)
    if path.endswith(".safetensors"):
        state = load_safetensors(blob)
    else:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        for k in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and k in state and isinstance(state[k], dict):
                state = state[k]
                break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(
            f"{path}: none of its tensors match backbone {type(model.backbone).__name__}"
        )
    model.backbone.load_state_dict(usable, strict=False)
