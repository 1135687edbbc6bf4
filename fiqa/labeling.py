"""`fiqa label`: score any shard spec with any checkpoint (moves beside the other commands)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fiqa import storage
from fiqa.calibration import Logistic4
from fiqa.config import ConfigError, ScoringConfig
from fiqa.scoring import job_for_model, run_score_job


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
