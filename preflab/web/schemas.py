"""Wire schemas of the JSON API (pydantic), kept apart from the store's ORM tables.

Nothing a rater receives names a model, a checkpoint or a canonical response id: a task is an
assignment id, the query and two texts; the server maps the rater's screen side back to the
canonical winner.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

RoundKind = Literal["calibration", "collection", "rerate", "eval"]
IDEM_PATTERN = r"^[A-Za-z0-9_.:\-]{8,128}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Me(BaseModel):
    id: int
    name: str
    role: Literal["rater", "admin"]


class Progress(BaseModel):
    done: int
    total: int


class RoundOut(BaseModel):
    """A round as a rater sees it."""

    id: int
    name: str
    kind: RoundKind
    allow_ties: bool
    min_rationale_chars: int
    guideline_version: str | None
    progress: Progress


class RoundAdminOut(BaseModel):
    id: int
    name: str
    kind: RoundKind
    status: str
    overlap: int
    duplicate_rate: float
    allow_ties: bool
    min_rationale_chars: int
    guideline_version: str | None
    n_items: int
    n_judgements: int
    warnings: list[str] = Field(default_factory=list, description="Items that cannot reach their overlap with "
                                                                   "the active raters (collect.assign.routing_gaps).")


class RoundCreate(Strict):
    name: str = Field(min_length=1, max_length=200)
    kind: RoundKind = "collection"
    pair_ids: list[str] | None = Field(None, max_length=100_000,
                                       description="Pairs to rate; omitted = every pair of the project.")
    guideline_version: str | None = Field(None, max_length=64, description="Label; omitted = the newest version.")
    overlap: int = Field(3, ge=1, le=50)
    duplicate_rate: float = Field(0.1, ge=0.0, le=0.5)
    min_rationale_chars: int = Field(20, ge=0, le=2000)
    allow_ties: bool = True
    routing: Literal["specialty", "any"] = "specialty"
    fallback: Literal["always", "after", "never"] = "always"
    fallback_after_s: float = Field(0.0, ge=0.0, le=365 * 86400.0, allow_inf_nan=False,
                                    description="With fallback 'after': seconds after the round opens.")
    seed: int = Field(0, ge=0, le=2**31 - 1)


class Side(BaseModel):
    text: str


class TaskOut(BaseModel):
    assignment_id: int
    prompt: str
    left: Side
    right: Side


class NextOut(BaseModel):
    task: TaskOut | None
    progress: Progress
    closed: bool = Field(False, description="True when an admin closed the round: task is null although items may "
                                            "be left, and answers are refused until it is reopened.")


class JudgementIn(Strict):
    assignment_id: int = Field(ge=1, le=2**62)
    choice: Literal["left", "right", "tie"]
    strength: int = Field(2, ge=0, le=3, description="0 negligible/tie, 1 slightly, 2 clearly, 3 much better")
    rationale: str = Field(max_length=20_000)
    time_on_task_s: float = Field(0.0, ge=0.0, le=1e7, allow_inf_nan=False,
                                  description="Client-measured; clipped server side.")
    idempotency_key: str = Field(pattern=IDEM_PATTERN, description="One per task; resend it on retry.")


class JudgementOut(BaseModel):
    judgement_id: int
    assignment_id: int
    replayed: bool = Field(description="True when this key had been stored before (nothing new written).")


class ImportOut(BaseModel):
    kind: Literal["prompts", "pairs"]
    counts: dict[str, int]


class ProgressRow(BaseModel):
    rater: str
    rater_id: int
    done: int  # judgements, planted duplicates included
    total: int  # done + items in hand (lease running)
    expired: int = 0  # leases that lapsed: the items go back to the pool at the next request for work


class AlertOut(BaseModel):
    id: int
    kind: str
    message: str
    rater_id: int | None
    round_id: int | None
    created_at: dt.datetime


class RaterCreate(Strict):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")

    @field_validator("name")
    @classmethod
    def _trimmed(cls, v: str) -> str:  # "  dave  " would be a name nobody can type at the sign-in
        v = v.strip()
        if not v:
            raise ValueError("a name needs a visible character")
        return v
    role: Literal["rater", "admin"] = "rater"
    specialties: list[str] = Field(default_factory=list, max_length=20)
    hourly_rate: float = Field(0.0, ge=0.0, le=10_000.0)
    password: str | None = Field(None, min_length=8, max_length=500, description="Omitted = a random one, shown once.")


class RaterCreated(BaseModel):
    id: int
    name: str
    role: str
    password: str = Field(description="Shown once; only its argon2 hash is stored.")
    token: str = Field(description="API token, shown once; only its SHA-256 is stored.")


class RaterOut(BaseModel):
    id: int
    name: str
    role: Literal["rater", "admin"]
    specialties: list[str]
    hourly_rate: float
    active: bool


class RaterUpdate(Strict):
    """Fields to change (omitted = unchanged)."""

    role: Literal["rater", "admin"] | None = None
    specialties: list[str] | None = Field(None, max_length=20)
    hourly_rate: float | None = Field(None, ge=0.0, le=10_000.0)
    active: bool | None = None


class CredentialsReset(Strict):
    password: str | None = Field(None, min_length=8, max_length=500, description="Omitted = a random one, shown once.")


class GuidelineIn(Strict):
    label: str = Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f]+$")
    text: str = Field("", max_length=200_000, description="The guideline as raters read it.")
    rubric: list[str] = Field(default_factory=list, max_length=200, description="Rubric items, one rule each.")


class GuidelineOut(BaseModel):
    label: str
    text: str
    rubric: list[str]
    created_at: dt.datetime
