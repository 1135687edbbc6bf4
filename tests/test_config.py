from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from fiqa.config import (
    ConfigError,
    ScoringConfig,
    batch_plan,
    effective_lr,
    from_dict,
    load_config,
)

REPO = Path(__file__).resolve().parent.parent


def minimal(**over):
    raw = {
        "run_dir": "runs/x",
        "data": {
            k: f"d/{k}"
            for k in ("labeled_train", "labeled_val", "test", "unlabeled_1", "unlabeled_2")
        },
    }
    raw.update(over)
    return raw


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.data.label_field == "mos"


def test_paper_config_keeps_the_papers_models():
    cfg = load_config(REPO / "configs" / "paper.yaml")
    assert (cfg.teacher.arch, cfg.teacher.image_size) == ("swin_base_patch4_window7_224", 448)
    assert (cfg.student.arch, cfg.student.image_size) == ("edgenext_xx_small", 352)


def test_paper_config_trains_as_the_released_code():
    """sunwei925/Efficient-FIQA @0e63bc7: AdamW 1e-4, wd 1e-6, StepLR(10, 0.1), 30 epochs,
    batch 32, images resized to the input without crops or flips."""
    cfg = load_config(REPO / "configs" / "paper.yaml")
    for name in ("train_teacher", "train_teacher_plus", "distill_student"):
        t = getattr(cfg, name)
        assert (t.lr, t.weight_decay, t.epochs, t.batch_size) == (1e-4, 1e-6, 30, 32), name
        assert (t.schedule, t.lr_step_epochs, t.lr_gamma, t.hflip) == ("step", 10, 0.1, False)
    assert cfg.teacher.resize == cfg.teacher.image_size
    assert cfg.student.resize == cfg.student.image_size


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train_teacher\.lrr"):
        from_dict(minimal(train_teacher={"lrr": 0.1}))
    with pytest.raises(ConfigError, match="unknown key datta"):
        from_dict(minimal(datta={}))


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train_teacher\.epochs"):
        from_dict(minimal(train_teacher={"epochs": "many"}))
    with pytest.raises(ConfigError, match=r"train_teacher\.use_gpu"):
        from_dict(minimal(train_teacher={"use_gpu": "yes"}))
    with pytest.raises(ConfigError, match=r"scoring\.pin_cores"):
        from_dict(minimal(scoring={"pin_cores": "auto"}))  # true, false or null
    assert from_dict(minimal(scoring={"pin_cores": False})).scoring.pin_cores is False


def test_required_keys():
    raw = minimal()
    del raw["data"]["unlabeled_2"]
    with pytest.raises(ConfigError, match=r"data\.unlabeled_2: required"):
        from_dict(raw)


def test_semantic_checks():
    with pytest.raises(ConfigError, match="divide"):
        from_dict(minimal(train_teacher={"batch_size": 10, "num_workers": 3}))
    with pytest.raises(ConfigError, match="init_from"):
        from_dict(minimal(train_teacher_plus={"init_from": "nowhere"}))
    with pytest.raises(ConfigError, match="train_teacher.labeled_only_baseline: applies to"):
        from_dict(minimal(train_teacher={"labeled_only_baseline": False}))
    with pytest.raises(ConfigError, match=r"train_teacher_plus\.rounds"):
        from_dict(minimal(train_teacher_plus={"rounds": 0}))
    with pytest.raises(ConfigError, match=r"distill_student\.rounds.*belong"):
        from_dict(minimal(distill_student={"rounds": 2}))
    assert from_dict(minimal(train_teacher_plus={"rounds": 3})).train_teacher_plus.rounds == 3
    with pytest.raises(ConfigError, match="scoring.buffer_mb"):
        from_dict(minimal(scoring={"buffer_mb": 1}))
    with pytest.raises(ConfigError, match="scoring.concurrency"):
        from_dict(minimal(scoring={"concurrency": [4, 2]}))
    with pytest.raises(ConfigError, match="distill_student.schedule: expected step or cosine"):
        from_dict(minimal(distill_student={"schedule": "linear"}))
    for warm in (8, -1):
        with pytest.raises(ConfigError, match="warmup_epochs: must be >= 0 and below epochs"):
            from_dict(minimal(distill_student={"epochs": 8, "warmup_epochs": warm}))


def test_the_batch_and_lr_checks_are_the_ones_training_applies():
    from fiqa import training

    assert training.batch_plan is batch_plan and training.effective_lr is effective_lr
    # fewer rows than workers: no micro-batch of >= 1 row splits the global batch
    with pytest.raises(
        ConfigError, match=r"distill_student\.batch_size: .* num_workers=4 x micro_batch_size=1 "
    ):
        from_dict(minimal(distill_student={"batch_size": 2, "num_workers": 4}))
    with pytest.raises(ConfigError, match=r"train_teacher_plus\.lr_reference_batch: required"):
        from_dict(minimal(train_teacher_plus={"lr_scaling": "sqrt", "lr_reference_batch": 0}))
    t = from_dict(
        minimal(
            train_teacher={
                "batch_size": 48,
                "num_workers": 2,
                "lr": 1e-3,
                "lr_scaling": "linear",
                "lr_reference_batch": 24,
            }
        )
    ).train_teacher
    assert batch_plan(t) == (24, 1) and effective_lr(t) == pytest.approx(2e-3)


def test_overrides_parse_yaml_values():
    cfg = from_dict(
        minimal(),
        [
            "train_teacher.epochs=3",
            "train_teacher.lr=1e-4",
            "data.labeled_train=[a.tar, b.tar]",
            "distill_student.source_weights={pseudo_u1: 0.5}",
        ],
    )
    assert cfg.train_teacher.epochs == 3
    assert cfg.train_teacher.lr == pytest.approx(1e-4)
    assert cfg.data.labeled_train == ["a.tar", "b.tar"]
    assert cfg.distill_student.source_weights == {"pseudo_u1": 0.5}


def test_bad_override():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        from_dict(minimal(), ["train_teacher.epochs"])
    with pytest.raises(ConfigError, match=r"train_teacher\.nope"):
        from_dict(minimal(), ["train_teacher.nope=1"])


def test_fingerprint_tracks_sections():
    a, b = from_dict(minimal()), from_dict(minimal(), ["distill_student.epochs=99"])
    assert a.fingerprint("train_teacher") == b.fingerprint("train_teacher")
    assert a.fingerprint("distill_student") != b.fingerprint("distill_student")


def test_fingerprint_tracks_what_a_stage_computes_not_how_it_runs():
    import hashlib
    import json

    from fiqa.config import UNFINGERPRINTED

    a = from_dict(minimal())
    for key in ("scoring.concurrency=[1, 4]", "scoring.num_gpus=0.5", "scoring.buffer_mb=900"):
        assert from_dict(minimal(), [key]).fingerprint("scoring") == a.fingerprint("scoring"), key
    truth = from_dict(minimal(), ["data.unlabeled_2_truth=truth.csv"])
    assert truth.fingerprint("data") == a.fingerprint("data")
    for key in ("scoring.precision=32-true", "scoring.views=crops", "data.min_image_side=32"):
        section = key.split(".")[0]
        assert from_dict(minimal(), [key]).fingerprint(section) != a.fingerprint(section), key
    assert set(UNFINGERPRINTED["scoring"]) < {f.name for f in fields(ScoringConfig)}
    # CPU scoring decodes and computes otherwise than GPU scoring
    cpu = from_dict(minimal(), ["scoring.num_gpus=0"])
    assert cpu.fingerprint("scoring") != a.fingerprint("scoring")
    # legacy: every key hashed, as runs were fingerprinted before (the runner accepts those);
    # a config at the defaults hashes the same either way
    b = from_dict(minimal(), ["scoring.concurrency=[1, 4]"])
    for cfg in (a, b):
        d = cfg.to_dict()
        old = hashlib.sha256(json.dumps({"scoring": d["scoring"]}, sort_keys=True).encode())
        assert cfg.fingerprint("scoring", legacy=True) == old.hexdigest()[:16]
    assert a.fingerprint("scoring") == a.fingerprint("scoring", legacy=True)
    assert b.fingerprint("scoring") != b.fingerprint("scoring", legacy=True)


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_a_renamed_section_names_its_new_key():
    with pytest.raises(ConfigError, match=r"pseudo_label: renamed to scoring"):
        from_dict(minimal(pseudo_label={"batch_size": 8}))
    with pytest.raises(ConfigError, match=r"pseudo_label: renamed to scoring"):
        from_dict(minimal(), ["pseudo_label.batch_size=8"])


def test_min_epoch_rows_below_one_batch_is_refused():
    with pytest.raises(ConfigError, match=r"distill_student\.min_epoch_rows"):
        from_dict(minimal(distill_student={"min_epoch_rows": 10, "batch_size": 64}))


def test_an_unset_added_key_leaves_the_fingerprint_of_earlier_runs():
    """`min_epoch_rows` came after runs were fingerprinted: unset, a run keeps its hash (and
    its finished stages); set, the stage it belongs to is another computation."""
    base = from_dict(minimal())
    raw = dict(base.to_dict())
    for section in ("train_teacher", "train_teacher_plus", "distill_student"):
        del raw[section]["min_epoch_rows"]  # the config as earlier versions hashed it
    import hashlib
    import json

    old = hashlib.sha256(
        json.dumps({"train_teacher": raw["train_teacher"]}, sort_keys=True).encode()
    )
    assert base.fingerprint("train_teacher") == old.hexdigest()[:16]
    changed = from_dict(minimal(train_teacher={"min_epoch_rows": 2048}))
    assert changed.fingerprint("train_teacher") != base.fingerprint("train_teacher")
    assert changed.fingerprint("distill_student") == base.fingerprint("distill_student")
