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
        assert not any(checks[r.name].flagged for r in pool[1:]), checks  # the drifting rater's peers are not
        monitor_drift(s, project_id=pid, cfg=cfg, baseline_n=50)  # no second open alert
        alerts = ops.list_alerts(s, project_id=pid, resolved=False, kind="reconvene")
        assert [a.rater_id for a in alerts].count(ids[pool[0].name]) == 1
        assert alerts[0].payload["examples"]
        status = {r["rater"]: r for r in rater_status(s, project_id=pid)}
    assert status[pool[0].name]["open_alerts"] == 1
    assert status[pool[1].name]["consistency"]["n"] > 5
    assert 0 < status[pool[1].name]["agreement_with_majority"] <= 1
    side = status[pool[1].name]["picks_left"]  # simulated raters judge content: about half on each side
    assert side["n"] > 50 and 0.35 < side["share"] < 0.65 and side["p_value"] > 0.001


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
    res = runner.invoke(app, ["quality", "status", "--db", url, "--project", "demo", "--check-drift"])
    assert res.exit_code == 0 and "drift check" in res.output and "enough" in res.output, res.output  # says what it did
    res = runner.invoke(app, ["quality", "report", "--db", url, "--out", str(tmp_path / "x"), "--project", "nope"])
    assert res.exit_code == 2 and "no project named 'nope'" in res.output

    # rounds by name or id, of this project only; the same round twice or an overlap-1 round is named
    e = db.make_engine(url)
    with db.session_scope(e) as s:
        pid = ops.project_id(s, name="demo")
        first, last = ops.list_rounds(s, project_id=pid, kind="calibration")
        other = ops.create_project(s, name="other")
        ops.add_prompts(s, project_id=other, prompts=[ops.PromptIn("q1", "How much?", "pricing")])
        ops.add_responses(s, project_id=other, responses=[ops.ResponseIn("r1", "q1", "5"), ops.ResponseIn("r2", "q1", "6")])
        ops.add_pairs(s, project_id=other, pairs=[ops.PairIn("x1", "q1", "r1", "r2")])
        foreign = ops.create_round(s, project_id=other, name="theirs", kind="calibration", pair_ids=["x1"], overlap=2)
        ops.create_round(s, project_id=pid, name="single", kind="collection", pair_ids=[p.id for p in ops.list_pairs(s, project_id=pid)][:2], overlap=1)
    e.dispose()
    base = ["quality", "report", "--db", url, "--out", str(tmp_path / "y"), "--project", "demo", "--n-boot", "30"]
    res = runner.invoke(app, [*base, "--before", first.name, "--after", str(last.id)])
    assert res.exit_code == 0, res.output
    for flags, words in ((["--before", str(foreign)], "--before: no round named or numbered"),
                         (["--after", str(first.id)], f"before and after are the same round ({first.id})"),
                         (["--before", "single"], "round 'single': overlap 1")):
        res = runner.invoke(app, [*base, *flags], terminal_width=200)
        assert res.exit_code == 2 and words in res.output, (flags, res.output)
    res = runner.invoke(app, ["quality", "review", "single", "--db", url, "--project", "demo"], terminal_width=200)
    assert res.exit_code == 2 and "'single' has overlap 1" in res.output, res.output  # not every item at 100%


def test_a_rater_who_flips_labels_does_not_get_an_honest_peer_flagged(engine):
    """Three raters on every item; dan turns contrary after 100 judgements. Agreement with "the
    others" falls for ben too (dan is half of his others), enough to flag him at the default alpha;
    checked again against the raters not flagged themselves, only dan is flagged."""
    import random
    import uuid

    from preflab.quality.drift import DriftConfig, check_drift, hits_vs_others

    rng, n = random.Random(0), 160
    with db.session_scope(engine) as s:
        pid = ops.create_project(s, name="d")
        ops.add_prompts(s, project_id=pid, prompts=[ops.PromptIn(f"q{i}", f"question {i}", "t") for i in range(n)])
        ops.add_responses(s, project_id=pid, responses=[ops.ResponseIn(f"p{i}:{k}", f"q{i}", f"{k} text {i}")
                                                        for i in range(n) for k in "ab"])
        ops.add_pairs(s, project_id=pid, pairs=[ops.PairIn(f"p{i}", f"q{i}", f"p{i}:a", f"p{i}:b") for i in range(n)])
        ids = {name: ops.create_rater(s, project_id=pid, name=name) for name in ("ann", "ben", "dan")}
        rid = ops.create_round(s, project_id=pid, name="coll", kind="collection", pair_ids=[f"p{i}" for i in range(n)],
                               overlap=3, duplicate_rate=0.0, routing="any")
    truth = {f"p{i}": rng.choice("ab") for i in range(n)}
    done, active = dict.fromkeys(ids, 0), list(ids)
    while active:
        for name in list(active):
            with db.session_scope(engine) as s:
                t = ops.next_task(s, round_id=rid, rater_id=ids[name])
                if t is None:
                    active.remove(name)
                    continue
                p = t.left_id.rsplit(":", 1)[0]
                wrong = rng.random() < (0.8 if name == "dan" and done[name] >= 100 else 0.1)
                pick = truth[p] if not wrong else ("b" if truth[p] == "a" else "a")
                ops.submit_judgement(s, assignment_id=t.assignment_id, rater_id=ids[name], strength=2,
                                     choice="left" if (pick == "a") == (t.left_id == f"{p}:a") else "right",
                                     rationale=f"accurate and clear {rng.randint(0, 9)}", time_on_task_s=5,
                                     idempotency_key=uuid.uuid4().hex)
                done[name] += 1
    cfg = DriftConfig(window=60, baseline_min=100, min_recent=40, n_perm=199)
    with db.session_scope(engine) as s:
        checks = {c.rater: c for c in monitor_drift(s, project_id=pid, cfg=cfg, baseline_n=100)}
        rows = sorted((j for j in ops.project_judgements(s, project_id=pid)), key=lambda j: j.judgement_id)
    assert checks["dan"].flagged and "agreement with the others fell" in checks["dan"].reason
    assert not checks["ann"].flagged and not checks["ben"].flagged, checks
    # against everyone, dan included, ben's agreement does fall past alpha: what the second look is for
    hits = hits_vs_others([((j.round_id, j.pair_id), j.rater_name, j.choice) for j in rows])["ben"]
    ben = [j.rationale for j in rows if j.rater_name == "ben"]
    naive = check_drift("ben", ben[:100], ben[100:], baseline_hits=[h for h in hits[:100] if h is not None],
                        recent_hits=[h for h in hits[100:] if h is not None], cfg=cfg)
    assert naive.flagged and naive.p_agreement <= cfg.alpha
