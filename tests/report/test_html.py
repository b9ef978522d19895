"""The report renders from run-dir files: every section when its file exists, none otherwise."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from preflab.report.html import ReportError, render_report
from tests.report.fixture_run import make_run_dir

ROOT = Path(__file__).resolve().parents[2]
ALL = ["setup", "workshop", "quality", "reward", "ppo", "checkpoints", "pricing", "ab", "factual", "outcomes",
       "cost", "experiments", "truth"]


@pytest.fixture(scope="module")
def sandbox_run(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("r") / "demo", conversations_per_week=150)


def test_full_sandbox_report(sandbox_run):
    rep = render_report(sandbox_run)
    assert rep.sections == ALL and rep.problems == []
    doc = rep.html_path.read_text()
    assert doc.count('<img class="plot"') == 13 and "src=\"http" not in doc  # self-contained
    assert "Ground truth (sandbox only)" in doc and "Sandbox run" in doc
    md = rep.md_path.read_text()
    for needle in ("mean pairwise kappa 0.54 -> 0.71", "blind win rate 68.0% [61.3%, 74.0%]", "## Cost ledger",
                   "rm.seed | 1", "collection.seed | 3", "## Ground truth (sandbox only)", "payback",
                   "- torch 2.13.0, numpy 2.4.6, CPU kernels AVX512 on Test CPU, 2 threads",
                   "resumed under more than one", "## What the terms mean", "- duplicate ceiling: the best accuracy",
                   "One policy, three measurements on three samples"):
        assert needle in md, needle


def test_real_project_has_no_gold_panel(tmp_path):
    run = make_run_dir(tmp_path / "real", sandbox=False, conversations_per_week=60)
    rep = render_report(run)
    assert "truth" not in rep.sections and "experiments" not in rep.sections
    doc = rep.html_path.read_text()
    assert "Ground truth" not in doc and "Real project" in doc and "Nothing in this run was simulated" in doc
    assert "Imported production logs" in doc


def test_sections_follow_files(sandbox_run, tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    shutil.copytree(sandbox_run / "ab", run / "ab")
    shutil.copy(sandbox_run / "cost.json", run / "cost.json")
    assert render_report(run).sections == ["ab", "cost"]
    with pytest.raises(ReportError, match="no report inputs"):
        render_report(_empty(tmp_path))
    with pytest.raises(ReportError, match="not a directory"):
        render_report(tmp_path / "missing")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_bad_file_is_named_and_the_rest_renders(sandbox_run, tmp_path):
    run = tmp_path / "bad"
    shutil.copytree(sandbox_run, run)
    (run / "ab" / "result.json").write_text('{"win_rate": 0.6,\n oops}')
    (run / "ppo_v1" / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1\n')
    rep = render_report(run)
    assert any("result.json:2: invalid JSON" in p for p in rep.problems)
    assert any("metrics.jsonl:2: invalid JSON" in p for p in rep.problems)
    assert "outcomes" in rep.sections and "cost" in rep.sections
    assert 'class="problem"' in rep.html_path.read_text()


def test_json_text_is_escaped(sandbox_run, tmp_path):
    run = tmp_path / "esc"
    run.mkdir()
    shutil.copytree(sandbox_run / "collection", run / "collection")
    q = json.loads((run / "collection" / "quality.json").read_text())
    q["drift_alerts"][0]["examples"] = ['<script>alert(1)</script>']
    (run / "collection" / "quality.json").write_text(json.dumps(q))
    doc = render_report(run).html_path.read_text()
    assert "<script>" not in doc and "&lt;script&gt;alert(1)&lt;/script&gt;" in doc


def test_cli_report_and_outcomes(sandbox_run, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "preflab.cli", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)

    out = cli("outcomes", "compare", "--run", str(sandbox_run), "--baseline", "sft", "--candidate", "ppo_v2")
    assert out.returncode == 0, out.stderr
    assert "escalation rate" in out.stdout and "comparison.json" in out.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("conversation_id,model_version,escalated,csat,handle_time_min,timestamp\nx,sft,1,7,1,2026-01-05\n")
    out = cli("outcomes", "import", str(bad), "--run", str(tmp_path / "r"))
    assert out.returncode == 2 and "bad.csv:2: csat" in out.stdout.replace("\n", "")
    assert not (tmp_path / "r" / "outcomes").exists()
    out = cli("outcomes", "compare", "--run", str(tmp_path / "r"), "--baseline", "sft", "--candidate", "ppo_v2")
    assert out.returncode == 2 and "--run: no outcomes imported in" in out.stdout.replace("\n", "")
    out = cli("report", str(tmp_path / "nothing-here"))
    assert out.returncode == 2 and "not a directory" in out.stdout


def test_reads_the_native_outputs_of_the_evaluators(tmp_path):
    """evaluate.ab / preference / factual / gates write to_dict() as is; the report reads it."""
    from types import SimpleNamespace

    from preflab.evaluate.ab import ab_result
    from preflab.evaluate.factual import FactualComparison
    from preflab.evaluate.gates import Gate, GateReport
    from preflab.evaluate.preference import preference_report

    run = tmp_path / "native"
    (run / "ab").mkdir(parents=True)
    outcomes = [1.0] * 14 + [0.5] * 2 + [0.0] * 4
    ab = ab_result(outcomes, topics=["pricing", "billing"] * 10, candidate_texts=["a b c"] * 20,
                   baseline_texts=["a b"] * 20, candidate="ppo_v2", baseline="sft")
    (run / "ab" / "result.json").write_text(json.dumps(ab.to_dict()))
    ex = [SimpleNamespace(pair_id=f"p{i}", chosen="x y", rejected="x", rater="ana", topic="pricing",
                          strength=1 + i % 3, is_tie=False) for i in range(30)]
    pref = preference_report(ex, [1.0] * 24 + [-1.0] * 6, [0.0] * 30, ceiling=0.8, n_boot=50)
    (run / "rm_v1" / "eval").mkdir(parents=True)
    (run / "rm_v1" / "eval" / "preference.json").write_text(json.dumps(pref.to_dict()))
    fc = FactualComparison(n=10, accuracy_baseline=0.6, accuracy_candidate=0.7, only_baseline=1, only_candidate=2,
                           p_value=1.0, regression=False,
                           by_topic={"pricing": {"n": 10, "accuracy_baseline": 0.6, "accuracy_candidate": 0.7}})
    (run / "factual").mkdir()
    (run / "factual" / "result.json").write_text(json.dumps(fc.to_dict()))
    gates = GateReport([Gate("win_rate", False, 0.45, 0.5, "lower CI > threshold")], subject="ppo_v1@500")
    (run / "checkpoints.json").write_text(json.dumps([{"run": "ppo_v1", "step": 500, "gates": gates.to_dict()}]))
    import numpy as np

    from preflab.quality.calibration import before_after
    from preflab.sandbox.oracle import frontier_from_tables

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 40)
    noisy = lambda flip: {f"i{i}": {r: int(t) ^ int(rng.random() < flip) for r in ("ana", "ben", "eli")}  # noqa: E731
                          for i, t in enumerate(truth)}
    (run / "workshop").mkdir()
    (run / "workshop" / "report.json").write_text(json.dumps(before_after(noisy(0.3), noisy(0.1), n_boot=50)))
    fr = frontier_from_tables("gold", [np.log(np.full(4, 0.25))], [np.arange(4.0)], [np.arange(4.0)])
    (run / "oracle.json").write_text(json.dumps({"gold": fr.to_dict()}))
    (run / "ppo_v1").mkdir()
    (run / "ppo_v1" / "metrics.jsonl").write_text('{"step": 0, "objective/kl": 0.0, "gold/utility": 1.5}\n')
    rep = render_report(run)
    assert rep.problems == []
    assert rep.sections == ["workshop", "reward", "ppo", "checkpoints", "ab", "factual"]
    assert rep.html_path.read_text().count('<img class="plot"') == 6
    md = rep.md_path.read_text()
    assert f"blind win rate {100 * ab.overall.rate:.1f}%" in md
    assert "rm_v1 held-out accuracy 80.0% (ceiling 80.0%)" in md
    assert "sft 60.0% -> ppo_v2" not in md and "baseline 60.0% -> candidate 70.0%" in md
    assert "FAIL win_rate 0.450 vs 0.500" in md
    assert "- Decision: nothing promoted; blocked ppo_v1@500 on win_rate\n" in md.split("## Summary")[1]  # the first line
    assert "mean pairwise kappa " in md and "| Fleiss' kappa |" in md and "| raw agreement |" in md
    rep_w = json.loads((run / "workshop" / "report.json").read_text())["change"]["mean_pairwise_kappa"]
    change = f"{rep_w['value']:+.2f} [{rep_w['low']:+.2f}, {rep_w['high']:+.2f}]"  # the change's own interval
    assert f"(change {change}" in md and f"| {change}" in md


def test_curve_headlines_say_climbing_flat_or_one_size(tmp_path):
    from preflab.evaluate.curve import curve_summary

    run = tmp_path / "curves"
    flat = [{"pairs": 100, "hits": [1, 0] * 50}, {"pairs": 200, "hits": [1, 0] * 50}]
    climbing = [{"pairs": 100, "hits": [0] * 100}, {"pairs": 200, "hits": [1] * 100}]
    wide = [{"pairs": 100, "hits": [1, 0] * 50}, {"pairs": 200, "hits": [1, 1, 0, 0] * 25}]  # +0 [-14, +14]
    for name, points in (("a", flat), ("b", climbing), ("c", flat[:1]), ("d", wide)):
        (run / name).mkdir(parents=True)
        (run / name / "curve.json").write_text(json.dumps(curve_summary(points, ceiling=0.9)))
    rep = render_report(run)
    assert rep.sections == ["reward"] and rep.problems == []
    md = rep.md_path.read_text()
    for needle in ("a: flat at 200 pairs", "b: still climbing at 200 pairs", "c: one size only, 100 pairs",
                   "d: unclear whether still climbing at 200 pairs"):
        assert needle in md, needle


def test_workshop_rounds_of_different_sizes_are_both_named():
    from preflab.report.html import norm_workshop

    stats = {"mean_pairwise_kappa": {"value": 0.5, "ci": [0.4, 0.6]}}
    w = norm_workshop({"before": {"statistics": stats, "n_items": 40, "raters": {}},
                       "after": {"statistics": stats, "n_items": 38, "raters": {}}})
    assert w["n_pairs"] == "40 before / 38 after"
    w = norm_workshop({"before": {"statistics": stats, "n_items": 40, "raters": {}},
                       "after": {"statistics": stats, "n_items": 40, "raters": {}}})
    assert w["n_pairs"] == 40


def test_who_moved_lists_the_raters_who_fell_too():
    from preflab.report.html import norm_workshop

    stats = {"mean_pairwise_kappa": {"value": 0.5, "ci": [0.4, 0.6]}}
    movers = [{"rater": r, "kappa_before": 0.5, "kappa_after": 0.5 + d, "kappa_change": d}
              for r, d in (("ana", 0.2), ("dev", 0.1), ("chloe", 0.05), ("eli", -0.16), ("ben", -0.2))]
    w = norm_workshop({"before": {"statistics": stats, "n_items": 40, "raters": {}},
                       "after": {"statistics": stats, "n_items": 40, "raters": {}}, "movers": movers})
    assert [m["rater"] for m in w["moved"]] == ["ana", "dev", "chloe", "eli", "ben"]


def test_the_checkpoint_table_says_what_each_gate_value_is(tmp_path):
    run = tmp_path / "gates"
    run.mkdir()
    gates = [{"name": "win_rate", "value": 0.71, "threshold": 0.5, "pass": True, "rule": "Wilson lower bound > threshold"},
             {"name": "factual[pricing]", "value": 0.02, "threshold": 0.01, "pass": True, "rule": "one-sided p"}]
    (run / "checkpoints.json").write_text(json.dumps({"rows": [{"run": "ppo", "step": 5, "gates": gates,
                                                                "promoted": True, "stage": "staging",
                                                                "win_rate": 0.8, "win_rate_ci": [0.7, 0.9],
                                                                "win_rate_n": 100}]}))
    md = render_report(run).md_path.read_text()
    assert "- win_rate: Wilson lower bound > threshold" in md and "- factual: one-sided p" in md
    assert "promoted (staging)" in md and "80.0% [70.0%, 90.0%], n=100" in md


def test_the_ground_truth_panel_shows_gold_at_every_checkpoint(tmp_path):
    run = tmp_path / "truth"
    (run / "ppo_v2").mkdir(parents=True)
    (run / "truth.json").write_text(json.dumps({"statement": "Simulated.", "policies": []}))
    (run / "ppo_v2" / "gold_by_checkpoint.json").write_text(json.dumps([
        {"step": 0, "oracle/kl": 0.0, "oracle/gold": -0.57, "gold/utility": -0.83},
        {"step": 80, "oracle/kl": 1.19, "oracle/gold": -0.05, "gold/utility": 0.95}]))
    md = render_report(run).md_path.read_text()
    assert "### Gold by checkpoint" in md and "| ppo_v2 | 80 | 1.19 | -0.05 | 0.95 |" in md


def test_each_ppo_pass_is_read_in_a_sentence_with_what_looks_wrong():
    from preflab.report.html import _ppo_reading

    steps = [{"step": i, "objective/scores": 0.1 * i, "objective/kl": 0.3 * i, "objective/beta": 0.02}
             for i in range(1, 11)]
    gold = [{"step": 0, "gold/utility": 1.0}, {"step": 10, "gold/utility": 0.2}]
    line = _ppo_reading("ppo_x", gold[:1] + steps + gold[1:], {"kl_controller": "adaptive", "kl_target": 1.0})
    assert line.startswith("ppo_x: over 10 steps its reward model's score went +0.15 -> +0.95; KL 2.85 nats (target 1.00)")
    assert "gold (sandbox, sampled) +1.00 -> +0.20" in line
    assert "Watch: the score rose while gold fell: reward hacking" in line and "Watch: KL ended +185% off its target" in line
    calm = _ppo_reading("ppo_y", steps, {"kl_controller": "fixed"})  # no target, no gold: nothing to watch
    assert "Watch" not in calm and "target" not in calm
    assert _ppo_reading("ppo_z", [{"step": 0, "gold/utility": 1.0}], {}) == "ppo_z: no training steps logged yet."
