"""`preflab report RUN_DIR --db`: a real project's rater quality, cost, checkpoints and A/B come from
the store and the checkpoints' evidence (no sandbox, no gold), and the demo's own files are never overwritten."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from preflab.cli import app
from preflab.evaluate.ab import ab_result
from preflab.evaluate.gates import Evidence, GatesConfig, evaluate_gates
from preflab.store import db, ops
from tests.conftest import judge_all


def test_report_from_a_real_projects_store(seed, db_url, tmp_path):
    st = seed(n_pairs=12, raters={"ann": [], "bob": []}, project="acme")
    with db.session_scope(st.engine) as s:
        rid = ops.create_round(s, project_id=st.project_id, name="week 1", kind="collection", pair_ids=st.pair_ids,
                               overlap=2, duplicate_rate=0.5, duplicate_gap=1, routing="any")
        ops.update_rater(s, rater_id=st.raters["ann"], hourly_rate=90.0)
    # ann always prefers the same answer (canonical a); bob always picks the left one, so every planted
    # duplicate (sides swapped) gets the other answer from him
    n_ann = judge_all(st.engine, rid, st.raters["ann"], lambda t: "left" if t.left_id.endswith("a") else "right",
                      seconds=36.0)
    n_bob = judge_all(st.engine, rid, st.raters["bob"], lambda t: "left", seconds=18.0)

    run = tmp_path / "run"
    ev_dir = run / "ppo1" / "policy" / "eval"
    outcomes = [1.0] * 30 + [0.0] * 8 + [0.5] * 2
    ev = Evidence(ab=ab_result(outcomes, topics=["pricing"] * 40, candidate_texts=["a b c"] * 40,
                               baseline_texts=["a b"] * 40, candidate=str(run / "ppo1" / "policy"), baseline="sft"))
    ev.save(ev_dir)
    evaluate_gates(GatesConfig(gates=["win_rate"]), ev, subject="ppo1").save(ev_dir / "gate.json")
    (run / "ppo1" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 30}\n')  # no curves logged: nothing to plot

    r = CliRunner().invoke(app, ["report", str(run), "--db", db_url, "--project", "acme"])
    assert r.exit_code == 0, r.output
    for name in ("collection/quality.json", "cost.json", "checkpoints.json", "ab/result.json"):
        assert f"{name}: written" in r.output
    assert "sections: quality, ppo, checkpoints, ab, cost" in r.output and "warning" not in r.output, r.output

    q = json.loads((run / "collection" / "quality.json").read_text())
    raters = {x["rater"]: x for x in q["raters"]}
    assert raters["ann"]["consistency"] == 1.0 and raters["bob"]["consistency"] == 0.0
    n_dup = raters["ann"]["n_duplicates"] + raters["bob"]["n_duplicates"]
    assert n_dup == q["n_duplicates"] > 0 and q["n_pairs"] == 12 and q["n_judgements"] == n_ann + n_bob
    c = raters["ann"]["n_duplicates"] / n_dup  # pooled: only ann's duplicates agree
    assert math.isclose(q["consistency"], c)
    assert math.isclose(q["ceiling"], 1 - (1 - math.sqrt(max(2 * c - 1, 0))) / 2)  # docs/quality.md: 1 - e
    lo, hi = q["ceiling_ci"]  # the Wilson interval of the pooled consistency, through the same formula
    assert lo <= q["ceiling"] <= hi
    assert f"from {n_dup} planted duplicates (few duplicates: a rough figure)" in (run / "report.md").read_text()

    cost = json.loads((run / "cost.json").read_text())
    people = {a["rater"]: a for a in cost["annotators"]}
    assert math.isclose(people["ann"]["cost"], n_ann * 36 / 3600 * 90)  # the store's hourly rate
    assert math.isclose(people["bob"]["cost"], n_bob * 18 / 3600 * 60)  # CostConfig's default
    assert cost["simulated_raters"] is False

    row = json.loads((run / "checkpoints.json").read_text())["rows"][0]
    assert (row["run"], row["step"], row["promoted"]) == ("ppo1/policy", 30, True)
    assert math.isclose(row["win_rate"], 31 / 40)
    ab = json.loads((run / "ab" / "result.json").read_text())
    assert ab["candidate"] == "ppo1/policy" and ab["baseline"] == "sft"
    html = (run / "report.html").read_text()
    assert "Real project" in (run / "report.md").read_text() and "Ground truth" not in html
    md = (run / "report.md").read_text()
    assert "- blind win rate:" in md and "- gold utility" not in md  # the glossary: only the terms used here

    # again: its own files are rewritten; a file it did not write (e.g. the demo's) is kept as it is
    (run / "cost.json").write_text('{"currency": "EUR", "annotators": [], "compute": [], "totals": {}}')
    r = CliRunner().invoke(app, ["report", str(run), "--db", db_url, "--project", "acme"])
    assert r.exit_code == 0 and "collection/quality.json: written" in r.output, r.output
    assert "kept: cost.json was not written by preflab report --db" in " ".join(r.output.split())
    assert json.loads((run / "cost.json").read_text())["currency"] == "EUR"

    r = CliRunner().invoke(app, ["report", str(run), "--db", db_url, "--project", "nobody"])
    assert r.exit_code == 2 and "no project named 'nobody'" in r.output


def test_a_real_projects_report_has_the_roi_once_outcomes_are_compared(seed, db_url, tmp_path):
    """Outcomes imported and compared (`outcomes compare --run`) give the ledger its escalation rates;
    the project's [cost] table prices an escalation and the weekly volume."""
    st = seed(n_pairs=4, raters={"ann": []}, project="acme")
    with db.session_scope(st.engine) as s:
        rid = ops.create_round(s, project_id=st.project_id, name="w1", kind="collection", pair_ids=st.pair_ids,
                               overlap=1, duplicate_rate=0.0, routing="any")
    judge_all(st.engine, rid, st.raters["ann"], lambda t: "left", seconds=3600.0)  # 4 hours at 60/h = 240
    run = tmp_path / "run"
    run.mkdir()
    rows = ["conversation_id,model_version,escalated,csat,handle_time_min,timestamp"]
    rows += [f"a{i},sft,{int(i < 40)},3,5,2026-01-05" for i in range(100)]  # 40% escalated
    rows += [f"b{i},ppo,{int(i < 20)},4,5,2026-01-12" for i in range(100)]  # 20%
    (tmp_path / "logs.csv").write_text("\n".join(rows) + "\n")
    runner = CliRunner()
    assert runner.invoke(app, ["outcomes", "import", str(tmp_path / "logs.csv"), "--run", str(run)]).exit_code == 0
    r = runner.invoke(app, ["outcomes", "compare", "--run", str(run), "--baseline", "sft", "--candidate", "ppo"])
    assert r.exit_code == 0, r.output
    (tmp_path / "project.toml").write_text("[cost]\nweekly_conversations = 1000\ncost_per_escalation = 12.0\n")
    r = runner.invoke(app, ["report", str(run), "--db", db_url, "--project", "acme",
                            "--config", str(tmp_path / "project.toml")])
    assert r.exit_code == 0, r.output
    roi = json.loads((run / "cost.json").read_text())["roi"]
    # 0.20 fewer escalations x 1000 conversations a week x 12 = 2400 a week; the 240 spent pays back in 0.1 week
    assert math.isclose(roi["escalation_before"], 0.4) and math.isclose(roi["escalation_after"], 0.2)
    assert math.isclose(roi["weekly_saving"], 2400.0) and math.isclose(roi["payback_weeks"], 0.1)
    assert len(roi["payback_weeks_range"]) == 2
    md = (run / "report.md").read_text()
    assert "payback" in md.lower() and "- KL (to SFT)" not in md and "- duplicate ceiling" in md
    r = runner.invoke(app, ["report", str(run), "--config", str(tmp_path / "project.toml")])
    assert r.exit_code == 2 and "--config: give --db too" in r.output


def test_a_gate_loosened_after_a_refusal_reaches_the_report_and_a_rate_for_nobody_warns(seed, db_url, tmp_path):
    """The store's decisions (refusal at win_rate_lower_min 0.5, promotion at 0.4) go to decisions.json; the
    summary's Decision line carries the store's note; `[cost] hourly_rates` naming no rater is a warning."""
    from preflab.evaluate.promote import record_decision

    st = seed(n_pairs=4, raters={"ann": []}, project="acme")
    with db.session_scope(st.engine) as s:
        rid = ops.create_round(s, project_id=st.project_id, name="w1", kind="collection", pair_ids=st.pair_ids,
                               overlap=1, duplicate_rate=0.0, routing="any")
    judge_all(st.engine, rid, st.raters["ann"], lambda t: "left", seconds=60.0)
    run = tmp_path / "run"
    ckpt = run / "dpo1" / "policy"
    ev = Evidence(ab=ab_result([1.0] * 24 + [0.0] * 16, topics=["pricing"] * 40, candidate_texts=["a"] * 40,
                               baseline_texts=["a"] * 40, candidate=str(ckpt), baseline="sft"))
    ev.save(ckpt / "eval")  # win rate 0.6, Wilson lower bound 0.45: refused at 0.5, promoted at 0.4
    strict, loose = GatesConfig(gates=["win_rate"]), GatesConfig(gates=["win_rate"], win_rate_lower_min=0.4)
    evaluate_gates(loose, ev, subject=str(ckpt)).save(ckpt / "eval" / "gate.json")
    with db.session_scope(st.engine) as s:
        for cfg in (strict, loose):
            d = record_decision(s, project_id=st.project_id, checkpoint=ckpt, stage="staging",
                                report=evaluate_gates(cfg, ev, subject=str(ckpt)), gates=cfg)
    assert d.promoted and d.notes
    (tmp_path / "p.toml").write_text("[cost]\nhourly_rates = { bne = 38 }\n")
    r = CliRunner().invoke(app, ["report", str(run), "--db", db_url, "--project", "acme",
                                 "--config", str(tmp_path / "p.toml")])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "decisions.json: written" in out
    assert ("warning: cost: CostConfig.hourly_rates.bne: no rater of this project is named 'bne' (its raters: ann)"
            in out)
    decided = json.loads((run / "decisions.json").read_text())["decisions"]
    assert [(d["checkpoint"], d["stage"], d["promoted"], d["failed"]) for d in decided] == [
        ("dpo1/policy", "staging", False, ["win_rate"]), ("dpo1/policy", "staging", True, [])]
    assert decided[1]["notes"] == list(d.notes) and decided[0]["subject"] == str(ckpt.resolve())
    md = (run / "report.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("- Decision:"))
    assert "(every gate passed; note: promoted under other gate settings than the refusal(s)" in line
    assert "refused earlier (store): dpo1/policy for staging on win_rate" in line
    assert "| dpo1/policy | staging | refused | win_rate |" in md
