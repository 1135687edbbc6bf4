"""The report's headline table and findings: the last screen of a run and report.md."""

from fiqa.report import _markdown, findings, headline_rows, headline_text

MODELS = ("teacher", "teacher_plus", "student", "student_labeled_only")


def ci(value, low, high):
    return {"value": value, "low": low, "high": high}


def notes_about(report, prefix):
    return [x for x in findings(report) if x.startswith(prefix)]


def a_report():
    report = {
        m: {
            "srcc": 0.8 - 0.1 * i,
            "plcc": 0.81 - 0.1 * i,
            "krcc": 0.6,
            "rmse": 0.5,
            "gflops": 0.5 if i < 2 else 0.05,
            "params_m": 5.0 if i < 2 else 1.5,
            "arch": "resnet10t",
            "image_size": 64,
            "n": 600,
        }
        for i, m in enumerate(MODELS)
    }
    report["intervals"] = {
        "models": {
            m: {
                "srcc": ci(0.8 - 0.1 * i, 0.77 - 0.1 * i, 0.83 - 0.1 * i),
                "plcc": ci(0.81, 0.78, 0.84),
            }
            for i, m in enumerate(MODELS)
        },
        "deltas": {
            "self_training": {"srcc": ci(0.0025, -0.01, 0.015), "plcc": ci(0.001, -0.012, 0.014)},
            "distillation": {"srcc": ci(0.29, 0.25, 0.33), "plcc": ci(0.3, 0.26, 0.34)},
        },
        "resamples": 1000,
        "seed": 0,
    }
    report["student_teacher_gflops_ratio"] = 0.1
    report["labeled_mos"] = {"std": 1.0, "min": 1.0, "max": 5.0}
    report["pseudo_label"] = {
        "unlabeled_1": {
            "labeled": 1600,
            "rejected": 0,
            "score_std": 0.55,
            "score_min": 1.7,
            "score_max": 4.7,
        },
        "unlabeled_2": {
            "labeled": 1600,
            "rejected": 0,
            "score_std": 0.95,
            "score_min": 1.1,
            "score_max": 4.9,
        },
    }
    return report


def test_the_headline_table_has_every_model_with_its_intervals():
    lines = headline_text(a_report()).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert "SRCC [95% CI]" in lines[header] and "PLCC [95% CI]" in lines[header]
    rows = lines[header + 1 : header + 5]
    assert [r.split()[0] for r in rows] == list(MODELS)
    assert "0.8000 [0.7700, 0.8300]" in rows[0]
    assert len({len(r) for r in rows}) == 1  # the columns line up
    assert "600 test images" in lines[0] and "1000 paired bootstrap resamples" in lines[0]


def test_findings_call_an_interval_containing_zero_within_noise():
    f = findings(a_report())
    self_training = next(x for x in f if x.startswith("Self-training"))
    assert "within noise" in self_training and "+0.0025 [-0.0100, +0.0150]" in self_training
    distillation = next(x for x in f if x.startswith("Distillation"))
    assert "within noise" not in distillation
    assert "the distilled student beats the labeled-only student" in distillation


def test_a_difference_below_zero_trails():
    report = a_report()
    report["intervals"]["deltas"]["self_training"]["srcc"] = ci(-0.05, -0.08, -0.02)
    self_training = next(x for x in findings(report) if x.startswith("Self-training"))
    assert "teacher-plus TRAILS the teacher" in self_training


def test_compressed_pseudo_labels_get_a_note_and_others_none():
    notes = notes_about(a_report(), "Pseudo-labels")
    assert len(notes) == 1 and "unlabeled_1" in notes[0]
    assert "std 0.55 against 1.00" in notes[0] and "1.70-4.70 against 1.00-5.00" in notes[0]


def test_report_md_has_the_same_table_and_findings():
    md = _markdown(a_report(), ["/x/plots/pred_vs_mos.png"])
    assert "| teacher | resnet10t | 64 | 0.8000 [0.7700, 0.8300] |" in md
    for line in findings(a_report()):
        assert f"- {line}" in md
    assert "| unlabeled_1 | 1600 | 0 | 0.550 | n/a | n/a | n/a |" in md
    assert "score_spread" not in md  # one view: no confidence to speak of


def test_report_md_says_what_the_pseudo_labels_spread_is_worth():
    report = a_report()
    report["pseudo_label"]["unlabeled_1"]["confidence"] = {
        "spread_mean": 0.12,
        "srcc_spread_error": 0.31,
        "rmse_by_spread_quartile": [0.2, 0.25, 0.3, 0.5],
    }
    md = _markdown(report, [])
    assert (
        "unlabeled_1: score_spread (mean 0.120) ranks the labels' errors with SRCC 0.310; "
        "RMSE vs truth by spread quartile, lowest first: 0.200, 0.250, 0.300, 0.500." in md
    )


def test_each_self_training_round_gets_a_finding_and_one_round_none():
    assert not notes_about(a_report(), "Self-training round")
    report = a_report()
    report["self_training"] = [
        {
            "round": 1,
            "labeled_by": "train_teacher:abc",
            "pseudo_u1_agreement": {"srcc": 0.81},
            "val": {"srcc": 0.83},
        },
        {
            "round": 2,
            "labeled_by": "train_teacher_plus/round_1:def",
            "pseudo_u1_agreement": None,  # no truth for U1
            "val": {"srcc": 0.84},
        },
    ]
    notes = notes_about(report, "Self-training round")
    assert notes == [
        "Self-training round 1: U1 labeled by train_teacher:abc, SRCC 0.8100 against its "
        "truth; its teacher-plus reached validation SRCC 0.8300.",
        "Self-training round 2: U1 labeled by train_teacher_plus/round_1:def; its "
        "teacher-plus reached validation SRCC 0.8400.",
    ]


def test_provenance_counts_labeling_passes_apart_from_self_training_rounds():
    report = a_report()
    report["pseudo_label"] = {  # two self-training rounds: U1 relabeled, U2 the third pass
        "unlabeled_1": {
            "round": 2,
            "labeled_by": "train_teacher_plus round 1",
            "model_ids": ["train_teacher_plus/round_1:def"],
        },
        "unlabeled_2": {"round": 3, "labeled_by": "train_teacher_plus", "model_ids": []},
    }
    notes = notes_about(report, "Provenance")
    assert notes == [
        "Provenance: unlabeled_1 was pseudo-labeled by train_teacher_plus round 1 in the run's "
        "labeling pass 2 (model_id train_teacher_plus/round_1:def).",
        "Provenance: unlabeled_2 was pseudo-labeled by train_teacher_plus in the run's "
        "labeling pass 3 (model_id none).",
    ]


def test_a_report_without_intervals_still_renders():
    report = a_report()
    del report["intervals"]
    text = headline_text(report)
    assert "0.8000" in text and "no interval" in text


def test_write_report_with_metrics_in_the_plot_titles(tmp_path):
    import numpy as np

    from fiqa.pipelines.evaluate import paired_intervals, spread
    from fiqa.report import write_report

    rng = np.random.default_rng(0)
    mos = rng.uniform(1, 5, 80)
    keys = [f"k{i:03d}" for i in range(80)]
    predictions = {}
    for i, m in enumerate(MODELS):
        order = rng.permutation(80)  # each model's table lists the images in its own order
        pred = mos + rng.normal(0, 0.3 + 0.3 * i, 80)
        predictions[m] = {"pred": pred[order], "mos": mos[order], "keys": [keys[j] for j in order]}
    report = a_report()
    report["intervals"] = paired_intervals(predictions, seed=0)
    report["labeled_mos"] = spread(mos)
    pools = {"unlabeled_1": {"score": 3 + 0.5 * rng.normal(size=50), "truth": None}}
    history = [{"epoch": 1, "train_loss": 1.0, "val_srcc": 0.5, "loss_by_source": {"labeled": 1}}]
    paths = write_report(str(tmp_path), report, predictions, pools, {"teacher": history})
    assert all((tmp_path / "plots" / p).stat().st_size > 5000 for p in ("pred_vs_mos.png",))
    assert set(report["intervals"]["deltas"]) == {"self_training", "distillation"}
    teacher = report["intervals"]["models"]["teacher"]["srcc"]
    assert teacher["low"] < teacher["value"] < teacher["high"] and teacher["value"] > 0.9
    assert "| teacher |" in (tmp_path / "report.md").read_text() and paths["plots"]


def test_a_run_without_the_labeled_only_student_says_distillation_is_not_judged():
    report = a_report()
    del report["student_labeled_only"]
    del report["intervals"]["models"]["student_labeled_only"]
    del report["intervals"]["deltas"]["distillation"]
    (note,) = notes_about(report, "Distillation")
    assert "not judged" in note and "labeled_only_baseline: false" in note
    assert [r[0] for r in headline_rows(report)[1:]] == ["teacher", "teacher_plus", "student"]
    assert "student_labeled_only" not in _markdown(report, []).replace(note, "")


def test_the_regime_is_named_first():
    report = a_report()
    report["regime"] = {"labeled": 400, "pool": 8000, "pool_per_label": 20.0}
    assert findings(report)[0] == "Regime: 400 labeled faces, 8,000 pseudo-labeled (20 per label)."


def _no_distillation_gain(report, teacher, labeled_only, pool_per_label=20.0):
    report["intervals"]["deltas"]["distillation"]["srcc"] = ci(-0.01, -0.03, 0.01)
    report["teacher"]["srcc"], report["teacher_plus"]["srcc"] = teacher, teacher
    report["student_labeled_only"]["srcc"] = labeled_only
    report["regime"] = {
        "labeled": 400,
        "pool": int(400 * pool_per_label),
        "pool_per_label": pool_per_label,
    }
    return notes_about(report, "Distillation did not pay")


def test_no_distillation_gain_says_what_bounds_it_and_what_to_change():
    (weak_teacher,) = _no_distillation_gain(a_report(), teacher=0.70, labeled_only=0.70)
    assert "no better than the labeled-only student" in weak_teacher
    assert "train_teacher.epochs" in weak_teacher and "teacher.image_size" in weak_teacher
    (unlearned,) = _no_distillation_gain(a_report(), teacher=0.80, labeled_only=0.70)
    assert "distill_student.epochs" in unlearned
    (small_pool,) = _no_distillation_gain(a_report(), 0.8, 0.7, pool_per_label=1.0)
    assert "add unlabeled faces" in small_pool
    assert notes_about(a_report(), "Distillation did not pay") == []  # a gain: no advice


def test_self_training_below_zero_beyond_noise_gets_advice():
    report = a_report()
    assert notes_about(report, "Self-training lowered") == []  # within noise: no advice
    report["intervals"]["deltas"]["self_training"]["srcc"] = ci(-0.05, -0.08, -0.02)
    (advice,) = notes_about(report, "Self-training lowered")
    assert "train_teacher_plus.source_weights" in advice


def test_a_failed_fit_marks_plcc_and_rmse_and_degenerate_figures_are_na():
    report = a_report()
    report["teacher"]["logistic_fit"] = "failed: maxfev reached"
    report["student"]["degenerate"] = "constant predictions"
    rows = {r[0]: r for r in headline_rows(report)}
    assert rows["teacher"][2].endswith("†") and "†" not in rows["teacher"][1]
    assert rows["student"][1:3] == ["n/a", "n/a"]
    (fit,) = notes_about(report, "teacher:")
    assert "maxfev reached" in fit and "unfitted" in fit
    assert notes_about(report, "student:") == ["student: no figures (n/a): constant predictions."]
    md = _markdown(report, [])
    assert "| n/a | n/a |" in md and "0.5000†" in md
