"""Shared recipe of stages 2 and 4 (and of self-training's later rounds): a trained model
pseudo-labels an unlabeled pool.

Ray Data streams the pool's shards through CPU decode tasks and an actor
pool holding the model; raw scores are mapped to the MOS scale with the
4-parameter logistic fitted on labeled data when the model was trained (it
travels in the model's ``model.json``); one Parquet part per shard goes to
``labels/`` and the samples that could not be used go to ``rejects/``. Every row
names the model that labeled it (``model_id``).
"""

from __future__ import annotations

from fiqa.runner import StageContext
from fiqa.scoring import job_for_model, run_score_job


def stage_model(ctx: StageContext, stage: str) -> tuple[str, str]:
    """A finished stage's model: its directory and its provenance id (``stage:output id``)."""
    return f"{ctx.dir(stage)}/model", f"{stage}:{ctx.manifests[stage]['output_id'][:12]}"


def pseudo_label(
    ctx: StageContext,
    pool: str,
    source: str,
    model_dir: str,
    model_id: str,
    out_dir: str | None = None,
) -> dict:
    """``data.<pool>`` scored by the model in ``model_dir`` into ``out_dir`` (the stage's own
    directory by default), its rows' ``source`` and ``model_id`` as given."""
    cfg = ctx.cfg
    job = job_for_model(
        model_dir,
        ctx.shards(pool),
        out_dir or ctx.dir(),
        source,
        scoring=cfg.scoring,
        model_id=model_id,
        label_field=cfg.data.label_field,
        max_pixels=cfg.data.max_image_pixels,
        min_side=cfg.data.min_image_side,
        max_member_bytes=cfg.data.max_member_bytes,
        views=cfg.scoring.views,
    )
    job.description = f"pseudo-label {pool} with {model_id.split(':')[0]}"
    return run_score_job(job)


def headline(summary: dict) -> str:
    """``1600 scored, 0 rejected`` (this attempt's: shards committed earlier are not counted)."""
    line = f"{summary['scored']} scored, {summary['rejected']} rejected"
    if summary.get("shards_skipped"):
        line += f" ({summary['shards_skipped']} shard(s) committed by an earlier attempt)"
    return line
