"""`rm train --db` with a re-rate round still open: it says which pairs keep their old labels, and the
lineage names the rounds trained on."""

from __future__ import annotations

from typer.testing import CliRunner

from preflab.cli import app
from preflab.collect import rerate
from preflab.store import db, ops
from tests.conftest import judge_all, seed_store
from tests.train.rm_fixtures import tiny_policy_and_pairs, tiny_tokenizer


def test_rm_train_warns_about_a_partly_judged_rerate(sqlite_url, tmp_path):
    engine = db.make_engine(sqlite_url)
    st = seed_store(engine, n_pairs=12, raters={"ann": []})
    with db.session_scope(engine) as s:
        c1 = ops.create_round(s, project_id=st.project_id, name="c1", kind="collection", pair_ids=st.pair_ids,
                              duplicate_rate=0.0)
    n = iter(range(100))
    judge_all(engine, c1, st.raters["ann"], lambda t: "tie" if next(n) % 3 == 0 else "left")  # a third are ties
    with db.session_scope(engine) as s:
        rerate.add_rubric(s, project_id=st.project_id, label="v2", items=["Verify every price."])
        rr = rerate.create_rerate_round(s, project_id=st.project_id, name="rr", where={"topic": "pricing"},
                                        limit=100, guideline="v2")
    for key in ("k1", "k2"):  # 2 of its 6 pairs judged
        with db.session_scope(engine) as s:
            t = ops.next_task(s, round_id=rr.round_id, rater_id=st.raters["ann"])
            ops.submit_judgement(s, assignment_id=t.assignment_id, rater_id=st.raters["ann"], choice="right",
                                 strength=2, rationale="checked the price", time_on_task_s=5.0, idempotency_key=key)
    engine.dispose()
    policy, _ = tiny_policy_and_pairs(tiny_tokenizer(), tmp_path, n_pairs=4)
    (tmp_path / "rm.toml").write_text('[rm]\ncheckpoint_every = 0\nprompt_format = "raw"\nmax_length = 64\n')
    args = ["rm", "train", "--db", sqlite_url, "--project", "proj", "--policy", str(policy), "--config",
            str(tmp_path / "rm.toml"), "--epochs", "1", "--threads", "1"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "rm")], terminal_width=400)
    out = " ".join(r.output.split())
    assert r.exit_code == 0, out
    assert ("warning: re-rate round 2 (rr, guideline v2) is open with 2 of 6 pairs judged: the other 4 train on "
            "their old labels, made under an older guideline") in out
    assert "of them ties (left out of the loss)" in out  # what 'trained on N judgements' holds
    # its lineage names the rounds it read
    engine = db.make_engine(sqlite_url)
    with db.session_scope(engine, readonly=True) as s:
        (row,) = rerate.lineage(s, project_id=st.project_id)
    engine.dispose()
    assert [(x["id"], x["name"], x["kind"], x["guideline"]) for x in row["trained_rounds"]] == [
        (1, "c1", "collection", "v1"), (2, "rr", "rerate", "v2")]
    # without re-rate rounds in --rounds there is nothing stale to warn about
    r = CliRunner().invoke(app, [*args, "--rounds", "collection", "--out", str(tmp_path / "rm_c")],
                           terminal_width=400)
    assert r.exit_code == 0 and "warning: re-rate round" not in r.output, r.output
