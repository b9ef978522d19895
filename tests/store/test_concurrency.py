"""Threaded raters against one store (SQLite: one process, many threads; PostgreSQL: many
connections, which is what several worker processes amount to, since ops keep no memory).

Checked: no item past its overlap, no rater given a fresh item twice, every acknowledged
submission stored exactly once, concurrent same-key resubmissions never duplicate, and a
rater asking twice at once holds one task.
"""

from __future__ import annotations

import threading
from collections import Counter
from functools import partial

from sqlalchemy import func, select

from preflab.store import db, ops
from preflab.store.schema import Assignment, Judgement

N_RATERS = 6
N_PAIRS = 16
OVERLAP = 3


def _run_threads(targets):
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a rater thread hung"
    assert not errors, errors[0]


def _twice(fn):
    """Run ``fn`` in two threads at once; both results."""
    out: list = [None, None]

    def run(i):
        out[i] = fn()

    _run_threads([partial(run, 0), partial(run, 1)])
    return out


def _submit(s, *, assignment_id, rater_id, key, choice):
    return ops.submit_judgement(s, assignment_id=assignment_id, rater_id=rater_id, choice=choice, strength=1,
                                rationale="concurrent rationale", time_on_task_s=1.0, idempotency_key=key)


def test_parallel_raters_keep_every_invariant(seed):
    st = seed(n_pairs=N_PAIRS, raters={f"r{i}": (["pricing"] if i % 2 else []) for i in range(N_RATERS)})
    eng = st.engine
    rid = ops_round = db.transact(eng, lambda s: ops.create_round(
        s, project_id=st.project_id, name="race", kind="collection", pair_ids=st.pair_ids, overlap=OVERLAP,
        duplicate_rate=0.3, duplicate_gap=2, seed=3))
    acked: list[tuple[int, int, str]] = []  # (judgement id, assignment id, key)
    lock = threading.Lock()

    def rater(rater_id: int):
        def loop():
            for n in range(200):
                # the same rater asks twice at once (double click): one task, one lease
                got = _twice(lambda: db.transact(eng, lambda s: ops.next_task(s, round_id=rid, rater_id=rater_id)))
                if got[0] is None or got[1] is None:
                    assert got[0] is None and got[1] is None
                    return
                assert got[0].assignment_id == got[1].assignment_id
                task, key = got[0], f"{rater_id}-{n}"
                # a client retry racing the original request, same idempotency key
                results = _twice(partial(db.transact, eng, partial(
                    _submit, assignment_id=task.assignment_id, rater_id=rater_id, key=key,
                    choice="left" if n % 2 else "right")))
                assert results[0].id == results[1].id
                assert sorted([results[0].replayed, results[1].replayed]) == [False, True]
                with lock:
                    acked.append((results[0].id, task.assignment_id, key))
            raise AssertionError("rater never ran out of tasks")
        return loop

    _run_threads([rater(r) for r in st.raters.values()])
    del ops_round

    with db.session_scope(eng) as s:
        fresh = s.execute(select(Assignment.item_id, Assignment.rater_id).where(
            Assignment.round_id == rid, Assignment.is_duplicate.is_(False))).all()
        per_item = Counter(i for i, _ in fresh)
        assert max(per_item.values()) <= OVERLAP
        assert len(per_item) == N_PAIRS and set(per_item.values()) == {OVERLAP}  # every item reached overlap
        assert len(set(fresh)) == len(fresh)  # no rater got a fresh item twice
        judged = s.execute(select(Judgement.id, Judgement.assignment_id, Judgement.idempotency_key)).all()
        assert sorted(map(tuple, judged)) == sorted(acked)  # every acknowledged submission exactly once
        assert s.scalar(select(func.count()).select_from(Assignment).where(Assignment.state == "leased")) == 0
        dups = ops.duplicate_pairs(s, project_id=st.project_id, round_id=rid)
        assert dups and all(d.gap >= 2 for d in dups)
        prog = ops.round_progress(s, round_id=rid)
    assert prog.items_complete == N_PAIRS
    assert prog.n_judgements == len(acked) == N_PAIRS * OVERLAP + len(dups)
