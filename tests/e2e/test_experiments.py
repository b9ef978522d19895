"""``preflab sandbox experiment NAME`` end to end at toy scale, plus the pure pieces it rests on."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from preflab.config import ConfigError
from preflab.experiments import ExperimentConfig, label_pairs, mean_ci, paired_diff, wilson
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


def test_mean_ci_and_wilson_hand_values():
    m, ci = mean_ci([1.0, 2.0, 3.0, 4.0])  # s = 1.2910, 1.96 s / 2 = 1.2652
    assert m == 2.5
    assert ci == pytest.approx([2.5 - 1.26520, 2.5 + 1.26520], abs=1e-4)
    assert mean_ci([3.0]) == (3.0, [3.0, 3.0])
    assert wilson(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-3)  # textbook Wilson 95% for 8/10
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_paired_diff_hand_values():
    # items 3 and 4 are unscored on one side; d = [1, 0, 0]: mean 1/3, s = sqrt(1/3), half-width 1.96 s / sqrt(3)
    p = paired_diff([1, 1, 0, None, 1], [0, 1, 0, 1, None])
    assert p["n"] == 3 and p["diff"] == pytest.approx(1 / 3)
    assert p["ci"] == pytest.approx([1 / 3 - 0.65333, 1 / 3 + 0.65333], abs=1e-4)
    assert paired_diff([1, 0], [1, 0])["ci"] == [0.0, 0.0]
    assert paired_diff([None], [1])["n"] == 0


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

    rep = render_report(lab / "run")
    assert not rep.problems
    html = rep.html_path.read_text() if hasattr(rep.html_path, "read_text") else open(rep.html_path).read()
    assert html.count("What-if experiments") >= 1 and "KL penalty sweep" in html

    # a re-run resumes from the cache: nothing is trained again
    r = _run(lab, "kl-sweep")
    assert r.exit_code == 0 and "PPO beta-0.01: cached" in r.output.replace("\n", " ")
    assert json.loads((out / "kl-sweep.json").read_text())["rows"] == kl["rows"]


def test_unknown_experiment_is_refused(lab):
    r = _run(lab, "bigger-model")
    assert r.exit_code == 2 and "unknown name" in r.output
