"""Store operations on SQLite and PostgreSQL: validation, assignment rules, canonical judgements."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from sqlalchemy import func, select

from preflab.store import db, ops
from preflab.store.schema import Assignment, Judgement, Pair, Rater


def one(engine, fn, **kw):
    with db.session_scope(engine) as s:
        return fn(s, **kw)


def mk_round(st, name="r1", **kw):
    kw.setdefault("pair_ids", st.pair_ids)
    kw.setdefault("kind", "collection")
    return one(st.engine, ops.create_round, project_id=st.project_id, name=name, **kw)


def judge(engine, task, rater_id, choice="left", key=None, **kw):
    kw.setdefault("strength", 2)
    kw.setdefault("rationale", "the left answer states the price")
    kw.setdefault("time_on_task_s", 4.0)
    return one(engine, ops.submit_judgement, assignment_id=task.assignment_id, rater_id=rater_id, choice=choice,
               idempotency_key=key or f"k-{task.assignment_id}", **kw)


def drain(engine, round_id, rater_id, *, now=None, limit=1000):
    """Pull and judge ('left') until no task is left; returns the tasks in order."""
    tasks = []
    for _ in range(limit):
        t = one(engine, ops.next_task, round_id=round_id, rater_id=rater_id, now=now)
        if t is None:
            return tasks
        judge(engine, t, rater_id)
        tasks.append(t)
    raise AssertionError("drain did not finish")


# ---- projects, raters, content -----------------------------------------------------------


def test_rater_password_and_token_are_hashed(seed):
    store = seed(passwords=True)
    with db.session_scope(store.engine) as s:
        r = s.get(Rater, store.raters["ann"])
        assert r.password_hash and "pw-ann" not in r.password_hash and r.password_hash.startswith("$argon2")
        assert ops.check_password(s, project_id=store.project_id, name="ann", password="pw-ann").name == "ann"
        assert ops.check_password(s, project_id=store.project_id, name="ann", password="nope") is None
        token = ops.issue_api_token(s, rater_id=store.raters["bob"])
    with db.session_scope(store.engine) as s:
        stored = s.get(Rater, store.raters["bob"]).token_hash
        assert stored == hashlib.sha256(token.encode()).hexdigest() and token not in stored
        assert ops.rater_by_token(s, token=token).name == "bob"
        assert ops.rater_by_token(s, token=token + "x") is None


def test_duplicate_names_and_bad_fields_are_named(store):
    with pytest.raises(ops.StoreError, match="rater.name: 'ann' already exists") as e:
        one(store.engine, ops.create_rater, project_id=store.project_id, name="ann")
    assert e.value.code == "conflict"
    with pytest.raises(ops.StoreError, match="rater.role"):
        one(store.engine, ops.create_rater, project_id=store.project_id, name="zed", role="boss")
    with pytest.raises(ops.StoreError, match="project.name"):
        one(store.engine, ops.create_project, name="proj")
    with pytest.raises(ops.StoreError, match="guideline.label: 'v1' already exists"):
        one(store.engine, ops.create_guideline_version, project_id=store.project_id, label="v1")


def test_bulk_insert_is_all_or_nothing(store):
    pairs = [{"id": "new1", "prompt_id": "q000", "response_a_id": "r000a", "response_b_id": "r000b"},
             {"id": "new2", "prompt_id": "q001", "response_a_id": "r001a", "response_b_id": "r_9"}]
    with pytest.raises(ops.StoreError, match=r"pairs\[1\]: unknown response id 'r_9'"):
        one(store.engine, ops.add_pairs, project_id=store.project_id, pairs=pairs)
    with db.session_scope(store.engine) as s:
        assert s.get(Pair, "new1") is None


def test_pair_sides_must_answer_the_pair_prompt(store):
    bad = [{"id": "x", "prompt_id": "q000", "response_a_id": "r000a", "response_b_id": "r001b"}]
    with pytest.raises(ops.StoreError, match="answers prompt 'q001', not 'q000'"):
        one(store.engine, ops.add_pairs, project_id=store.project_id, pairs=bad)
    same = [{"id": "x", "prompt_id": "q000", "response_a_id": "r000a", "response_b_id": "r000a"}]
    with pytest.raises(ops.StoreError, match="both 'r000a'"):
        one(store.engine, ops.add_pairs, project_id=store.project_id, pairs=same)


def test_reimport_identical_is_skipped_changed_is_conflict(store):
    same = [{"id": "q000", "text": "Question 0 about pricing?", "topic": "pricing"}]
    assert one(store.engine, ops.add_prompts, project_id=store.project_id, prompts=same) == 0
    changed = [{"id": "q000", "text": "Something else", "topic": "pricing"}]
    with pytest.raises(ops.StoreError, match="already exists with different content"):
        one(store.engine, ops.add_prompts, project_id=store.project_id, prompts=changed)
    other = one(store.engine, ops.create_project, name="other")  # the same prompt into another project
    with pytest.raises(ops.StoreError, match=r"prompt id 'q000' already belongs to project '.+' \(ids are unique"):
        one(store.engine, ops.add_prompts, project_id=other, prompts=same)
    with pytest.raises(ops.StoreError, match=r"prompts\[0\]: unknown field 'txt'"):
        one(store.engine, ops.add_prompts, project_id=store.project_id, prompts=[{"id": "a", "txt": "b"}])


def test_create_round_validates(store):
    with pytest.raises(ops.StoreError, match=r"round.pair_ids\[1\]: unknown pair id 'nope'"):
        mk_round(store, pair_ids=["p000", "nope"])
    with pytest.raises(ops.StoreError, match="round.overlap"):
        mk_round(store, overlap=0)
    with pytest.raises(ops.StoreError, match="round.kind"):
        mk_round(store, kind="party")
    with pytest.raises(ops.StoreError, match="round.duplicate_rate"):
        mk_round(store, duplicate_rate=1.5)
    rid = mk_round(store)
    info = one(store.engine, ops.get_round, round_id=rid)
    assert info.guideline_label == "v1" and info.n_items == len(store.pair_ids)
    order = one(store.engine, ops.round_pair_ids, round_id=rid)
    assert sorted(order) == sorted(store.pair_ids) and order != store.pair_ids  # shuffled by seed


# ---- next_task / submit_judgement ----------------------------------------------------------


def test_task_is_blind_and_judgement_is_canonical(store):
    rid = mk_round(store, duplicate_rate=0.0)
    ann = store.raters["ann"]
    sides = []
    for _ in range(len(store.pair_ids)):
        t = one(store.engine, ops.next_task, round_id=rid, rater_id=ann)
        assert "model-" not in repr(t)  # no source model anywhere in the task
        assert {t.left_id, t.right_id} == {t.left_id[:-1] + "a", t.left_id[:-1] + "b"}
        assert t.left_text.startswith(f"Answer {t.left_id[-1]}")
        j = judge(store.engine, t, ann, choice="right")
        assert j.winner_id == t.right_id and not j.is_tie
        sides.append(t.left_id[-1])
    assert set(sides) == {"a", "b"}  # sides are randomised
    with db.session_scope(store.engine) as s:
        rows = ops.round_judgements(s, round_id=rid)
    assert all(r.winner_id != r.left_id for r in rows)
    assert all(r.choice == ("a" if r.winner_id == r.response_a_id else "b") for r in rows)


def test_choice_by_id_tie_and_validation(store):
    rid = mk_round(store, duplicate_rate=0.0, allow_ties=False, min_rationale_chars=12)
    ann = store.raters["ann"]
    t = one(store.engine, ops.next_task, round_id=rid, rater_id=ann)
    with pytest.raises(ops.StoreError, match="does not allow ties"):
        judge(store.engine, t, ann, choice="tie")
    with pytest.raises(ops.StoreError, match="rationale: at least 12 characters"):
        judge(store.engine, t, ann, rationale="  short  ")
    with pytest.raises(ops.StoreError, match="strength: must be an integer 0..3"):
        judge(store.engine, t, ann, strength=4)
    with pytest.raises(ops.StoreError, match="choice:"):
        judge(store.engine, t, ann, choice="r999a")
    with pytest.raises(ops.StoreError, match="time_on_task_s"):
        judge(store.engine, t, ann, time_on_task_s=-1)
    with pytest.raises(ops.StoreError, match="not found") as e:  # another rater's assignment
        judge(store.engine, t, store.raters["bob"])
    assert e.value.code == "not_found"
    j = judge(store.engine, t, ann, choice=t.right_id)
    assert j.winner_id == t.right_id
    rid2 = mk_round(store, name="ties", duplicate_rate=0.0)
    t2 = one(store.engine, ops.next_task, round_id=rid2, rater_id=ann)
    j2 = judge(store.engine, t2, ann, choice="tie", strength=3)
    assert j2.is_tie and j2.winner_id is None and j2.strength == 0


def test_idempotent_submission(store):
    rid = mk_round(store, duplicate_rate=0.0)
    ann = store.raters["ann"]
    t = one(store.engine, ops.next_task, round_id=rid, rater_id=ann)
    j1 = judge(store.engine, t, ann, key="same")
    j2 = judge(store.engine, t, ann, key="same", choice="right")  # a retry: the first answer stands
    assert j2.replayed and j2.id == j1.id and j2.winner_id == j1.winner_id
    with pytest.raises(ops.StoreError, match="already judged") as e:
        judge(store.engine, t, ann, key="other")
    assert e.value.code == "conflict"
    t2 = one(store.engine, ops.next_task, round_id=rid, rater_id=ann)
    with pytest.raises(ops.StoreError, match="idempotency_key: already used for assignment"):
        judge(store.engine, t2, ann, key="same")
    with db.session_scope(store.engine) as s:
        assert s.scalar(select(func.count()).select_from(Judgement)) == 1
        assert ops.judgement_by_key(s, rater_id=ann, idempotency_key="same").id == j1.id
        assert ops.judgement_by_key(s, rater_id=store.raters["bob"], idempotency_key="same") is None


def test_held_task_is_handed_back(store):
    rid = mk_round(store)
    ann = store.raters["ann"]
    t1 = one(store.engine, ops.next_task, round_id=rid, rater_id=ann)
    t2 = one(store.engine, ops.next_task, round_id=rid, rater_id=ann)
    assert t1.assignment_id == t2.assignment_id
    assert one(store.engine, ops.get_task, assignment_id=t1.assignment_id, rater_id=ann).left_id == t1.left_id
    with pytest.raises(ops.StoreError):
        one(store.engine, ops.get_task, assignment_id=t1.assignment_id, rater_id=store.raters["bob"])


def test_overlap_and_no_repeat(seed):
    st = seed(n_pairs=10, raters={n: [] for n in "abcde"})
    rid = mk_round(st, overlap=3, duplicate_rate=0.0)
    seen = {}
    for name, r in st.raters.items():
        seen[name] = [t.left_id[:-1] for t in drain(st.engine, rid, r)]
    for name, items in seen.items():
        assert len(items) == len(set(items)), name
    with db.session_scope(st.engine) as s:
        counts = s.execute(select(Judgement.pair_id, func.count()).group_by(Judgement.pair_id)).all()
        prog = ops.round_progress(s, round_id=rid)
    assert len(counts) == 10 and all(n == 3 for _, n in counts)
    assert prog.items_complete == 10 and prog.n_judgements == 30
    assert sum(len(v) for v in seen.values()) == 30


def test_specialty_routing_and_fallbacks(seed):
    st = seed(n_pairs=8, raters={"pri": ["pricing"], "gen": []}, topics=("pricing", "billing"))
    pri = st.raters["pri"]
    # specialists get their own domain first, then others ('always')
    rid = mk_round(st, name="always", duplicate_rate=0.0, fallback="always")
    topics = [t.topic for t in drain(st.engine, rid, pri)]
    assert topics == ["pricing"] * 4 + ["billing"] * 4
    # 'never': only their domain
    rid = mk_round(st, name="never", duplicate_rate=0.0, fallback="never")
    assert [t.topic for t in drain(st.engine, rid, pri)] == ["pricing"] * 4
    # 'after': other domains only once the round is old enough
    rid = mk_round(st, name="after", duplicate_rate=0.0, fallback="after", fallback_after_s=3600)
    created = one(st.engine, ops.get_round, round_id=rid).created_at
    assert len(drain(st.engine, rid, pri, now=created + dt.timedelta(minutes=5))) == 4
    late = drain(st.engine, rid, pri, now=created + dt.timedelta(hours=2))
    assert [t.topic for t in late] == ["billing"] * 4
    # a generalist takes anything
    rid = mk_round(st, name="gen", duplicate_rate=0.0, fallback="never")
    assert len(drain(st.engine, rid, st.raters["gen"])) == 8


def test_planted_duplicates_are_swapped_and_spaced(seed):
    st = seed(n_pairs=20, raters={"ann": []})
    ann = st.raters["ann"]
    rid = mk_round(st, duplicate_rate=0.3, duplicate_gap=4, seed=7)
    tasks = drain(st.engine, rid, ann)
    pos: dict[str, list[int]] = {}
    left: dict[str, list[str]] = {}
    for i, t in enumerate(tasks):
        pos.setdefault(t.left_id[:-1], []).append(i)
        left.setdefault(t.left_id[:-1], []).append(t.left_id)
    dups = {k: v for k, v in pos.items() if len(v) == 2}
    assert 2 <= len(dups) <= 12 and all(len(v) <= 2 for v in pos.values())
    for k, (i, j) in dups.items():
        assert j - i - 1 >= 4, (k, i, j)  # at least `duplicate_gap` other tasks between
        assert left[k][0] != left[k][1]  # sides swapped
    with db.session_scope(st.engine) as s:
        dp = ops.duplicate_pairs(s, project_id=st.project_id, round_id=rid)
        rows = ops.round_judgements(s, round_id=rid)
    assert len(dp) == len(dups) and all(d.gap >= 4 for d in dp)
    # always answering 'left' on swapped sides is perfectly inconsistent
    assert not any(d.consistent for d in dp)
    assert sum(r.is_duplicate for r in rows) == len(dups)


def test_duplicate_rate_zero_and_one(seed):
    st = seed(n_pairs=10, raters={"ann": []})
    ann = st.raters["ann"]
    assert len(drain(st.engine, mk_round(st, name="none", duplicate_rate=0.0), ann)) == 10
    tasks = drain(st.engine, mk_round(st, name="all", duplicate_rate=1.0, duplicate_gap=2), ann)
    # every item whose duplicate can be spaced is repeated; the last ones cannot be
    assert 10 < len(tasks) < 20


def test_expired_lease_returns_to_pool(store):
    rid = mk_round(store, overlap=1, duplicate_rate=0.0, lease_s=60, pair_ids=["p000"])
    ann, bob = store.raters["ann"], store.raters["bob"]
    t0 = dt.datetime(2030, 1, 1, 12, 0, 0)
    ta = one(store.engine, ops.next_task, round_id=rid, rater_id=ann, now=t0)
    assert one(store.engine, ops.next_task, round_id=rid, rater_id=bob, now=t0 + dt.timedelta(seconds=30)) is None
    tb = one(store.engine, ops.next_task, round_id=rid, rater_id=bob, now=t0 + dt.timedelta(seconds=61))
    assert tb is not None and {tb.left_id, tb.right_id} == {ta.left_id, ta.right_id}
    with pytest.raises(ops.StoreError, match="expired lease") as e:
        judge(store.engine, ta, ann)
    assert e.value.code == "not_found"
    judge(store.engine, tb, bob)


def test_progress_counts_a_lapsed_lease_apart_and_deactivation_frees_the_raters_items(store):
    """An item a rater left open past the lease is 'expired', not 'in hand', in the admin's figures; a
    rater made inactive gives back what they hold at once (they could never answer it)."""
    rid = mk_round(store, overlap=1, duplicate_rate=0.0, lease_s=60, pair_ids=["p000", "p001"])
    ann, bob, cat = store.raters["ann"], store.raters["bob"], store.raters["cat"]
    t0 = dt.datetime(2030, 1, 1, 12, 0, 0)
    ta = one(store.engine, ops.next_task, round_id=rid, rater_id=ann, now=t0)
    tb = one(store.engine, ops.next_task, round_id=rid, rater_id=bob, now=t0)
    by = {r.rater_name: r for r in one(store.engine, ops.round_progress, round_id=rid,
                                       now=t0 + dt.timedelta(seconds=30)).raters}
    assert (by["ann"].leased, by["ann"].expired) == (1, 0)
    by = {r.rater_name: r for r in one(store.engine, ops.round_progress, round_id=rid,
                                       now=t0 + dt.timedelta(seconds=61)).raters}
    assert (by["ann"].leased, by["ann"].expired) == (0, 1) and (by["bob"].leased, by["bob"].expired) == (0, 1)

    assert one(store.engine, ops.next_task, round_id=rid, rater_id=cat, now=t0 + dt.timedelta(seconds=1)) is None
    one(store.engine, ops.update_rater, rater_id=ann, active=False)  # within the lease: ann's item comes free now
    tc = one(store.engine, ops.next_task, round_id=rid, rater_id=cat, now=t0 + dt.timedelta(seconds=2))
    assert tc is not None and {tc.left_id, tc.right_id} == {ta.left_id, ta.right_id}
    judge(store.engine, tc, cat)
    judge(store.engine, tb, bob)
    prog = one(store.engine, ops.round_progress, round_id=rid, now=t0 + dt.timedelta(seconds=3))
    assert prog.items_complete == 2 and {r.rater_name: r.leased + r.expired for r in prog.raters} == {
        "bob": 0, "cat": 0}


def test_own_expired_lease_can_still_be_submitted(store):
    rid = mk_round(store, duplicate_rate=0.0, lease_s=60)
    ann = store.raters["ann"]
    t0 = dt.datetime(2030, 1, 1)
    t = one(store.engine, ops.next_task, round_id=rid, rater_id=ann, now=t0)
    j = judge(store.engine, t, ann, now=t0 + dt.timedelta(hours=1))
    assert j.winner_id == t.left_id


def test_closed_round(store):
    rid = mk_round(store)
    ann = store.raters["ann"]
    t = one(store.engine, ops.next_task, round_id=rid, rater_id=ann)
    one(store.engine, ops.set_round_status, round_id=rid, status="closed")
    assert one(store.engine, ops.next_task, round_id=rid, rater_id=ann) is None
    with pytest.raises(ops.StoreError, match="closed"):
        judge(store.engine, t, ann)


def test_inactive_or_foreign_rater_is_refused(store, engine):
    rid = mk_round(store)
    one(engine, ops.update_rater, rater_id=store.raters["cat"], active=False)
    with pytest.raises(ops.StoreError, match="inactive") as e:
        one(engine, ops.next_task, round_id=rid, rater_id=store.raters["cat"])
    assert e.value.code == "forbidden"
    other = one(engine, ops.create_project, name="other")
    stranger = one(engine, ops.create_rater, project_id=other, name="x")
    with pytest.raises(ops.StoreError, match="not in the project"):
        one(engine, ops.next_task, round_id=rid, rater_id=stranger)


def test_progress_counts_down_to_done(seed):
    st = seed(n_pairs=6, raters={"ann": [], "bob": []})
    rid = mk_round(st, overlap=1, duplicate_rate=0.0)
    ann, bob = st.raters["ann"], st.raters["bob"]
    t = one(st.engine, ops.next_task, round_id=rid, rater_id=ann)
    assert (t.done, t.total) == (0, 6)
    judge(st.engine, t, ann)
    drain(st.engine, rid, bob)  # bob takes the other five
    p = one(st.engine, ops.progress, round_id=rid, rater_id=ann)
    assert (p.done, p.total) == (1, 1)


# ---- queries for later stages ------------------------------------------------------------


def test_preference_examples_latest_guideline_and_duplicates_once(seed):
    st = seed(n_pairs=4, raters={"ann": [], "bob": []})
    ann, bob = st.raters["ann"], st.raters["bob"]
    r1 = mk_round(st, name="v1-round", overlap=2, duplicate_rate=1.0, duplicate_gap=0)
    drain(st.engine, r1, ann)
    drain(st.engine, r1, bob)
    with db.session_scope(st.engine) as s:
        ex = ops.preference_examples(s, project_id=st.project_id)
    assert len(ex) == 8  # 4 pairs x 2 raters, duplicates counted once
    assert {e.guideline_version for e in ex} == {"v1"}
    # re-rate two pairs under v2: only their v2 labels remain
    v2 = one(st.engine, ops.create_guideline_version, project_id=st.project_id, label="v2", rubric=["facts"])
    r2 = mk_round(st, name="rerate", kind="rerate", pair_ids=["p000", "p001"], duplicate_rate=0.0,
                  guideline_version_id=v2)
    assert len(drain(st.engine, r2, ann)) == 2
    with db.session_scope(st.engine) as s:
        ex = ops.preference_examples(s, project_id=st.project_id)
        ex_all = ops.preference_examples(s, project_id=st.project_id, latest_guideline=False)
        ex_coll = ops.preference_examples(s, project_id=st.project_id, round_kinds=("collection",))
    by_pair = {}
    for e in ex:
        by_pair.setdefault(e.pair_id, []).append(e)
    assert [e.guideline_version for e in by_pair["p000"]] == ["v2"] and len(by_pair["p002"]) == 2
    assert len(ex) == 6 and len(ex_all) == 8 and len(ex_coll) == 8
    for e in ex:
        assert e.chosen_id != e.rejected_id and e.chosen_text.startswith(f"Answer {e.chosen_id[-1]}")


def test_alerts_and_events(store):
    aid = one(store.engine, ops.add_alert, project_id=store.project_id, kind="drift", message="ann drifts",
              rater_id=store.raters["ann"], payload={"z": 3.1})
    one(store.engine, ops.record_event, project_id=store.project_id, kind="promotion", subject="runs/a/step_000500",
        payload={"decision": "promote"})
    with db.session_scope(store.engine) as s:
        assert [a.kind for a in ops.list_alerts(s, project_id=store.project_id, resolved=False)] == ["drift"]
        ops.resolve_alert(s, alert_id=aid)
    with db.session_scope(store.engine) as s:
        assert ops.list_alerts(s, project_id=store.project_id, resolved=False) == []
        ev = ops.list_events(s, kind="promotion")
    assert ev[0].payload == {"decision": "promote"} and ev[0].subject == "runs/a/step_000500"


def test_assignment_constraints_hold_in_the_database(store):
    """The invariants are enforced by the database itself, not only by ops."""
    from sqlalchemy.exc import IntegrityError

    rid = mk_round(store, overlap=1, duplicate_rate=0.0)
    t = one(store.engine, ops.next_task, round_id=rid, rater_id=store.raters["ann"])
    with pytest.raises(IntegrityError), db.session_scope(store.engine) as s:
        a = s.get(Assignment, t.assignment_id)
        s.add(Assignment(round_id=rid, item_id=a.item_id, pair_id=a.pair_id, rater_id=store.raters["bob"],
                         left_response_id=a.left_response_id, slot=0, seq=0, state="leased"))
