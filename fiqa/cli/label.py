"""`fiqa label`: score any shard spec with any checkpoint into Parquet tables."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from fiqa import storage
from fiqa.calibration import Logistic4
from fiqa.cluster.local import ensure_ray
from fiqa.config import (
    ConfigError,
    RayConfig,
    ScoringConfig,
    StorageConfig,
    check_scoring_config,
)


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
        expand_shard_spec(shard_spec),
        out_dir,
        source,
        scoring=scoring,
        calibration_override=calibration,
        label_field=label_field,
        max_pixels=max_pixels,
        min_side=min_side,
    )
    record = {
        "model": model_path,
        "model_id": job.model_id,
        "calibration": job.calibration.to_dict() if job.calibration else None,
        "source": source,
    }
    record_path = storage.join(out_dir, "label_job.json")
    keys = ("model_id", "calibration", "source")
    try:
        before = storage.read_json(record_path)
    except FileNotFoundError:
        storage.write_json(record_path, record)
    else:
        if {k: before.get(k) for k in keys} != {k: record[k] for k in keys}:
            raise ConfigError(
                f"{out_dir} holds labels from {before.get('model_id')} "
                f"(source {before.get('source')!r}); this job would write {job.model_id} "
                f"(source {source!r}). Use another --output, or delete it to start over."
            )
    stats = run_score_job(job, progress=progress, on_start=on_start, **engine)
    stats["model_id"] = job.model_id
    storage.write_json(storage.join(out_dir, "label_summary.json"), stats)
    return stats


def cmd_label(args: argparse.Namespace) -> int:
    conc = [int(c) for c in args.concurrency.split(",")] if args.concurrency else [1]
    label = ScoringConfig(
        batch_size=args.batch_size,
        concurrency=conc[0] if len(conc) == 1 else conc,
        num_gpus=args.num_gpus,
        num_cpus=args.num_cpus,
        decode_cpus=args.decode_cpus,
        compile=args.compile,
        pin_cores={"auto": None, "yes": True, "no": False}[args.pin_cores],
        buffer_mb=args.buffer_mb,
    )
    check_scoring_config(label, "label")
    storage.configure(StorageConfig(endpoint_url=args.endpoint_url))
    calibration = None
    if args.calibration:
        raw = storage.read_json(args.calibration)  # local or s3://
        calibration = Logistic4.from_dict(raw.get("calibration", raw))
    stats = label_shards(
        args.model,
        args.input,
        args.output,
        label,
        calibration=calibration,
        source=args.source,
        max_pixels=args.max_pixels,
        min_side=args.min_side,
        on_start=lambda: ensure_ray(RayConfig(address=args.address, num_cpus=args.num_cpus_total)),
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
        description="Label any shard spec with any checkpoint, writing OUTPUT/labels/*.parquet "
        "and OUTPUT/rejects/*.parquet (the pseudo-labeling stages' engine). Rerunning the same "
        "command scores only the shards without committed output.",
    )
    s.add_argument("--model", required=True, help="checkpoint directory (model.json + weights)")
    s.add_argument(
        "--input", required=True, nargs="+", help="shard spec(s): path, dir, glob, {a..b}, s3://"
    )
    s.add_argument("--output", required=True, help="output directory or s3:// prefix")
    s.add_argument(
        "--calibration",
        help="JSON with b1..b4 (or a model.json) mapping raw scores to the MOS scale; "
        "default: the calibration stored in the checkpoint",
    )
    s.add_argument("--source", default="pseudo", help="value of the table's source column")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--concurrency", metavar="N|MIN,MAX", help="scoring actors (default 1)")
    s.add_argument("--num-gpus", type=float, default=None, help="per actor (default: 1 if any)")
    s.add_argument("--num-cpus", type=float, default=1.0, help="per actor")
    s.add_argument("--decode-cpus", type=float, default=1.0, help="per decode task")
    s.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    s.add_argument(
        "--pin-cores",
        choices=["auto", "yes", "no"],
        default="auto",
        help="CPU actors on cores of their own, decoding on the rest (auto: where a node's "
        "cores are all its processes may use)",
    )
    s.add_argument(
        "--buffer-mb",
        type=int,
        help="object store for decoded batches awaiting the actors (default: what the actors, 4 blocks or 1,024 images each, or the decode tasks, 16/3 blocks each, need, whichever is more)",
    )
    s.add_argument("--max-pixels", type=int, default=40_000_000)
    s.add_argument("--min-side", type=int, default=16)
    s.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    s.add_argument(
        "--endpoint-url", help="S3-compatible store (default: AWS_ENDPOINT_URL_S3, else AWS)"
    )
    s.add_argument("--num-cpus-total", type=int, help="CPUs of the local Ray (default: all)")
    s.set_defaults(func=cmd_label)
