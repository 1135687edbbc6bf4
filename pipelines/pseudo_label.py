"""Shared recipe of stages 2 and 4: a trained model pseudo-labels an unlabeled pool.

Ray Data streams the pool's shards through CPU decode tasks and an actor
pool holding the model; raw scores are mapped to the MOS scale with the
4-parameter logistic fitted on labeled data when the model was trained (it
travels in the model's ``model.json``); one Parquet part per shard goes to
``labels/`` and the samples that could not be used go to ``rejects/``.
"""

from __future__ import annotations

from fiqa.runner import StageContext
from fiqa.scoring import job_for_model, run_score_job


def pseudo_label(ctx: StageContext, pool: str, model_stage: str, source: str) -> dict:
    cfg = ctx.cfg
    model_dir = f"{ctx.dir(model_stage)}/model"
    shards = ctx.shards(pool)
    job = job_for_model(
        model_dir,
        shards,
        ctx.dir(),
        source,
        scoring=cfg.scoring,
        model_id=f"{model_stage}:{ctx.manifests[model_stage]['output_id'][:12]}",
        label_field=cfg.data.label_field,
        max_pixels=cfg.data.max_image_pixels,
        min_side=cfg.data.min_image_side,
        views=cfg.scoring.views,
    )
    job.description = f"pseudo-label {pool} with {model_stage}"
    return run_score_job(job)


def headline(summary: dict) -> str:
    """``1600 scored, 0 rejected`` (this attempt's: shards committed earlier are not counted)."""
    line = f"{summary['scored']} scored, {summary['rejected']} rejected"
    if summary.get("shards_skipped"):
        line += f" ({summary['shards_skipped']} shard(s) committed by an earlier attempt)"
    return line
