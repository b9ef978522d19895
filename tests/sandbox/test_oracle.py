"""The oracle frontier: the tilt against hand-worked values, frontier properties, model log-probs."""

import math

import numpy as np
import pytest
import torch

from preflab.sandbox.domain import all_styles, format_prompt, generate_queries, sandbox_texts
from preflab.sandbox.gold import gold_utility
from preflab.sandbox.oracle import (
    Frontier,
    OracleTables,
    enumerate_responses,
    frontier_from_tables,
    kl_divergence,
    kl_split,
    oracle_frontiers,
    reference_logprobs,
    tilt,
)


def test_tilt_and_kl_hand_worked():
    ref = np.log([0.5, 0.5])
    star = tilt(ref, np.array([0.0, math.log(3.0)]), beta=1.0)  # weights 1 : 3
    assert np.exp(star) == pytest.approx([0.25, 0.75])
    assert kl_divergence(star, ref) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert np.exp(tilt(ref, np.array([0.0, 5.0]), float("inf"))) == pytest.approx([0.5, 0.5])


def test_kl_split_hand_worked():
    """A policy that is a tilt needs all its KL; one that moves mass between answers of equal reward
    needs none of it; the two parts always add up to the KL (random policies, rewards of any sign)."""
    ref = np.log([0.25, 0.25, 0.5])
    r = np.array([0.0, 0.0, 1.0])
    star = tilt(ref, r, beta=0.5)
    needed, excess = kl_split(star, ref, r)
    assert needed == pytest.approx(kl_divergence(star, ref), abs=1e-9) and excess == pytest.approx(0.0, abs=1e-9)
    swap = np.log([0.4, 0.1, 0.5])  # same expected reward as ref: nothing of its KL buys reward
    needed, excess = kl_split(swap, ref, r)
    assert needed == pytest.approx(0.0, abs=1e-9)
    assert excess == pytest.approx(0.4 * math.log(1.6) + 0.1 * math.log(0.4))
    # half the mass of "0" moved to "2": E[r] 0.5 -> 0.625; the cheapest way there is the tilt with
    # weights 1 : 1 : 2w where 2w / (2 + 2w) = 0.625, i.e. w = 5/3
    moved = np.log([0.125, 0.25, 0.625])
    q = np.log(np.array([1.0, 1.0, 10 / 3]) / (2 + 10 / 3))
    needed, excess = kl_split(moved, ref, r)
    assert needed == pytest.approx(kl_divergence(q, ref), abs=1e-9)
    assert excess == pytest.approx(kl_divergence(moved, q), abs=1e-9) and excess > 0
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.normal(size=7) * 2, rng.normal(size=7) * 2
        lp, lq = a - np.logaddexp.reduce(a), b - np.logaddexp.reduce(b)
        needed, excess = kl_split(lp, lq, rng.normal(size=7) * 3)
        assert needed >= 0 and excess >= -1e-12
        assert needed + excess == pytest.approx(kl_divergence(lp, lq), rel=1e-9)
    assert kl_split(moved, ref, np.ones(3)) == (0.0, pytest.approx(kl_divergence(moved, ref)))


def _tables(seed, n_prompts=5, n=12):
    rng = np.random.default_rng(seed)
    refs, golds, proxies = [], [], []
    for _ in range(n_prompts):
        lp = rng.normal(size=n) * 2
        refs.append(lp - np.logaddexp.reduce(lp))
        g = rng.normal(size=n)
        golds.append(g)
        proxies.append(g + rng.normal(size=n))  # a noisy proxy of gold
    return refs, golds, proxies


def test_gold_frontier_is_monotone_and_dominates_the_proxy_frontier():
    refs, golds, proxies = _tables(0)
    betas = np.geomspace(1e-3, 1e3, 200)
    fg = frontier_from_tables("gold", refs, golds, golds, betas)
    fp = frontier_from_tables("proxy", refs, proxies, golds, betas)
    assert fg.kl[0] == pytest.approx(0.0, abs=1e-12) and np.all(np.diff(fg.kl) >= -1e-9)
    assert np.all(np.diff(fg.gold) >= -1e-9)  # more KL budget never hurts the gold-tilted policy
    for kl, g in zip(fp.kl, fp.gold, strict=True):  # the gold tilt is optimal for gold at every KL
        assert fg.gold_at_kl(kl) >= g - 1e-3
    # at beta -> 0 the gold tilt picks argmax gold on every prompt
    assert fg.gold[-1] == pytest.approx(np.mean([g.max() for g in golds]), abs=1e-3)
    assert fg.fraction_of_gain(fg.kl[50], fg.gold[50]) == pytest.approx(1.0, abs=1e-6)


def test_gold_at_kl_interpolates():
    f = Frontier("gold", np.array([np.inf, 1.0]), np.array([0.0, 2.0]), np.array([1.0, 3.0]), np.zeros(2))
    assert f.gold_at_kl(1.0) == pytest.approx(2.0)
    assert f.gold_at_kl(5.0) == pytest.approx(3.0)
    assert f.fraction_of_gain(1.0, 1.5) == pytest.approx(0.5)


def test_enumeration_covers_every_style():
    q = generate_queries(1, seed=0)[0]
    resp = enumerate_responses(q)
    assert len(resp) == len(all_styles()) == 144
    assert len({gold_utility(q, r) for r in resp}) > 10


@pytest.fixture(scope="module")
def tiny():
    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer

    torch.set_num_threads(1)
    tok = train_tokenizer(sandbox_texts(n=200), 320)
    cfg = tiny_gpt2_config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=512,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tiny_gpt2(cfg, seed=0), tok


def test_reference_logprobs_are_renormalised_sequence_logprobs(tiny):
    from preflab.models.sampling import sequence_logprobs

    model, tok = tiny
    q = generate_queries(1, seed=3)[0]
    resp = enumerate_responses(q)[:3]
    lp = reference_logprobs(model, tok, q, resp)
    assert np.exp(lp).sum() == pytest.approx(1.0)
    raw = []
    for r in resp:
        p = tok(format_prompt(q.text), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + tok(" " + r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            raw.append(float(sequence_logprobs(model, ids, torch.ones_like(ids), len(p)).sum()))
    assert lp - lp[0] == pytest.approx(np.array(raw) - raw[0], abs=1e-3)


def test_oracle_frontiers_with_a_proxy(tiny):
    model, tok = tiny
    qs = generate_queries(2, seed=1)

    def proxy(prompts, texts):  # rewards stilted formality: a biased reward model
        return torch.tensor([2.0 * ("Please be advised" in t) for t in texts])

    fr = oracle_frontiers(model, tok, qs, proxy_fn=proxy, betas=[0.01, 0.1, 1.0, 10.0])
    g, p = fr["gold"], fr["proxy"]
    assert len(g.betas) == 5 and np.isinf(g.betas[0])
    assert g.gold[-1] > g.gold[0] and p.reward_value[-1] > p.reward_value[0]
    assert g.gold_at_kl(p.kl[-1]) > p.gold[-1]
    assert set(g.to_dict()) >= {"sqrt_kl", "gold", "kl", "betas"}


def test_other_mass_is_kept_as_one_outcome(tiny):
    """other_samples > 0: pi_ref keeps the mass outside the enumerated answers (malformed text for this
    tiny model), so the reference's gold drops to the sampled policy's level and the greedy end of the
    frontier costs more KL (leaving the malformed mass is not free)."""
    model, tok = tiny
    qs = generate_queries(2, seed=1)
    plain = oracle_frontiers(model, tok, qs, betas=[0.001, 1.0])["gold"]
    fair = oracle_frontiers(model, tok, qs, betas=[0.001, 1.0], other_samples=8, max_new_tokens=8)["gold"]
    assert fair.gold[0] < plain.gold[0]  # beta = inf: pi_ref itself, malformed mass included
    assert fair.kl[-1] > plain.kl[-1]
    assert fair.gold[-1] == pytest.approx(plain.gold[-1], abs=0.5)  # the greedy end still finds good answers


def test_a_policy_is_placed_on_the_frontiers_support(tiny):
    """OracleTables.point: the reference itself sits at KL 0 with the reference's gold; another
    model gets the exact KL over the enumerated answers plus the "other" outcome, computed here by
    hand from the two models' sequence log-probs."""
    from preflab.models.tiny import tiny_gpt2

    model, tok = tiny
    qs = generate_queries(2, seed=1)
    tables = OracleTables(model, tok, qs, other_samples=8, max_new_tokens=8, seed=0)
    ref_point = tables.point(model)
    assert ref_point["kl"] == pytest.approx(0.0, abs=1e-9)
    assert ref_point["other_mass"] > 0.5  # an untrained model writes mostly malformed text
    assert ref_point["gold"] == pytest.approx(tables.reference_gold, abs=0.5)  # "other" re-sampled
    other = tiny_gpt2(model.config, seed=1)
    pt = tables.point(other)
    kl = 0.0
    for q in qs:
        resp = enumerate_responses(q)
        lp = reference_logprobs(other, tok, q, resp, renormalise=False)
        lr = reference_logprobs(model, tok, q, resp, renormalise=False)
        po, ro = 1 - np.exp(lp).sum(), 1 - np.exp(lr).sum()
        kl += float(np.sum(np.exp(lp) * (lp - lr))) + po * math.log(po / ro)
    assert pt["kl"] == pytest.approx(kl / len(qs), rel=1e-6) and pt["kl"] > 0
    # with the reward it was trained on: its expected score, and its KL split into needed + excess
    def proxy(prompts, texts):
        return torch.tensor([float(len(t)) / 10 for t in texts])

    assert tables.point(model, proxy)["kl_needed"] == pytest.approx(0.0, abs=1e-9)
    full = tables.point(other, proxy)
    assert {k: full[k] for k in pt} == pytest.approx(pt)  # the same point, same "other" samples
    assert full["kl_needed"] + full["kl_excess"] == pytest.approx(full["kl"], rel=1e-9)
    assert full["kl_needed"] >= 0 and full["kl_excess"] >= 0
    assert "reward" in full and "reward" not in pt
    # the frontiers built from the same tables are oracle_frontiers' own
    fr = oracle_frontiers(model, tok, qs, betas=[0.01, 1.0], other_samples=8, max_new_tokens=8)["gold"]
    assert np.allclose(tables.frontier("gold", betas=[0.01, 1.0]).gold, fr.gold)
