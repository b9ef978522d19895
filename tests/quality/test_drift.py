"""Rationale drift: embeddings, permutation and Fisher tests, the monitoring rule, detection power."""

from __future__ import annotations

import random

import numpy as np
import pytest

from preflab.config import ConfigError
from preflab.quality.drift import (
    DriftConfig,
    agreement_drop_test,
    centroid_shift,
    check_drift,
    first_alarm,
    fisher_greater,
    hits_vs_others,
    permutation_test,
    rolling_agreement,
    tfidf_embed,
    tokenize,
)


def test_tfidf_matches_sklearn():
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = ["B is warmer and answers directly.", "A has no filler.", "B is warmer.", "A sounds confident and sure."]
    ours = tfidf_embed(texts)
    ref = TfidfVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None).fit_transform(texts).toarray()
    assert ours.shape == ref.shape
    assert np.allclose(ours, ref, atol=1e-12)


@pytest.mark.parametrize("table", [(20, 5, 10, 15), (0, 3, 4, 0), (5, 0, 0, 5), (90, 10, 80, 20), (3, 7, 7, 3)])
def test_fisher_matches_scipy(table):
    from scipy.stats import fisher_exact

    a, b, c, d = table
    ref = fisher_exact([[a, b], [c, d]], alternative="greater").pvalue
    assert fisher_greater(a, b, c, d) == pytest.approx(ref, abs=1e-12)


def test_agreement_drop_test_direction_and_empty():
    assert agreement_drop_test([True] * 90 + [False] * 10, [True] * 60 + [False] * 40) < 1e-4
    assert agreement_drop_test([True] * 60 + [False] * 40, [True] * 90 + [False] * 10) > 0.99
    assert agreement_drop_test([], [True]) == 1.0


def test_permutation_test_null_and_shift():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 5)), rng.normal(size=(60, 5))
    stat, p = permutation_test(x, y, n_perm=499, seed=1)
    assert stat == pytest.approx(centroid_shift(x, y)) and p > 0.01
    _, p_shift = permutation_test(x, y + 0.8, n_perm=499, seed=1)
    assert p_shift == pytest.approx(1 / 500)
    assert permutation_test(x, y, n_perm=499, seed=1) == (stat, p)  # seeded


def test_permutation_p_is_uniformish_under_null():
    rng = np.random.default_rng(3)
    ps = [permutation_test(rng.normal(size=(30, 3)), rng.normal(size=(30, 3)), n_perm=199, seed=s)[1]
          for s in range(60)]
    assert 0.3 < float(np.mean(ps)) < 0.7
    assert np.mean(np.array(ps) <= 0.1) < 0.25


def test_rolling_agreement_hand_worked():
    assert rolling_agreement([1, 0, 1, 1], 2).tolist() == [1.0, 0.5, 0.5, 1.0]
    with pytest.raises(ValueError):
        rolling_agreement([1], 0)


def test_hits_vs_others():
    stream = [(1, "a", "x"), (1, "b", "x"), (1, "c", "y"), (2, "a", "x"), (2, "b", "y"), (3, "a", "x")]
    h = hits_vs_others(stream)
    assert h["a"] == [None, False, None]  # item 1: others split x/y; item 2: b alone says y; item 3: alone
    assert h["c"] == [False]  # others both said x
    assert h["b"] == [None, False]
    h = hits_vs_others(stream, exclude={"c"})  # c's labels no longer count among a's and b's others
    assert h["a"] == [True, False, None] and h["b"] == [True, False]
    assert h["c"] == [False]  # c's own hits still compare c with a and b


def test_config_validation_names_field():
    with pytest.raises(ConfigError, match="DriftConfig.alpha"):
        check_drift("r", ["x"] * 200, ["y"] * 100, cfg=DriftConfig(alpha=2.0))


def test_check_drift_flags_changed_reasons_with_examples():
    rng = random.Random(0)
    base = [rng.choice(["B is warmer.", "A answers directly.", "B has no filler."]) for _ in range(150)]
    moved = [rng.choice(["A sounds more professional and formal.", "B is warmer."]) for _ in range(100)]
    same = [rng.choice(["B is warmer.", "A answers directly.", "B has no filler."]) for _ in range(100)]
    c = check_drift("r", base, moved, standard_rationales=base[:50])
    assert c.flagged and "rationales moved" in c.reason
    assert any("formal" in e for e in c.examples)
    assert c.standard_distance_recent > c.standard_distance_baseline
    assert not check_drift("r", base, same).flagged
    short = check_drift("r", base[:20], moved)
    assert not short.flagged and "not enough" in short.reason


def test_check_drift_flags_agreement_drop_alone():
    texts = ["B is warmer."] * 150
    c = check_drift("r", texts, texts[:100], baseline_hits=[True] * 140 + [False] * 10,
                    recent_hits=[True] * 60 + [False] * 40)
    assert c.flagged and "agreement" in c.reason and c.p_rationale == 1.0


def test_first_alarm_reports_when():
    base = ["B is warmer."] * 100 + ["A sounds more professional and formal."] * 100
    found = first_alarm("r", base, [None] * 200, baseline_n=100, every=25)
    assert found is not None and found[0] == 150


@pytest.mark.slow
def test_drift_detection_power_reduced_trials():
    """Full count: bench/drift_detection.py. Here one trial per drift profile (4 drifting raters,
    16 non-drifting): every drifting rater flagged within 150 judgements, <= 1 false alarm."""
    from bench.drift_detection import drift_trial

    detected, false_alarms = 0, 0
    for seed in range(4):
        for res in drift_trial(seed, cfg=DriftConfig(n_perm=999)).values():
            if res["drifting"]:
                detected += res["alarm_at"] is not None
            else:
                false_alarms += res["alarm_at"] is not None
    assert detected == 4
    assert false_alarms <= 1


def test_default_embedder_prefers_offline_minilm_when_importable(monkeypatch):
    from preflab.quality import drift

    monkeypatch.setattr(drift, "minilm_available", lambda: True)
    assert drift.default_embedder() is drift.minilm_embed
    monkeypatch.setattr(drift, "minilm_available", lambda: False)
    assert drift.default_embedder() is drift.tfidf_embed
