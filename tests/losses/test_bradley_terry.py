"""Bradley-Terry loss: parity with an independent numpy reference, hand-worked values, ties, margins."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from preflab.losses.bradley_terry import (
    MARGIN_PRESETS,
    bradley_terry_loss,
    counted_pairs,
    margins_from_strength,
)


def ref_loss(rc, rr, m, tie, ties):
    """Independent reference: the formula written out with numpy in float64, pair by pair."""
    total, n = 0.0, 0
    for c, r, mm, t in zip(rc, rr, m, tie, strict=True):
        d = float(c) - float(r)
        if t:
            if ties == "exclude":
                continue
            p = 1.0 / (1.0 + np.exp(-d))
            total += -0.5 * np.log(p) - 0.5 * np.log(1.0 - p)
        else:
            total += np.log1p(np.exp(-(d - float(mm))))
        n += 1
    return total / max(n, 1)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", ["exclude", "half"])
def test_parity_with_numpy_reference(seed, ties):
    g = torch.Generator().manual_seed(seed)
    b = 64
    rc = torch.randn(b, generator=g, dtype=torch.float64) * 3
    rr = torch.randn(b, generator=g, dtype=torch.float64) * 3
    strength = torch.randint(0, 4, (b,), generator=g)
    tie = torch.rand(b, generator=g) < 0.2
    m = margins_from_strength(strength, "llama2_large", dtype=torch.float64)
    got = bradley_terry_loss(rc, rr, m, tie_mask=tie, ties=ties)
    want = ref_loss(rc.numpy(), rr.numpy(), m.numpy(), tie.numpy(), ties)
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_hand_worked_values():
    # d = 0 -> log 2; d = 2, m = 1 -> log(1 + e^-1); tie at d = 2 -> -0.5 log s(2) - 0.5 log s(-2)
    rc = torch.tensor([0.0, 2.0, 2.0])
    rr = torch.tensor([0.0, 0.0, 0.0])
    per = bradley_terry_loss(rc, rr, torch.tensor([0.0, 1.0, 5.0]), tie_mask=torch.tensor([False, False, True]),
                             ties="half", reduction="none")
    s2 = 1 / (1 + math.exp(-2))
    assert per.tolist() == pytest.approx([math.log(2), math.log(1 + math.exp(-1)),
                                          -0.5 * math.log(s2) - 0.5 * math.log(1 - s2)], rel=1e-6)


def test_ties_excluded_do_not_count_in_mean():
    rc, rr = torch.tensor([1.0, 5.0]), torch.tensor([0.0, 0.0])
    tie = torch.tensor([False, True])
    got = bradley_terry_loss(rc, rr, tie_mask=tie, ties="exclude")
    assert got.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    assert counted_pairs(tie, 2, ties="exclude") == 1 and counted_pairs(tie, 2, ties="half") == 2
    # all ties excluded: zero loss, zero gradient, no NaN
    rc.requires_grad_(True)
    loss = bradley_terry_loss(rc, rr, tie_mask=torch.tensor([True, True]), ties="exclude")
    loss.backward()
    assert loss.item() == 0.0 and rc.grad.abs().sum().item() == 0.0


def test_tie_loss_is_minimal_at_equal_rewards():
    d = torch.linspace(-3, 3, 61, dtype=torch.float64)
    per = bradley_terry_loss(d, torch.zeros_like(d), tie_mask=torch.ones_like(d, dtype=torch.bool), ties="half",
                             reduction="none")
    assert int(per.argmin()) == 30 and per[30].item() == pytest.approx(math.log(2))


def test_margin_pushes_gradient_harder():
    rc = torch.tensor([1.0], requires_grad=True)
    bradley_terry_loss(rc, torch.zeros(1)).backward()
    g0 = rc.grad.item()
    rc.grad = None
    bradley_terry_loss(rc, torch.zeros(1), 2.0).backward()
    # d/dd of -log s(d - m) = -(1 - s(d - m)): more negative with the margin
    assert rc.grad.item() < g0 < 0
    assert rc.grad.item() == pytest.approx(-(1 - 1 / (1 + math.exp(1.0))), rel=1e-6)


def test_gradient_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    rc = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    rr = torch.randn(8, generator=g, dtype=torch.float64)
    m = torch.rand(8, generator=g, dtype=torch.float64)
    bradley_terry_loss(rc, rr, m, reduction="sum").backward()
    want = -(1 - torch.sigmoid(rc.detach() - rr - m))
    assert torch.allclose(rc.grad, want, atol=1e-12)


def test_margin_maps():
    assert margins_from_strength([0, 1, 2, 3, None], "llama2_small").tolist() == pytest.approx(
        [0, 1 / 3, 2 / 3, 1, 0])
    assert margins_from_strength([3, 0], "llama2_large").tolist() == [3.0, 0.0]
    assert margins_from_strength([3, 0], 0.5).tolist() == [0.5, 0.5]
    assert margins_from_strength([2], {2: 0.25}).tolist() == [0.25]
    assert margins_from_strength([2], None) is None
    assert set(MARGIN_PRESETS) >= {"none", "llama2_small", "llama2_large"}
    with pytest.raises(ValueError, match="unknown preset"):
        margins_from_strength([1], "llama3")
    with pytest.raises(ValueError, match=r"strength\[0\]"):
        margins_from_strength([7], "llama2_small")


@pytest.mark.parametrize("lapse", [0.05, 0.15, 0.3])
def test_lapse_likelihood_matches_reference_and_bounds_a_lapsed_label(lapse):
    g = torch.Generator().manual_seed(7)
    rc, rr = torch.randn(32, generator=g, dtype=torch.float64) * 4, torch.randn(32, generator=g, dtype=torch.float64)
    m = margins_from_strength(torch.randint(0, 4, (32,), generator=g), "llama2_small", dtype=torch.float64)
    got = bradley_terry_loss(rc, rr, m, lapse=lapse, reduction="none")
    want = [-math.log(lapse + (1 - 2 * lapse) / (1 + math.exp(-(c - r - mm))))
            for c, r, mm in zip(rc.tolist(), rr.tolist(), m.tolist(), strict=True)]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    # a label the model is sure is wrong (a lapse) costs at most -log e, and pulls ever less
    far = torch.tensor([-50.0], dtype=torch.float64, requires_grad=True)
    loss = bradley_terry_loss(far, torch.zeros(1, dtype=torch.float64), lapse=lapse)
    loss.backward()
    assert loss.item() == pytest.approx(-math.log(lapse), rel=1e-9) and abs(far.grad.item()) < 1e-12
    plain = bradley_terry_loss(rc, rr, m, reduction="none")
    assert torch.equal(bradley_terry_loss(rc, rr, m, lapse=0.0, reduction="none"), plain)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="lapse"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), lapse=0.5)
    with pytest.raises(ValueError, match="ties"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), ties="drop")
    with pytest.raises(ValueError, match="r_chosen"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
