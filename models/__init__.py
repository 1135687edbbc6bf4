"""Models: one factory by name, one checkpoint format, cost accounting.

Nothing outside this package needs to know which backbone is inside a model:
build with `create_model`, save and load with `save_checkpoint` /
`load_checkpoint` (its metadata typed as `ModelMeta`), measure with
`model_cost`, export for deployment (ONNX, TorchScript) with
`export_checkpoint`, and score with any of them through `open_predictor`.
Attributes are imported lazily, so that importing a light submodule
(``fiqa.models.meta``) does not pull in torch or timm.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "REGISTRY": "registry",
    "ModelSpec": "registry",
    "create_model": "registry",
    "resolve_spec": "registry",
    "QualityRegressor": "regressor",
    "ModelMeta": "meta",
    "LoadedModel": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "model_cost": "cost",
    "ScoringModule": "graph",
    "export_checkpoint": "export",
    "Predictor": "predictor",
    "open_predictor": "predictor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"fiqa.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fiqa.models' has no attribute {name!r}")
