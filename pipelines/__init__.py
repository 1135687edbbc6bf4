"""The six stages of the recipe, in order; each module reads as one recipe."""

from fiqa.pipelines import (
    distill_student,
    evaluate,
    pseudo_label_1,
    pseudo_label_2,
    train_teacher,
    train_teacher_plus,
)

STAGES = [
    train_teacher.STAGE,
    pseudo_label_1.STAGE,
    train_teacher_plus.STAGE,
    pseudo_label_2.STAGE,
    distill_student.STAGE,
    evaluate.STAGE,
]
STAGE_NAMES = [s.name for s in STAGES]
