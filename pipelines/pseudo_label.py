"""Shared recipe of stages 2 and 4: a trained model pseudo-labels an unlabeled pool.

Ray Data streams the pool's shards through CPU decode tasks and an actor
pool holding the model; raw scores are mapped to the MOS scale with the
4-parameter logistic fitted on labeled data when the model was trained (it
travels in the model's ``model.json``); one Parquet part per shard goes to
``labels/`` and the samples that could not be used go to ``rejects/``.
"""

from __future__ import annotations

from fiqa.labeling import ScoreJob, run_score_job
from fiqa.metrics import Logistic4
from fiqa.models.checkpoint import read_meta
from fiqa.runner import StageContext


def pseudo_label(ctx: StageContext, pool: str, model_stage: str, source: str) -> dict:
    cfg = ctx.cfg
    model_dir = f"{ctx.dir(model_stage)}/model"
    meta = read_meta(model_dir)
    calibration = Logistic4.from_dict(meta["calibration"]) if meta.get("calibration") else None
    job = ScoreJob(
        shards=ctx.shards(pool),
        out_dir=ctx.dir(),
        source=source,
        label_field=cfg.data.label_field,
        model_path=model_dir,
        calibration=calibration,
        model_id=f"{model_stage}:{ctx.manifests[model_stage]['output_id'][:12]}",
        resize=int(meta.get("resize", meta["image_size"])),
        crop=int(meta["image_size"]),
        max_pixels=cfg.data.max_image_pixels,
        min_side=cfg.data.min_image_side,
        label=cfg.pseudo_label,
    )
    return run_score_job(job)
