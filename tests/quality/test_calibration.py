"""Before/after statistics of a workshop and the style-guide excerpt selection."""

from __future__ import annotations

import random

import pytest

from preflab.quality.agreement import fleiss_kappa, mean_pairwise_kappa
from preflab.quality.calibration import (
    before_after,
    change_ci,
    report_markdown,
    round_stats,
    style_guide_excerpts,
    style_guide_markdown,
)
from preflab.quality.drift import tfidf_embed


def _round(seed, agree, n=50, raters="abcde"):
    rng = random.Random(seed)
    t = {}
    for i in range(n):
        truth = rng.choice("ab")
        t[f"p{i}"] = {r: truth if rng.random() < agree else rng.choice(["a", "b", "tie"]) for r in raters}
    return t


def test_round_stats_values_and_cis():
    t = _round(0, 0.7)
    st = round_stats(t, n_boot=100, seed=0)
    k = st["statistics"]["mean_pairwise_kappa"]
    assert k["value"] == pytest.approx(mean_pairwise_kappa(t))
    assert k["low"] <= k["value"] <= k["high"]
    assert st["statistics"]["fleiss_kappa"]["value"] == pytest.approx(fleiss_kappa(t))
    assert set(st["raters"]) == set("abcde") and st["n_items"] == 50
    assert all(0 <= r["agreement_with_majority"] <= 1 for r in st["raters"].values())


def test_before_after_change_and_movers():
    before, after = _round(1, 0.5), _round(2, 0.85)
    rep = before_after(before, after, n_boot=200, seed=0)
    ch = rep["change"]["mean_pairwise_kappa"]
    assert ch["value"] == pytest.approx(mean_pairwise_kappa(after) - mean_pairwise_kappa(before))
    assert ch["low"] > 0  # a big improvement is outside the noise
    assert len(rep["movers"]) == 5
    changes = [m["kappa_change"] for m in rep["movers"]]
    assert changes == sorted(changes, reverse=True)
    md = report_markdown(rep)
    assert "| mean pairwise kappa |" in md and "## Who moved" in md


def test_change_ci_brackets_zero_for_same_process():
    rep = change_ci(_round(3, 0.7), _round(4, 0.7), mean_pairwise_kappa, n_boot=300, seed=0)
    assert rep["low"] < 0 < rep["high"]


def test_style_guide_excerpts_pick_matching_rationales():
    rubric = ["Tone: warmer answers are better.", "Brevity: has no filler."]
    rationales = ["Is warmer.", "Is warmer and answers directly.", "Has no filler.", "Has no filler and is warmer.",
                  "Zzz unrelated."]
    ex = style_guide_excerpts(rubric, rationales, embed=tfidf_embed, n_per_item=2)
    assert [e.rationale for e in ex[rubric[0]]][0] == "Is warmer."
    assert "Has no filler." in [e.rationale for e in ex[rubric[1]]]
    assert all("Zzz" not in e.rationale for v in ex.values() for e in v)
    md = style_guide_markdown("Guide", "Be right, then kind.", ex)
    assert md.startswith("# Guide") and "> Is warmer." in md and "### Brevity" in md
    assert style_guide_excerpts(rubric, [], embed=tfidf_embed) == {r: [] for r in rubric}
