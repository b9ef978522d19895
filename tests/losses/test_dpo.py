"""DPO and IPO losses against plain-Python reference computations on random tensors."""

import math

import pytest
import torch

from preflab.losses.dpo import dpo_loss, ipo_loss


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(8, generator=g) * 40) for _ in range(4)]


@pytest.mark.parametrize("seed, beta, eps", [(0, 0.1, 0.0), (1, 0.5, 0.0), (2, 0.1, 0.2)])
def test_dpo_matches_reference(seed, beta, eps):
    pc, pr, rc, rr = _data(seed)
    out = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    for i in range(8):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        ref = -(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h)
        assert out.losses[i].item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), rel=1e-5)


def test_dpo_at_reference_is_log2_and_gradient_pushes_apart():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-6.0], requires_grad=True)
    out = dpo_loss(pc, pr, pc.detach(), pr.detach(), beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(2))
    out.losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)


@pytest.mark.parametrize("seed, beta", [(3, 0.1), (4, 1.0)])
def test_ipo_matches_reference(seed, beta):
    pc, pr, rc, rr = _data(seed)
    out = ipo_loss(pc, pr, rc, rr, beta=beta)
    for i in range(8):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert out.losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-4)
