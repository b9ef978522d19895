"""Promotion records every decision and promotes only when every gate passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preflab.evaluate.gates import GatesConfig
from preflab.evaluate.promote import decisions, promote_checkpoint, promoted_to
from preflab.store import db
from tests.evaluate.test_gates import evidence, good_style, rubric_v1_style


@pytest.fixture
def setup(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    good, bad = tmp_path / "ppo2" / "policy", tmp_path / "ppo1" / "policy"
    evidence(good_style, candidate=str(good)).save(good / "eval")  # the A/B was about these checkpoints
    evidence(rubric_v1_style, candidate=str(bad)).save(bad / "eval")
    return url, good, bad


def _events(url):
    eng = db.make_engine(url)
    try:
        with db.session_scope(eng, readonly=True) as s:
            from preflab.store import ops

            pid = ops.project_id(s, name="default")
            return (decisions(s, project_id=pid), promoted_to(s, project_id=pid, stage="staging"),
                    promoted_to(s, project_id=pid, stage="production"))
    finally:
        eng.dispose()


def test_failing_checkpoint_is_refused_and_recorded(setup):
    url, good, bad = setup
    d = promote_checkpoint(bad, stage="staging", db_url=url)
    assert not d.promoted and "confident_wrong" in d.report.failed
    assert (bad / "eval" / "gate.json").exists()
    decs, staged, prod = _events(url)
    assert len(decs) == 1 and decs[0].payload["promoted"] is False and decs[0].subject == str(bad.resolve())
    assert "confident_wrong" in decs[0].payload["failed"] and staged is None


def test_passing_checkpoint_is_promoted_and_production_needs_staging(setup):
    url, good, bad = setup
    assert not promote_checkpoint(good, stage="production", db_url=url).promoted  # not staged yet
    assert promote_checkpoint(good, stage="staging", db_url=url).promoted
    assert promote_checkpoint(good, stage="production", db_url=url).promoted
    decs, staged, prod = _events(url)
    assert [d.payload["promoted"] for d in decs] == [False, True, True]
    assert decs[0].payload["failed"] == ["staged_first"]
    assert staged == prod == str(good.resolve())
    # gate.json says which decision it is (the report's checkpoint table shows it beside the gates)
    gate = json.loads((good / "eval" / "gate.json").read_text())
    assert gate["stage"] == "production" and gate["passed"]
    from preflab.pipeline import checkpoint_row

    assert checkpoint_row(good / "eval", run="good", step=None)["stage"] == "production"


def test_missing_evidence_or_checkpoint(setup, tmp_path):
    url, good, bad = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    d = promote_checkpoint(empty, stage="staging", db_url=url, gates=GatesConfig(gates=["formality"]))
    assert not d.promoted and d.report.gates[0].numbers == {"reason": "no evidence"}
    with pytest.raises(ValueError, match="no such checkpoint"):
        promote_checkpoint(tmp_path / "nope", stage="staging", db_url=url)
    with pytest.raises(ValueError, match="--to: must be one of"):
        promote_checkpoint(good, stage="prod", db_url=url)


def test_cli_promote_refuses_with_a_table_and_exit_1(setup):
    from typer.testing import CliRunner

    from preflab.cli import app

    url, good, bad = setup
    runner = CliRunner()
    res = runner.invoke(app, ["promote", str(bad), "--to", "staging", "--db", url + "x"], terminal_width=200)
    assert res.exit_code == 2 and "--db: no store at" in res.output  # a mistyped --db records nothing anywhere
    assert not Path(url.removeprefix("sqlite:///") + "x").exists()
    assert runner.invoke(app, ["store", "migrate", "--db", url]).exit_code == 0
    res = runner.invoke(app, ["promote", str(bad), "--to", "staging", "--db", url], terminal_width=200)
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.output and "confident_wrong" in res.output and "refused" in res.output
    res = runner.invoke(app, ["promote", str(good), "--to", "staging", "--db", url], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "promoted" in res.output
    decs, staged, _ = _events(url)
    assert [d.payload["promoted"] for d in decs] == [False, True] and staged == str(good.resolve())
    res = runner.invoke(app, ["gates", str(bad)], terminal_width=200)
    assert res.exit_code == 1 and "factual[pricing]" in res.output


def test_evidence_of_other_weights_does_not_promote(setup, tmp_path):
    """A checkpoint directory copied with its eval/ keeps the evidence; evidence copied into another
    checkpoint, or collected against the candidate itself, fails the gates it would decide."""
    import shutil

    from preflab.evaluate.gates import Evidence, evaluate_gates

    url, good, bad = setup
    for d, seed in ((good, 1), (bad, 2)):
        (d / "model.safetensors").write_bytes(bytes([seed]) * 4096)  # stand-ins for two checkpoints' weights
    ab = json.loads((good / "eval" / "ab.json").read_text())
    from preflab.models.hf import weights_fingerprint

    ab["candidate_weights"] = weights_fingerprint(good)
    (good / "eval" / "ab.json").write_text(json.dumps(ab))
    moved = tmp_path / "moved" / "policy"
    shutil.copytree(good, moved)  # the same weights elsewhere: its A/B still counts
    report = evaluate_gates(GatesConfig(gates=["win_rate"]), Evidence.load(moved / "eval"), checkpoint=moved)
    assert report.passed
    shutil.copy(good / "eval" / "ab.json", bad / "eval" / "ab.json")  # good's A/B pasted beside bad's weights
    d = promote_checkpoint(bad, stage="staging", db_url=url, gates=GatesConfig(gates=["win_rate"]))
    assert not d.promoted and d.report.gates[0].numbers["reason"].startswith("the A/B was judged on other weights")
    ev = Evidence.load(good / "eval")
    ev.provenance = {"candidate": str(good), "candidate_weights": weights_fingerprint(good), "baseline": str(good),
                     "baseline_weights": weights_fingerprint(good)}
    report = evaluate_gates(GatesConfig(gates=["factual", "formality"]), ev, checkpoint=good)
    assert not report.passed
    assert all(g.numbers["reason"].startswith("the evidence compares the candidate with itself") for g in report.gates)
    # an A/B against another baseline than the rest of the evidence's (a weaker model passes it more easily)
    weak = tmp_path / "weak"
    weak.mkdir()
    (weak / "model.safetensors").write_bytes(bytes([9]) * 4096)
    ab["baseline_weights"] = weights_fingerprint(weak)
    (good / "eval" / "ab.json").write_text(json.dumps(ab))
    ev = Evidence.load(good / "eval")
    ev.provenance = {"candidate": str(good), "candidate_weights": weights_fingerprint(good), "baseline": "runs/sft",
                     "baseline_weights": weights_fingerprint(bad)}
    g = evaluate_gates(GatesConfig(gates=["win_rate"]), ev, checkpoint=good).gates[0]
    assert not g.passed and g.numbers["reason"].startswith("the A/B's baseline (")
    ev.provenance["baseline_weights"] = weights_fingerprint(weak)  # the same baseline: it decides
    assert evaluate_gates(GatesConfig(gates=["win_rate"]), ev, checkpoint=good).passed


def test_a_promotion_after_a_refusal_with_unrecorded_settings_is_noted(setup):
    """A refusal recorded without its gate settings (a caller of record_decision that passed none, as the
    demo did) followed by a promotion: the loosening cannot be checked, so the decision says so."""
    from preflab.evaluate.gates import Evidence, evaluate_gates
    from preflab.evaluate.promote import record_decision
    from preflab.store import ops

    url, good, bad = setup
    eng = db.make_engine(url)
    db.upgrade(eng)
    try:
        with db.session_scope(eng) as s:
            pid = ops.ensure_project(s, name="default")
            refused = record_decision(s, project_id=pid, checkpoint=bad, stage="staging",
                                      report=evaluate_gates(GatesConfig(), Evidence.load(bad / "eval")))
            assert not refused.promoted and refused.notes == ()
            lenient = GatesConfig(gates=["win_rate"])
            d = record_decision(s, project_id=pid, checkpoint=bad, stage="staging", gates=lenient,
                                report=evaluate_gates(lenient, Evidence.load(bad / "eval")))
    finally:
        eng.dispose()
    assert d.promoted and d.notes == (f"promoted after the refusal(s) of this checkpoint for staging (decision event "
                                      f"{refused.event_id}); the gate settings of one side were not recorded: "
                                      "compare them by hand",)


@pytest.mark.parametrize("table, words", [
    ("gates = []", "no gates configured"),
    ('gates = ["kl", "kl"]', "'kl' is listed twice"),
    ("formality_max_shift = 5.0", "formality_max_shift: must be in (-1, 1)"),
    ("confident_wrong_max_shift = 2.0", "confident_wrong_max_shift: must be in (-1, 1)"),
    ("detector_max_shift = { hedging = 7 }", "detector_max_shift.hedging: must be in (-1, 1)"),
    ("detector_max_shift = { length = -1 }", "detector_max_shift.length: a ratio to the baseline: must be > 0"),
])
def test_gate_settings_that_would_switch_a_gate_off_are_refused(tmp_path, table, words):
    from preflab.config import ConfigError, load_toml

    (tmp_path / "g.toml").write_text(f"[gates]\n{table}\n")
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_toml(GatesConfig, tmp_path / "g.toml", "gates")


def test_decisions_list_and_gate_shopping_is_noted(setup, tmp_path):
    from typer.testing import CliRunner

    from preflab.cli import app

    url, good, bad = setup
    runner = CliRunner()
    assert runner.invoke(app, ["store", "migrate", "--db", url]).exit_code == 0
    r = runner.invoke(app, ["promote", str(bad), "--to", "staging", "--db", url], terminal_width=200)
    assert r.exit_code == 1  # refused under the default gates
    (tmp_path / "lenient.toml").write_text('[gates]\ngates = ["win_rate"]\n')
    r = runner.invoke(app, ["promote", str(bad), "--to", "staging", "--db", url, "--config",
                            str(tmp_path / "lenient.toml")], terminal_width=200)
    assert r.exit_code == 0 and "note: promoted under other gate settings than the refusal(s)" in r.output
    r = runner.invoke(app, ["promote", str(good), "--to", "production", "--db", url], terminal_width=200)
    assert r.exit_code == 1 and "failed: staged_first" in r.output
    gate = json.loads((good / "eval" / "gate.json").read_text())
    assert gate["gates"][-1]["numbers"]["reason"] == "never promoted to staging: promote it --to staging first"
    r = runner.invoke(app, ["decisions", "--db", url], terminal_width=250)
    assert r.exit_code == 0, r.output
    assert f"staging: {bad.resolve()}" in r.output and "production: (nothing promoted yet)" in r.output
    assert r.output.count("refused") == 2 and r.output.count("promoted") >= 2
    r = runner.invoke(app, ["store", "projects", "--db", url])
    assert r.exit_code == 0 and r.output.strip() == "default"
