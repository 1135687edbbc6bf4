"""Stage 5: distill the lightweight student, and train its labeled-only ablation.

Recipe:
1. the student learns from labeled + PL(U1) + PL(U2), with per-source loss
   weights from ``distill_student.source_weights`` (sources ``labeled``,
   ``pseudo_u1``, ``pseudo_u2``): the paper's knowledge distillation. PL(U1) is
   the labels the final teacher-plus learned from: the teacher's, or with several
   self-training rounds those of the last round;
2. the same student, same schedule, on the labeled table only: the ablation
   the paper reports, to show what the pseudo-labels are worth. Its table is read
   over again within each epoch up to the distilled student's rows, so both take the
   same optimizer steps (``TrainJob.epoch_rows``): fewer steps would credit the
   pseudo-labels with what is only more training.

A model whose training finished is not trained again when an interrupted
stage is resumed (``fit`` returns the summary its ``fit.json`` recorded).
"""

from __future__ import annotations

from fiqa.pipelines.train_teacher_plus import u1_table
from fiqa.runner import Stage, StageContext
from fiqa.training import TrainJob, fit, fit_headline
from fiqa.training.data import table_rows


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    m, t = cfg.student, cfg.distill_student
    tables = ctx.dir("train_teacher") + "/tables"
    labeled = f"{tables}/labeled_train/labels"
    pseudo = [
        u1_table(ctx.run_dir, cfg.train_teacher_plus.rounds) + "/labels",
        f"{ctx.dir('pseudo_label_2')}/labels",
    ]
    students = [("student", [labeled, *pseudo], None)]
    if t.labeled_only_baseline:
        # equal optimizer steps: as many labeled rows an epoch as the distilled student reads
        students.append(("student_labeled_only", [labeled], table_rows([labeled, *pseudo])))
    out = {}
    for name, train_tables, epoch_rows in students:
        job = TrainJob(
            name=name,
            arch=m.arch,
            image_size=m.image_size,
            resize=m.resize,
            train_tables=train_tables,
            val_table=f"{tables}/labeled_val/labels",
            out_dir=f"{ctx.dir()}/{name}",
            train=t,
            seed=cfg.seed + 2,
            pretrained_weights=m.pretrained_weights,
            config_fingerprint=cfg.fingerprint("student", "distill_student"),
            epoch_rows=epoch_rows,
        )
        # Each of the two models commits with its fit.json (written by `fit`): after a crash
        # during the second, a rerun of the stage (same fingerprint) does not train the first.
        out[name] = fit(job)
    return out


def headline(summary: dict) -> str:
    return "; ".join(f"{name}: {fit_headline(fit)}" for name, fit in summary.items())


STAGE = Stage(
    name="distill_student",
    run=run,
    sections=("seed", "student", "distill_student"),
    after=("train_teacher", "pseudo_label_1", "train_teacher_plus", "pseudo_label_2"),
    description="distil the student on labeled + PL(U1) + PL(U2), and its labeled-only ablation",
    headline=headline,
)
