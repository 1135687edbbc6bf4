"""The model registry: the paper's teacher and student, the demo's CPU models, any timm name."""

from __future__ import annotations

from dataclasses import dataclass

import timm
from torch import nn

from fiqa import storage
from fiqa.models.checkpoint import load_pretrained_backbone
from fiqa.models.inputs import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (re-exported)
from fiqa.models.regressor import QualityRegressor, timm_backbone

# ``pretrained="timm"`` asks for timm's own hub weights: the only code path that downloads.
TIMM_HUB_WEIGHTS = "timm"


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry name
    arch: str  # timm architecture
    image_size: int  # input crop
    resize: int  # resize before the crop
    role: str
    note: str = ""


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "swin_base",
            "swin_base_patch4_window7_224",
            448,
            512,
            "teacher",
            "the paper's teacher (Swin-B at 448 px); needs pretrained weights",
        ),
        ModelSpec(
            "edgenext_xx_small",
            "edgenext_xx_small",
            352,
            384,
            "student",
            "the paper's student (EdgeNeXt-XXS at 352 px); needs pretrained weights",
        ),
        ModelSpec(
            "resnet10t",
            "resnet10t",
            64,
            72,
            "teacher",
            "the demo teacher: a batch-norm CNN that learns from scratch on CPU",
        ),
        ModelSpec("resnet18", "resnet18", 112, 128, "teacher", "a bigger CPU teacher"),
        ModelSpec(
            "mobilenetv3_small_075",
            "mobilenetv3_small_075",
            96,
            108,
            "student",
            "the demo student: about a tenth of the demo teacher's cost, at 96 px",
        ),
        ModelSpec(
            "mobilenetv3_small_100",
            "mobilenetv3_small_100",
            64,
            72,
            "student",
            "a smaller-input student, for tests",
        ),
    )
}


def resolve_spec(name: str, image_size: int | None = None, resize: int | None = None) -> ModelSpec:
    """A registry entry, or an entry for any timm architecture name."""
    if name in REGISTRY:
        spec = REGISTRY[name]
    elif timm.is_model(name):
        spec = ModelSpec(name, name, 224, 256, "any", "timm backbone")
    else:
        known = ", ".join(sorted(REGISTRY))
        raise ValueError(
            f"unknown model {name!r}: not in the registry ({known}) nor a timm model name"
        )
    if image_size is not None or resize is not None:
        size = image_size or spec.image_size
        spec = ModelSpec(
            spec.name, spec.arch, size, resize or max(size, spec.resize), spec.role, spec.note
        )
    return spec


def check_archs(cfg) -> None:
    """``teacher.arch`` and ``student.arch`` of a run config name models: a typo fails when
    the run is started or submitted, not hours later when its stage begins."""
    from fiqa.config import ConfigError

    for role in ("teacher", "student"):
        try:
            resolve_spec(getattr(cfg, role).arch)
        except ValueError as e:
            raise ConfigError(f"{role}.arch: {e}") from None


def create_model(
    name: str, image_size: int | None = None, pretrained: str | None = None
) -> nn.Module:
    """A regressor by registry or timm name; the backbone's weights as ``pretrained`` says.

    ``pretrained``: None for random weights, a local or s3:// weights file, or ``"timm"``
    for timm's hub weights (network access needed; nothing else downloads).
    """
    spec = resolve_spec(name, image_size)
    model = QualityRegressor(spec.arch, image_size=spec.image_size)
    if pretrained == TIMM_HUB_WEIGHTS:
        hub = timm_backbone(spec.arch, spec.image_size, pretrained=True)
        model.backbone.load_state_dict(hub.state_dict())
    elif pretrained:
        load_pretrained_backbone(model, pretrained)
    return model


def check_pretrained(pretrained: str | None) -> None:
    """Fail before Ray starts when the ``pretrained`` weights file of `create_model` is missing."""
    if not pretrained or pretrained == TIMM_HUB_WEIGHTS:
        return
    if not storage.exists(pretrained):
        raise FileNotFoundError(f"pretrained_weights {pretrained!r} not found")
