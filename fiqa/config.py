"""The run configuration: one YAML file, validated on load, overridable with ``--set``.

The schema is the dataclasses below; every key a YAML file may hold is a
field here, with its type and default. Loading rejects unknown keys and
wrong types with an error that names the offending key (``train_teacher.lr``),
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass
class DataConfig:
    labeled_train: str | list[str] = ""
    labeled_val: str | list[str] = ""
    test: str | list[str] = ""
    unlabeled_1: str | list[str] = ""
    unlabeled_2: str | list[str] = ""
    label_field: str = "mos"
    # Optional ground truth of the unlabeled pools (CSV with key,mos), for evaluation only.
    unlabeled_1_truth: str | None = None
    unlabeled_2_truth: str | None = None
    max_image_pixels: int = 40_000_000
    min_image_side: int = 16


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    image_size: int = 112  # the crop the network sees
    resize: int = 128  # images are resized to this, then cropped to image_size
    pretrained_weights: str | None = None  # local or s3:// path to safetensors / timm checkpoint


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 64  # global batch, over all workers
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lr_step_epochs: int = 4  # StepLR: multiply lr by lr_gamma every lr_step_epochs
    lr_gamma: float = 0.5
    plcc_loss_weight: float = 1.0  # loss = MSE + w * (1 - PLCC) / 2
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int | None = None  # intra-op threads per worker; None: all cores / workers
    init_from: str = "scratch"  # scratch | teacher (teacher_plus only)
    source_weights: dict[str, float] = field(default_factory=dict)  # per-source loss weights
    shuffle_buffer: int = 512  # rows; training starts once the buffer is full


@dataclass
class LabelConfig:
    batch_size: int = 64
    concurrency: int = 1  # teacher actors
    num_gpus: float | None = None  # per actor; None: 1 when the cluster has GPUs, else 0
    num_cpus: float = 1.0  # per actor
    torch_threads: int | None = None
    decode_cpus: float = 1.0  # per decode task


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray for this run
    num_cpus: int | None = None
    object_store_memory: int | None = None


@dataclass
class RunConfig:
    run_dir: str = ""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=lambda: ModelConfig(arch="mobilenetv3_small_100"))
    train_teacher: TrainConfig = field(default_factory=TrainConfig)
    train_teacher_plus: TrainConfig = field(default_factory=TrainConfig)
    distill_student: TrainConfig = field(default_factory=TrainConfig)
    pseudo_label: LabelConfig = field(default_factory=LabelConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, *sections: str) -> str:
        """A stable hash of the named top-level sections (all when none is named)."""
        d = self.to_dict()
        picked = {k: d[k] for k in (sections or sorted(d))}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


REQUIRED = (
    "run_dir",
    "data.labeled_train",
    "data.labeled_val",
    "data.test",
    "data.unlabeled_1",
    "data.unlabeled_2",
)


def _check(value: Any, tp: Any, key: str) -> Any:
    """Coerce ``value`` to type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_check(k, kt, key): _check(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML reads exponent-only numbers such as 1e-4 as strings
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _check(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def _validate(cfg: RunConfig) -> None:
    for key in REQUIRED:
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        if not obj:
            raise ConfigError(f"{key}: required, but not set")
    for name in ("teacher", "student"):
        m: ModelConfig = getattr(cfg, name)
        if m.image_size < 32 or m.resize < m.image_size:
            raise ConfigError(
                f"{name}: need 32 <= image_size <= resize, got {m.image_size}, {m.resize}"
            )
    for name in ("train_teacher", "train_teacher_plus", "distill_student"):
        t: TrainConfig = getattr(cfg, name)
        for k in ("epochs", "batch_size", "num_workers"):
            if getattr(t, k) < 1:
                raise ConfigError(f"{name}.{k}: must be >= 1, got {getattr(t, k)}")
        if t.batch_size % t.num_workers:
            raise ConfigError(
                f"{name}.batch_size: the global batch {t.batch_size} must divide "
                f"evenly over num_workers={t.num_workers}"
            )
        if t.init_from not in ("scratch", "teacher"):
            raise ConfigError(
                f"{name}.init_from: expected 'scratch' or 'teacher', got {t.init_from!r}"
            )
        if t.lr <= 0:
            raise ConfigError(f"{name}.lr: must be > 0")
    if cfg.pseudo_label.concurrency < 1 or cfg.pseudo_label.batch_size < 1:
        raise ConfigError("pseudo_label.concurrency and pseudo_label.batch_size must be >= 1")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value`` (value in YAML syntax) into (["a", "b"], value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train_teacher.epochs=3")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return raw


def from_dict(raw: dict, overrides: list[str] | None = None) -> RunConfig:
    raw = apply_overrides(json.loads(json.dumps(raw)), overrides or [])
    cfg = _build(RunConfig, raw, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load, override and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return from_dict(raw, overrides)
