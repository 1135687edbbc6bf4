"""Stage 2: the teacher pseudo-labels unlabeled pool U1 (see `pseudo_label`)."""

from __future__ import annotations

from fiqa.pipelines.pseudo_label import headline, pseudo_label
from fiqa.runner import Stage, StageContext


def run(ctx: StageContext) -> dict:
    return pseudo_label(ctx, pool="unlabeled_1", model_stage="train_teacher", source="pseudo_u1")


STAGE = Stage(
    name="pseudo_label_1",
    run=run,
    sections=("data", "scoring"),
    data=("unlabeled_1",),
    after=("train_teacher",),
    description="the teacher pseudo-labels pool U1",
    headline=headline,
)
