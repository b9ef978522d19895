"""``preflab sandbox experiment NAME`` end to end at toy scale, plus the pure pieces it rests on."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from preflab.config import ConfigError
from preflab.experiments import ExperimentConfig, label_pairs, wilson
from preflab.sandbox.raters import SimRater, sft_style_pairs
from preflab.sandbox.truth import reward_model_truth

# positions well above prompt + response of the toy tokenizer (the RM pads responses past the prompt)
TINY = dict(corpus_size=64, tokenizer_texts=200, vocab_size=400, n_layer=2, n_head=2, n_embd=64,
            n_positions=512, steps=6, batch_size=8, warmup_steps=1, checkpoint_every=3, num_threads=1,
            progress=False)
FLAGS = ["--pairs", "24", "--volume-ratio", "2", "--crowd-raters", "6", "--eval-pairs", "40", "--ppo-steps", "2",
         "--ppo-prompts", "4", "--ppo-eval-every", "1", "--eval-queries", "8", "--oracle-queries", "2",
         "--max-new-tokens", "16", "--betas", "0.01,0.5", "--no-progress"]


# ---- pure pieces --------------------------------------------------------------------------------


def test_wilson_hand_values():
    assert wilson(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-3)  # textbook Wilson 95% for 8/10
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_label_pairs_canonical_and_faithful():
    """A careful, unbiased rater's labels follow gold whatever the screen side; ties keep both texts."""
    pairs = sft_style_pairs(120, seed=3)
    sharp = SimRater("gold", "pricing", temperature=1e-4, specialty_temperature=1e-4, flip_rate=0.0, tie_band=0.0)
    ex = label_pairs([sharp], pairs, rubric="v2", seed=0, tag="t")
    assert len(ex) == len(pairs)
    for (q, a, b), e in zip(pairs, ex, strict=True):
        assert {e.chosen, e.rejected} == {a, b} and e.prompt == q.text and e.rater == "gold"
        assert e.strength == 0 if e.is_tie else 1 <= e.strength <= 3
    t = reward_model_truth("labels", [(q, e.chosen, e.rejected, 1.0) for (q, _, _), e in zip(pairs, ex, strict=True)
                                      if not e.is_tie])
    assert t["gold_accuracy"] == 1.0
    # a coin-flipping rater (lapse ~ 0.5) is near chance: the check above can fail
    sloppy = SimRater("coin", "pricing", flip_rate=0.49)
    ex2 = label_pairs([sloppy], pairs, rubric="v2", seed=0, tag="t")
    t2 = reward_model_truth("labels", [(q, e.chosen, e.rejected, 1.0) for (q, _, _), e in zip(pairs, ex2, strict=True)
                                       if not e.is_tie])
    assert t2["gold_accuracy"] < 0.75


@pytest.mark.parametrize("kw, field", [({"betas": [0.1, -1.0]}, "betas"), ({"margins": ["huge"]}, "margin"),
                                       ({"pairs": 0}, "pairs"), ({"rubric": "v3"}, "rubric")])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        ExperimentConfig(**kw)


def test_curve_sizes_must_ascend():
    for bad in ([], [500, 250], [0, 10]):
        with pytest.raises(ConfigError, match="curve_sizes"):
            ExperimentConfig(curve_sizes=bad)


def test_full_scale_keeps_the_story_ratio():
    f = ExperimentConfig().full()
    assert (f.pairs, f.pairs * f.volume_ratio, f.crowd_raters) == (6000, 60000, 50)


# ---- end to end through the CLI -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from preflab.sandbox.build import BuildConfig, build_sandbox_model
    from preflab.train.sft import train_sft

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("exp")
    build_sandbox_model(BuildConfig(**TINY), root / "base", train_sft=train_sft)
    return root


def _run(lab, *args):
    from preflab.cli import app

    return CliRunner().invoke(app, ["sandbox", "experiment", *args, "--run", str(lab / "run"),
                                    "--base", str(lab / "base"), *FLAGS])


def _ci_ok(ci):
    return len(ci) == 2 and ci[0] <= ci[1]


def test_experiments_write_report_plots(lab):
    from preflab.report.html import render_report

    out = lab / "run" / "experiments"
    r = _run(lab, "margin")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "margin.json").read_text())
    assert m["kind"] == "bars" and len(m["bars"]) == 4 and "24 pairs" in m["notes"]
    for b in m["bars"]:
        assert 0.0 <= b["value"] <= 1.0 and _ci_ok(b["ci"]) and b["ci"][0] <= b["value"] <= b["ci"][1]
    assert {row["margin"] for row in m["rows"]} == {"none", "llama2_small"}
    diff = m["rows"][1]["gold_diff"]  # paired on the same held-out pairs: equals the difference of accuracies
    assert diff["n"] == m["rows"][0]["n_gold"] and _ci_ok(diff["ci"])
    assert diff["diff"] == pytest.approx(m["rows"][1]["gold_accuracy"] - m["rows"][0]["gold_accuracy"])

    r = _run(lab, "consistency-vs-volume")
    assert r.exit_code == 0, r.output
    cv = json.loads((out / "consistency-vs-volume.json").read_text())
    assert [row["pairs"] for row in cv["rows"]] == [24, 48]  # the ratio is kept
    assert cv["gold_accuracy_diff"]["diff"] == pytest.approx(cv["rows"][1]["gold_accuracy"] - cv["rows"][0]["gold_accuracy"])
    assert "cached" in r.output  # the calibrated reward model is the margin experiment's llama2_small one
    ppo = json.loads((out / "consistency-vs-volume_ppo.json").read_text())
    assert ppo["kind"] == "bars" and len(ppo["bars"]) == 3 and all(_ci_ok(b["ci"]) for b in ppo["bars"])

    r = _run(lab, "kl-sweep")
    assert r.exit_code == 0, r.output
    kl = json.loads((out / "kl-sweep.json").read_text())
    assert kl["kind"] == "lines"
    runs = [s for s in kl["series"] if not s.get("reference")]
    ref = [s for s in kl["series"] if s.get("reference")]
    assert [s["label"] for s in runs][:2] == ["beta=0.01", "beta=0.5"] and runs[2]["label"].startswith("adaptive")
    assert len(ref) == 1 and ref[0]["x"] == sorted(ref[0]["x"]) and ref[0]["x"][0] == 0.0
    for s in runs:  # exact points on the oracle's support: the base is the frontier's origin
        assert s["x"][0] == 0.0 and s["y"][0] == pytest.approx(ref[0]["y"][0], abs=1e-6)
        assert len(s["x"]) == len(s["y"]) == 3  # base + 2 evals
    for row in kl["rows"]:  # each row: the exact point, the oracle at its KL, and sampled gold with its CI
        assert row["oracle_kl"] >= -1e-9 and 0 <= row["oracle_other_mass"] <= 1
        assert row["oracle_gold_at_kl"] >= ref[0]["y"][0] - 1e-9
        assert row["gold_ci"][0] <= row["gold"] <= row["gold_ci"][1]
        f = row["fraction_of_oracle_gain"]
        assert f is None or f == pytest.approx((row["oracle_gold"] - ref[0]["y"][0])
                                               / (row["oracle_gold_at_kl"] - ref[0]["y"][0]), rel=1e-6)
    # "closest to the oracle" is the largest share of its gain, not the largest raw gold (the furthest drift)
    shares = {r["run"]: r["fraction_of_oracle_gain"] for r in kl["rows"] if r["fraction_of_oracle_gain"] is not None}
    if shares:
        top = max(shares, key=shares.get)
        assert f"closest to the oracle frontier {top}" in kl["headline"] or any(
            abs(shares[top] - v) < 0.01 and f"frontier {k}" in kl["headline"] for k, v in shares.items())

    r = _run(lab, "learning-curve", "--curve-sizes", "12,24")
    assert r.exit_code == 0, r.output
    lc = json.loads((out / "learning-curve.json").read_text())
    assert lc["kind"] == "curve" and [p["asked"] for p in lc["points"]] == [12, 24]
    small, big = lc["points"]
    assert 12 <= small["pairs"] < big["pairs"] and big["pairs"] == 24  # the largest set is every labelled pair
    assert small["n"] == big["n"] == lc["n_val"] == lc["gains"][0]["n"]  # the same held-out labels, paired
    assert lc["gains"][0]["diff"] == pytest.approx(big["accuracy"] - small["accuracy"])
    for p in lc["points"]:
        assert _ci_ok(p["ci"]) and p["ci"][0] <= p["accuracy"] <= p["ci"][1]
        assert 0 <= p["gold_accuracy"] <= 1 and _ci_ok(p["gold_ci"])
    # the ceiling from re-judged held-out pairs, and the best possible model, are the raters' (lapse 0.12 + own)
    assert 0.5 < lc["ceiling"] <= 1 and lc["duplicates"] == lc["n_val"] + lc["n_val_ties"]
    assert 0.5 < lc["best_possible"]["expected"] < 1 and "duplicate ceiling" in lc["notes"]

    rep = render_report(lab / "run")
    assert not rep.problems
    html = rep.html_path.read_text() if hasattr(rep.html_path, "read_text") else open(rep.html_path).read()
    assert html.count("What-if experiments") >= 1 and "KL penalty sweep" in html
    assert "Would more judgements help?" in html
    # a run of experiments alone is a sandbox run, and each plot gives the summary a line
    assert "Sandbox experiments: the raters are simulated" in html and "Real project" not in html
    md = rep.md_path.read_text().split("## Summary")[1]
    assert "margin on/off: llama2_small - none gold accuracy" in md and "KL sweep: closest to the oracle" in md
    assert "gold utility, oracle frontier (sandbox)" in html  # the glossary explains gold

    # a re-run resumes from the cache: nothing is trained again
    r = _run(lab, "kl-sweep")
    assert r.exit_code == 0 and "PPO beta-0.01: cached" in r.output.replace("\n", " ")
    assert json.loads((out / "kl-sweep.json").read_text())["rows"] == kl["rows"]


def test_unknown_experiment_is_refused(lab):
    r = _run(lab, "bigger-model")
    assert r.exit_code == 2 and "unknown name" in r.output
