"""Stage 6: evaluate every model on the held-out test set and write the report.

Recipe:
1. score ``data.test`` with the teacher, teacher-plus, student and labeled-only
   student through the same streaming engine as pseudo-labeling;
2. SRCC, KRCC, and PLCC / RMSE after the 4-parameter logistic fit, per model;
   GFLOPs per image and parameters; 95 % bootstrap intervals on SRCC and PLCC
   and on the self-training and distillation differences (paired: the same
   resampled test images for every model);
3. pseudo-label counts per pool, their spread against the labeled MOS's, and
   their agreement with the pools' ground truth when ``data.unlabeled_*_truth``
   exists;
4. ``report.json``, ``report.md`` and plots in ``evaluate/``.

Every path here may be local or ``s3://`` (`fiqa.storage`).
"""

from __future__ import annotations

import io

import numpy as np

from fiqa import storage
from fiqa.bootstrap import model_intervals
from fiqa.calibration import fit_logistic
from fiqa.data.tables import read_table
from fiqa.metrics import quality_metrics
from fiqa.pipelines.train_teacher_plus import u1_table
from fiqa.report import DELTAS, write_report
from fiqa.runner import Stage, StageContext
from fiqa.scoring import job_for_model, run_score_job

MODELS = {
    "teacher": "train_teacher",
    "teacher_plus": "train_teacher_plus",
    "student": "distill_student/student",
    "student_labeled_only": "distill_student/student_labeled_only",
}
POOLS = {"unlabeled_1": "pseudo_label_1", "unlabeled_2": "pseudo_label_2"}


def pool_tables(ctx: StageContext) -> dict[str, tuple[str, int, str]]:
    """Each pool's pseudo-labels the student learned from: table, round and labeling model."""
    n = ctx.cfg.train_teacher_plus.rounds
    u1_by = "train_teacher" if n == 1 else f"train_teacher_plus round {n - 1}"
    return {
        "unlabeled_1": (u1_table(ctx.run_dir, n), n, u1_by),
        "unlabeled_2": (ctx.dir("pseudo_label_2"), n + 1, "train_teacher_plus"),
    }


def pool_entry(table_dir: str, truth: dict[str, float] | None) -> tuple[dict, dict]:
    """A pool's pseudo-label counts, spread, model ids and, with ``truth``, their agreement
    with it and how well their ``score_spread`` ranks their errors; and the scores matched
    to the truth, for the plots."""
    # Count from the tables, not the manifest: a resumed stage's manifest
    # counts only the shards of its last attempt.
    table = read_table(f"{table_dir}/labels", columns=["key", "score", "score_spread", "model_id"])
    rejects = read_table(f"{table_dir}/rejects", columns=["key", "reason"])
    entry: dict = {
        "labeled": table.num_rows,
        "rejected": rejects.num_rows,
        "model_ids": sorted(set(table.column("model_id").to_pylist())),
    }
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    entry.update({f"score_{k}": v for k, v in spread(scores).items()})
    matched: dict = {"score": scores, "truth": None}
    if truth:
        keys = table.column("key").to_pylist()
        mask = np.array([k in truth for k in keys])
        t = np.array([truth.get(k, np.nan) for k in keys])
        if mask.sum() >= 4:
            agree = quality_metrics(scores[mask], t[mask])
            agree["rmse_calibrated"] = float(np.sqrt(np.mean((scores[mask] - t[mask]) ** 2)))
            entry["agreement"] = agree
            matched["truth"] = t[mask]
            spreads = table.column("score_spread").to_numpy(zero_copy_only=False)
            if not np.isnan(spreads[mask].astype(np.float64)).any():
                entry["confidence"] = confidence(scores[mask], spreads[mask], t[mask])
    return entry, matched


def self_training(ctx: StageContext, rounds: list[dict], last_u1: dict) -> list[dict]:
    """Per self-training round: which model labeled U1, how close its labels came to U1's
    truth (when known), and the round's teacher-plus on validation. ``last_u1``: the pool
    entry of U1's table the last round learned from, already read."""
    truth = _read_truth(ctx.cfg.data.unlabeled_1_truth)
    out = []
    for r in rounds:
        last = r["round"] == len(rounds)
        entry = last_u1 if last else pool_entry(u1_table(ctx.run_dir, r["round"]), truth)[0]
        out.append(
            {
                "round": r["round"],
                "labeled_by": r["labeled_by"],
                "pseudo_u1_agreement": entry.get("agreement"),
                "val": r["training"]["val"],
                "best_epoch": r["training"]["best_epoch"],
            }
        )
    return out


def confidence(score: np.ndarray, spread: np.ndarray, truth: np.ndarray) -> dict:
    """Whether ``score_spread`` tells good pseudo-labels from bad: the rank correlation of the
    spread with the label's error, and the RMSE vs truth per spread quartile (low to high)."""
    from scipy.stats import spearmanr

    error = np.abs(score - truth)
    spread = spread.astype(np.float64)
    quartile = np.searchsorted(np.quantile(spread, [0.25, 0.5, 0.75]), spread, side="right")
    return {
        "spread_mean": float(spread.mean()),
        "srcc_spread_error": float(spearmanr(spread, error)[0]),
        "rmse_by_spread_quartile": [
            float(np.sqrt(np.mean(error[quartile == q] ** 2))) if (quartile == q).any() else None
            for q in range(4)
        ],
    }


def _read_truth(path: str | None) -> dict[str, float] | None:
    if not path:
        return None
    import csv

    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        return None
    return {row["key"]: float(row["mos"]) for row in csv.DictReader(io.StringIO(text))}


def run(ctx: StageContext) -> dict:
    from fiqa.models import load_checkpoint, model_cost  # torch: only when the stage runs
    from fiqa.models.export import weights_sha256

    cfg = ctx.cfg
    test_shards = ctx.shards("test")
    report: dict = {}
    predictions: dict[str, dict] = {}
    histories: dict[str, list] = {}
    models = {  # the labeled-only student only where distill_student trained one
        name: sub
        for name, sub in MODELS.items()
        if name != "student_labeled_only" or cfg.distill_student.labeled_only_baseline
    }
    for name, sub in models.items():
        model_dir = storage.join(ctx.run_dir, sub, "model")
        loaded = load_checkpoint(model_dir)
        out = ctx.dir() + f"/predictions/{name}"
        job = job_for_model(
            model_dir,
            test_shards,
            out,
            "test",
            scoring=cfg.scoring,
            model_id=name,
            label_field=cfg.data.label_field,
            require_label=True,
            max_pixels=cfg.data.max_image_pixels,
            min_side=cfg.data.min_image_side,
            max_member_bytes=cfg.data.max_member_bytes,
        )
        job.description = f"evaluate {name} on test"
        counts = run_score_job(job)
        table = read_table(out + "/labels", columns=["key", "raw_score", "mos"])
        pred = table.column("raw_score").to_numpy(zero_copy_only=False).astype(np.float64)
        mos = table.column("mos").to_numpy(zero_copy_only=False).astype(np.float64)
        keys = table.column("key").to_pylist()
        metrics = quality_metrics(pred, mos)
        cost = model_cost(loaded.model, loaded.image_size)
        report[name] = {
            **metrics,
            **{k: round(v, 4) for k, v in cost.items()},
            "arch": loaded.meta["arch"],
            "image_size": loaded.image_size,
            "best_epoch": loaded.meta.get("epoch"),
            # model_id names a run's output; equal digests are the same weights, run or not
            "weights_sha256": weights_sha256(model_dir),
            "rejected": counts["rejected"],
        }
        predictions[name] = {"pred": pred, "mos": mos, "keys": keys}
        try:
            histories[name] = storage.read_json(storage.join(ctx.run_dir, sub, "history.json"))
            report[name]["optimizer_steps"] = sum(h.get("steps", 0) for h in histories[name])
        except FileNotFoundError:
            pass

    report["intervals"] = paired_intervals(predictions, seed=cfg.seed)
    labeled = read_table(f"{ctx.dir('train_teacher')}/tables/labeled_train/labels", columns=["mos"])
    report["labeled_mos"] = spread(labeled.column("mos").to_numpy(zero_copy_only=False))

    pools: dict = {}
    pool_scores: dict[str, dict] = {}
    for pool, (table_dir, round_, by) in pool_tables(ctx).items():
        truth = _read_truth(getattr(cfg.data, f"{pool}_truth"))
        entry, pool_scores[pool] = pool_entry(table_dir, truth)
        entry.update(
            shards=stage_summary(ctx.manifests[POOLS[pool]]).get("shards_total"),
            # provenance: every row's model_id names the model and its output's digest
            round=round_,
            labeled_by=by,
        )
        pools[pool] = entry
    rounds = stage_summary(ctx.manifests["train_teacher_plus"]).get("rounds")
    if rounds:
        report["self_training"] = self_training(ctx, rounds, pools["unlabeled_1"])
    report["pseudo_label"] = pools
    pool_rows = sum(p["labeled"] for p in pools.values())
    report["regime"] = {
        "labeled": len(labeled),
        "pool": pool_rows,
        "pool_per_label": round(pool_rows / max(len(labeled), 1), 2),
    }
    if "teacher" in report and "student" in report and report["teacher"]["gflops"]:
        report["student_teacher_gflops_ratio"] = (
            report["student"]["gflops"] / report["teacher"]["gflops"]
        )
    paths = write_report(ctx.dir(), report, predictions, pool_scores, histories)
    return {
        "report": paths["json"],
        "test_srcc": {m: round(report[m]["srcc"], 4) for m in models},
        "test_plcc": {m: round(report[m]["plcc"], 4) for m in models},
    }


def stage_summary(manifest: dict) -> dict:
    """What a stage returned, from its manifest (``counts`` in manifests before ``summary``)."""
    return manifest.get("summary", manifest.get("counts")) or {}


def spread(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {}
    return {"std": float(v.std()), "min": float(v.min()), "max": float(v.max())}


def paired_intervals(predictions: dict[str, dict], seed: int) -> dict:
    """Bootstrap intervals over the test images every model scored, matched by key."""
    common = set.intersection(*(set(p["keys"]) for p in predictions.values()))
    keys = sorted(common)
    preds, mapped, mos = {}, {}, None
    for name, p in predictions.items():
        at = {k: i for i, k in enumerate(p["keys"])}
        order = np.array([at[k] for k in keys], dtype=np.int64)
        preds[name] = p["pred"][order]
        mos = p["mos"][order]
        # the logistic of the whole test set, as the model's PLCC has it
        mapped[name] = (
            fit_logistic(preds[name], mos)(preds[name]) if len(keys) >= 4 else preds[name]
        )
    if mos is None or len(keys) < 4:
        return {}
    return model_intervals(preds, mapped, mos, DELTAS, seed=seed)


def headline(summary: dict) -> str:
    srcc = summary.get("test_srcc") or {}
    return "test SRCC " + ", ".join(f"{m} {v:.4f}" for m, v in srcc.items()) if srcc else ""


STAGE = Stage(
    name="evaluate",
    run=run,
    sections=("data", "scoring"),
    data=("test",),
    files=("unlabeled_1_truth", "unlabeled_2_truth"),
    after=(
        "train_teacher",
        "pseudo_label_1",
        "train_teacher_plus",
        "pseudo_label_2",
        "distill_student",
    ),
    description="evaluate all models on the test set and write the report",
    headline=headline,
)
