"""The fix loop: rubric versions, targeted re-rating, newest-guideline training data, lineage."""

from __future__ import annotations

import pytest

from preflab.collect import rerate
from preflab.store import db, ops
from preflab.store.ops import StoreError
from tests.conftest import judge_all


def test_parse_where_names_the_bad_item():
    assert rerate.parse_where(["topic=pricing", "round_kind=collection"]) == {"topic": "pricing",
                                                                              "round_kind": "collection"}
    with pytest.raises(StoreError, match=r"--where\[1\]: expected KEY=VALUE"):
        rerate.parse_where(["topic=pricing", "pricing"])
    with pytest.raises(StoreError, match="unknown key 'colour'"):
        rerate.parse_where(["colour=red"])


def test_rerate_pricing_pairs_replaces_their_labels(seed):
    st = seed(n_pairs=12, raters={"ann": []}, topics=("pricing", "billing"))
    ann = st.raters["ann"]
    with db.session_scope(st.engine) as s:
        r1 = ops.create_round(s, project_id=st.project_id, name="c1", kind="collection", pair_ids=st.pair_ids,
                              duplicate_rate=0.0)
    # under v1 ann picks response a everywhere
    assert judge_all(st.engine, r1, ann, lambda t: t.left_id if t.left_id.endswith("a") else t.right_id) == 12

    with db.session_scope(st.engine) as s:
        rerate.add_rubric(s, project_id=st.project_id, label="v2", items=["Verify every price."])
        g2 = ops.latest_guideline(s, project_id=st.project_id)
        assert g2.label == "v2" and g2.rubric[-1] == "Verify every price." and "accuracy" in g2.rubric
        # same seed, same selection (asked before the round exists: its pairs are queued after)
        first = rerate.select_pairs(s, project_id=st.project_id, where={"topic": "pricing"}, limit=4, seed=3)
        rr = rerate.create_rerate_round(s, project_id=st.project_id, name="rr", where={"topic": "pricing"},
                                        limit=4, guideline="v2", seed=3)
    assert (rr.n_pairs, rr.matched) == (4, 6)
    with db.session_scope(st.engine) as s:
        chosen = ops.round_pair_ids(s, round_id=rr.round_id)
    assert all(st.topics[p] == "pricing" for p in chosen)
    assert sorted(first) == sorted(chosen)

    # under v2 ann picks response b on the re-rated pairs
    judge_all(st.engine, rr.round_id, ann, lambda t: t.left_id if t.left_id.endswith("b") else t.right_id)
    with db.session_scope(st.engine) as s:
        ex = ops.preference_examples(s, project_id=st.project_id)
    by_pair = {e.pair_id: e for e in ex}
    assert len(by_pair) == 12 and len(ex) == 12
    for p in chosen:
        assert by_pair[p].chosen_id.endswith("b") and by_pair[p].guideline_version == "v2"
    for p in set(st.pair_ids) - set(chosen):
        assert by_pair[p].chosen_id.endswith("a") and by_pair[p].guideline_version == "v1"


def test_rerate_errors_change_nothing(seed):
    st = seed(n_pairs=4, raters={"ann": []})
    with db.session_scope(st.engine) as s:
        with pytest.raises(StoreError, match="unknown guideline version 'v9'"):
            rerate.create_rerate_round(s, project_id=st.project_id, name="x", where={}, limit=5, guideline="v9")
        with pytest.raises(StoreError, match="no judged pairs"):
            rerate.create_rerate_round(s, project_id=st.project_id, name="x", where={"topic": "pricing"},
                                       limit=5, guideline="v1")
        rerate.add_rubric(s, project_id=st.project_id, label="v2", items=["Verify every price."])
        with pytest.raises(StoreError, match="'v1' is not the newest guideline version \\('v2'\\)"):
            rerate.create_rerate_round(s, project_id=st.project_id, name="x", where={}, limit=5, guideline="v1")
        for items, message in ((["Verify every price."], "already in guideline v2's rubric"),
                               (["New.", "New."], r"items\[1\]: 'New\.' is already in the items given"),
                               (["  "], r"items\[0\]: empty")):
            with pytest.raises(StoreError, match=message):
                rerate.add_rubric(s, project_id=st.project_id, label="v3", items=items)
        assert ops.latest_guideline(s, project_id=st.project_id).label == "v2"
        assert ops.list_rounds(s, project_id=st.project_id) == []
        # the revision is on record, as the workshop's is: what changed from which version
        (ev,) = ops.list_events(s, project_id=st.project_id, kind="guideline_revision")
        assert ev.subject == "v2" and ev.payload["previous"] == "v1"
        assert ev.payload["added"] == ["Verify every price."] and ev.payload["removed"] == []


def test_lineage_records_in_order(seed):
    st = seed(n_pairs=2, raters={"ann": []})
    with db.session_scope(st.engine) as s:
        rerate.record_lineage(s, project_id=st.project_id, run="rm_v1", guideline="v1", n_judgements=10)
        rerate.record_lineage(s, project_id=st.project_id, run="ppo_v1", reward_model="rm_v1", parent="base")
        got = rerate.lineage(s, project_id=st.project_id)
    assert [g["run"] for g in got] == ["rm_v1", "ppo_v1"]
    assert got[1]["reward_model"] == "rm_v1" and got[0]["n_judgements"] == 10


# ---- selection: which judged pairs a re-rate takes, and what it says it left out ----


def _judged_store(seed, n_pairs=12):
    """``n_pairs`` pairs (pricing/billing alternating) judged by ann in collection round c1; pairs p012, p013
    (pricing, billing) judged in a calibration round only. Returns the store."""
    st = seed(n_pairs=n_pairs + 2, raters={"ann": []}, topics=("pricing", "billing"))
    with db.session_scope(st.engine) as s:
        c1 = ops.create_round(s, project_id=st.project_id, name="c1", kind="collection",
                              pair_ids=st.pair_ids[:n_pairs], duplicate_rate=0.0)
        cal = ops.create_round(s, project_id=st.project_id, name="cal", kind="calibration",
                               pair_ids=st.pair_ids[n_pairs:], duplicate_rate=0.0)
    for rid in (c1, cal):
        judge_all(st.engine, rid, st.raters["ann"], lambda t: "left")
    with db.session_scope(st.engine) as s:
        rerate.add_rubric(s, project_id=st.project_id, label="v2", items=["Verify every price."])
    return st


def test_selection_leaves_calibration_only_pairs_out_unless_asked(seed):
    st = _judged_store(seed)
    with db.session_scope(st.engine) as s:
        default = rerate.selection(s, project_id=st.project_id, where={"topic": "pricing"}, limit=100)
        cal = rerate.selection(s, project_id=st.project_id, where={"topic": "pricing", "round_kind": "calibration"},
                               limit=100)
    assert sorted(default.pair_ids) == [f"p{i:03d}" for i in range(0, 12, 2)]  # p012 was judged in calibration only
    assert (default.matched, default.skipped, default.queued, default.guideline) == (6, 0, 0, "v2")
    assert cal.pair_ids == ["p012"]


def test_a_truncated_selection_says_so_and_a_second_round_takes_the_rest(seed):
    st = _judged_store(seed)
    with db.session_scope(st.engine) as s:
        r1 = rerate.create_rerate_round(s, project_id=st.project_id, name=None, where={"topic": "pricing"}, limit=4,
                                        guideline="v2")
        r2 = rerate.create_rerate_round(s, project_id=st.project_id, name=None, where={"topic": "pricing"}, limit=4,
                                        guideline="v2")
        first, second = (set(ops.round_pair_ids(s, round_id=r.round_id)) for r in (r1, r2))
        meta = ops.get_round(s, round_id=r1.round_id).meta
    assert (r1.n_pairs, r1.matched, r1.queued) == (4, 6, 0)
    assert (r2.n_pairs, r2.matched, r2.queued) == (2, 2, 4)  # the 4 waiting in r1 are not paid for twice
    assert not first & second and len(first | second) == 6
    assert (r1.name, r2.name) == ("rerate-v2-pricing", "rerate-v2-pricing-2")  # unique default names
    assert (meta["limit"], meta["matched"], meta["skipped"]) == (4, 6, 0)
    with db.session_scope(st.engine) as s:  # all 6 queued: nothing left, said so
        with pytest.raises(StoreError, match=r"all 6 judged pairs .* already judged \(0\) or waiting in an open "
                                             r"round \(6\) under guideline 'v2'"):
            rerate.create_rerate_round(s, project_id=st.project_id, name=None, where={"topic": "pricing"}, limit=4,
                                       guideline="v2", include_rerated=True)


def test_pairs_judged_under_the_target_guideline_are_skipped_unless_included(seed):
    st = _judged_store(seed)
    with db.session_scope(st.engine) as s:
        rr = rerate.create_rerate_round(s, project_id=st.project_id, name="rr", where={"topic": "pricing"}, limit=3,
                                        guideline="v2")
    judge_all(st.engine, rr.round_id, st.raters["ann"], lambda t: "right")
    with db.session_scope(st.engine) as s:
        again = rerate.selection(s, project_id=st.project_id, where={"topic": "pricing"}, limit=100)
        assert (len(again.pair_ids), again.matched, again.skipped) == (3, 3, 3)
        assert not set(again.pair_ids) & set(ops.round_pair_ids(s, round_id=rr.round_id))
        both = rerate.selection(s, project_id=st.project_id, where={"topic": "pricing"}, limit=100,
                                include_rerated=True)
        assert (len(both.pair_ids), both.skipped) == (6, 0)
        # a billing re-rate under the same guideline gets its own default name (it collided on rerate-v2)
        assert rerate.create_rerate_round(s, project_id=st.project_id, name=None, where={"topic": "billing"},
                                          limit=100, guideline="v2").name == "rerate-v2-billing"
        rerate.create_rerate_round(s, project_id=st.project_id, name=None, where={"topic": "pricing"}, limit=100,
                                   guideline="v2")  # the 3 not yet re-rated
        with pytest.raises(StoreError, match=r"already judged \(3\) or waiting in an open round \(3\) .*"
                                             "--include-rerated selects the judged ones again"):
            rerate.create_rerate_round(s, project_id=st.project_id, name=None, where={"topic": "pricing"},
                                       limit=100, guideline="v2")


def test_a_taken_name_is_refused_and_changes_nothing(seed):
    st = _judged_store(seed)
    with db.session_scope(st.engine) as s:
        with pytest.raises(StoreError, match=r"rerate\.name: a round named 'c1' already exists \(round 1, collection\)"):
            rerate.create_rerate_round(s, project_id=st.project_id, name="c1", where={}, limit=5, guideline="v2")
        assert [r.name for r in ops.list_rounds(s, project_id=st.project_id)] == ["c1", "cal"]
        assert ops.list_events(s, project_id=st.project_id, kind="rerate") == []


def test_unfinished_rerates_count_judged_pairs(seed):
    st = _judged_store(seed)
    with db.session_scope(st.engine) as s:
        rr = rerate.create_rerate_round(s, project_id=st.project_id, name="rr", where={"topic": "pricing"},
                                        limit=100, guideline="v2")
    with db.session_scope(st.engine) as s:
        t = ops.next_task(s, round_id=rr.round_id, rater_id=st.raters["ann"])
        ops.submit_judgement(s, assignment_id=t.assignment_id, rater_id=st.raters["ann"], choice="left", strength=2,
                             rationale="checked the price", time_on_task_s=5.0, idempotency_key="one")
    with db.session_scope(st.engine) as s:
        assert rerate.unfinished_rerates(s, project_id=st.project_id) == [
            rerate.OpenRerate(rr.round_id, "rr", "v2", 1, 6)]
    judge_all(st.engine, rr.round_id, st.raters["ann"], lambda t: "left")
    with db.session_scope(st.engine) as s:
        assert rerate.unfinished_rerates(s, project_id=st.project_id) == []  # all judged: nothing stale


def test_lineage_links_a_reward_model_by_its_model_dir_and_names_rounds(seed):
    st = _judged_store(seed)
    with db.session_scope(st.engine) as s:
        ids = rerate.trained_round_ids(s, project_id=st.project_id, round_kinds=("collection", "rerate"))
        rerate.record_lineage(s, project_id=st.project_id, run="/r/rm3", judgements=12, rounds=1, round_ids=ids,
                              model_dir="/r/rm3/model")
        rerate.record_lineage(s, project_id=st.project_id, run="/r/ppo3", reward_model="/r/rm3/model")
        rerate.record_lineage(s, project_id=st.project_id, run="/r/ppo4", reward_model="/elsewhere/rm9/model")
        rerate.record_lineage(s, project_id=st.project_id, run="ppo_v1", reward_model="/r/rm3")
        rows = {r["run"]: r for r in rerate.lineage(s, project_id=st.project_id)}
    assert ids == [1]
    assert rows["/r/rm3"]["trained_rounds"] == [{"id": 1, "name": "c1", "kind": "collection", "guideline": "v1"}]
    assert rows["/r/rm3"]["rounds"] == 1 and "trained_rounds" not in rows["/r/ppo3"]
    assert rows["/r/ppo3"]["reward_model"] == "/r/rm3/model"  # what was recorded stays
    assert rows["/r/ppo3"]["reward_model_run"] == "/r/rm3"  # the row it links to
    assert rows["/r/ppo4"]["reward_model_run"] == "/elsewhere/rm9"  # no row: the run directory above model/
    assert "reward_model_run" not in rows["ppo_v1"]  # already the run's name (the demo's rows): nothing added
