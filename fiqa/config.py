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
import math
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
    # A tar member larger than this is a reject (member_too_large), skipped unread: a
    # hostile shard's claimed sizes cost a decode task no memory.
    max_member_bytes: int = 64 * 2**20


# PIL's own decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS, its default):
# a data.max_image_pixels above it would let PIL refuse images the limit allows.
MAX_IMAGE_PIXELS_LIMIT = 2 * 89_478_485
MIN_MEMBER_BYTES = 2**20  # below 1 MiB, ordinary photos would be rejected: a unit slip


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    image_size: int = 112  # the crop the network sees
    resize: int = 128  # images are resized to this, then cropped to image_size
    pretrained_weights: str | None = None  # local or s3:// path to safetensors / timm checkpoint


@dataclass
class TrainConfig:
    epochs: int = 8
    # An epoch reads at least this many rows: a smaller table is read over again (and cut),
    # so a few hundred labels still get enough optimizer steps to learn from. None: once.
    min_epoch_rows: int | None = None
    batch_size: int = 64  # global batch, over all workers
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "step"  # step: lr x lr_gamma every lr_step_epochs | cosine: down to 0
    lr_step_epochs: int = 4
    lr_gamma: float = 0.5
    warmup_epochs: float = 0.0  # linear warm-up from 0, before either schedule (fractions ok)
    hflip: bool = True  # random horizontal flips beside the random crops
    plcc_loss_weight: float = 1.0  # loss = MSE + w * (1 - PLCC) / 2
    # A pseudo-label's loss weight x 1 / (1 + (spread / s)^2), s the tables' RMS score_spread:
    # labels the teacher is unsure of (scores that move under flips and crops) count less.
    spread_weighting: bool = False
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # intra-op threads per worker; None: its cpus_per_worker (on the local Ray: all its
    # CPUs shared among the workers, when that is more)
    torch_threads: int | None = None
    init_from: str = "scratch"  # scratch | teacher (teacher_plus only)
    # Self-training rounds (teacher_plus only): in round r > 1 the teacher-plus of round r - 1
    # labels U1 again and a new teacher-plus learns from those labels.
    rounds: int = 1
    source_weights: dict[str, float] = field(default_factory=dict)  # per-source loss weights
    # distill_student only: also train the student on the labeled table alone (as many
    # optimizer steps), the baseline the report judges distillation against. False halves
    # the stage's cost and the report then has no distillation comparison.
    labeled_only_baseline: bool = True
    shuffle_buffer: int = 512  # rows; training starts once the buffer is full
    # Rows per worker per forward/backward; None: batch_size / num_workers. The global
    # batch stays batch_size: accumulation steps = batch_size / (num_workers * micro_batch_size).
    micro_batch_size: int | None = None
    lr_scaling: str = "fixed"  # fixed | linear | sqrt: lr follows batch_size / lr_reference_batch
    lr_reference_batch: int | None = None  # the global batch `lr` was tuned for (linear, sqrt)
    precision: str = "bf16"  # bf16: bf16 autocast on GPU (CPU always computes in fp32) | fp32
    # Same seed and config, the same model: the training stream keeps its order (Ray Data
    # preserve_order), crops and flips are drawn on the worker from the seed, torch uses
    # deterministic algorithms. Costs the stream's reordering slack; a restart after a failure
    # resumes from a checkpoint with fresh draws.
    deterministic: bool = False


def batch_plan(t: TrainConfig) -> tuple[int, int]:
    """(rows per worker per micro-batch, accumulation steps) that make up the global batch.

    The one rule, used both when a config is validated and when training starts: a
    config that loads never fails here later.
    """
    micro = t.micro_batch_size or max(t.batch_size // t.num_workers, 1)
    if micro < 1 or t.batch_size % (t.num_workers * micro):
        raise ConfigError(
            f"batch_size: the global batch {t.batch_size} must divide evenly into "
            f"num_workers={t.num_workers} x micro_batch_size={micro} x accumulation steps"
        )
    return micro, t.batch_size // (t.num_workers * micro)


def effective_lr(t: TrainConfig) -> float:
    """``lr`` as configured (``fixed``), or scaled from ``lr_reference_batch`` to ``batch_size``."""
    if t.lr_scaling not in ("fixed", "linear", "sqrt"):
        raise ConfigError(f"lr_scaling: expected fixed, linear or sqrt, got {t.lr_scaling!r}")
    if t.lr_scaling == "fixed":
        return t.lr
    if (t.lr_reference_batch or 0) < 1:
        raise ConfigError(f"lr_reference_batch: required (>= 1) with lr_scaling {t.lr_scaling}")
    ratio = t.batch_size / t.lr_reference_batch
    return t.lr * (ratio if t.lr_scaling == "linear" else math.sqrt(ratio))


@dataclass
class ScoringConfig:
    batch_size: int = 64
    # Teacher actors: a fixed count, or [min, max] for a pool Ray Data scales with the backlog.
    concurrency: int | list[int] = 1
    num_gpus: float | None = None  # per actor; None: 1 when the cluster has GPUs, else 0
    num_cpus: float = 1.0  # per actor
    torch_threads: int | None = None
    decode_cpus: float = 1.0  # per decode task
    # Reserved (Ray's logical memory) per decode task; None: what it holds at its peak, from
    # the crop, the block and the pool's first images (fiqa.scoring.stream.decode_task_memory).
    decode_memory_mb: int | None = None
    compile: bool = False  # torch.compile the model in each actor (pays off on GPUs, long jobs)
    # Where JPEGs are decoded: "tasks" (CPU decode tasks), "actor" (the scoring actor: nvJPEG
    # on its GPU), or "auto": the actor where actors have GPUs (fiqa.scoring.device_decode).
    decode: str = "auto"
    # The model's arithmetic on a GPU, in PyTorch Lightning's names: "16-mixed" (fp16 autocast:
    # bf16's speed with 8x finer rounding), "bf16-mixed", "16-true" / "bf16-true" (the weights
    # too), "32-true". A CPU always runs 32-true.
    precision: str = "16-mixed"
    # CPU actors on cores of their own, decode tasks on the others (fiqa.cluster.cores):
    # true, false, or null: where a node's cores are all its processes may use.
    pin_cores: bool | None = None
    # Object store the stream may fill with decoded batches waiting for the actors. It bounds
    # memory whatever the pool's size; None: what the actors (4 decoded blocks or 1,024
    # images each) or the decode tasks the CPUs run beside them need, whichever is more
    # (fiqa.scoring.stream.stream_buffer_bytes).
    buffer_mb: int | None = None
    # What a pseudo-label averages (pseudo-labeling stages and `fiqa label`; evaluation always
    # scores the centre crop): "center", "flip" (and its mirror image), or "crops" (the centre
    # and four corner crops of the resized image, each mirrored too: 10 views, the training
    # crops' extremes). With more than one view each row also gets ``score_spread``.
    views: str = "center"

    def actor_range(self) -> tuple[int, int]:
        """(min, max) actors of the scoring pool."""
        c = self.concurrency
        return (c, c) if isinstance(c, int) else (c[0], c[1])


DECODE_PLACES = ("auto", "tasks", "actor")
VIEWS = ("center", "flip", "crops")
PRECISIONS = ("16-mixed", "bf16-mixed", "16-true", "bf16-true", "32-true")


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray for this run
    num_cpus: int | None = None
    object_store_memory: int | None = None
    # May the cluster grow (an autoscaler adds nodes)? Then plans larger than the cluster now
    # only warn. None: yes when joining a cluster (address / RAY_ADDRESS), no for a local Ray.
    autoscaling: bool | None = None


@dataclass
class StorageConfig:
    """Object storage (s3://) settings; credentials come from the AWS environment, never from here."""

    endpoint_url: str | None = None  # S3-compatible store (MinIO, Ceph): http(s)://host:port
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION / the AWS config file
    addressing_style: str = "auto"  # auto | path | virtual (MinIO and Ceph usually need path)
    max_attempts: int = 6  # botocore attempts per request (adaptive retry mode)
    retry_seconds: float = 60.0  # whole operations retried on transient errors for this long


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
    # Every scoring job: pseudo-labeling, ingest of labeled shards, evaluation, `fiqa label`.
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, *sections: str, legacy: bool = False) -> str:
        """A stable hash of the named top-level sections (all when none is named), with the
        `UNFINGERPRINTED` keys at their defaults: changing one of those resumes a stage.
        ``legacy``: the hash of every key, as earlier versions fingerprinted runs."""
        d = self.to_dict()
        for section, keys in () if legacy else UNFINGERPRINTED.items():
            defaults = dataclasses.asdict(type(getattr(self, section))())
            d[section].update({k: defaults[k] for k in keys})
        if not legacy and self.scoring.num_gpus == 0:
            # scoring on CPUs: decoded by PIL and computed in fp32, where GPUs use nvJPEG and fp16
            d["scoring"]["num_gpus"] = 0
        added = {
            s: ADDED_TRAIN_KEYS for s in ("train_teacher", "train_teacher_plus", "distill_student")
        }
        for section, keys in {**added, "data": ADDED_DATA_KEYS}.items():
            for key, default in keys.items():
                if d[section].get(key, default) == default:
                    d[section].pop(key, None)
        picked = {k: d[k] for k in (sections or sorted(d))}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


# Keys that say how the work runs or what the report reads, not what a stage computes: after
# an out-of-memory error, say, a run with fewer actors or a smaller buffer resumes each stage
# from what it committed instead of redoing it. (Batch size and compile move scores by float
# rounding only; evaluate fingerprints the truth files' contents itself.)
UNFINGERPRINTED = {
    "scoring": (
        "batch_size",
        "concurrency",
        "num_gpus",
        "num_cpus",
        "torch_threads",
        "decode_cpus",
        "decode_memory_mb",
        "compile",
        "pin_cores",
        "buffer_mb",
    ),
    "data": ("unlabeled_1_truth", "unlabeled_2_truth"),
}

# Training keys added after runs were fingerprinted: at these values they are left out of the
# hash, so a run from before they existed keeps its fingerprint (and its finished stages).
ADDED_TRAIN_KEYS = {"min_epoch_rows": None}
ADDED_DATA_KEYS = {"max_member_bytes": DataConfig.max_member_bytes}

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


# Keys renamed since users' YAML files were written: old key -> (new key, why).
RENAMED = {
    "pseudo_label": ("scoring", "it sizes every scoring job: pseudo-labeling, ingest, evaluation"),
}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    for old in raw:
        key = f"{prefix}.{old}" if prefix else old
        if key in RENAMED:
            new, why = RENAMED[key]
            raise ConfigError(f"{key}: renamed to {new} ({why}); rename the section in your YAML")
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
        for check in (batch_plan, effective_lr):  # the checks training itself applies
            try:
                check(t)
            except ConfigError as e:
                raise ConfigError(f"{name}.{e}") from None
        if t.schedule not in ("step", "cosine"):
            raise ConfigError(f"{name}.schedule: expected step or cosine, got {t.schedule!r}")
        if not 0 <= t.warmup_epochs < t.epochs:
            raise ConfigError(
                f"{name}.warmup_epochs: must be >= 0 and below epochs, got {t.warmup_epochs}"
            )
        if t.precision not in ("bf16", "fp32"):
            raise ConfigError(f"{name}.precision: expected bf16 or fp32, got {t.precision!r}")
        bad = sorted(set(t.source_weights) - {"labeled", "pseudo_u1", "pseudo_u2"})
        if bad or any(w < 0 for w in t.source_weights.values()):
            raise ConfigError(
                f"{name}.source_weights: sources are labeled, pseudo_u1, pseudo_u2 with weights "
                f">= 0; got {t.source_weights}"
            )
        if name != "distill_student" and not t.labeled_only_baseline:
            raise ConfigError(f"{name}.labeled_only_baseline: applies to distill_student only")
        if t.init_from not in ("scratch", "teacher"):
            raise ConfigError(
                f"{name}.init_from: expected 'scratch' or 'teacher', got {t.init_from!r}"
            )
        if t.lr <= 0:
            raise ConfigError(f"{name}.lr: must be > 0")
        if t.min_epoch_rows is not None and t.min_epoch_rows < t.batch_size:
            raise ConfigError(
                f"{name}.min_epoch_rows: at least one global batch ({t.batch_size}) or null, "
                f"got {t.min_epoch_rows}"
            )
        if t.rounds < 1 or (t.rounds > 1 and name != "train_teacher_plus"):
            raise ConfigError(
                f"{name}.rounds: self-training rounds belong to train_teacher_plus (>= 1); "
                f"got {t.rounds}"
            )
    check_data_config(cfg.data)
    check_scoring_config(cfg.scoring, "scoring")
    check_storage_config(cfg.storage)


def check_data_config(d: DataConfig) -> None:
    """The data limits (a run's config and `fiqa label`'s)."""
    if not 1 <= d.max_image_pixels <= MAX_IMAGE_PIXELS_LIMIT:
        raise ConfigError(
            f"data.max_image_pixels: between 1 and {MAX_IMAGE_PIXELS_LIMIT} (PIL's own "
            f"decompression-bomb limit), got {d.max_image_pixels}"
        )
    if d.min_image_side < 1:
        raise ConfigError(f"data.min_image_side: must be >= 1, got {d.min_image_side}")
    if d.max_member_bytes < MIN_MEMBER_BYTES:
        raise ConfigError(
            f"data.max_member_bytes: at least {MIN_MEMBER_BYTES} (1 MiB), got {d.max_member_bytes}"
        )


def check_storage_config(sc: StorageConfig) -> None:
    if sc.endpoint_url and not sc.endpoint_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"storage.endpoint_url: expected http(s)://host[:port], got {sc.endpoint_url!r}"
        )
    if sc.endpoint_url and "@" in sc.endpoint_url.split("://", 1)[1].split("/", 1)[0]:
        raise ConfigError(  # the config is saved with the run: it must not hold secrets
            "storage.endpoint_url: must not carry credentials; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment instead"
        )
    if sc.addressing_style not in ("auto", "path", "virtual"):
        raise ConfigError(
            f"storage.addressing_style: expected auto, path or virtual, got {sc.addressing_style!r}"
        )
    if sc.max_attempts < 1 or sc.retry_seconds < 0:
        raise ConfigError("storage.max_attempts must be >= 1 and storage.retry_seconds >= 0")


def check_scoring_config(lc: ScoringConfig, where: str) -> None:
    c = lc.concurrency
    if isinstance(c, list) and (len(c) != 2 or not 1 <= c[0] <= c[1]):
        raise ConfigError(
            f"{where}.concurrency: expected N or [MIN, MAX] with 1 <= MIN <= MAX, got {c}"
        )
    if isinstance(c, int) and c < 1:
        raise ConfigError(f"{where}.concurrency: must be >= 1, got {c}")
    if lc.batch_size < 1:
        raise ConfigError(f"{where}.batch_size: must be >= 1, got {lc.batch_size}")
    if lc.num_gpus is not None and lc.num_gpus < 0:
        raise ConfigError(f"{where}.num_gpus: must be >= 0, got {lc.num_gpus}")
    if lc.decode_memory_mb is not None and lc.decode_memory_mb < 1:
        raise ConfigError(f"{where}.decode_memory_mb: must be >= 1, got {lc.decode_memory_mb}")
    if lc.buffer_mb is not None and lc.buffer_mb < 16:
        raise ConfigError(f"{where}.buffer_mb: must be >= 16 (or null for automatic)")
    if lc.decode_cpus <= 0 or lc.num_cpus < 0:
        raise ConfigError(f"{where}: decode_cpus must be > 0 and num_cpus >= 0")
    if lc.decode not in DECODE_PLACES:
        raise ConfigError(f"{where}.decode: one of {', '.join(DECODE_PLACES)}, got {lc.decode!r}")
    if lc.precision not in PRECISIONS:
        raise ConfigError(
            f"{where}.precision: one of {', '.join(PRECISIONS)}, got {lc.precision!r}"
        )
    if lc.views not in VIEWS:
        raise ConfigError(f"{where}.views: one of {', '.join(VIEWS)}, got {lc.views!r}")


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


def section_from_dict(name: str, raw: Any) -> Any:
    """One top-level section of the config (``scoring``, ``data``...) from a mapping, checked
    as a YAML file's is: an unknown key or a wrong type raises ConfigError naming the key."""
    tp = typing.get_type_hints(RunConfig).get(name)
    if not dataclasses.is_dataclass(tp):
        raise ConfigError(f"{name}: not a section of the config")
    return _build(tp, raw, name)


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
