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
    evidence(good_style).save(good / "eval")
    evidence(rubric_v1_style).save(bad / "eval")
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
    with pytest.raises(ValueError, match="stage"):
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
