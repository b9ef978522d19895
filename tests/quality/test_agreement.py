"""Agreement statistics against reference implementations and textbook values."""

from __future__ import annotations

import random

import numpy as np
import pytest

from preflab.quality.agreement import (
    agreement_with_reference,
    cohen_kappa,
    encode,
    fleiss_kappa,
    krippendorff_alpha,
    majority_labels,
    mean_pairwise_kappa,
    pairwise_kappa,
    percent_agreement,
)

# Fleiss (1971), table 1: 30 patients, 6 psychiatrists each, 5 diagnoses; kappa = .430
# (R irr::kappam.fleiss(diagnoses) = 0.4302445; each row lists the six diagnoses given).
FLEISS_1971 = [
    [4, 4, 4, 4, 4, 4], [2, 2, 2, 5, 5, 5], [2, 3, 3, 3, 3, 5], [5, 5, 5, 5, 5, 5], [2, 2, 2, 4, 4, 4],
    [1, 1, 3, 3, 3, 3], [3, 3, 3, 3, 5, 5], [1, 1, 3, 3, 3, 4], [1, 1, 4, 4, 4, 4], [5, 5, 5, 5, 5, 5],
    [1, 4, 4, 4, 4, 4], [1, 2, 4, 4, 4, 4], [2, 2, 2, 3, 3, 3], [1, 4, 4, 4, 4, 4], [2, 2, 4, 4, 4, 5],
    [3, 3, 3, 3, 3, 5], [1, 1, 1, 4, 5, 5], [1, 1, 1, 1, 1, 2], [2, 2, 4, 4, 4, 4], [1, 3, 3, 5, 5, 5],
    [5, 5, 5, 5, 5, 5], [2, 4, 4, 4, 4, 4], [2, 2, 4, 5, 5, 5], [1, 1, 4, 4, 4, 4], [1, 4, 4, 4, 4, 5],
    [2, 2, 2, 2, 2, 4], [1, 1, 1, 1, 5, 5], [2, 2, 4, 4, 4, 4], [1, 3, 3, 3, 3, 3], [5, 5, 5, 5, 5, 5],
]


def table_from_rows(rows):
    return {i: {f"r{j}": lab for j, lab in enumerate(row)} for i, row in enumerate(rows)}


def random_table(rng: random.Random, *, n_items=40, n_raters=5, n_cats=3, p_missing=0.0, agree=0.6):
    cats = ["id_a", "id_b", "tie"][:n_cats] if n_cats <= 3 else [f"c{k}" for k in range(n_cats)]
    table = {}
    for i in range(n_items):
        truth = rng.choice(cats)
        row = {}
        for r in range(n_raters):
            if rng.random() < p_missing:
                continue
            row[f"rater{r}"] = truth if rng.random() < agree else rng.choice(cats)
        table[f"item{i}"] = row
    return table


def test_fleiss_1971_worked_example():
    assert fleiss_kappa(table_from_rows(FLEISS_1971)) == pytest.approx(0.4302445, abs=5e-8)


def test_fleiss_wikipedia_counts_example():
    # 10 subjects x 14 raters x 5 categories, counts per category; kappa = 0.210 (Wikipedia, "Fleiss' kappa")
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    rows = [[c for c, n in enumerate(row) for _ in range(n)] for row in counts]
    assert fleiss_kappa(table_from_rows(rows)) == pytest.approx(0.20993, abs=5e-5)
    assert percent_agreement(table_from_rows(rows)) == pytest.approx(0.378, abs=5e-4)


def test_cohen_hand_worked():
    # 50 items: both yes 20, a yes b no 5, a no b yes 10, both no 15 (Wikipedia, "Cohen's kappa")
    rows = [["y", "y"]] * 20 + [["y", "n"]] * 5 + [["n", "y"]] * 10 + [["n", "n"]] * 15
    t = table_from_rows(rows)
    # p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5 -> 0.4
    assert cohen_kappa(t, "r0", "r1") == pytest.approx(0.4, abs=1e-12)
    assert percent_agreement(t) == pytest.approx(0.7, abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_cohen_matches_sklearn_with_missing(seed):
    from sklearn.metrics import cohen_kappa_score

    rng = random.Random(seed)
    t = random_table(rng, n_items=rng.randint(5, 60), n_raters=4, n_cats=rng.choice([2, 3]),
                     p_missing=0.25, agree=rng.random())
    pk = pairwise_kappa(t)
    vals = []
    for i, a in enumerate(pk.raters):
        for j, b in enumerate(pk.raters[i + 1:], start=i + 1):
            shared = [it for it in t if a in t[it] and b in t[it]]
            if not shared:
                assert np.isnan(pk.matrix[i, j])
                continue
            la, lb = [t[it][a] for it in shared], [t[it][b] for it in shared]
            if len(set(la) | set(lb)) == 1:  # p_e = 1: undefined, as sklearn's NaN
                assert np.isnan(cohen_kappa_score(la, lb)) and np.isnan(pk.matrix[i, j])
                with pytest.raises(ValueError, match="undefined"):
                    cohen_kappa(t, a, b)
            else:
                ref = cohen_kappa_score(la, lb)
                assert cohen_kappa(t, a, b) == pytest.approx(ref, abs=1e-9)
                assert pk.matrix[i, j] == pytest.approx(ref, abs=1e-9)
                vals.append((ref, len(shared)))
            assert pk.n_shared[i, j] == len(shared)
    for min_shared in (1, 5):  # pairs sharing >= min_shared items, each weighted by the items it shares
        k, n = np.array([v for v in vals if v[1] >= min_shared] or [(0.0, 0)]).T
        if n.sum():
            assert mean_pairwise_kappa(t, min_shared=min_shared) == pytest.approx(float((k * n).sum() / n.sum()),
                                                                                  abs=1e-12)
        else:
            with pytest.raises(ValueError, match="no pair of raters shares"):
                mean_pairwise_kappa(t, min_shared=min_shared)


def test_a_rater_with_one_item_does_not_swing_the_mean():
    # A and B share 10 items with kappa 0.6 (p_o 0.8, p_e 0.5); C judged one item, agreeing with both.
    # C's kappas rest on one item with equal labels: p_e = 1, undefined (sklearn: nan), where they
    # used to count as 1.0 and lifted the mean ((10 * 0.6 + 1 + 1) / 12 = 0.667 weighted, 0.867 not).
    # They stay out of the mean, for sharing fewer than 5 items and for being undefined.
    a = list("aaaaabbbbb")
    b = list("aaaabbbbba")
    t = {f"i{k}": {"A": a[k], "B": b[k]} for k in range(10)}
    t["i0"]["C"] = "a"
    pk = pairwise_kappa(t)
    assert cohen_kappa(t, "A", "B") == pytest.approx(0.6)
    assert mean_pairwise_kappa(t) == pytest.approx(0.6, abs=1e-12)
    assert mean_pairwise_kappa(t, min_shared=1) == pytest.approx(0.6, abs=1e-12)  # undefined, not 1.0
    d = pk.mean_detail()
    assert (d.n_pairs, d.n_pairs_few_items, d.n_pairs_undefined) == (1, 2, 0)
    d1 = pk.mean_detail(1)
    assert (d1.n_pairs, d1.n_pairs_few_items, d1.n_pairs_undefined) == (1, 0, 2)
    assert pk.rater_mean(list(pk.raters).index("C")) is None  # C's own figure: undefined with everyone
    assert pk.rater_mean(list(pk.raters).index("A")) == pytest.approx(0.6)


@pytest.mark.parametrize("seed", range(12))
def test_fleiss_matches_statsmodels(seed):
    from statsmodels.stats.inter_rater import aggregate_raters
    from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss

    rng = random.Random(100 + seed)
    t = random_table(rng, n_items=rng.randint(3, 50), n_raters=rng.randint(2, 7), n_cats=rng.choice([2, 3, 5]),
                     agree=rng.random())
    m = encode(t)
    counts, _ = aggregate_raters(m.codes)
    if np.count_nonzero(counts.sum(0)) == 1:
        assert fleiss_kappa(t) == 1.0
    else:
        assert fleiss_kappa(t) == pytest.approx(sm_fleiss(counts), abs=1e-9)


def _fleiss_varying_by_hand(t):
    items = [row for row in t.values() if len(row) >= 2]
    cats = sorted({lab for row in items for lab in row.values()})
    p_i, tot = [], {c: 0 for c in cats}
    for row in items:
        n = len(row)
        nc = {c: list(row.values()).count(c) for c in cats}
        p_i.append((sum(v * v for v in nc.values()) - n) / (n * (n - 1)))
        for c in cats:
            tot[c] += nc[c]
    total = sum(tot.values())
    p_e = sum((v / total) ** 2 for v in tot.values())
    return (np.mean(p_i) - p_e) / (1 - p_e)


@pytest.mark.parametrize("seed", range(6))
def test_fleiss_varying_raters_reduces_to_documented_rule(seed):
    rng = random.Random(200 + seed)
    t = random_table(rng, n_items=30, n_raters=5, p_missing=0.35, agree=0.5)
    if len({lab for row in t.values() if len(row) >= 2 for lab in row.values()}) > 1:
        assert fleiss_kappa(t) == pytest.approx(_fleiss_varying_by_hand(t), abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_alpha_matches_krippendorff_package(seed):
    import krippendorff

    rng = random.Random(300 + seed)
    t = random_table(rng, n_items=rng.randint(4, 50), n_raters=rng.randint(2, 6), n_cats=rng.choice([2, 3, 4]),
                     p_missing=rng.choice([0.0, 0.2, 0.5]), agree=rng.random())
    m = encode(t)
    if not (np.sum(m.codes >= 0, axis=1) >= 2).any():
        with pytest.raises(ValueError):
            krippendorff_alpha(t)
        return
    data = np.where(m.codes >= 0, m.codes, np.nan).T.astype(float)  # (raters, items)
    used = {int(c) for row in m.codes if (row >= 0).sum() >= 2 for c in row if c >= 0}
    if len(used) == 1:
        assert krippendorff_alpha(t) == 1.0
    else:
        ref = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
        assert krippendorff_alpha(t) == pytest.approx(ref, abs=1e-9)


def test_alpha_krippendorff_2011_example():
    # Krippendorff (2011) "Computing Krippendorff's alpha-reliability", nominal example with
    # 4 coders, 12 units and missing values: alpha = 0.743.
    rows = [
        [1, 1, None, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4],
        [4, 4, 4, 4], [1, 1, 2, 1], [2, 2, 2, 2], [None, 5, 5, 5], [None, None, 1, 1], [None, 3, None, None],
    ]
    t = {i: {f"c{j}": v for j, v in enumerate(r) if v is not None} for i, r in enumerate(rows)}
    assert krippendorff_alpha(t) == pytest.approx(0.743, abs=5e-4)


def test_degenerate_all_agree_and_one_category():
    one_cat = {i: {"a": "x", "b": "x", "c": "x"} for i in range(5)}
    with pytest.raises(ValueError, match="undefined .* expected agreement is 1"):  # 0/0; sklearn: nan
        cohen_kappa(one_cat, "a", "b")
    assert np.isnan(pairwise_kappa(one_cat).matrix[0, 1])
    assert fleiss_kappa(one_cat) == 1.0
    assert krippendorff_alpha(one_cat) == 1.0
    assert percent_agreement(one_cat) == 1.0
    all_agree = {i: {"a": lab, "b": lab} for i, lab in enumerate("xyxyz")}
    assert cohen_kappa(all_agree, "a", "b") == 1.0
    assert fleiss_kappa(all_agree) == 1.0
    assert krippendorff_alpha(all_agree) == 1.0


def test_undefined_cases_raise_named_errors():
    t = {1: {"a": "x"}, 2: {"b": "y"}}
    with pytest.raises(ValueError, match="share no judged item"):
        cohen_kappa(t, "a", "b")
    with pytest.raises(ValueError, match="fleiss_kappa"):
        fleiss_kappa(t)
    with pytest.raises(ValueError, match="krippendorff_alpha"):
        krippendorff_alpha(t)
    with pytest.raises(ValueError, match="no two raters share"):
        mean_pairwise_kappa(t)
    with pytest.raises(ValueError, match="unknown rater"):
        cohen_kappa(t, "a", "zed")


def test_majority_and_agreement_with_reference():
    t = {
        1: {"a": "x", "b": "x", "c": "y"},
        2: {"a": "y", "b": "y", "c": "y"},
        3: {"a": "x", "b": "y"},
        4: {"c": "x"},
    }
    maj = majority_labels(t)
    assert maj[1] == "x" and maj[2] == "y" and 3 not in maj and maj[4] == "x"
    ag = agreement_with_reference(t)  # leave-one-out majority
    # a: item1 others (x, y) split -> skip; item2 others y,y -> hit; item3 others (y) -> miss
    assert ag["a"].n == 2 and ag["a"].agreement == pytest.approx(0.5)
    # c: item1 others x,x -> miss; item2 hit; item4 no others -> skip
    assert ag["c"].n == 2 and ag["c"].agreement == pytest.approx(0.5)
    ref = agreement_with_reference(t, {1: "x", 2: "x"})
    assert ref["b"].agreement == pytest.approx(0.5) and ref["b"].n == 2
    none = agreement_with_reference({1: {"a": "x"}})
    assert none["a"].n == 0 and none["a"].agreement is None


def test_screen_side_randomisation_leaves_every_figure_unchanged():
    """Raters see canonical ids on random screen sides; stored labels are canonical, so figures match."""
    from preflab.quality.bootstrap import bootstrap_ci

    rng = random.Random(7)
    items = {f"item{i}": (f"resp{2 * i}", f"resp{2 * i + 1}") for i in range(40)}
    preference = {(it, r): rng.choice(["first", "second", "tie"]) for it in items for r in range(5)}

    def collect(randomise: bool):
        side_rng = random.Random(99)
        table = {}
        for it, (x, y) in items.items():
            row = {}
            for r in range(5):
                left, right = (y, x) if randomise and side_rng.random() < 0.5 else (x, y)
                pref = preference[(it, r)]
                chosen = "tie" if pref == "tie" else (x if pref == "first" else y)
                screen = "tie" if chosen == "tie" else ("a" if chosen == left else "b")
                # what the store keeps: the canonical id behind the chosen screen side
                row[f"r{r}"] = "tie" if screen == "tie" else (left if screen == "a" else right)
            table[it] = row
        return table

    fixed, randomised = collect(False), collect(True)
    for fn in (mean_pairwise_kappa, fleiss_kappa, krippendorff_alpha, percent_agreement):
        assert fn(fixed) == fn(randomised)
        assert bootstrap_ci(fixed, fn, n_boot=50, seed=1) == bootstrap_ci(randomised, fn, n_boot=50, seed=1)
    assert agreement_with_reference(fixed) == agreement_with_reference(randomised)
