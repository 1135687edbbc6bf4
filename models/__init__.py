"""Models: one factory by name, one checkpoint format, cost accounting.

Nothing outside this package needs to know which backbone is inside a model:
build with `create_model`, save and load with `save_checkpoint` /
`load_checkpoint`, measure with `model_cost`.
"""

from fiqa.models.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from fiqa.models.cost import model_cost
from fiqa.models.registry import REGISTRY, ModelSpec, create_model, resolve_spec
from fiqa.models.regressor import QualityRegressor

__all__ = [
    "REGISTRY",
    "LoadedModel",
    "ModelSpec",
    "QualityRegressor",
    "create_model",
    "load_checkpoint",
    "model_cost",
    "resolve_spec",
    "save_checkpoint",
]
