"""Plain frozen dataclasses the ops return (never ORM objects) and take in bulk inserts."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

# ---- records returned to callers (plain dataclasses, no ORM objects) ------------------


@dataclass(frozen=True)
class RaterInfo:
    id: int
    project_id: int
    name: str
    role: str
    specialties: tuple[str, ...]
    hourly_rate: float
    active: bool


@dataclass(frozen=True)
class GuidelineInfo:
    id: int
    project_id: int
    label: str
    text: str
    rubric: tuple[str, ...]
    created_at: dt.datetime


@dataclass(frozen=True)
class PromptIn:
    id: str
    text: str
    topic: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResponseIn:
    id: str
    prompt_id: str
    text: str
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairIn:
    id: str
    prompt_id: str
    response_a_id: str
    response_b_id: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairInfo:
    id: str
    prompt_id: str
    prompt_text: str
    topic: str
    response_a_id: str
    response_a_text: str
    response_a_source: str
    response_b_id: str
    response_b_text: str
    response_b_source: str
    meta: dict[str, Any]


@dataclass(frozen=True)
class RoundInfo:
    id: int
    project_id: int
    name: str
    kind: str
    guideline_version_id: int | None
    guideline_label: str | None
    overlap: int
    duplicate_rate: float
    duplicate_gap: int
    allow_ties: bool
    min_rationale_chars: int
    routing: str
    fallback: str
    fallback_after_s: float
    lease_s: float
    status: str
    seed: int
    n_items: int
    created_at: dt.datetime
    meta: dict[str, Any]


@dataclass(frozen=True)
class Task:
    """One comparison as a rater sees it: canonical ids, screen sides, no model identity."""

    assignment_id: int
    round_id: int
    prompt_text: str
    topic: str
    left_id: str
    left_text: str
    right_id: str
    right_text: str
    allow_ties: bool
    min_rationale_chars: int
    lease_expires_at: dt.datetime
    done: int
    total: int


@dataclass(frozen=True)
class Progress:
    """A rater's progress in a round; ``total`` counts what they could still be given."""

    done: int
    total: int


@dataclass(frozen=True)
class JudgementRecord:
    id: int
    assignment_id: int
    round_id: int
    pair_id: str
    rater_id: int
    winner_id: str | None
    is_tie: bool
    strength: int
    rationale: str
    time_on_task_s: float
    idempotency_key: str
    guideline_version_id: int | None
    is_duplicate: bool
    created_at: dt.datetime
    replayed: bool = False  # True when an earlier submission with the same key was returned


@dataclass(frozen=True)
class JudgementRow:
    """A judgement with its context, for analysis and export (admin side: includes sources)."""

    judgement_id: int
    assignment_id: int
    round_id: int
    round_kind: str
    pair_id: str
    prompt_id: str
    prompt_text: str
    topic: str
    rater_id: int
    rater_name: str
    response_a_id: str
    response_b_id: str
    source_a: str
    source_b: str
    left_id: str
    winner_id: str | None
    choice: Literal["a", "b", "tie"]
    strength: int
    rationale: str
    time_on_task_s: float
    is_duplicate: bool
    guideline_label: str | None
    created_at: dt.datetime


@dataclass(frozen=True)
class DuplicatePair:
    """A rater's answers to a pair and its planted (side-swapped) duplicate."""

    round_id: int
    rater_id: int
    rater_name: str
    pair_id: str
    first: Literal["a", "b", "tie"]
    second: Literal["a", "b", "tie"]
    first_strength: int
    second_strength: int
    gap: int  # tasks served in between

    @property
    def consistent(self) -> bool:
        return self.first == self.second


@dataclass(frozen=True)
class PreferenceExample:
    pair_id: str
    prompt_text: str
    topic: str
    chosen_text: str
    rejected_text: str
    chosen_id: str
    rejected_id: str
    strength: int
    rater: str
    is_tie: bool  # chosen/rejected are the canonical a/b order then
    guideline_version: str | None
    round_id: int


@dataclass(frozen=True)
class RaterProgress:
    rater_id: int
    rater_name: str
    done: int
    leased: int  # items in hand, their lease running
    duplicates_done: int
    time_on_task_s: float
    expired: int = 0  # leases that lapsed: back to the pool at the next request for work


@dataclass(frozen=True)
class RoundProgress:
    round_id: int
    n_items: int
    items_complete: int  # items with `overlap` fresh judgements
    n_judgements: int
    raters: tuple[RaterProgress, ...]


@dataclass(frozen=True)
class AlertInfo:
    id: int
    project_id: int
    kind: str
    rater_id: int | None
    round_id: int | None
    message: str
    payload: dict[str, Any]
    created_at: dt.datetime
    resolved: bool


@dataclass(frozen=True)
class EventInfo:
    id: int
    project_id: int | None
    kind: str
    subject: str
    payload: dict[str, Any]
    created_at: dt.datetime
