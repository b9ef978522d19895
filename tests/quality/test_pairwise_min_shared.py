"""Mean pairwise kappa in incomplete designs (many raters, overlap 3): only rater pairs sharing
>= min_shared items, undefined pairs (p_e = 1) left out; the batched bootstrap equals the loop."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from preflab.quality.agreement import (
    encode,
    fleiss_kappa,
    fleiss_kappa_batched,
    krippendorff_alpha,
    krippendorff_alpha_batched,
    mean_pairwise_kappa,
    mean_pairwise_kappa_batched,
    pairwise_kappa,
    percent_agreement,
    percent_agreement_batched,
)
from preflab.quality.bootstrap import (
    bootstrap_ci,
    bootstrap_replicates,
    bootstrap_rows,
    bootstrap_weights,
)

TWINS = [(mean_pairwise_kappa, mean_pairwise_kappa_batched), (fleiss_kappa, fleiss_kappa_batched),
         (krippendorff_alpha, krippendorff_alpha_batched), (percent_agreement, percent_agreement_batched)]


def overlap_round(seed: int, *, n_items: int = 300, n_raters: int = 25, overlap: int = 3) -> dict:
    """The walkthrough's design with random labels: each item to `overlap` of `n_raters` raters."""
    rng = np.random.default_rng(seed)
    return {f"i{i}": {f"r{r}": str(rng.choice(["a", "b", "tie"], p=[.4, .4, .2]))
                      for r in rng.choice(n_raters, overlap, replace=False)} for i in range(n_items)}


def sklearn_mean(t: dict, min_shared: int) -> float | None:
    """Independent: sklearn's kappa per rater pair on the items both judged (repeats as listed), pairs
    sharing >= min_shared items with a defined kappa, weighted by the items they share."""
    from sklearn.metrics import cohen_kappa_score

    raters = sorted({r for lab in t.values() for r in lab})
    num = den = 0.0
    for i, a in enumerate(raters):
        for b in raters[i + 1:]:
            la = [lab[a] for lab in t.values() if a in lab and b in lab]
            lb = [lab[b] for lab in t.values() if a in lab and b in lab]
            if len(la) < min_shared:
                continue
            with warnings.catch_warnings():  # one label in use: sklearn warns and gives nan
                warnings.simplefilter("ignore")
                k = cohen_kappa_score(la, lb)
            if np.isnan(k):
                continue
            num, den = num + len(la) * k, den + len(la)
    return num / den if den else None


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("min_shared", [1, 3, 5])
def test_mean_matches_sklearn_in_an_overlap_3_round(seed, min_shared):
    t = overlap_round(seed, n_items=120, n_raters=12)
    ref = sklearn_mean(t, min_shared)
    assert ref is not None
    assert mean_pairwise_kappa(t, min_shared=min_shared) == pytest.approx(ref, abs=1e-12)


def test_pairs_left_out_are_counted_and_no_pair_is_n_a():
    t = overlap_round(0)
    d = pairwise_kappa(t).mean_detail()
    n_shared = pairwise_kappa(t).n_shared[np.triu_indices(25, 1)]
    assert d.n_pairs + d.n_pairs_undefined == int((n_shared >= 5).sum()) and d.n_pairs > 0
    assert d.n_pairs_few_items == int(((n_shared > 0) & (n_shared < 5)).sum()) > 0
    sparse = {f"i{k}": {f"r{2 * k}": "a", f"r{2 * k + 1}": "b" if k % 2 else "a"} for k in range(10)}
    d = pairwise_kappa(sparse).mean_detail()  # ten pairs, one shared item each
    assert d.value is None and (d.n_pairs, d.n_pairs_few_items) == (0, 10)
    assert "Fleiss' kappa and Krippendorff's alpha" in d.reason
    with pytest.raises(ValueError, match="no pair of raters shares 5 or more items"):
        mean_pairwise_kappa(sparse)


@pytest.mark.parametrize("seed", range(3))
def test_ci_contains_its_estimate_and_covers_zero_on_random_labels(seed):
    # the walkthrough's repro: before, +0.030 CI [+0.041, +0.126] (seed 0): the CI missed its own estimate
    t = overlap_round(seed)
    e = bootstrap_ci(t, mean_pairwise_kappa, n_boot=300, seed=0)
    assert e.low <= e.value <= e.high and e.low < 0 < e.high and e.n_failed == 0
    # and the pairs that moved it: counted as 1.0 before, left out now
    assert mean_pairwise_kappa(t) == pytest.approx(sklearn_mean(t, 5), abs=1e-12)


def test_a_pair_counts_its_items_with_multiplicity_as_drawn():
    # A and B share three items; drawn 2 + 2 + 1 times the pair shares five and enters the mean with
    # the kappa of the repeated labels (sklearn on the expanded lists)
    from sklearn.metrics import cohen_kappa_score

    t = {"x": {"A": "a", "B": "a"}, "y": {"A": "b", "B": "b"}, "z": {"A": "a", "B": "b"}}
    m = encode(t)
    got = mean_pairwise_kappa_batched(m, np.array([[2, 2, 1], [1, 1, 1]]))
    assert got[0] == pytest.approx(cohen_kappa_score(list("aabba"), list("aabbb")), abs=1e-12)
    assert np.isnan(got[1])  # three items: below min_shared
    rows = np.array([[0, 0, 1, 1, 2]])
    assert mean_pairwise_kappa(m.take(rows[0])) == pytest.approx(got[0], abs=1e-12)
    assert (bootstrap_weights(rows, 3) == [[2, 2, 1]]).all()


@pytest.mark.parametrize("seed", range(4))
def test_batched_twins_equal_the_statistic_on_each_resampled_table(seed):
    rng = np.random.default_rng(seed)
    t = overlap_round(seed, n_items=int(rng.integers(20, 80)), n_raters=int(rng.integers(3, 9)),
                      overlap=int(rng.integers(2, 4)))
    m = encode(t)
    rows = bootstrap_rows(len(m.items), n_boot=60, seed=seed)
    w = bootstrap_weights(rows, len(m.items))
    for plain, batched in TWINS:
        got = batched(m, w)
        for b, r in enumerate(rows):
            try:
                want = plain(m.take(r))
            except ValueError:
                assert np.isnan(got[b])
                continue
            assert got[b] == pytest.approx(want, abs=1e-12)
        assert batched(m, np.ones((1, len(m.items))))[0] == pytest.approx(plain(m), abs=1e-12)


@pytest.mark.parametrize("fn", [f for f, _ in TWINS])
def test_vectorised_bootstrap_gives_the_loops_replicates(fn):
    t = overlap_round(1, n_items=80, n_raters=8)
    fast, failed_fast = bootstrap_replicates(t, fn, n_boot=120, seed=5)
    slow, failed_slow = bootstrap_replicates(t, lambda m: fn(m), n_boot=120, seed=5)  # no twin: the loop
    assert failed_fast == failed_slow and np.allclose(fast, slow, rtol=0, atol=1e-12) and len(fast) > 100


def test_complete_design_is_unchanged_by_the_threshold():
    # the workshop's rounds: every rater on every item, so every pair shares all items
    rng = np.random.default_rng(0)
    t = {i: {f"r{r}": str(rng.choice(["a", "b", "tie"])) for r in range(5)} for i in range(50)}
    assert mean_pairwise_kappa(t) == mean_pairwise_kappa(t, min_shared=1) == mean_pairwise_kappa(t, min_shared=50)
    assert mean_pairwise_kappa(t) == pytest.approx(sklearn_mean(t, 1), abs=1e-12)
