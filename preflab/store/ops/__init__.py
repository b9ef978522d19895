"""Typed, keyword-only operations on the preference store.

Every function takes an open ``Session`` and does its work inside the caller's
transaction (``with db.session_scope(engine) as s: ops.f(s, ...)``: one op, one
transaction); nothing commits here. Bad input raises ``StoreError`` naming the place;
``StoreError.code`` (``invalid`` | ``not_found`` | ``conflict`` | ``forbidden``) lets the
web layer choose a status code.

Assignment (``next_task`` / ``submit_judgement``) is atomic under concurrency on SQLite
(one process, many threads: transactions take the write lock up front, see db.py) and
on PostgreSQL with several processes: overlap, no-double-assignment, task order and
idempotency are unique constraints (schema.py); a clash rolls back a savepoint and the
next candidate is tried. No state is kept in memory between calls.

Rules of ``next_task`` (for one rater in one round):

1. a task the rater already holds (leased, expired or not) is handed back, lease renewed;
2. leases of other raters that expired return to the pool (fresh tasks are deleted,
   freeing their slot; planted duplicates go back to ``scheduled``);
3. a planted duplicate whose ``due_seq`` has come is served (same pair, sides swapped);
4. otherwise a fresh item with a free slot (fewer than ``overlap`` raters) that this
   rater never had: specialty matches first, then items closest to full overlap, then
   the round's shuffled order. Routing: a rater with no specialties takes anything;
   ``fallback='always'`` lets a specialist take other domains when theirs are done,
   ``'never'`` never, ``'after'`` only once the round is ``fallback_after_s`` old.

A planted duplicate is scheduled when a fresh task is judged, with probability
``duplicate_rate`` (a seeded hash of round, pair and rater), due at least
``duplicate_gap`` other tasks later.
"""

from __future__ import annotations

from preflab.store.ops.assign import (
    get_task,
    next_task,
    progress,
    submit_judgement,
)
from preflab.store.ops.base import (
    MAX_KEY,
    MAX_RATIONALE,
    StoreError,
    hash_token,
)
from preflab.store.ops.content import (
    add_pairs,
    add_prompts,
    add_responses,
    eval_prompt_ids,
    get_pair,
    list_pairs,
    list_prompts,
)
from preflab.store.ops.events import (
    add_alert,
    list_alerts,
    list_events,
    record_event,
    resolve_alert,
)
from preflab.store.ops.people import (
    check_password,
    create_guideline_version,
    create_project,
    create_rater,
    credentials_version,
    ensure_project,
    get_guideline,
    get_rater,
    issue_api_token,
    latest_guideline,
    list_guidelines,
    list_projects,
    list_raters,
    password_hash_of,
    project_id,
    rater_by_name,
    rater_by_token,
    rater_by_token_hash,
    require_project,
    set_password,
    set_token_hash,
    update_rater,
)
from preflab.store.ops.queries import (
    duplicate_pairs,
    judgement_by_key,
    preference_examples,
    project_judgements,
    rater_judgements,
    round_judgements,
    round_progress,
)
from preflab.store.ops.records import (
    AlertInfo,
    DuplicatePair,
    EventInfo,
    GuidelineInfo,
    JudgementRecord,
    JudgementRow,
    PairIn,
    PairInfo,
    PreferenceExample,
    Progress,
    PromptIn,
    RaterInfo,
    RaterProgress,
    ResponseIn,
    RoundInfo,
    RoundProgress,
    Task,
)
from preflab.store.ops.rounds import (
    create_round,
    get_round,
    list_rounds,
    round_by_name,
    round_pair_ids,
    set_round_status,
)

__all__ = [
    "AlertInfo",
    "DuplicatePair",
    "EventInfo",
    "GuidelineInfo",
    "JudgementRecord",
    "JudgementRow",
    "MAX_KEY",
    "MAX_RATIONALE",
    "PairIn",
    "PairInfo",
    "PreferenceExample",
    "Progress",
    "PromptIn",
    "RaterInfo",
    "RaterProgress",
    "ResponseIn",
    "RoundInfo",
    "RoundProgress",
    "StoreError",
    "Task",
    "add_alert",
    "add_pairs",
    "add_prompts",
    "add_responses",
    "check_password",
    "create_guideline_version",
    "create_project",
    "create_rater",
    "create_round",
    "credentials_version",
    "duplicate_pairs",
    "ensure_project",
    "list_projects",
    "get_guideline",
    "eval_prompt_ids",
    "get_pair",
    "get_rater",
    "get_round",
    "get_task",
    "hash_token",
    "issue_api_token",
    "judgement_by_key",
    "latest_guideline",
    "list_alerts",
    "list_events",
    "list_guidelines",
    "list_pairs",
    "list_prompts",
    "list_raters",
    "list_rounds",
    "next_task",
    "password_hash_of",
    "preference_examples",
    "progress",
    "project_id",
    "project_judgements",
    "rater_by_name",
    "rater_by_token",
    "rater_by_token_hash",
    "rater_judgements",
    "record_event",
    "require_project",
    "resolve_alert",
    "round_by_name",
    "round_judgements",
    "round_pair_ids",
    "round_progress",
    "set_password",
    "set_round_status",
    "set_token_hash",
    "submit_judgement",
    "update_rater",
]
