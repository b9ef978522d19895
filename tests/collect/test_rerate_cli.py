"""`preflab rerate` and `preflab lineage` as a user runs them: what they print, which flag an error names."""

from __future__ import annotations

from typer.testing import CliRunner

from preflab.cli import app
from preflab.collect import rerate
from preflab.store import db, ops
from tests.conftest import judge_all, seed_store


def _store(sqlite_url):
    engine = db.make_engine(sqlite_url)
    st = seed_store(engine, n_pairs=12, raters={"ann": []})
    with db.session_scope(engine) as s:
        c1 = ops.create_round(s, project_id=st.project_id, name="c1", kind="collection", pair_ids=st.pair_ids,
                              duplicate_rate=0.0)
    judge_all(engine, c1, st.raters["ann"], lambda t: "left")
    with db.session_scope(engine) as s:
        rerate.add_rubric(s, project_id=st.project_id, label="v2", items=["Verify every price."])
    return engine, st


def _run(*args):
    r = CliRunner().invoke(app, list(args), terminal_width=400)
    return r.exit_code, " ".join(r.output.split())


def test_rerate_says_how_many_matched_what_it_kept_and_how_to_take_the_rest(sqlite_url):
    engine, st = _store(sqlite_url)
    where = ("--where", "topic=pricing", "--guideline", "v2", "--db", sqlite_url, "--project", "proj")
    code, out = _run("rerate", *where, "--limit", "4")
    assert code == 0, out
    assert "re-rate round 2 (rerate-v2-pricing): 4 of 6 matching pairs under guideline v2" in out
    assert "truncated at --limit 4: kept a random sample (seeded shuffle, --seed 0); the other 2 are not queued" in out
    code, out = _run("rerate", *where, "--limit", "4")  # the second round takes the rest
    assert code == 0, out
    assert "re-rate round 3 (rerate-v2-pricing-2): 2 of 2 matching pairs" in out
    assert "skipped 4 matching pairs waiting in an open round under v2" in out and "truncated" not in out
    with db.session_scope(engine, readonly=True) as s:
        rounds = ops.list_rounds(s, project_id=st.project_id, kind="rerate")
    assert [r.duplicate_rate for r in rounds] == [0.1, 0.1]  # a collection round's: self-consistency is measured
    # errors name the flag typed and create nothing
    code, out = _run("rerate", *where, "--name", "c1")
    assert code == 2 and "--name: a round named 'c1' already exists (round 1, collection)" in out, out
    code, out = _run("rerate", "--where", "topic=billing", "--guideline", "v2", "--db", sqlite_url, "--project",
                     "proj", "--duplicate-rate", "1.5")
    assert code == 2 and "--duplicate-rate: must be in [0, 1], got 1.5" in out, out
    code, out = _run("rerate", *where)
    assert code == 2 and "--where: all 6 judged pairs" in out, out
    with db.session_scope(engine, readonly=True) as s:
        assert len(ops.list_rounds(s, project_id=st.project_id)) == 3
    engine.dispose()


def test_lineage_shows_rounds_and_the_reward_model_run(sqlite_url):
    engine, st = _store(sqlite_url)
    with db.session_scope(engine) as s:
        rerate.record_lineage(s, project_id=st.project_id, run="/r/rm3", judgements=12, rounds=1, round_ids=[1],
                              model_dir="/r/rm3/model")
        rerate.record_lineage(s, project_id=st.project_id, run="/r/ppo3", reward_model="/r/rm3/model", steps=3)
    engine.dispose()
    code, out = _run("lineage", "--db", sqlite_url, "--project", "proj")
    assert code == 0, out
    flat = "".join(out.replace("│", "").split())  # the table folds long cells at the console's width
    assert "judgements=12,rounds=1,model_dir=/r/rm3/model,trainedonrounds1c1(collection,v1)" in flat
    assert "reward_model=/r/rm3,steps=3" in flat
