"""The loss through `GradAccumulator` (plain PyTorch, no Ray): what a split of the global
batch into micro-batches changes, weight-0 rows, and the epoch score's NaN safety."""

import math

import numpy as np
import pytest
import torch

from fiqa.metrics import quality_metrics
from fiqa.training.loop import epoch_score
from fiqa.training.step import GradAccumulator

ROWS = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rows(weight: torch.Tensor | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixels": torch.randint(0, 256, (ROWS, 4, 4, 3), generator=g, dtype=torch.uint8),
        "target": 1 + 4 * torch.rand(ROWS, generator=g),
        "weight": torch.ones(ROWS) if weight is None else weight,
        "source_id": torch.arange(ROWS) % 2,
    }


def gradient(batch: dict, micro: int, plcc_weight: float) -> torch.Tensor:
    """The global batch's gradient, accumulated over micro-batches of ``micro`` rows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 1))
    acc = GradAccumulator(
        model, ROWS // micro, 2, target_mean=3.0, target_std=1.2, plcc_weight=plcc_weight
    )
    done = [
        acc.backward({k: v[i : i + micro] for k, v in batch.items()}) for i in range(0, ROWS, micro)
    ]
    assert done[-1]
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize(
    "weight",
    [None, torch.tensor([0.5, 1.0] * (ROWS // 2))],  # every micro-batch: the same weight sum
    ids=["uniform", "equal-sums"],
)
def test_mse_part_gradient_is_the_same_for_any_split(weight):
    batch = rows(weight)
    whole = gradient(batch, ROWS, plcc_weight=0.0)
    for micro in (8, 4, 2):
        torch.testing.assert_close(gradient(batch, micro, plcc_weight=0.0), whole)


def test_plcc_part_is_a_per_micro_batch_estimate():
    """Documented, not a bug: the PLCC term's gradient changes with the split."""
    batch = rows()
    assert not torch.allclose(gradient(batch, 4, 1.0), gradient(batch, ROWS, 1.0), rtol=1e-3)


@pytest.mark.parametrize("micro", [ROWS, 4])
def test_weight_zero_rows_have_no_gradient_under_the_full_loss(micro):
    weight = (torch.arange(ROWS) % 4 != 0).float()
    batch = rows(weight)
    other = rows(weight, seed=1)  # other pixels and targets everywhere
    changed = {
        k: torch.where((weight == 0).view(-1, *[1] * (v.dim() - 1)), other[k], v)
        for k, v in batch.items()
    }
    assert not torch.equal(changed["pixels"], batch["pixels"])
    torch.testing.assert_close(gradient(changed, micro, 1.0), gradient(batch, micro, 1.0))


def test_a_nan_epoch_never_scores_best():
    nan_val = quality_metrics(np.ones(8), np.arange(8.0))  # constant predictions
    assert math.isnan(nan_val["srcc"])
    scores = [epoch_score(nan_val), epoch_score({"srcc": 0.1, "plcc": 0.3}), epoch_score(nan_val)]
    assert scores[0] == -math.inf and scores[1] == pytest.approx(0.2)
    # export_best takes max over Ray Train's kept checkpoints; Progress.best is max so far
    assert max(scores) == scores[1] and max(-math.inf, *scores) == scores[1]
