"""GAE against hand-worked examples and a plain-Python reference loop."""

import random

import pytest
import torch

from preflab.losses.gae import gae


def test_hand_worked_example_with_padding():
    # rewards [0, 0, 1], V [.5, .6, .7], gamma 1, lambda .5, one pad token
    # t=2: d=1-0.7=0.3, A=0.3;  t=1: d=0.7-0.6=0.1, A=0.1+0.5*0.3=0.25;  t=0: d=0.1, A=0.1+0.5*0.25=0.225
    r = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    v = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.225, 0.25, 0.3, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.725, 0.85, 1.0, 0.0])


def test_lambda_one_zero_values_is_discounted_return():
    r = torch.tensor([[1.0, 2.0]])
    adv, ret = gae(r, torch.zeros(1, 2), torch.ones(1, 2), gamma=0.9, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([1 + 0.9 * 2, 2.0])
    assert ret.tolist()[0] == pytest.approx([2.8, 2.0])


def test_lambda_zero_is_one_step_td():
    r = torch.tensor([[0.1, 0.2, 0.3]])
    v = torch.tensor([[1.0, 2.0, 3.0]])
    adv, _ = gae(r, v, torch.ones(1, 3), gamma=0.5, lam=0.0)
    assert adv.tolist()[0] == pytest.approx([0.1 + 0.5 * 2 - 1, 0.2 + 0.5 * 3 - 2, 0.3 - 3])


def reference(rewards, values, length, gamma, lam):
    adv = [0.0] * len(rewards)
    for t in range(length):
        acc = 0.0
        for k in range(t, length):
            nv = values[k + 1] if k + 1 < length else 0.0
            delta = rewards[k] + gamma * nv - values[k]
            acc += (gamma * lam) ** (k - t) * delta
        adv[t] = acc
    return adv


def test_random_variable_lengths_match_reference():
    g = torch.Generator().manual_seed(0)
    B, R = 6, 9
    r, v = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)
    lengths = [random.Random(i).randint(1, R) for i in range(B)]
    m = torch.tensor([[1 if t < n else 0 for t in range(R)] for n in lengths])
    adv, ret = gae(r, v, m, gamma=0.97, lam=0.9)
    for b in range(B):
        ref = reference(r[b].tolist(), v[b].tolist(), lengths[b], 0.97, 0.9)
        assert adv[b].tolist() == pytest.approx(ref, abs=1e-5)
        assert ret[b, : lengths[b]].tolist() == pytest.approx(
            [a + x for a, x in zip(ref, v[b].tolist(), strict=False)][: lengths[b]], abs=1e-5)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="gae: shapes differ"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
