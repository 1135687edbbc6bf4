"""Stage 3: self-training. A teacher-plus learns from labeled + pseudo-labeled U1.

Recipe: the same training as stage 1 (same architecture, loss, validation and
best-epoch selection), over the union of the labeled table and the
pseudo-labeled U1 table; per-source loss weights come from
``train_teacher_plus.source_weights`` (sources ``labeled``, ``pseudo_u1``).
``train_teacher_plus.init_from: teacher`` starts from the teacher's weights
instead of from scratch (or from ``teacher.pretrained_weights``).

With ``train_teacher_plus.rounds: N`` the self-training repeats: in round r > 1 the
teacher-plus of round r - 1 labels U1 again (into ``round_<r>/labels``) and a new
teacher-plus learns from labeled + those labels, initialised as round 1 was: rounds
differ only in their pseudo-labels. A round before the last keeps its model in
``round_<r>/model``; the last round's is the stage's ``model/``, the one that labels U2,
and the student learns from the U1 labels that round learned from (`u1_table`).
"""

from __future__ import annotations

from fiqa import storage
from fiqa.models.meta import read_meta
from fiqa.pipelines.pseudo_label import pseudo_label, stage_model
from fiqa.runner import Stage, StageContext
from fiqa.scoring.job import model_id_of
from fiqa.training import TrainJob, fit, fit_headline
from fiqa.training.job import run_paths

NAME = "train_teacher_plus"


def round_dir(run_dir: str, r: int) -> str:
    """Where round ``r`` (> 1) writes U1's new labels, and its model unless it is the last."""
    return storage.join(run_dir, NAME, f"round_{r}")


def u1_table(run_dir: str, r: int) -> str:
    """The U1 pseudo-labels round ``r`` learns from (``labels/``, ``rejects/``): the
    teacher's, stage 2's, in round 1."""
    return storage.join(run_dir, "pseudo_label_1") if r == 1 else round_dir(run_dir, r)


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    m, t = cfg.teacher, cfg.train_teacher_plus
    tables = ctx.dir("train_teacher") + "/tables"
    teacher_dir, labeler = stage_model(ctx, "train_teacher")
    model_dir = teacher_dir  # the model that labels the next round's U1
    rounds = []
    for r in range(1, t.rounds + 1):
        last = r == t.rounds
        entry: dict = {"round": r, "labeled_by": labeler}
        if r > 1:
            entry["pseudo_label"] = pseudo_label(
                ctx, "unlabeled_1", "pseudo_u1", model_dir, labeler, round_dir(ctx.run_dir, r)
            )
        job = TrainJob(
            # the last round keeps the name (and digest) a single round has always had
            name="teacher_plus" if last else f"teacher_plus_round_{r}",
            arch=m.arch,
            image_size=m.image_size,
            resize=m.resize,
            train_tables=[f"{tables}/labeled_train/labels", u1_table(ctx.run_dir, r) + "/labels"],
            val_table=f"{tables}/labeled_val/labels",
            out_dir=ctx.dir() if last else round_dir(ctx.run_dir, r),
            train=t,
            seed=cfg.seed + 1,
            init_checkpoint=teacher_dir if t.init_from == "teacher" else None,
            pretrained_weights=m.pretrained_weights,
            config_fingerprint=cfg.fingerprint("teacher", "train_teacher_plus"),
        )
        entry["training"] = fit(job)
        rounds.append(entry)
        model_dir = run_paths(job).model  # (not the summary's: a resumed copy of a run)
        labeler = model_id_of(read_meta(model_dir), name=f"{NAME}/round_{r}")
    summary = {"training": rounds[-1]["training"]}
    if t.rounds > 1:
        summary["rounds"] = rounds
    return summary


def headline(summary: dict) -> str:
    line = fit_headline(summary["training"])
    return f"round {len(summary['rounds'])}: {line}" if summary.get("rounds") else line


STAGE = Stage(
    name=NAME,
    run=run,
    # scoring and U1's shards: from round 2 on, the stage labels U1 itself
    sections=("seed", "teacher", "train_teacher_plus", "scoring"),
    data=("unlabeled_1",),
    after=("train_teacher", "pseudo_label_1"),
    description="self-training: teacher-plus on labeled + PL(U1)",
    headline=headline,
)
