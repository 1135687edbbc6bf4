"""Stage 3: self-training. A teacher-plus learns from labeled + pseudo-labeled U1.

Recipe: the same training as stage 1 (same architecture, loss, validation and
best-epoch selection), over the union of the labeled table and the
pseudo-labeled U1 table; per-source loss weights come from
``train_teacher_plus.source_weights`` (sources ``labeled``, ``pseudo_u1``).
``train_teacher_plus.init_from: teacher`` starts from the teacher's weights
instead of from scratch (or from ``teacher.pretrained_weights``).
"""

from __future__ import annotations

from fiqa.runner import Stage, StageContext
from fiqa.training import TrainJob, fit, fit_headline


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    m, t = cfg.teacher, cfg.train_teacher_plus
    tables = ctx.dir("train_teacher") + "/tables"
    job = TrainJob(
        name="teacher_plus",
        arch=m.arch,
        image_size=m.image_size,
        resize=m.resize,
        train_tables=[f"{tables}/labeled_train/labels", f"{ctx.dir('pseudo_label_1')}/labels"],
        val_table=f"{tables}/labeled_val/labels",
        out_dir=ctx.dir(),
        train=t,
        seed=cfg.seed + 1,
        init_checkpoint=f"{ctx.dir('train_teacher')}/model" if t.init_from == "teacher" else None,
        pretrained_weights=m.pretrained_weights,
        config_fingerprint=cfg.fingerprint("teacher", "train_teacher_plus"),
    )
    return {"training": fit(job)}


STAGE = Stage(
    name="train_teacher_plus",
    run=run,
    sections=("seed", "teacher", "train_teacher_plus"),
    after=("train_teacher", "pseudo_label_1"),
    description="self-training: teacher-plus on labeled + PL(U1)",
    headline=lambda summary: fit_headline(summary["training"]),
)
