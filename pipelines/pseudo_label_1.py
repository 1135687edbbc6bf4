"""Stage 2: the teacher pseudo-labels unlabeled pool U1 (see `pseudo_label`)."""

from __future__ import annotations

from fiqa.pipelines.pseudo_label import headline, pseudo_label, stage_model
from fiqa.runner import Stage, StageContext


def run(ctx: StageContext) -> dict:
    return pseudo_label(ctx, "unlabeled_1", "pseudo_u1", *stage_model(ctx, "train_teacher"))


STAGE = Stage(
    name="pseudo_label_1",
    run=run,
    sections=("data", "scoring"),
    data=("unlabeled_1",),
    after=("train_teacher",),
    description="the teacher pseudo-labels pool U1",
    headline=headline,
)
