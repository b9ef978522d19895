"""KL estimators against exact KL on small categorical distributions; controllers against their formulas."""

import math

import numpy as np
import pytest
import torch

from preflab.losses.kl import (
    AdaptiveKLController,
    AlarmKLController,
    FixedKLController,
    adaptive_beta,
    kl_full,
    kl_k1,
    kl_k3,
)


def test_estimators_are_unbiased_for_exact_kl():
    q = torch.tensor([0.5, 0.3, 0.2])
    p = torch.tensor([0.2, 0.5, 0.3])
    exact = sum(qi * math.log(qi / pi) for qi, pi in zip(q.tolist(), p.tolist(), strict=True))
    lq, lp = q.log(), p.log()
    # expectation under q, computed exactly over the support
    assert (q * kl_k1(lq, lp)).sum().item() == pytest.approx(exact, rel=1e-5)
    assert (q * kl_k3(lq, lp)).sum().item() == pytest.approx(exact, rel=1e-5)
    assert (kl_k3(lq, lp) >= 0).all()


def test_kl_full_is_the_exact_kl_of_each_state_and_differentiable():
    g = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    q, p = logits.softmax(-1).double().numpy(), ref_logits.softmax(-1).double().numpy()
    exact = (q * (np.log(q) - np.log(p))).sum(-1)  # independent: probabilities, not log-softmax
    got = kl_full(logits, ref_logits.log_softmax(-1))
    np.testing.assert_allclose(got.numpy(), exact, rtol=1e-5, atol=1e-6)
    assert got.shape == (2, 3) and (got >= 0).all()
    assert kl_full(ref_logits, ref_logits.log_softmax(-1)).abs().max() < 1e-6  # the reference itself: 0
    # it is E_q[k1] at that state
    lq = logits.log_softmax(-1)
    torch.testing.assert_close((lq.exp() * kl_k1(lq, ref_logits.log_softmax(-1))).sum(-1), got)
    x = logits.clone().requires_grad_()
    kl_full(x, ref_logits.log_softmax(-1)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_k3_elementwise():
    lq, lp = torch.tensor([-1.0]), torch.tensor([-2.5])
    r = math.exp(-2.5 + 1.0)
    assert kl_k3(lq, lp).item() == pytest.approx(r - 1 - math.log(r))
    assert kl_k1(lq, lp).item() == pytest.approx(1.5)


@pytest.mark.parametrize("kl, expected_e", [(0.5, -0.2), (0.9, -0.1), (1.0, 0.0), (1.1, 0.1), (3.0, 0.2)])
def test_adaptive_controller_follows_ziegler_formula(kl, expected_e):
    c = AdaptiveKLController(0.02, target=1.0, horizon=1000)
    c.update(step=1, kl=kl, n_samples=64, texts=None)
    assert c.beta == pytest.approx(0.02 * (1 + expected_e * 64 / 1000))
    assert adaptive_beta(0.02, kl, 1.0, 64, 1000) == pytest.approx(c.beta)


def test_adaptive_controller_converges_toward_target_kl():
    # toy world: KL falls as beta rises (KL = 0.1 / beta); the fixed point is beta = 0.1 / target
    c = AdaptiveKLController(0.02, target=2.0, horizon=200)
    for step in range(300):
        c.update(step=step, kl=0.1 / c.beta, n_samples=32)
    assert 0.1 / c.beta == pytest.approx(2.0, rel=0.05)


def test_adaptive_floor_stops_beta_winding_down_and_survives_a_resume():
    plain = AdaptiveKLController(0.02, target=2.0, horizon=100)
    floored = AdaptiveKLController(0.02, target=2.0, horizon=100, min_beta=0.02)
    for step in range(1, 31):  # KL still rising toward the target: the plain controller slackens
        plain.update(step=step, kl=0.5, n_samples=32)
        floored.update(step=step, kl=0.5, n_samples=32)
    assert plain.beta < 0.003 and floored.beta == 0.02  # (1 - 0.2 * 0.32)^30 = 0.14
    floored.update(step=31, kl=4.0, n_samples=32)  # above target: it rises from the floor at once
    assert floored.beta == pytest.approx(0.02 * (1 + 0.2 * 32 / 100))
    again = AdaptiveKLController(1.0, target=1.0, horizon=1)
    again.load_state_dict(floored.state_dict())
    assert (again.beta, again.min_beta) == (floored.beta, 0.02)
    with pytest.raises(ValueError, match="min_beta"):
        AdaptiveKLController(0.02, target=1.0, horizon=10, min_beta=-1)


def test_fixed_controller_never_moves_and_roundtrips():
    c = FixedKLController(0.05)
    assert c.update(step=1, kl=100.0, n_samples=10) == [] and c.beta == 0.05
    d = FixedKLController(0.0)
    d.load_state_dict(c.state_dict())
    assert d.beta == 0.05


def test_alarm_raises_beta_from_zero_with_cause_and_cooldown():
    readings = {"formality": 0.1}
    c = AlarmKLController(FixedKLController(0.0), detector=lambda texts: dict(readings),
                          thresholds={"formality": 0.5}, factor=2.0, floor=0.05, cooldown=2)
    assert c.update(step=1, kl=0.0, n_samples=8, texts=["x"]) == [] and c.beta == 0.0
    readings["formality"] = 0.8
    ev = c.update(step=2, kl=0.0, n_samples=8, texts=["x"])
    assert c.beta == 0.05 and len(ev) == 1 and "formality 0.8 > 0.5" in ev[0]["cause"]
    assert c.update(step=3, kl=0.0, n_samples=8, texts=["x"]) == []  # cooling down
    ev = c.update(step=4, kl=0.0, n_samples=8, texts=["x"])
    assert c.beta == pytest.approx(0.1) and ev[0]["beta_old"] == 0.05
    state = c.state_dict()
    c2 = AlarmKLController(FixedKLController(0.0), detector=lambda t: {}, thresholds={"formality": 0.5})
    c2.load_state_dict(state)
    assert c2.beta == pytest.approx(0.1) and c2.last_alarm_step == 4


def test_alarm_window_reads_the_mean_of_the_last_rollouts_and_restarts_after_an_alarm():
    feed = iter([0.5, 0.2, 0.3,   0.5, 0.5, 0.5,   0.6, 0.6, 0.6, 0.6])
    c = AlarmKLController(FixedKLController(0.1), detector=lambda texts: {"formality": next(feed)},
                          thresholds={"formality": 0.45}, window=3)

    def step(i):
        return c.update(step=i, kl=0.0, n_samples=32, texts=["x"])

    # one noisy rollout above the threshold: with window 1 it would fire, here the window is not full yet
    assert step(1) == [] and step(2) == [] and step(3) == [] and c.beta == 0.1  # mean 0.33
    assert step(4) == [] and step(5) == []  # means 0.33, 0.43
    ev = step(6)  # mean of 0.5, 0.5, 0.5
    assert c.beta == 0.2 and ev[0]["cause"] == "alarm: formality 0.5 > 0.45 (mean of 3 steps)"
    assert step(7) == [] and step(8) == []  # the window starts afresh: two readings are not enough
    # a resumed controller carries the partial window: the third reading fires there
    again = AlarmKLController(FixedKLController(0.0), detector=lambda texts: {"formality": 0.6},
                              thresholds={"formality": 0.45}, window=3)
    again.load_state_dict(c.state_dict())
    assert again.recent == {"formality": [0.6, 0.6]}
    assert again.update(step=9, kl=0.0, n_samples=32, texts=["x"])[0]["beta_new"] == 0.4
    assert step(9)[0]["beta_new"] == 0.4  # the same as the uninterrupted one
    with pytest.raises(ValueError, match="window"):
        AlarmKLController(FixedKLController(0.0), detector=lambda t: {}, thresholds={"formality": 0.5}, window=0)


def test_controller_validation():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError):
        AlarmKLController(FixedKLController(0.1), detector=lambda t: {}, thresholds={}, factor=2)
