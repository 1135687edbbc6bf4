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


def _plots(out: str, predictions: dict, pools: dict, histories: dict) -> list[str]:
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
        ax.set(title=name, xlabel="MOS", ylabel="prediction (logistic-mapped)")
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
        ax.set(title=f"{pool}: pseudo-labels", xlabel="score (MOS scale)", ylabel="count")
        ax.legend()
    fig.tight_layout()
    files.append(storage.join(out, "pseudo_label_hist.png"))
    _save(fig, files[-1])
    plt.close(fig)

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 3.8))
    for name, hist in histories.items():
        ep = [h["epoch"] for h in hist]
        line = a1.plot(ep, [h["train_loss"] for h in hist], marker="o", label=name)[0]
        a3.plot(ep, [h["val_srcc"] for h in hist], marker="o", label=name)
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


def _markdown(report: dict, plots: list[str]) -> str:
    lines = [
        "# FIQA self-training and distillation: report",
        "",
        "Test set metrics (PLCC and RMSE after a 4-parameter logistic fit).",
        "",
        "| model | arch | px | SRCC | PLCC | KRCC | RMSE | GFLOPs | params (M) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in MODEL_ORDER:
        if name in report:
            r = report[name]
            lines.append(
                f"| {name} | {r['arch']} | {r['image_size']} | {r['srcc']:.4f} | {r['plcc']:.4f} | "
                f"{r['krcc']:.4f} | {r['rmse']:.4f} | {r['gflops']:.3f} | {r['params_m']:.2f} |"
            )
    lines += ["", "## Findings", ""]
    t, tp = report.get("teacher"), report.get("teacher_plus")
    s, sl = report.get("student"), report.get("student_labeled_only")
    if t and tp:
        verdict = "does not trail" if tp["srcc"] >= t["srcc"] else "TRAILS"
        lines.append(
            f"- Self-training: teacher-plus {verdict} the teacher "
            f"(SRCC {tp['srcc']:.4f} vs {t['srcc']:.4f})."
        )
    if s and sl:
        verdict = "beats" if s["srcc"] > sl["srcc"] else "does NOT beat"
        lines.append(
            f"- Distillation: the distilled student {verdict} the labeled-only student "
            f"(SRCC {s['srcc']:.4f} vs {sl['srcc']:.4f})."
        )
    if "student_teacher_gflops_ratio" in report:
        lines.append(
            f"- Cost: the student needs {100 * report['student_teacher_gflops_ratio']:.1f}% "
            f"of the teacher's GFLOPs."
        )
    lines += [
        "",
        "## Pseudo-labels",
        "",
        "| pool | labeled | rejected | SRCC vs truth | PLCC vs truth | RMSE vs truth |",
        "|---|---|---|---|---|---|",
    ]
    for pool, p in report.get("pseudo_label", {}).items():
        a = p.get("agreement")
        cells = (
            f"{a['srcc']:.4f} | {a['plcc']:.4f} | {a['rmse_calibrated']:.4f}"
            if a
            else "n/a | n/a | n/a"
        )
        lines.append(f"| {pool} | {p['labeled']} | {p['rejected']} | {cells} |")
    lines += ["", "## Plots", ""] + [
        f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plots
    ]
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str, report: dict, predictions: dict, pools: dict, histories: dict
) -> dict:
    plots = _plots(storage.join(out_dir, "plots"), predictions, pools, histories)
    json_path = storage.join(out_dir, "report.json")
    storage.write_text(json_path, json.dumps(report, indent=2, sort_keys=True))
    md_path = storage.join(out_dir, "report.md")
    storage.write_text(md_path, _markdown(report, plots))
    return {"json": json_path, "md": md_path, "plots": plots}
