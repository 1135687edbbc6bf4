"""`fiqa label`: score any shard spec with any checkpoint into Parquet tables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from fiqa import storage
from fiqa.calibration import Logistic4, from_meta
from fiqa.cli.options import add_output, add_set, hidden_alias, option
from fiqa.cluster.local import ensure_ray
from fiqa.config import (
    VIEWS,
    ConfigError,
    DataConfig,
    ScoringConfig,
    apply_overrides,
    check_data_config,
    check_scoring_config,
    check_storage_config,
    section_from_dict,
)
from fiqa.models.meta import checkpoint_dir, read_meta


def _shared(model: str, first_input: str, output: str) -> dict[str, str]:
    """What every node must see where these are local paths (`check_shared`)."""
    from fiqa.data.shards import expand_shard_spec

    if not storage.is_remote(first_input):
        first_input = expand_shard_spec(first_input, what="INPUT")[0]  # a file, not a glob
    return {"MODEL": model, "INPUT": first_input, "--output": output}


def label_shards(
    model_path: str,
    shard_spec: str | list[str],
    out_dir: str,
    scoring: ScoringConfig,
    *,
    calibration: Logistic4 | None = None,
    source: str = "pseudo",
    label_field: str = "mos",
    max_pixels: int = 40_000_000,
    min_side: int = 16,
    max_member_bytes: int = DataConfig.max_member_bytes,
    progress: bool = True,
    on_start: Callable[[], None] | None = None,
    **engine: Any,
) -> dict:
    """Score ``shard_spec`` with the checkpoint at ``model_path`` into ``out_dir``.

    ``out_dir/label_job.json`` records which model (and calibration) wrote the tables; a
    rerun with the same model resumes (only uncommitted shards are scored), a rerun with
    another model into the same directory is refused rather than mixing the two.
    ``engine`` goes to `run_score_job` (its ``scorer`` and ``decode`` seams).
    """
    from fiqa.data.shards import expand_shard_spec
    from fiqa.scoring import job_for_model, run_score_job  # pyarrow, PIL: when it runs

    job = job_for_model(
        model_path,
        expand_shard_spec(shard_spec, what="INPUT"),
        out_dir,
        source,
        scoring=scoring,
        calibration_override=calibration,
        label_field=label_field,
        max_pixels=max_pixels,
        min_side=min_side,
        max_member_bytes=max_member_bytes,
        views=scoring.views,
    )
    record = {
        "model": model_path,
        "model_id": job.model_id,
        "calibration": job.calibration.to_dict() if job.calibration else None,
        "source": source,
        "views": job.views,
    }
    record_path = storage.join(out_dir, "label_job.json")
    keys = ("model_id", "calibration", "source", "views")
    try:
        before = storage.read_json(record_path)
    except FileNotFoundError:
        storage.write_json(record_path, record)
    else:
        before.setdefault("views", "center")  # written before views existed
        if {k: before.get(k) for k in keys} != {k: record[k] for k in keys}:
            raise ConfigError(
                f"{out_dir} holds labels from {before.get('model_id')} "
                f"(source {before.get('source')!r}, views {before['views']}); this job would "
                f"write {job.model_id} (source {source!r}, views {job.views}). Use another "
                "-o/--output, or delete it to start over."
            )
    stats = run_score_job(job, progress=progress, on_start=on_start, **engine)
    stats["model_id"] = job.model_id
    storage.write_json(storage.join(out_dir, "label_summary.json"), stats)
    return stats


# The config sections `fiqa label` reads (--set), and the data keys it uses.
LABEL_SECTIONS = ("scoring", "data", "ray", "storage")
DATA_KEYS = ("label_field", "max_image_pixels", "min_image_side", "max_member_bytes")
# Shortcut flags (their dest) -> the config key each sets; --set is applied after them.
SHORTCUTS = {
    "batch_size": "scoring.batch_size",
    "concurrency": "scoring.concurrency",
    "num_gpus": "scoring.num_gpus",
    "num_cpus": "scoring.num_cpus",
    "decode_cpus": "scoring.decode_cpus",
    "compile": "scoring.compile",
    "pin_cores": "scoring.pin_cores",
    "buffer_mb": "scoring.buffer_mb",
    "views": "scoring.views",
    "max_image_pixels": "data.max_image_pixels",
    "min_image_side": "data.min_image_side",
    "label_field": "data.label_field",
    "address": "ray.address",
    "num_cpus_total": "ray.num_cpus",
    "endpoint_url": "storage.endpoint_url",
}
PIN_CORES = {"auto": None, "yes": True, "no": False}


def label_config(args: argparse.Namespace) -> dict[str, Any]:
    """The sections `fiqa label` runs with: the flags, then ``--set``, over the defaults."""
    raw: dict[str, Any] = {name: {} for name in LABEL_SECTIONS}
    for dest, key in SHORTCUTS.items():
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        if dest == "concurrency":
            value = _concurrency(value)
        elif dest == "pin_cores":
            value = PIN_CORES[value]
        section, name = key.split(".")
        raw[section][name] = value
    apply_overrides(raw, args.set)
    other = sorted(set(raw) - set(LABEL_SECTIONS))
    if other:
        raise ConfigError(
            f"--set {other[0]}.*: fiqa label reads {', '.join(k + '.*' for k in LABEL_SECTIONS)}"
        )
    if isinstance(raw["data"], dict) and set(raw["data"]) - set(DATA_KEYS):
        raise ConfigError(
            f"--set data.{sorted(set(raw['data']) - set(DATA_KEYS))[0]}: fiqa label reads "
            f"data.{{{','.join(DATA_KEYS)}}} (the inputs are its arguments)"
        )
    cfg = {name: section_from_dict(name, raw[name]) for name in LABEL_SECTIONS}
    check_data_config(cfg["data"])
    check_scoring_config(cfg["scoring"], "scoring")
    check_storage_config(cfg["storage"])
    return cfg


def _concurrency(text: str) -> int | list[int]:
    try:
        conc = [int(c) for c in text.split(",")]
    except ValueError:
        raise ConfigError(f"--concurrency {text!r}: expected N or MIN,MAX") from None
    return conc[0] if len(conc) == 1 else conc


def read_calibration(path: str) -> Logistic4:
    """``--calibration``: a JSON ``{b1..b4}``, or a model.json holding one (local or s3://)."""
    if not storage.is_remote(path) and os.path.isdir(path):
        raise ConfigError(f"--calibration {path}: a directory; give a JSON file (a model.json)")
    try:
        raw = storage.read_json(path)
    except FileNotFoundError:
        raise ConfigError(f"--calibration {path}: not found") from None
    except ValueError:  # not JSON, or not text
        raw = None
    try:
        calibration = from_meta(raw) if isinstance(raw, dict) else None
    except (KeyError, TypeError, ValueError):  # a b1..b4 missing, or not a number
        calibration = None
    if calibration is None:
        raise ConfigError(
            f"--calibration {path}: not JSON with b1..b4 (numbers), nor a model.json "
            "with a calibration holding them"
        )
    return calibration


def cmd_label(args: argparse.Namespace) -> int:
    model = args.model or args.model_flag
    inputs = (args.inputs or []) + (args.input_flag or [])
    if not model or not inputs:
        raise ConfigError("fiqa label: give the MODEL, then at least one INPUT (see --help)")
    cfg = label_config(args)
    storage.configure(cfg["storage"])
    model = checkpoint_dir(model)
    read_meta(model)  # a missing or unreadable checkpoint fails here, before anything heavy
    calibration = read_calibration(args.calibration) if args.calibration else None
    data: DataConfig = cfg["data"]
    stats = label_shards(
        model,
        inputs,
        args.output,
        cfg["scoring"],
        calibration=calibration,
        source=args.source,
        label_field=data.label_field,
        max_pixels=data.max_image_pixels,
        min_side=data.min_image_side,
        max_member_bytes=data.max_member_bytes,
        on_start=lambda: ensure_ray(cfg["ray"], shared=_shared(model, inputs[0], args.output)),
    )
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats["reasons"].items())) or "none"
    print(
        f"labeled {stats['scored']} and rejected {stats['rejected']} samples from "
        f"{stats['shards']} shard(s) ({stats['shards_skipped']} already done) into {args.output}\n"
        f"reject reasons: {reasons}"
    )
    return 0


def add_label(sub: Any) -> None:
    s = sub.add_parser(
        "label",
        help="score shards with a trained checkpoint into Parquet (resumes where it stopped)",
        usage="fiqa label MODEL INPUT [INPUT ...] -o OUTPUT [options]",
        description="Label any shard spec with any checkpoint, writing OUTPUT/labels/*.parquet "
        "and OUTPUT/rejects/*.parquet (the pseudo-labeling stages' engine). Rerunning the same "
        "command scores only the shards without committed output. The sizing flags are "
        "shortcuts for the config keys they name; --set sets any scoring.*, ray.*, storage.* "
        "key, and data.label_field, data.max_image_pixels, data.min_image_side, "
        "data.max_member_bytes. MODEL is a checkpoint (safetensors: loading it runs no code).",
    )
    s.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="checkpoint directory (model.json + model.safetensors), or either file",
    )
    s.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="shard spec(s): path, dir, glob, {a..b}, s3://"
    )
    hidden_alias(s, "--model", "MODEL (the first argument)", dest="model_flag")
    hidden_alias(s, "--input", "INPUT (the arguments after MODEL)", dest="input_flag", nargs="+")
    add_output(s, "output directory or s3:// prefix", required=True)
    s.add_argument(
        "--calibration",
        metavar="FILE",
        help="JSON with b1..b4 (or a model.json) mapping raw scores to the MOS scale; "
        "default: the calibration stored in the checkpoint",
    )
    s.add_argument(
        "--source", default="pseudo", help="value of the table's source column (default pseudo)"
    )
    add_set(s, "scoring.precision=32-true")
    d = ScoringConfig()
    s.add_argument(
        "--batch-size", type=int, metavar="N", help=f"scoring.batch_size (default {d.batch_size})"
    )
    s.add_argument(
        "--concurrency", metavar="N|MIN,MAX", help="scoring.concurrency: actors (default 1)"
    )
    s.add_argument(
        "--num-gpus", type=float, metavar="F", help="scoring.num_gpus per actor (default: 1 if any)"
    )
    s.add_argument(
        "--num-cpus", type=float, metavar="F", help="scoring.num_cpus per actor (default 1)"
    )
    s.add_argument(
        "--decode-cpus",
        type=float,
        metavar="F",
        help="scoring.decode_cpus per decode task (default 1)",
    )
    s.add_argument(
        "--compile", action="store_true", help="scoring.compile: torch.compile the model (GPU)"
    )
    s.add_argument(
        "--pin-cores",
        choices=list(PIN_CORES),
        help="scoring.pin_cores: CPU actors on cores of their own, decoding on the rest (auto: "
        "where a node's cores are all its processes may use)",
    )
    s.add_argument(
        "--views",
        choices=list(VIEWS),
        help="scoring.views: what a score averages: the centre crop, it and its mirror image, "
        "or 10 crops and flips; with more than one, each row gets score_spread (default center)",
    )
    s.add_argument(
        "--buffer-mb",
        type=int,
        metavar="MB",
        help="scoring.buffer_mb: object store for decoded batches awaiting the actors (default: "
        "what the actors, 4 blocks or 1,024 images each, or the decode tasks, 16/3 blocks each, "
        "need, whichever is more)",
    )
    option(
        s,
        "--max-image-pixels",
        deprecated=["--max-pixels"],
        type=int,
        metavar="N",
        help=f"data.max_image_pixels: larger images are rejected (default {DataConfig.max_image_pixels:,})",
    )
    option(
        s,
        "--min-image-side",
        deprecated=["--min-side"],
        type=int,
        metavar="PX",
        help=f"data.min_image_side: smaller images are rejected (default {DataConfig.min_image_side})",
    )
    s.add_argument(
        "--label-field",
        metavar="NAME",
        help="data.label_field: the label's name in each sample (default mos)",
    )
    s.add_argument(
        "--address", help="ray.address: the cluster to join (default: RAY_ADDRESS, else local)"
    )
    s.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="storage.endpoint_url: S3-compatible store (default: AWS_ENDPOINT_URL_S3, else AWS)",
    )
    hidden_alias(s, "--num-cpus-total", "--set ray.num_cpus=N", type=int)
    s.set_defaults(func=cmd_label)
