"""PPO losses against element-wise plain-Python reference computations on random tensors."""

import math
import threading

import pytest
import torch

from preflab.losses.ppo import (
    entropy_from_logits,
    explained_variance,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)


def _data(seed=0, B=4, R=7):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, R, generator=g) * 3
    old = lp + 0.4 * torch.randn(B, R, generator=g)
    adv = torch.randn(B, R, generator=g)
    mask = (torch.rand(B, R, generator=g) > 0.3).long()
    return lp, old, adv, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_loss_matches_reference(seed):
    lp, old, adv, mask = _data(seed)
    eps = 0.2
    out = ppo_policy_loss(lp, old, adv, mask, clip_range=eps)
    tot, n, clipped, kl2 = 0.0, 0, 0, 0.0
    for a, b, A, m in zip(lp.flatten().tolist(), old.flatten().tolist(), adv.flatten().tolist(),
                          mask.flatten().tolist(), strict=True):
        if not m:
            continue
        ratio = math.exp(a - b)
        u, c = -A * ratio, -A * min(max(ratio, 1 - eps), 1 + eps)
        tot += max(u, c)
        clipped += c > u
        kl2 += 0.5 * (a - b) ** 2
        n += 1
    assert out.loss.item() == pytest.approx(tot / n, rel=1e-5)
    assert out.clipfrac.item() == pytest.approx(clipped / n)
    assert out.approx_kl.item() == pytest.approx(kl2 / n, rel=1e-5)


def test_policy_gradient_on_policy_is_minus_advantage():
    # at ratio 1 the clipped objective has gradient -A/N w.r.t. each log-prob
    lp = torch.zeros(1, 3, requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    ppo_policy_loss(lp, lp.detach(), adv, torch.ones(1, 3)).loss.backward()
    assert lp.grad.tolist()[0] == pytest.approx([-1 / 3, 2 / 3, -0.5 / 3])


def test_policy_gradient_vanishes_when_clipped_in_the_favoured_direction():
    lp = torch.full((1, 1), math.log(1.5), requires_grad=True)  # ratio 1.5 > 1.2 with A > 0
    ppo_policy_loss(lp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1)).loss.backward()
    assert lp.grad.item() == 0.0


@pytest.mark.parametrize("seed", [0, 3])
def test_value_loss_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    v, old, ret = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = (torch.rand(3, 5, generator=g) > 0.2).long()
    out = ppo_value_loss(v, old, ret, mask, clip_range=0.3)
    tot, n = 0.0, 0
    for a, o, G, m in zip(v.flatten().tolist(), old.flatten().tolist(), ret.flatten().tolist(),
                          mask.flatten().tolist(), strict=True):
        if m:
            vc = o + min(max(a - o, -0.3), 0.3)
            tot += 0.5 * max((a - G) ** 2, (vc - G) ** 2)
            n += 1
    assert out.loss.item() == pytest.approx(tot / n, rel=1e-5)


def test_whiten_and_explained_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    w = masked_whiten(x, m)
    assert w[0, :3].tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)], rel=1e-4)
    assert w[0, 3].item() == 0.0
    assert explained_variance(x, x, m).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(x, 2.0), x, m).item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_uniform_and_peaked():
    assert entropy_from_logits(torch.zeros(5)).item() == pytest.approx(math.log(5))
    assert entropy_from_logits(torch.tensor([0.0, -1e4])).item() == pytest.approx(0.0, abs=1e-6)



class TwoRanks:
    """Two threads standing in for two DDP processes: ``total`` is an all-reduce sum between them."""

    def __init__(self):
        self.barrier, self.buf = threading.Barrier(2), {}

    def run(self, fn):
        out = {}
        threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, fn(r, self.total_for(r)))) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out[0], out[1]

    def total_for(self, rank):
        def total(t):
            self.buf[rank] = t
            self.barrier.wait()
            s = self.buf[0] + self.buf[1]
            self.barrier.wait()
            return s
        return total


def test_a_batch_split_over_two_ranks_whitens_and_trains_like_the_whole_batch():
    # DDP: rank 0 holds fewer tokens than rank 1; with statistics summed over both and the loss
    # divided by (global tokens / 2), the ranks' averaged gradient is the whole batch's
    lp, old, adv, mask = _data(seed=3, B=6, R=9)
    mask[0, 3:] = 0
    halves = [slice(0, 3), slice(3, 6)]
    w0, w1 = TwoRanks().run(lambda r, total: masked_whiten(adv[halves[r]], mask[halves[r]], total=total))
    torch.testing.assert_close(torch.cat([w0, w1]), masked_whiten(adv, mask))
    assert not torch.allclose(w0, masked_whiten(adv[:3], mask[:3]))  # local statistics would differ
    ev = TwoRanks().run(lambda r, total: explained_variance(old[halves[r]], adv[halves[r]], mask[halves[r]],
                                                            total=total))
    torch.testing.assert_close(ev[0], explained_variance(old, adv, mask))

    grads = []
    for h in halves:
        x = lp[h].clone().requires_grad_(True)
        ppo_policy_loss(x, old[h], adv[h], mask[h], n_tokens=mask.sum() / 2).loss.backward()
        grads.append(x.grad)
    x = lp.clone().requires_grad_(True)
    ppo_policy_loss(x, old, adv, mask).loss.backward()
    torch.testing.assert_close(torch.cat(grads) / 2, x.grad)
    v = lp.clone().requires_grad_(True)
    ppo_value_loss(v, old, adv, mask).loss.backward()
    vg = []
    for h in halves:
        y = lp[h].clone().requires_grad_(True)
        ppo_value_loss(y, old[h], adv[h], mask[h], n_tokens=mask.sum() / 2).loss.backward()
        vg.append(y.grad)
    torch.testing.assert_close(torch.cat(vg) / 2, v.grad)
