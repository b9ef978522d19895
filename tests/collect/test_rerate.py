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
        rr = rerate.create_rerate_round(s, project_id=st.project_id, name="rr", where={"topic": "pricing"},
                                        limit=4, guideline="v2", seed=3)
    assert rr.n_pairs == 4
    with db.session_scope(st.engine) as s:
        chosen = ops.round_pair_ids(s, round_id=rr.round_id)
    assert all(st.topics[p] == "pricing" for p in chosen)
    # same seed, same selection
    with db.session_scope(st.engine) as s:
        again = rerate.select_pairs(s, project_id=st.project_id, where={"topic": "pricing"}, limit=4, seed=3)
    assert sorted(again) == sorted(chosen)

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
