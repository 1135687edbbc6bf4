"""The learning-rate schedules (`fiqa.training.schedule`) and the training flip switch."""

from __future__ import annotations

import numpy as np
import pytest

from fiqa.config import TrainConfig
from fiqa.data.transforms import random_crop_flip
from fiqa.training.schedule import lr_factor, position


def test_step_schedule_changes_the_lr_only_at_epoch_boundaries():
    t = TrainConfig(epochs=6, schedule="step", lr_step_epochs=2, lr_gamma=0.5)
    for epoch in range(6):
        for step in range(1, 11):  # every step of a 10-step epoch, the last one included
            assert lr_factor(t, position(epoch, step, 10)) == 0.5 ** (epoch // 2)


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    t = TrainConfig(epochs=4, schedule="cosine", warmup_epochs=0.5)
    assert lr_factor(t, 0.25) == pytest.approx(0.5)  # half-way up the ramp
    assert lr_factor(t, 0.5) == pytest.approx(1.0)
    assert lr_factor(t, 0.5 + 3.5 / 2) == pytest.approx(0.5)  # half-way down the cosine
    assert lr_factor(t, 4.0) == pytest.approx(0.0, abs=1e-12)
    after = [lr_factor(t, 0.5 + x) for x in np.linspace(0, 3.5, 50)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))


def test_warm_up_also_ramps_the_step_schedule():
    t = TrainConfig(epochs=4, schedule="step", lr_step_epochs=10, warmup_epochs=1.0)
    assert lr_factor(t, 0.5) == pytest.approx(0.5)
    assert lr_factor(t, 1.5) == pytest.approx(1.0)


def test_a_position_stays_in_its_epoch_until_the_next_begins():
    assert position(2, 0, 10) == 2.0
    assert 2.99 < position(2, 10, 10) < 3.0
    assert position(2, 50, 10) < 3.0  # more steps than expected (a row-count estimate)
    assert position(3, 5, 0) == 3.0


def test_training_crops_flip_only_when_asked():
    img = np.repeat(np.arange(10 * 12, dtype=np.uint8).reshape(10, 12, 1), 3, axis=2)
    flipped = 0
    for seed in range(40):
        plain = random_crop_flip(img, 8, np.random.default_rng(seed), flip=False)
        again = random_crop_flip(img, 8, np.random.default_rng(seed), flip=True)
        # the same crop window either way; flipped or not, a row's values are the window's
        assert plain.shape == (8, 8, 3)
        if not np.array_equal(plain, again):
            flipped += 1
            assert np.array_equal(plain, again[:, ::-1])
        assert (np.diff(plain[..., 0].astype(int), axis=1) > 0).all()  # never mirrored
    assert 10 < flipped < 30
