"""The report's outcomes, cost and decision text on a real project's files: which checkpoint the
outcomes measure, a gate loosened after a refusal, compute not tracked, payback wording, rates and
warnings, and HTML that fits the page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from preflab.report.cost import CostConfig, build_ledger, write_ledger
from preflab.report.html import duration, plural, rate, render_report, sig2
from preflab.report.outcomes import compare_versions, read_outcomes, write_comparison
from preflab.report.plots import bar_label_place

HEAD = "conversation_id,model_version,escalated,csat,handle_time_min,timestamp"
GATE = [{"name": "win_rate", "value": 0.45, "threshold": 0.4, "pass": True}]


def outcomes(run: Path, *, esc_sft: int = 40, esc_ppo: int = 20, n: int = 100, checkpoint: str | None = None,
             surveys: bool = True) -> dict:
    rows = [f"a{i},sft,{int(i < esc_sft)},{3 if surveys else ''},5,2026-01-05" for i in range(n)]
    rows += [f"b{i},ppo1,{int(i < esc_ppo)},{4 if surveys or i == 0 else ''},4,2026-01-12" for i in range(n)]
    (run.parent / "logs.csv").write_text(HEAD + "\n" + "\n".join(rows) + "\n")
    comp = compare_versions(read_outcomes(run.parent / "logs.csv"), "sft", "ppo1")
    write_comparison(run, comp, simulated=False, checkpoint=checkpoint)
    return comp


def promoted_dpo(run: Path, *, decisions: bool = True) -> None:
    (run / "dpo1" / "policy").mkdir(parents=True, exist_ok=True)
    (run / "ppo1" / "policy").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints.json").write_text(json.dumps({"rows": [
        {"run": "ppo1/policy", "step": 30, "gates": [{**GATE[0], "value": 0.3, "pass": False}], "promoted": False},
        {"run": "dpo1/policy", "step": 6, "gates": GATE, "promoted": True, "stage": "production"}]}))
    if decisions:
        subject = str((run / "dpo1" / "policy").resolve())
        d = [{"event": 3, "at": "2026-01-10T09:00", "checkpoint": "dpo1/policy", "subject": subject,
              "stage": "production", "promoted": False, "failed": ["win_rate"], "notes": []},
             {"event": 5, "at": "2026-01-10T10:00", "checkpoint": "dpo1/policy", "subject": subject,
              "stage": "production", "promoted": True, "failed": [],
              "notes": ["promoted under other gate settings than the refusal(s) of this checkpoint for production "
                        "(decision event 3)"]}]
        (run / "decisions.json").write_text(json.dumps({"decisions": d}))


def ledger(run: Path, comp: dict | None = None, **kw) -> None:
    roi = {} if comp is None else {"escalation_before": comp["escalation"]["baseline"],
                                   "escalation_after": comp["escalation"]["candidate"],
                                   "escalation_diff_ci": tuple(comp["escalation"]["ci"])}
    cfg = kw.pop("cfg", CostConfig(currency="EUR", hourly_rates={"ann": 42.5}, default_hourly_rate=60.0))
    write_ledger(run, build_ledger(cfg, judgement_times=[("ann", 3600.0), ("ann", 3600.0), ("bob", 360.0)], **roi, **kw))


def summary(md: str) -> str:
    return md.split("## Summary")[1].split("\n## ")[0]


@pytest.fixture
def run(tmp_path) -> Path:
    r = tmp_path / "run"
    r.mkdir()
    return r


def test_outcomes_of_another_checkpoint_than_the_promoted_one_are_said_plainly(run):
    promoted_dpo(run)
    comp = outcomes(run, checkpoint=str(run / "ppo1" / "policy"))
    ledger(run, comp)
    rep = render_report(run)
    md = rep.md_path.read_text()
    warn = "These outcomes are NOT the promoted checkpoint's: 'ppo1' was served by ppo1/policy, while dpo1/policy"
    assert any(warn in p for p in rep.problems), rep.problems
    assert warn in md.split("## Production outcomes")[1].split("\n## ")[0]
    assert warn in md.split("## Cost ledger")[1]  # next to the ROI too
    assert sum(warn in line for line in summary(md).splitlines()) == 2  # outcome and payback headlines


def test_the_promoted_checkpoint_or_none_recorded(run):
    promoted_dpo(run)
    outcomes(run, checkpoint=str(run / "dpo1" / "policy"))
    rep = render_report(run)
    md = rep.md_path.read_text()
    assert "'ppo1' was served by dpo1/policy, the promoted checkpoint." in md and not rep.problems
    outcomes(run)  # no --checkpoint
    rep = render_report(run)
    md = rep.md_path.read_text()
    assert ("which checkpoint served 'ppo1' is not recorded (`preflab outcomes compare --checkpoint`), so they may "
            "not be the promoted dpo1/policy's") in md
    html = rep.html_path.read_text()
    assert "<code>preflab outcomes compare --checkpoint</code>" in html


def test_a_loosened_gate_is_in_the_decision_line_and_the_refusal_is_listed(run):
    promoted_dpo(run)
    md = render_report(run).md_path.read_text()
    line = next(ln for ln in summary(md).splitlines() if ln.startswith("- Decision:"))
    assert line.startswith("- Decision: promoted dpo1/policy@6 (production) (every gate passed; note: promoted under "
                           "other gate settings than the refusal(s) of this checkpoint for production (decision event 3))")
    assert "refused earlier (store): dpo1/policy for production on win_rate" in line
    section = md.split("## Checkpoints and promotion gates")[1]
    assert "| 3 | 2026-01-10T09:00 | dpo1/policy | production | refused | win_rate | - |" in section
    # without the store's decisions (the demo's own files) the line is as before
    (run / "decisions.json").unlink()
    md = render_report(run).md_path.read_text()
    assert "- Decision: promoted dpo1/policy@6 (production) (every gate passed); blocked ppo1/policy@30 on win_rate" in md


def test_counts_and_not_compared_metrics_in_the_report(run):
    outcomes(run, surveys=False, esc_sft=1, esc_ppo=0, n=10)
    md = render_report(run).md_path.read_text()
    section = md.split("## Production outcomes")[1]
    assert "10 conversations on sft, 10 conversations on ppo1." in section
    assert "| answered surveys | 0 | 1 |" in section
    assert "| CSAT | | | not compared | 0 answered surveys on sft, 1 on ppo1 (at least 2 on each side needed) | |" in (
        re.sub(r" +", " ", section))
    assert "Fisher exact" in section and "Escalation p-value: Fisher's exact test" in section


def test_compute_not_tracked_rates_defaults_and_cost_per_judgement(run):
    ledger(run)
    rep = render_report(run)
    md = rep.md_path.read_text()
    assert "Compute EUR 0.00" not in md and "compute EUR 0.00" not in md and "| stage |" not in md
    assert "compute not tracked; total EUR 91 (annotation only)" in md
    assert "annotation cost EUR 91, total EUR 91 (annotation only; compute not tracked)" in summary(md)
    # ann: 2 h at 42.50 = 85 over 2 judgements; bob: 0.1 h at the default 60 = 6 over 1 -> 91 / 3
    assert "| ann | 2 | 2.0 | EUR 42.50 | EUR 85 | EUR 42.50 |" in md
    assert "| bob | 1 | 0.1 | EUR 60 (default) | EUR 6 | EUR 6.00 |" in md
    assert "EUR 30.33 a judgement over 3 judgements" in md
    # a tracked (demo) ledger keeps its compute table
    ledger(run, stage_seconds={"rm": 3600.0})
    md = render_report(run).md_path.read_text()
    assert "| rm | 1.000 | 1 | 1.000 | EUR 2.50 |" in md and "not tracked" not in md


def test_a_rate_for_nobody_is_a_warning_naming_the_key_and_the_raters(run):
    ledger(run, cfg=CostConfig(hourly_rates={"bne": 38.0}), raters=["ann", "bob"])
    rep = render_report(run)
    msg = "CostConfig.hourly_rates.bne: no rater of this project is named 'bne' (its raters: ann, bob)"
    assert any(msg in p for p in rep.problems) and msg in rep.md_path.read_text()


@pytest.mark.parametrize("esc_ppo, expect, refuse", [
    (20, "payback 0.96 hours (", ("never", "0.0 weeks")),  # 91 / (4000 x 0.2 x 20) weeks x 168 h
    (45, "no payback: escalations rose (40.0% -> 45.0%)", ("payback never", "USD -")),
    (37, "payback not established: the escalation CI [", ("payback 0", "payback 1", "payback 2")),
])
def test_payback_wording(run, esc_ppo, expect, refuse):
    comp = outcomes(run, esc_ppo=esc_ppo)
    ledger(run, comp)
    md = render_report(run).md_path.read_text()
    s = summary(md)
    assert expect in s, s
    assert not any(r in s for r in refuse), s
    if esc_ppo == 45:
        assert "There is no saving, so no payback." in md


def test_formatting_helpers():
    assert [sig2(x) for x in (0.0096, 1.63, 17.4, 123.0)] == ["0.0096", "1.6", "17", "120"]
    assert [duration(w) for w in (0.0096, 0.5, 1.875, float("inf"))] == ["1.6 hours", "3.5 days", "1.9 weeks", "never"]
    assert (plural(1, "loss", "losses"), plural(2, "conversation")) == ("1 loss", "2 conversations")
    assert (rate(42.5, "EUR"), rate(42.0, "EUR")) == ("EUR 42.50", "EUR 42")


def test_a_zero_bar_label_sits_above_the_bar_in_dark_text():
    y, va, color = bar_label_place(0.0, 0.2, 0.07)
    assert y > 0.07 and va == "bottom" and color != "white"
    assert bar_label_place(0.3, 0.4, 0.35) == (0.15, "center", "white")


def test_wide_tables_scroll_and_html_text_has_no_backticks(run):
    promoted_dpo(run)
    comp = outcomes(run)
    ledger(run, comp)
    (run / "ab").mkdir()
    (run / "ab" / "result.json").write_text(json.dumps({"candidate": "dpo1/policy", "baseline": "sft", "n": 1,
                                                        "wins": 1, "ties": 1, "losses": 1, "win_rate": 0.5}))
    html = render_report(run).html_path.read_text()
    assert '<div class="wide"><table>' in html and "div.wide{max-width:100%;overflow-x:auto}" in html
    text = re.sub(r"<pre>.*?</pre>", "", html, flags=re.S)
    assert "`" not in text
    assert "<code>CostConfig.cost_per_escalation</code>" in html
    assert "1 new conversation: 1 win, 1 tie, 1 loss" in html
