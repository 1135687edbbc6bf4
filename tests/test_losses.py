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


def _loss_before_weighting(pred, target, weight=None, plcc_weight=1.0):
    """fiqa_loss as it was before the PLCC term took the weights: the reference for weight 1."""
    pred, target = pred.flatten().float(), target.flatten().float()
    se = (pred - target) ** 2
    mse = se.mean() if weight is None else (se * weight).sum() / weight.sum().clamp_min(1e-8)
    p, t = pred - pred.mean(), target - target.mean()
    r = (p * t).sum() / (p.norm() * t.norm() + 1e-8)
    return mse + plcc_weight * (1.0 - r) / 2.0


@pytest.mark.parametrize("n", [2, 3, 8, 49, 256])
def test_weight_one_everywhere_is_exactly_the_unweighted_loss(n):
    g = torch.Generator().manual_seed(n)
    y = torch.randn(n, generator=g)
    grads = []
    for loss_fn in (
        lambda p: fiqa_loss(p, y),
        lambda p: fiqa_loss(p, y, torch.ones(n)),
        lambda p: _loss_before_weighting(p, y, torch.ones(n)),
    ):
        p = torch.randn(n, generator=torch.Generator().manual_seed(1)).requires_grad_()
        loss = loss_fn(p)
        loss.backward()
        grads.append((loss.detach(), p.grad))
    for loss, grad in grads[1:]:
        assert torch.equal(loss, grads[0][0]) and torch.equal(grad, grads[0][1])


def test_weighted_plcc_matches_the_weighted_pearson_formula():
    g = torch.Generator().manual_seed(0)
    p, y, w = (
        torch.randn(32, generator=g),
        torch.randn(32, generator=g),
        torch.rand(32, generator=g),
    )
    pd, yd, wd = p.double(), y.double(), w.double()
    mp, my = (wd * pd).sum() / wd.sum(), (wd * yd).sum() / wd.sum()
    cov = (wd * (pd - mp) * (yd - my)).sum()
    r = cov / torch.sqrt((wd * (pd - mp) ** 2).sum() * (wd * (yd - my) ** 2).sum())
    assert plcc_loss(p, y, w).item() == pytest.approx(((1 - r) / 2).item(), abs=1e-6)
    # integer weights are repeated rows
    reps = torch.tensor([1, 2, 3, 1] * 8)
    assert plcc_loss(p, y, reps.float()).item() == pytest.approx(
        plcc_loss(p.repeat_interleave(reps), y.repeat_interleave(reps)).item(), abs=1e-6
    )


def test_weight_zero_rows_have_no_effect_on_the_full_loss():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(16, generator=g)
    w = (torch.arange(16) % 4 != 0).float()  # every 4th row weighs 0
    p = torch.randn(16, generator=g).requires_grad_()
    loss = fiqa_loss(p, y, w, plcc_weight=1.0)
    loss.backward()
    assert torch.all(p.grad[w == 0] == 0) and torch.all(p.grad[w > 0] != 0)
    # their predictions and targets can be anything: the loss is that of the other rows
    wild_p, wild_y = p.detach().clone(), y.clone()
    wild_p[w == 0], wild_y[w == 0] = 1e3, -1e3
    kept = w > 0
    assert fiqa_loss(wild_p, wild_y, w).item() == pytest.approx(loss.item(), rel=1e-5)
    assert fiqa_loss(p.detach()[kept], y[kept]).item() == pytest.approx(loss.item(), rel=1e-5)


def test_all_zero_weights_give_no_gradient():
    p = torch.randn(8, requires_grad=True)
    fiqa_loss(p, torch.randn(8), torch.zeros(8)).backward()
    assert torch.equal(p.grad, torch.zeros(8))
