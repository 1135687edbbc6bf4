"""Stage 4: the teacher-plus pseudo-labels unlabeled pool U2 (see `pseudo_label`)."""

from __future__ import annotations

from fiqa.pipelines.pseudo_label import headline, pseudo_label, stage_model
from fiqa.runner import Stage, StageContext


def run(ctx: StageContext) -> dict:
    return pseudo_label(ctx, "unlabeled_2", "pseudo_u2", *stage_model(ctx, "train_teacher_plus"))


STAGE = Stage(
    name="pseudo_label_2",
    run=run,
    sections=("data", "scoring"),
    data=("unlabeled_2",),
    after=("train_teacher_plus",),
    description="the teacher-plus pseudo-labels pool U2",
    headline=headline,
)
