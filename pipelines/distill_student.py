"""Stage 5: distill the lightweight student, and train its labeled-only ablation.

Recipe:
1. the student learns from labeled + PL(U1) + PL(U2), with per-source loss
   weights from ``distill_student.source_weights`` (sources ``labeled``,
   ``pseudo_u1``, ``pseudo_u2``): the paper's knowledge distillation;
2. the same student, same schedule, on the labeled table only: the ablation
   the paper reports, to show what the pseudo-labels are worth. Its table is read
   as many times per epoch as makes its optimizer steps those of the distilled
   student (``TrainJob.repeat``): fewer steps would credit the pseudo-labels with
   what is only more training.

A model whose training finished is not trained again when an interrupted
stage is resumed (``fit`` returns the summary its ``fit.json`` recorded).
"""

from __future__ import annotations

from fiqa.runner import Stage, StageContext
from fiqa.training import TrainJob, fit, fit_headline
from fiqa.training.data import table_rows


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    m, t = cfg.student, cfg.distill_student
    tables = ctx.dir("train_teacher") + "/tables"
    labeled = f"{tables}/labeled_train/labels"
    pseudo = [f"{ctx.dir('pseudo_label_1')}/labels", f"{ctx.dir('pseudo_label_2')}/labels"]
    # equal optimizer steps: the labeled rows read as often as make the distilled set's count
    labeled_rows = table_rows([labeled])
    repeat = max(1, round((labeled_rows + table_rows(pseudo)) / max(labeled_rows, 1)))
    out = {}
    for name, train_tables, times in (
        ("student", [labeled, *pseudo], 1),
        ("student_labeled_only", [labeled], repeat),
    ):
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
            repeat=times,
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
    after=("train_teacher", "pseudo_label_1", "pseudo_label_2"),
    description="distil the student on labeled + PL(U1) + PL(U2), and its labeled-only ablation",
    headline=headline,
)
