"""The run report: ``report.json`` (machine-readable), ``report.md`` and PNG plots."""

from __future__ import annotations

import io
import json
import os

import numpy as np

from fiqa import storage
from fiqa.calibration import fit_logistic

MODEL_ORDER = ("teacher", "teacher_plus", "student", "student_labeled_only")


def _save(fig, url: str) -> None:
    """Render ``fig`` as PNG in memory and store it at ``url`` (local or s3://) in one write."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    storage.write_bytes(url, buf.getvalue())


def _plots(out: str, predictions: dict, pools: dict, histories: dict, report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    names = [n for n in MODEL_ORDER if n in predictions]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        p, m = predictions[name]["pred"], predictions[name]["mos"]
        mapped = fit_logistic(p, m)(p) if len(p) >= 4 else p
        ax.scatter(m, mapped, s=6, alpha=0.5)
        lo, hi = float(np.min(m)), float(np.max(m))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        r = report.get(name, {})
        title = f"{name}\nSRCC {r['srcc']:.3f}  PLCC {r['plcc']:.3f}" if "srcc" in r else name
        ax.set(title=title, xlabel="MOS", ylabel="prediction (logistic-mapped)")
    fig.tight_layout()
    files.append(storage.join(out, "pred_vs_mos.png"))
    _save(fig, files[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, len(pools), figsize=(5 * len(pools), 3.6), squeeze=False)
    for ax, (pool, d) in zip(axes[0], pools.items(), strict=True):
        values = [d["score"]] + ([d["truth"]] if d.get("truth") is not None else [])
        lo, hi = min(float(np.min(v)) for v in values), max(float(np.max(v)) for v in values)
        bins = np.linspace(lo, hi, 41) if len(d["score"]) and hi > lo else 10
        ax.hist(d["score"], bins=bins, alpha=0.6, label="pseudo-label")
        if d.get("truth") is not None:
            ax.hist(d["truth"], bins=bins, alpha=0.5, label="ground truth")
        ax.set(title=_pool_title(pool, report), xlabel="score (MOS scale)", ylabel="count")
        ax.legend()
    fig.tight_layout()
    files.append(storage.join(out, "pseudo_label_hist.png"))
    _save(fig, files[-1])
    plt.close(fig)

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 3.8))
    for name, hist in histories.items():
        ep = [h["epoch"] for h in hist]
        line = a1.plot(ep, [h["train_loss"] for h in hist], marker="o", label=name)[0]
        best = max((h["val_srcc"] for h in hist), default=float("nan"))
        a3.plot(ep, [h["val_srcc"] for h in hist], marker="o", label=f"{name} (best {best:.3f})")
        # One line per training source, in the model's colour: how well the model fits
        # the labeled rows versus the pseudo-labels it learns from.
        sources = sorted({s for h in hist for s in h.get("loss_by_source", {})})
        for src, style in zip(sources, ("-", "--", ":", "-."), strict=False):
            pts = [h for h in hist if src in h.get("loss_by_source", {})]
            a2.plot(
                [h["epoch"] for h in pts],
                [h["loss_by_source"][src] for h in pts],
                style,
                marker="o",
                markersize=3,
                color=line.get_color(),
                label=f"{name}: {src}",
            )
    a1.set(title="training loss (MSE + PLCC)", xlabel="epoch")
    a2.set(title="training MSE per source (standardised)", xlabel="epoch")
    a3.set(title="validation SRCC (labeled_val)", xlabel="epoch")
    for ax in (a1, a2, a3):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(storage.join(out, "training_curves.png"))
    _save(fig, files[-1])
    plt.close(fig)
    return files


# The differences the findings judge: name -> (model, baseline).
DELTAS = {
    "self_training": ("teacher_plus", "teacher"),
    "distillation": ("student", "student_labeled_only"),
}
# Pseudo-labels whose spread is under this fraction of the labeled MOS's are called compressed.
COMPRESSED_BELOW = 0.8


def _ci(d: dict | None, signed: bool = False) -> str:
    """``0.8068 [0.7812, 0.8301]``; with ``signed``, ``+0.0025 [-0.0100, +0.0150]``."""
    if not d:
        return "n/a"
    f = "{:+.4f}" if signed else "{:.4f}"
    return f"{f.format(d['value'])} [{f.format(d['low'])}, {f.format(d['high'])}]"


def _within_noise(d: dict) -> bool:
    return d["low"] <= 0.0 <= d["high"]


def _pool_title(pool: str, report: dict) -> str:
    p = report.get("pseudo_label", {}).get(pool, {})
    title = f"{pool}: pseudo-labels"
    if "score_std" in p and report.get("labeled_mos"):
        title += f"\nstd {p['score_std']:.2f} vs labeled MOS {report['labeled_mos']['std']:.2f}"
    if p.get("agreement"):
        title += f", SRCC vs truth {p['agreement']['srcc']:.3f}"
    return title


def headline_rows(report: dict) -> list[list[str]]:
    """The headline table: a header, then per model SRCC and PLCC with their 95 % intervals,
    GFLOPs and parameters."""
    intervals = report.get("intervals", {}).get("models", {})
    rows = [["model", "SRCC [95% CI]", "PLCC [95% CI]", "GFLOPs", "params (M)"]]
    for name in MODEL_ORDER:
        if name not in report:
            continue
        r, ci = report[name], intervals.get(name, {})
        srcc = _ci(ci.get("srcc")) if ci else f"{r['srcc']:.4f}"
        plcc = (_ci(ci.get("plcc")) if ci else f"{r['plcc']:.4f}") + _fit_mark(r)
        if r.get("degenerate"):
            srcc = plcc = "n/a"
        rows.append([name, srcc, plcc, f"{r['gflops']:.3f}", f"{r['params_m']:.2f}"])
    return rows


def _fit_mark(r: dict) -> str:
    """``†`` where the logistic fit failed: PLCC and RMSE are of the unfitted initial map."""
    fit = r.get("logistic_fit", "converged")
    return "" if fit == "converged" or r.get("degenerate") else "†"


def metric_notes(report: dict) -> list[str]:
    """A sentence per model whose figures could not be computed as intended."""
    out = []
    for name in MODEL_ORDER:
        r = report.get(name, {})
        if r.get("degenerate"):
            out.append(f"{name}: no figures (n/a): {r['degenerate']}.")
        elif _fit_mark(r):
            reason = r["logistic_fit"].removeprefix("failed: ")
            out.append(
                f"{name}: † the logistic fit failed ({reason}): its PLCC and RMSE are of the "
                "unfitted initial map."
            )
    return out


def _verdict(d: dict, model: str, baseline: str) -> str:
    if _within_noise(d):
        return f"within noise: {model} and {baseline} cannot be told apart on this test set"
    return f"{model} {'beats' if d['value'] > 0 else 'TRAILS'} {baseline}"


def findings(report: dict) -> list[str]:
    """The findings, one sentence each: the paired differences with their 95 % intervals
    ("within noise" when one contains 0), the cost, and compressed pseudo-labels."""
    out = regime_notes(report)
    deltas = report.get("intervals", {}).get("deltas", {})
    names = {
        "self_training": ("Self-training", "teacher-plus", "the teacher"),
        "distillation": ("Distillation", "the distilled student", "the labeled-only student"),
    }
    for key, (model, baseline) in DELTAS.items():
        title, m, b = names[key]
        d = deltas.get(key)
        if d:
            out.append(
                f"{title}: {model} - {baseline}: SRCC {_ci(d['srcc'], True)}, "
                f"PLCC {_ci(d['plcc'], True)}; {_verdict(d['srcc'], m, b)}."
            )
        elif model in report and baseline in report:  # a report written before intervals
            diff = report[model]["srcc"] - report[baseline]["srcc"]
            out.append(f"{title}: {model} - {baseline}: SRCC {diff:+.4f} (no interval).")
        elif key == "distillation" and model in report:
            out.append(
                f"{title}: not judged, this run trained no labeled-only student "
                "(distill_student.labeled_only_baseline: false)."
            )
    if "student_teacher_gflops_ratio" in report:
        out.append(
            f"Cost: the student needs {100 * report['student_teacher_gflops_ratio']:.1f}% "
            "of the teacher's GFLOPs."
        )
    out += metric_notes(report) + advice_notes(report)
    out += steps_notes(report) + provenance_notes(report) + rounds_notes(report)
    out += compression_notes(report)
    return out


# Below this many unlabeled faces per label a missing gain is first put down to the pool's size:
# a heuristic (the sweep in benchmarks/RESULTS.md paid at 1 and 4 faces per label too).
FEW_POOL_PER_LABEL = 4


def regime_notes(report: dict) -> list[str]:
    """The regime the run is in: labeled faces, pseudo-labeled pool, their ratio."""
    r = report.get("regime")
    if not r:
        return []
    return [
        f"Regime: {r['labeled']:,} labeled faces, {r['pool']:,} pseudo-labeled "
        f"({r['pool_per_label']:g} per label)."
    ]


def advice_notes(report: dict) -> list[str]:
    """What to change when a gain the recipe is run for is not there, from what bounds it."""
    deltas = report.get("intervals", {}).get("deltas", {})
    out = []
    few = report.get("regime", {}).get("pool_per_label", FEW_POOL_PER_LABEL) < FEW_POOL_PER_LABEL
    d = deltas.get("distillation", {}).get("srcc")
    if d and d["low"] <= 0.0:
        teacher = max(
            (report[m]["srcc"] for m in ("teacher", "teacher_plus") if m in report), default=None
        )
        base = report.get("student_labeled_only", {}).get("srcc")
        if few:
            why = (
                "the pool is small next to the labels: pseudo-labeling pays where unlabeled "
                "faces outnumber labels many times over; add unlabeled faces"
            )
        elif teacher is not None and base is not None and teacher <= base + 0.01:
            why = (
                f"the teachers ({teacher:.4f}) are no better than the labeled-only student "
                f"({base:.4f}), and a student learns no more than its labels know: give the "
                "teacher more optimizer steps (train_teacher.epochs, min_epoch_rows), more "
                "pixels (teacher.image_size) or pretrained weights (teacher.pretrained_weights)"
            )
        else:
            why = (
                "the teacher is better than the labeled-only student, but the student did not "
                "learn it: give the distillation more steps (distill_student.epochs)"
            )
        out.append(f"Distillation did not pay in this run: {why}.")
    d = deltas.get("self_training", {}).get("srcc")
    if d and d["high"] < 0.0:
        out.append(
            "Self-training lowered the teacher: its pseudo-labels are worse than its labels "
            "teach; lower train_teacher_plus.lr or epochs, or weigh pseudo_u1 less "
            "(train_teacher_plus.source_weights)."
        )
    return out


def rounds_notes(report: dict) -> list[str]:
    """A sentence per self-training round (several rounds only): who labeled U1, how close
    those labels came to its truth, and the round's teacher-plus on validation."""
    out = []
    for r in report.get("self_training", []):
        agree = r.get("pseudo_u1_agreement")
        vs_truth = f", SRCC {agree['srcc']:.4f} against its truth" if agree else ""
        out.append(
            f"Self-training round {r['round']}: U1 labeled by {r['labeled_by']}{vs_truth}; "
            f"its teacher-plus reached validation SRCC {r['val']['srcc']:.4f}."
        )
    return out


def steps_notes(report: dict) -> list[str]:
    """How many optimizer steps each student took: the ablation is fair only when equal."""
    s, lo = report.get("student", {}), report.get("student_labeled_only", {})
    if "optimizer_steps" not in s or "optimizer_steps" not in lo:
        return []
    return [
        f"Training: the distilled student took {s['optimizer_steps']} optimizer steps, the "
        f"labeled-only student {lo['optimizer_steps']} (its smaller table is read over "
        "again, and cut, within each epoch to match)."
    ]


def provenance_notes(report: dict) -> list[str]:
    """Which model labeled which pool, as the tables' ``model_id`` column records it."""
    out = []
    for pool, p in report.get("pseudo_label", {}).items():
        if p.get("labeled_by"):
            ids = ", ".join(p.get("model_ids") or []) or "none"
            out.append(
                f"Provenance: {pool} was pseudo-labeled by {p['labeled_by']} in the run's "
                f"labeling pass {p['round']} (model_id {ids})."
            )
    return out


def compression_notes(report: dict) -> list[str]:
    """A note per pool whose pseudo-labels spread less than the labeled MOS does."""
    labeled = report.get("labeled_mos")
    if not labeled or not labeled.get("std"):
        return []
    out = []
    for pool, p in report.get("pseudo_label", {}).items():
        if "score_std" not in p:
            continue
        ratio = p["score_std"] / labeled["std"]
        if ratio < COMPRESSED_BELOW:
            out.append(
                f"Pseudo-labels of {pool} are compressed: std {p['score_std']:.2f} against "
                f"{labeled['std']:.2f} for the labeled MOS ({100 * ratio:.0f}%), range "
                f"{p['score_min']:.2f}-{p['score_max']:.2f} against "
                f"{labeled['min']:.2f}-{labeled['max']:.2f}: models trained on them learn "
                "a narrower scale."
            )
    return out


def _intervals_note(report: dict) -> str:
    iv = report.get("intervals")
    n = next((report[m]["n"] for m in MODEL_ORDER if m in report and "n" in report[m]), None)
    images = f"{n} test images" if n else "the test set"
    if not iv:
        return f"Test set metrics on {images} (PLCC after a 4-parameter logistic fit)."
    return (
        f"Test set metrics on {images} (PLCC after a 4-parameter logistic fit); 95% intervals "
        f"from {iv['resamples']} paired bootstrap resamples of the test images (seed {iv['seed']})."
    )


def headline_text(report: dict) -> str:
    """The last screen of a run: the headline table and the findings, as plain text."""
    rows = headline_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [_intervals_note(report), ""]
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines += [f"- {f}" for f in findings(report)]
    return "\n".join(lines)


def _markdown(report: dict, plots: list[str]) -> str:
    rows = headline_rows(report)
    lines = [
        "# FIQA self-training and distillation: report",
        "",
        _intervals_note(report),
        "",
        "| "
        + " | ".join(rows[0][:1] + ["arch", "px"] + rows[0][1:3])
        + " | KRCC | RMSE | "
        + " | ".join(rows[0][3:])
        + " |",
        "|---" * (len(rows[0]) + 4) + "|",
    ]
    for row in rows[1:]:
        r = report[row[0]]
        cells = [row[0], r["arch"], str(r["image_size"]), row[1], row[2]]
        krcc, rmse = (
            ("n/a", "n/a")
            if r.get("degenerate")
            else (f"{r['krcc']:.4f}", f"{r['rmse']:.4f}{_fit_mark(r)}")
        )
        cells += [krcc, rmse, row[3], row[4]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Findings", ""] + [f"- {f}" for f in findings(report)]
    lines += [
        "",
        "## Pseudo-labels",
        "",
        "| pool | labeled | rejected | std (labeled MOS: "
        + (f"{report['labeled_mos']['std']:.3f}" if report.get("labeled_mos") else "n/a")
        + ") | SRCC vs truth | PLCC vs truth | RMSE vs truth |",
        "|---|---|---|---|---|---|---|",
    ]
    for pool, p in report.get("pseudo_label", {}).items():
        a = p.get("agreement")
        cells = (
            f"{a['srcc']:.4f} | {a['plcc']:.4f} | {a['rmse_calibrated']:.4f}"
            if a
            else "n/a | n/a | n/a"
        )
        std = f"{p['score_std']:.3f}" if "score_std" in p else "n/a"
        lines.append(f"| {pool} | {p['labeled']} | {p['rejected']} | {std} | {cells} |")
    for pool, p in report.get("pseudo_label", {}).items():
        c = p.get("confidence")
        if c:
            by = ", ".join("n/a" if v is None else f"{v:.3f}" for v in c["rmse_by_spread_quartile"])
            lines.append(
                f"\n{pool}: score_spread (mean {c['spread_mean']:.3f}) ranks the labels' errors "
                f"with SRCC {c['srcc_spread_error']:.3f}; RMSE vs truth by spread quartile, "
                f"lowest first: {by}."
            )
    lines += ["", "## Plots", ""] + [
        f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plots
    ]
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str, report: dict, predictions: dict, pools: dict, histories: dict
) -> dict:
    plots = _plots(storage.join(out_dir, "plots"), predictions, pools, histories, report)
    json_path = storage.join(out_dir, "report.json")
    storage.write_text(json_path, json.dumps(report, indent=2, sort_keys=True))
    md_path = storage.join(out_dir, "report.md")
    storage.write_text(md_path, _markdown(report, plots))
    return {"json": json_path, "md": md_path, "plots": plots}
