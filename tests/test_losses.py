import pytest
import torch

from fiqa.losses import fiqa_loss, plcc_loss


def test_plcc_loss_bounds():
    y = torch.linspace(1, 5, 32)
    assert plcc_loss(2 * y + 3, y).item() == pytest.approx(0.0, abs=1e-6)
    assert plcc_loss(-y, y).item() == pytest.approx(1.0, abs=1e-6)


def test_plcc_loss_matches_numpy_pearson():
    g = torch.Generator().manual_seed(0)
    p, y = torch.randn(64, generator=g), torch.randn(64, generator=g)
    r = torch.corrcoef(torch.stack([p, y]))[0, 1]
    assert plcc_loss(p, y).item() == pytest.approx(((1 - r) / 2).item(), abs=1e-6)


def test_plcc_loss_has_gradient_and_handles_tiny_batches():
    p = torch.randn(8, requires_grad=True)
    plcc_loss(p, torch.randn(8)).backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()
    assert plcc_loss(torch.ones(1), torch.ones(1)).item() == 0.0


def test_fiqa_loss_is_mse_plus_weighted_plcc():
    p, y = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.5, 2.0, 3.0])
    mse = ((p - y) ** 2).mean()
    assert fiqa_loss(p, y, plcc_weight=0.0).item() == pytest.approx(mse.item())
    assert fiqa_loss(p, y, plcc_weight=1.0).item() == pytest.approx((mse + plcc_loss(p, y)).item())


def test_fiqa_loss_per_sample_weights():
    p, y = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 3.0])
    w = torch.tensor([1.0, 0.0])  # second sample ignored
    assert fiqa_loss(p, y, w, plcc_weight=0.0).item() == pytest.approx(1.0)
