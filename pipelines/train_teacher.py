"""Stage 1: train the teacher on the labeled faces.

Recipe:
1. turn ``data.labeled_train`` and ``data.labeled_val`` shards into Parquet
   tables (every sample accounted for: used, or rejected with a reason);
2. train ``teacher`` with Ray Train on the labeled table (loss MSE + PLCC),
   validating every epoch on labeled_val;
3. export the best epoch by (SRCC + PLCC) / 2, with the logistic that maps its
   raw outputs to the MOS scale (fitted on labeled_val), to ``model/``, and then its
   summary to ``fit.json``: a rerun of an interrupted stage does not train it again.
"""

from __future__ import annotations

from fiqa.runner import Stage, StageContext
from fiqa.scoring import ScoreJob, run_score_job
from fiqa.training import TrainJob, fit, fit_headline


def ingest_labeled(ctx: StageContext, split: str) -> dict:
    """Labeled shards -> ``tables/<split>`` (labels/ and rejects/), no model involved."""
    d = ctx.cfg.data
    job = ScoreJob(
        shards=ctx.shards(split),
        out_dir=f"{ctx.dir()}/tables/{split}",
        source="labeled",
        label_field=d.label_field,
        require_label=True,
        max_pixels=d.max_image_pixels,
        min_side=d.min_image_side,
        max_member_bytes=d.max_member_bytes,
        scoring=ctx.cfg.scoring,
        description=f"read {split}",
    )
    return run_score_job(job)


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    counts = {split: ingest_labeled(ctx, split) for split in ("labeled_train", "labeled_val")}
    m = cfg.teacher
    job = TrainJob(
        name="teacher",
        arch=m.arch,
        image_size=m.image_size,
        resize=m.resize,
        train_tables=[f"{ctx.dir()}/tables/labeled_train/labels"],
        val_table=f"{ctx.dir()}/tables/labeled_val/labels",
        out_dir=ctx.dir(),
        train=cfg.train_teacher,
        seed=cfg.seed,
        pretrained_weights=m.pretrained_weights,
        config_fingerprint=cfg.fingerprint("teacher", "train_teacher"),
        max_pixels=cfg.data.max_image_pixels,
    )
    return {**counts, "training": fit(job)}


STAGE = Stage(
    name="train_teacher",
    run=run,
    sections=("seed", "data", "teacher", "train_teacher"),
    data=("labeled_train", "labeled_val"),
    description="train the teacher on labeled faces",
    headline=lambda summary: fit_headline(summary["training"]),
)
