"""The calibration workshop through the store, with simulated raters; drift alerts; the CLI."""

from __future__ import annotations

import json

import pytest

from preflab.collect.workshop import (
    WorkshopConfig,
    create_calibration_round,
    disagreement_review,
    monitor_drift,
    rater_status,
    round_labels,
    sandbox_workshop,
)
from preflab.config import ConfigError
from preflab.store import db, ops


@pytest.fixture()
def engine(tmp_path):
    e = db.make_engine(tmp_path / "store.db")
    db.upgrade(e)
    yield e
    e.dispose()


def test_sandbox_workshop_end_to_end(engine, tmp_path):
    rep = sandbox_workshop(engine, project="sb", out_dir=tmp_path / "out",
                           cfg=WorkshopConfig(n_pairs=8, n_boot=50, seed=3))
    out = tmp_path / "out"
    for name in ("workshop_report.json", "workshop_report.md", "style_guide.md", "disagreement_review.md"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "workshop_report.json").read_text())
    assert data["before"]["n_items"] == 8 and data["before"]["n_raters"] == 5
    assert set(data["change"]) == {"mean_pairwise_kappa", "fleiss_kappa", "krippendorff_alpha", "percent_agreement"}
    assert rep["rounds"]["before"]["guideline"] == "v1" and rep["rounds"]["after"]["guideline"] == "v1.1"
    assert "### Tone" in (out / "style_guide.md").read_text()
    with db.session_scope(engine) as s:
        pid = ops.project_id(s, name="sb")
        rounds = ops.list_rounds(s, project_id=pid, kind="calibration")
        assert len(rounds) == 2 and all(r.overlap == 5 and r.min_rationale_chars >= 1 for r in rounds)
        labels = round_labels(s, round_id=rounds[0].id)
        assert len(labels) == 8 and all(len(v) == 5 for v in labels.values())  # every rater, every pair
        assert all(set(v.values()) <= {"a", "b", "tie"} for v in labels.values())
        review = disagreement_review(s, round_id=rounds[0].id)
        shares = [it.majority_share for it in review]
        assert shares == sorted(shares)
        assert sum(len(v) for v in review[0].rationales.values()) == 5
        assert [e.kind for e in ops.list_events(s, project_id=pid)].count("guideline_revision") == 1


def test_calibration_round_needs_two_raters_and_valid_config(engine):
    with db.session_scope(engine) as s:
        pid = ops.create_project(s, name="p")
        ops.create_rater(s, project_id=pid, name="solo")
        with pytest.raises(ops.StoreError, match="at least 2 active raters"):
            create_calibration_round(s, project_id=pid, name="r", pair_ids=["x"])
    with pytest.raises(ConfigError, match="WorkshopConfig.min_rationale_chars"):
        WorkshopConfig(min_rationale_chars=0).validate()


def test_status_and_drift_alert_through_the_store(engine):
    """A rater whose reasons change mid-collection gets one stored 'reconvene' alert."""
    from preflab.quality.drift import DriftConfig
    from preflab.sandbox.raters import DriftSchedule, default_pool, sft_style_pairs, work_round

    pool = default_pool(1)[:3]
    for r in pool:
        r.calibrate()
    pool[0].drift = DriftSchedule(50, {"formality": {"stilted": 2.5}, "padding": {"padded": 2.5}})
    with db.session_scope(engine) as s:
        pid = ops.create_project(s, name="c")
        ids = {r.name: ops.create_rater(s, project_id=pid, name=r.name) for r in pool}
        pairs = sft_style_pairs(100, seed=9)
        ops.add_prompts(s, project_id=pid, prompts=[ops.PromptIn(q.id, q.text, q.topic) for q, _, _ in pairs])
        ops.add_responses(s, project_id=pid, responses=[
            ops.ResponseIn(f"p{i}:{k}", q.id, t) for i, (q, a, b) in enumerate(pairs) for k, t in (("a", a), ("b", b))])
        ops.add_pairs(s, project_id=pid, pairs=[ops.PairIn(f"p{i}", q.id, f"p{i}:a", f"p{i}:b")
                                                for i, (q, _, _) in enumerate(pairs)])
        rid = ops.create_round(s, project_id=pid, name="collect", kind="collection",
                               pair_ids=[f"p{i}" for i in range(len(pairs))], overlap=3, duplicate_rate=0.1,
                               routing="any", seed=1)
    work_round(engine, round_id=rid, raters={ids[r.name]: r for r in pool}, rubric="v1", seed=1)
    cfg = DriftConfig(window=50, baseline_min=50, min_recent=40, n_perm=499)
    with db.session_scope(engine) as s:
        checks = {c.rater: c for c in monitor_drift(s, project_id=pid, cfg=cfg, baseline_n=50)}
        assert checks[pool[0].name].flagged, checks[pool[0].name]
        monitor_drift(s, project_id=pid, cfg=cfg, baseline_n=50)  # no second open alert
        alerts = ops.list_alerts(s, project_id=pid, resolved=False, kind="reconvene")
        assert [a.rater_id for a in alerts].count(ids[pool[0].name]) == 1
        assert alerts[0].payload["examples"]
        status = {r["rater"]: r for r in rater_status(s, project_id=pid)}
    assert status[pool[0].name]["open_alerts"] == 1
    assert status[pool[1].name]["consistency"]["n"] > 5
    assert 0 < status[pool[1].name]["agreement_with_majority"] <= 1


def test_cli_workshop_report_and_status(tmp_path):
    from typer.testing import CliRunner

    from preflab.cli import app

    url = f"sqlite:///{tmp_path / 's.db'}"
    runner = CliRunner()
    res = runner.invoke(app, ["quality", "workshop", "--db", url, "--out", str(tmp_path / "w"), "--n-pairs", "6",
                              "--n-boot", "30", "--project", "demo"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["quality", "report", "--db", url, "--out", str(tmp_path / "r"), "--project", "demo",
                              "--n-boot", "30"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "style_guide.md").exists() and (tmp_path / "r" / "workshop_report.json").exists()
    res = runner.invoke(app, ["quality", "status", "--db", url, "--project", "demo"])
    assert res.exit_code == 0 and "ana" in res.output
    res = runner.invoke(app, ["quality", "report", "--db", url, "--out", str(tmp_path / "x"), "--project", "nope"])
    assert res.exit_code == 2 and "no project named 'nope'" in res.output
