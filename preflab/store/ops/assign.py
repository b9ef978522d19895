"""Atomic assignment: ``next_task``, ``submit_judgement``, progress (rules in ``ops/__init__``)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Literal

from sqlalchemy import and_, case, delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from preflab.store.ops.base import (
    _RETRIES,
    MAX_KEY,
    MAX_RATIONALE,
    StoreError,
    _now,
    _rater,
    _round,
    _text,
    _unit,
)
from preflab.store.ops.records import (
    JudgementRecord,
    Progress,
    Task,
)
from preflab.store.schema import (
    Assignment,
    DuplicateLink,
    Judgement,
    Pair,
    Prompt,
    Rater,
    Response,
    Round,
    RoundItem,
)

# ---- assignment -------------------------------------------------------------------------


def _routing(rnd: Round, rater: Rater, now: dt.datetime) -> tuple[list[str], bool]:
    """(the rater's specialties to try first, whether other domains are allowed)."""
    specs = [s for s in (rater.specialties or []) if s]
    if rnd.routing == "any" or not specs:
        return [], True
    if rnd.fallback == "always":
        return specs, True
    if rnd.fallback == "after" and (now - rnd.created_at).total_seconds() >= rnd.fallback_after_s:
        return specs, True
    return specs, False


def _fresh(rnd: Round, rater: Rater):  # noqa: ANN202 - a Select
    """Items with a free slot that this rater never had as a fresh task.

    ``RoundItem.filled`` counts slotted assignments (kept in step with them by next_task
    and the lease reclaim), so this is an index scan, not a count per item.
    """
    mine = exists().where(Assignment.item_id == RoundItem.id, Assignment.rater_id == rater.id,
                          Assignment.is_duplicate.is_(False))
    return select(RoundItem.id).where(RoundItem.round_id == rnd.id, RoundItem.filled < rnd.overlap, ~mine)


def _pick_fresh(session: Session, rnd: Round, rater: Rater, now: dt.datetime, tried: set[int]) -> int | None:
    """The next fresh item: specialty first, then fullest, then the round's seeded order."""
    q = _fresh(rnd, rater)
    if tried:
        q = q.where(RoundItem.id.not_in(tried))
    # (filled desc, position desc) is a backward scan of ix_round_item_pick*; positions are a shuffle.
    # PostgreSQL: lock the picked item and skip items other raters are taking right now, so
    # concurrent raters spread over items instead of queueing on one (SQLite ignores this:
    # its writers are serialised anyway).
    q = q.order_by(RoundItem.filled.desc(), RoundItem.position.desc()).limit(1)
    specs, others = _routing(rnd, rater, now)
    queries = [q.where(RoundItem.domain.in_(specs))] if specs else []
    if others:
        queries.append(q)
    for query in queries:
        found = session.scalar(query.with_for_update(skip_locked=True, of=RoundItem))
        if found is None:  # everything left may be locked by raters taking it now: wait for them
            found = session.scalar(query.with_for_update(of=RoundItem))
        if found is not None:
            return found
    return None


def _n_fresh(session: Session, rnd: Round, rater: Rater, now: dt.datetime) -> int:
    """How many items ``_pick_fresh`` could still offer: open items minus the rater's own
    (two index counts instead of a correlated scan of the whole round)."""
    specs, others = _routing(rnd, rater, now)
    open_items = select(func.count()).select_from(RoundItem).where(
        RoundItem.round_id == rnd.id, RoundItem.filled < rnd.overlap)
    own = (select(func.count()).select_from(Assignment).join(RoundItem, RoundItem.id == Assignment.item_id)
           .where(Assignment.round_id == rnd.id, Assignment.rater_id == rater.id,
                  Assignment.is_duplicate.is_(False), RoundItem.filled < rnd.overlap))
    if specs and not others:
        open_items = open_items.where(RoundItem.domain.in_(specs))
        own = own.where(RoundItem.domain.in_(specs))
    return (session.scalar(open_items) or 0) - (session.scalar(own) or 0)


def _next_seq(session: Session, round_id: int, rater_id: int) -> int:
    m = session.scalar(select(func.max(Assignment.seq)).where(
        Assignment.round_id == round_id, Assignment.rater_id == rater_id))
    return 0 if m is None else m + 1


def _reclaim_expired(session: Session, round_id: int, now: dt.datetime) -> None:
    """Expired leases of the round go back to the pool (``_release``)."""
    _release(session, and_(Assignment.round_id == round_id, Assignment.state == "leased",
                           Assignment.lease_expires_at < now))


def release_rater_leases(session: Session, *, rater_id: int) -> None:
    """Every item the rater holds goes back to the pool now (a rater made inactive cannot answer:
    their items would otherwise wait out the lease, up to ``lease_s``)."""
    _release(session, and_(Assignment.rater_id == rater_id, Assignment.state == "leased"))


def _release(session: Session, leased) -> None:  # noqa: ANN001 - an SQL condition on leased assignments
    """The ``leased`` assignments give their items back: a fresh slot is deleted (its item's slot frees),
    a planted duplicate goes back to being scheduled.

    Only items whose row this transaction can lock without waiting are released (the rest on a
    later call, as expired leases): a releaser never waits on a rater taking that item, so the
    two cannot deadlock. RETURNING makes only rows really deleted free a slot.
    """
    item_ids = sorted(set(session.scalars(select(Assignment.item_id).where(leased, Assignment.is_duplicate.is_(False)))))
    if item_ids:
        locked = list(session.scalars(select(RoundItem.id).where(RoundItem.id.in_(item_ids)).order_by(RoundItem.id)
                                      .with_for_update(skip_locked=True)))
        if locked:
            freed = session.execute(
                delete(Assignment).where(leased, Assignment.is_duplicate.is_(False), Assignment.item_id.in_(locked))
                .returning(Assignment.item_id).execution_options(synchronize_session=False)).scalars().all()
            for item_id, n in Counter(freed).items():
                session.execute(update(RoundItem).where(RoundItem.id == item_id).values(filled=RoundItem.filled - n)
                                .execution_options(synchronize_session=False))
    session.execute(update(Assignment).where(leased, Assignment.is_duplicate.is_(True))
                    .values(state="scheduled", seq=None, lease_expires_at=None, leased_at=None)
                    .execution_options(synchronize_session=False))


def _try(session: Session, fn) -> bool:  # noqa: ANN001
    """Run ``fn`` in a savepoint; False (and rolled back) if it hit a unique constraint."""
    try:
        with session.begin_nested():
            fn()
            session.flush()
        return True
    except IntegrityError:
        return False


def next_task(session: Session, *, round_id: int, rater_id: int, now: dt.datetime | None = None) -> Task | None:
    """Lease the rater's next comparison in the round (rules in the module docstring).

    Returns None when the round is closed or nothing is left for this rater now.
    """
    now = _now(now)
    rnd = _round(session, round_id)
    # lock the rater row: one rater's concurrent requests queue here instead of racing
    # (no-op on SQLite, whose BEGIN IMMEDIATE already serialises writers)
    rater = session.scalar(select(Rater).where(Rater.id == rater_id).with_for_update())
    if rater is None:
        raise StoreError(f"rater {rater_id} not found", code="not_found")
    if rater.project_id != rnd.project_id:
        raise StoreError(f"rater {rater_id} is not in the project of round {round_id}", code="forbidden")
    if not rater.active:
        raise StoreError(f"rater {rater.name!r} is inactive", code="forbidden")
    if rnd.status != "open":
        return None
    lease_until = now + dt.timedelta(seconds=rnd.lease_s)
    tried: set[int] = set()
    for _ in range(_RETRIES):
        # 1. the task this rater already holds
        held = session.scalar(select(Assignment).where(
            Assignment.round_id == round_id, Assignment.rater_id == rater_id, Assignment.state == "leased")
            .order_by(Assignment.seq).limit(1))
        if held is not None:
            held.lease_expires_at = lease_until
            session.flush()
            return _task(session, rnd, held, now)
        # 2. expired leases of others go back to the pool
        _reclaim_expired(session, round_id, now)
        seq = _next_seq(session, round_id, rater_id)
        # 3. a planted duplicate that has come due
        dup = session.scalar(select(Assignment).where(
            Assignment.round_id == round_id, Assignment.rater_id == rater_id, Assignment.state == "scheduled",
            Assignment.due_seq <= seq).order_by(Assignment.due_seq, Assignment.id).limit(1))
        if dup is not None:
            def lease_dup(a: Assignment = dup, s: int = seq) -> None:
                session.execute(update(Assignment).where(Assignment.id == a.id, Assignment.state == "scheduled")
                                .values(state="leased", seq=s, leased_at=now, lease_expires_at=lease_until)
                                .execution_options(synchronize_session=False))
            if _try(session, lease_dup):
                session.refresh(dup)
                if dup.state == "leased" and dup.seq == seq:
                    return _task(session, rnd, dup, now)
            continue
        # 4. a fresh item with a free slot
        item_id = _pick_fresh(session, rnd, rater, now, tried)
        if item_id is None:
            return None
        item = session.get(RoundItem, item_id)
        pair = session.get(Pair, item.pair_id)
        used = set(session.scalars(select(Assignment.slot).where(
            Assignment.item_id == item.id, Assignment.slot.is_not(None))))
        free = [k for k in range(rnd.overlap) if k not in used]
        if not free:
            tried.add(item.id)
            continue
        left = pair.response_a_id if _unit("side", rnd.seed, round_id, pair.id, rater_id) < 0.5 else pair.response_b_id
        a = Assignment(round_id=round_id, item_id=item.id, pair_id=pair.id, rater_id=rater_id,
                       left_response_id=left, is_duplicate=False, slot=free[0], seq=seq, state="leased",
                       leased_at=now, lease_expires_at=lease_until, created_at=now)

        def take(a: Assignment = a, item_id: int = item.id) -> None:
            n = session.execute(update(RoundItem).where(RoundItem.id == item_id, RoundItem.filled < rnd.overlap)
                                .values(filled=RoundItem.filled + 1)
                                .execution_options(synchronize_session=False)).rowcount
            if n != 1:  # filled up meanwhile
                raise IntegrityError("item full", None, Exception("full"))
            session.add(a)

        if _try(session, take):
            return _task(session, rnd, a, now)
        if a in session:
            session.expunge(a)
        # a clash: another rater took the slot, or this rater got a task concurrently (step 1 finds it)
    raise StoreError(f"round {round_id}: could not lease a task after {_RETRIES} attempts (heavy contention)",
                     code="conflict")


def _task(session: Session, rnd: Round, a: Assignment, now: dt.datetime) -> Task:
    lr, rr = aliased(Response), aliased(Response)
    right_col = case((Pair.response_a_id == a.left_response_id, Pair.response_b_id), else_=Pair.response_a_id)
    prompt, left, right = session.execute(
        select(Prompt, lr, rr).select_from(Pair).join(Prompt, Prompt.id == Pair.prompt_id)
        .join(lr, lr.id == a.left_response_id).join(rr, rr.id == right_col).where(Pair.id == a.pair_id)).one()
    rater = session.get(Rater, a.rater_id)
    p = _progress(session, rnd, rater, now)
    return Task(a.id, rnd.id, prompt.text, prompt.topic, left.id, left.text, right.id, right.text,
                rnd.allow_ties, rnd.min_rationale_chars, a.lease_expires_at, p.done, p.total)


def get_task(session: Session, *, assignment_id: int, rater_id: int, now: dt.datetime | None = None) -> Task:
    """The task of an assignment the rater holds (e.g. after a page reload)."""
    a = session.get(Assignment, assignment_id)
    if a is None or a.rater_id != rater_id:
        raise StoreError(f"assignment {assignment_id} not found", code="not_found")
    return _task(session, _round(session, a.round_id), a, _now(now))


def progress(session: Session, *, round_id: int, rater_id: int, now: dt.datetime | None = None) -> Progress:
    """Done and total for a rater: total = done + held + fresh items they could still get
    + scheduled duplicates that can come due (an estimate while others are rating)."""
    return _progress(session, _round(session, round_id), _rater(session, rater_id), _now(now))


def _progress(session: Session, rnd: Round, rater: Rater, now: dt.datetime) -> Progress:
    rows = session.execute(select(Assignment.state, func.count(), func.max(Assignment.seq)).where(
        Assignment.round_id == rnd.id, Assignment.rater_id == rater.id).group_by(Assignment.state)).all()
    counts = {state: n for state, n, _ in rows}
    max_seq = max((m for _, _, m in rows if m is not None), default=-1)
    done, held = counts.get("done", 0), counts.get("leased", 0)
    fresh = _n_fresh(session, rnd, rater, now) if rnd.status == "open" else 0
    dups = 0
    if counts.get("scheduled"):
        reach = max_seq + 1 + held + fresh
        dups = session.scalar(select(func.count()).select_from(Assignment).where(
            Assignment.round_id == rnd.id, Assignment.rater_id == rater.id, Assignment.state == "scheduled",
            Assignment.due_seq <= reach)) or 0
    return Progress(done=done, total=done + held + fresh + dups)


def _choice(winner: str | None, pair: Pair) -> Literal["a", "b", "tie"]:
    if winner is None:
        return "tie"
    return "a" if winner == pair.response_a_id else "b"


def _record(j: Judgement, a: Assignment, *, replayed: bool) -> JudgementRecord:
    return JudgementRecord(j.id, j.assignment_id, j.round_id, j.pair_id, j.rater_id, j.winner_id,
                           j.winner_id is None, j.strength, j.rationale, j.time_on_task_s, j.idempotency_key,
                           j.guideline_version_id, a.is_duplicate, j.created_at, replayed)


def submit_judgement(
    session: Session,
    *,
    assignment_id: int,
    rater_id: int,
    choice: str,
    strength: int,
    rationale: str,
    time_on_task_s: float,
    idempotency_key: str,
    now: dt.datetime | None = None,
) -> JudgementRecord:
    """Store a rater's answer to an assignment against the CANONICAL response ids.

    ``choice`` is ``'left'``, ``'right'``, ``'tie'`` or the winning response id.
    ``strength`` 0..3 (0 tie/negligible, 1 slightly, 2 clearly, 3 much better); a tie is
    stored with strength 0 and ``winner_id`` NULL. Idempotent on ``idempotency_key``: the
    same key returns the stored judgement (``replayed=True``) and stores nothing new; the
    key reused for another assignment is a conflict. Judging a fresh task may schedule a
    planted duplicate (module docstring).
    """
    now = _now(now)
    key = _text(idempotency_key, "idempotency_key", max_len=MAX_KEY)
    prior = _by_key(session, rater_id, key)
    if prior is not None:
        return _replay(session, prior, assignment_id)
    a = session.get(Assignment, assignment_id)
    if a is None or a.rater_id != rater_id:
        raise StoreError(f"assignment {assignment_id} not found: not one of yours, or its lease expired and it went "
                         "to another rater (an expired lease returns to the pool)", code="not_found")
    rnd = _round(session, a.round_id)
    if a.state == "done":
        prior = _by_key(session, rater_id, key)  # a same-key request may have committed meanwhile
        if prior is not None:
            return _replay(session, prior, assignment_id)
        raise StoreError(f"assignment {assignment_id} is already judged", code="conflict")
    if rnd.status != "open":
        raise StoreError(f"round {rnd.name!r} is closed", code="conflict")
    pair = session.get(Pair, a.pair_id)
    if not isinstance(choice, str):
        raise StoreError(f"choice: expected 'left', 'right', 'tie' or a response id, got {choice!r}")
    right = pair.response_b_id if a.left_response_id == pair.response_a_id else pair.response_a_id
    winner: str | None
    if choice == "left":
        winner = a.left_response_id
    elif choice == "right":
        winner = right
    elif choice == "tie":
        winner = None
    elif choice in (pair.response_a_id, pair.response_b_id):
        winner = choice
    else:
        raise StoreError(f"choice: expected 'left', 'right', 'tie' or a response id of this pair, got {choice!r}")
    if winner is None and not rnd.allow_ties:
        raise StoreError(f"choice: round {rnd.name!r} does not allow ties")
    if not isinstance(strength, int) or isinstance(strength, bool) or not 0 <= strength <= 3:
        raise StoreError(f"strength: must be an integer 0..3, got {strength!r}")
    if winner is None:
        strength = 0
    rationale = _text(rationale, "rationale", max_len=MAX_RATIONALE, allow_empty=True)
    if len(rationale.strip()) < rnd.min_rationale_chars:
        raise StoreError(f"rationale: at least {rnd.min_rationale_chars} characters required "
                         f"(got {len(rationale.strip())})")
    if isinstance(time_on_task_s, bool) or not isinstance(time_on_task_s, (int, float)) \
            or not 0 <= time_on_task_s < 86_400 * 7:
        raise StoreError(f"time_on_task_s: must be a number of seconds >= 0, got {time_on_task_s!r}")
    j = Judgement(assignment_id=a.id, round_id=a.round_id, pair_id=a.pair_id, rater_id=rater_id,
                  winner_id=winner, strength=strength, rationale=rationale, time_on_task_s=float(time_on_task_s),
                  idempotency_key=key, guideline_version_id=rnd.guideline_version_id, created_at=now)

    def insert() -> None:
        session.add(j)
        session.flush()
        n = session.execute(update(Assignment).where(Assignment.id == a.id, Assignment.state != "done")
                            .values(state="done", done_at=now, lease_expires_at=None)
                            .execution_options(synchronize_session=False)).rowcount
        if n != 1:
            raise IntegrityError("assignment already done", None, Exception("done"))

    if not _try(session, insert):
        prior = _by_key(session, rater_id, key)
        if prior is not None:
            return _replay(session, prior, assignment_id)
        raise StoreError(f"assignment {assignment_id} is already judged", code="conflict")
    session.refresh(a)
    if a.seq is None:  # a duplicate judged after its lease lapsed back to 'scheduled'
        a.seq = _next_seq(session, a.round_id, rater_id)
    if not a.is_duplicate:
        _maybe_plant_duplicate(session, rnd, a, now)
    session.flush()
    return _record(j, a, replayed=False)


def _by_key(session: Session, rater_id: int, key: str) -> Judgement | None:
    return session.scalar(select(Judgement).where(Judgement.rater_id == rater_id, Judgement.idempotency_key == key))


def _replay(session: Session, prior: Judgement, assignment_id: int) -> JudgementRecord:
    if prior.assignment_id != assignment_id:
        raise StoreError(f"idempotency_key: already used for assignment {prior.assignment_id}", code="conflict")
    return _record(prior, session.get(Assignment, prior.assignment_id), replayed=True)


def _maybe_plant_duplicate(session: Session, rnd: Round, a: Assignment, now: dt.datetime) -> None:
    if rnd.duplicate_rate <= 0 or _unit("dup", rnd.seed, rnd.id, a.pair_id, a.rater_id) >= rnd.duplicate_rate:
        return
    pair = session.get(Pair, a.pair_id)
    other = pair.response_b_id if a.left_response_id == pair.response_a_id else pair.response_a_id
    d = Assignment(round_id=rnd.id, item_id=a.item_id, pair_id=a.pair_id, rater_id=a.rater_id,
                   left_response_id=other, is_duplicate=True, duplicate_of_id=a.id, slot=None, seq=None,
                   due_seq=a.seq + rnd.duplicate_gap + 1, state="scheduled", created_at=now)

    def add() -> None:
        session.add(d)
        session.flush()
        session.add(DuplicateLink(round_id=rnd.id, rater_id=a.rater_id, pair_id=a.pair_id,
                                  original_assignment_id=a.id, duplicate_assignment_id=d.id, created_at=now))

    _try(session, add)  # already planted (cannot happen for a first judgement): nothing to do
