"""Held-out preference report: accuracy and CIs, ECE, length correlation, warnings; flipped labels end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from preflab.evaluate.preference import (
    Accuracy,
    accuracy_warnings,
    bootstrap_mean,
    evaluate_run,
    expected_calibration_error,
    pair_correct,
    preference_report,
)
from preflab.train.data import PreferenceExample


def ex(i, *, rater="a", topic="billing", strength=1, tie=False, chosen="x y", rejected="x"):
    return PreferenceExample(pair_id=f"p{i}", prompt=f"q{i}", chosen=chosen, rejected=rejected, strength=strength,
                             rater=rater, topic=topic, is_tie=tie)


def test_pair_correct_counts_reward_ties_half():
    assert pair_correct(np.array([1.0, 0.0, -1.0]), np.array([0.0, 0.0, 0.0])).tolist() == [1.0, 0.5, 0.0]


def test_bootstrap_mean_is_seeded_and_brackets_the_mean():
    v = np.array([1.0] * 70 + [0.0] * 30)
    lo, hi = bootstrap_mean(v, n_boot=2000, seed=1)
    assert (lo, hi) == bootstrap_mean(v, n_boot=2000, seed=1)
    assert lo < 0.7 < hi
    # normal approximation: half-width ~ 1.96 * sqrt(.7*.3/100) = 0.0898
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(0.21 / 100), abs=0.015)
    # clustering: duplicating every value inside its own cluster leaves the interval as wide
    lo2, hi2 = bootstrap_mean(np.repeat(v, 2), np.repeat(np.arange(100), 2), n_boot=2000, seed=1)
    assert hi2 - lo2 == pytest.approx(hi - lo, abs=0.02)
    assert bootstrap_mean(np.repeat(v, 2), n_boot=2000, seed=1)[1] - bootstrap_mean(
        np.repeat(v, 2), n_boot=2000, seed=1)[0] < hi - lo - 0.02


def test_ece_hand_worked():
    # p = 0.75 on every pair, all correct: |1 - 0.75| = 0.25
    assert expected_calibration_error(np.full(4, math.log(3)))[0] == pytest.approx(0.25)
    # confidence 0.75, half of them wrong: |0.5 - 0.75| = 0.25
    ece, bins = expected_calibration_error(np.array([math.log(3), -math.log(3)]))
    assert ece == pytest.approx(0.25) and len(bins) == 1 and bins[0]["n"] == 2
    # two bins: conf .75 acc 1 (n=1) and conf .95 acc 1 (n=1): (0.25 + 0.05) / 2
    ece, bins = expected_calibration_error(np.array([math.log(3), math.log(19)]))
    assert ece == pytest.approx(0.15) and len(bins) == 2


def test_report_groups_monotonicity_length_and_reference():
    exs = [ex(i, rater="a" if i % 2 else "b", strength=i % 4, chosen="w " * (1 + i % 5), rejected="w")
           for i in range(40)] + [ex(99, tie=True)]
    s = np.array([e.strength for e in exs], dtype=float)
    rc = np.where(s >= 1, 1.0, -1.0) + 0.01 * np.arange(len(exs))  # wrong only on strength 0
    rr = np.zeros(len(exs))
    ref = [True] * 20 + [False] * 20 + [None]
    r = preference_report(exs, rc, rr, ceiling=0.9, reference=ref, n_boot=200)
    assert r.n_pairs == 40 and r.n_ties == 1
    assert r.accuracy.value == pytest.approx(0.75) and r.accuracy.low < 0.75 < r.accuracy.high
    assert {k: v.value for k, v in r.per_strength.items()} == {"0": 0.0, "1": 1.0, "2": 1.0, "3": 1.0}
    assert r.strength_monotonic is True
    assert set(r.per_rater) == {"a", "b"} and r.per_topic["billing"].n == 40
    assert r.reference_accuracy.n == 40 and r.reference_accuracy.value == pytest.approx((15 + 5) / 40)
    assert r.warnings == []
    d = json.loads(r.to_json())
    assert d["accuracy"]["value"] == pytest.approx(0.75) and d["ceiling"] == 0.9
    # reward grows with length -> positive correlation
    rc2 = np.array([len(e.chosen.split()) for e in exs], dtype=float)
    assert preference_report(exs, rc2, rr, n_boot=50).length_corr > 0.5
    r3 = preference_report(exs, -rc, rr, n_boot=50)
    assert r3.strength_monotonic is False


def test_warnings():
    assert any("weak signal" in w for w in accuracy_warnings(Accuracy(100, 0.52, 0.42, 0.62), None))
    assert any("rater quirks" in w for w in accuracy_warnings(Accuracy(100, 0.9, 0.84, 0.95), None))
    w = accuracy_warnings(Accuracy(100, 0.8, 0.72, 0.87), 0.76)
    assert len(w) == 1 and "ceiling" in w[0]
    assert accuracy_warnings(Accuracy(100, 0.74, 0.65, 0.82), 0.78) == []


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="2 examples"):
        preference_report([ex(0), ex(1)], [0.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="ceiling"):
        preference_report([ex(0)], [0.0], [0.0], ceiling=1.5)


def test_flipped_labels_give_chance_accuracy_and_weak_signal(tmp_path):
    import torch

    from preflab.train.data import split_by_prompt
    from preflab.train.reward import RewardConfig, train_reward
    from tests.train.rm_fixtures import sandbox_pairs, tiny_reward_model, tiny_tokenizer

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    train, val = split_by_prompt(sandbox_pairs(600, seed=5, flip=0.5), val_fraction=0.5, seed=0)
    cfg = RewardConfig(lr=2e-3, batch_size=20, epochs=1, eval_every=0, checkpoint_every=0)
    train_reward(cfg, model=tiny_reward_model(tok), tokenizer=tok, train=train, val=val, run_dir=tmp_path,
                 show_progress=False)
    rep = evaluate_run(tmp_path, ceiling=0.8, n_boot=300)
    assert rep.n_pairs > 250
    # labels independent of content: accuracy ~ Binomial(n, 1/2) / n; allow 3.3 standard deviations
    assert abs(rep.accuracy.value - 0.5) < 3.3 * math.sqrt(0.25 / rep.n_pairs)
    assert any(w.startswith("weak signal") for w in rep.warnings)
    assert json.loads((tmp_path / "eval" / "preference.json").read_text())["n_pairs"] == rep.n_pairs
