"""Assignment policy of a round: routing, overlap, planted duplicates, leases.

The rules run inside the store (``store.ops.next_task`` / ``submit_judgement``) because
they must be atomic in the database; this module owns the *policy* as a stage config
(``AssignConfig``, whose field docs become CLI help), opens rounds with it, and checks a
round's routing before raters waste time on it (``routing_gaps``).

Expected work of a round (``expected_load``): every item is judged by ``overlap``
distinct raters, and each judgement of a fresh item plants a duplicate with probability
``duplicate_rate``, so judgements ~= n_items * overlap * (1 + duplicate_rate), minus
duplicates that cannot be spaced ``duplicate_gap`` tasks from their original near the
end of a rater's queue.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.orm import Session

from preflab.config import check, field_doc
from preflab.store import ops


@dataclass
class AssignConfig:
    overlap: int = field_doc(1, "Distinct raters per item (3 for agreement statistics, 1 for bulk collection).")
    duplicate_rate: float = field_doc(0.1, "Share of judged items planted again for the same rater, sides swapped.")
    duplicate_gap: int = field_doc(5, "At least this many other tasks between an item and its planted duplicate.")
    allow_ties: bool = field_doc(True, "Offer 'tie' as an answer.")
    min_rationale_chars: int = field_doc(10, "Minimum rationale length (characters, after trimming).")
    routing: Literal["specialty", "any"] = field_doc(
        "specialty", "'specialty': raters get items of their domains first; 'any': no routing.")
    fallback: Literal["always", "after", "never"] = field_doc(
        "always", "When specialists may take other domains: 'always' (once theirs are done), "
                  "'after' (the round is fallback_after_s old), 'never'.")
    fallback_after_s: float = field_doc(0.0, "Seconds after the round opens before 'after' fallback applies.")
    lease_s: float = field_doc(900.0, "Seconds a rater holds a task before it returns to the pool.")
    seed: int = field_doc(0, "Seed of item order, screen sides and duplicate planting.")

    def validate(self) -> None:
        check(self.overlap >= 1, "assign.overlap", f"must be >= 1, got {self.overlap}")
        check(0.0 <= self.duplicate_rate <= 1.0, "assign.duplicate_rate", f"must be in [0, 1], got {self.duplicate_rate}")
        check(self.duplicate_gap >= 0, "assign.duplicate_gap", f"must be >= 0, got {self.duplicate_gap}")
        check(self.min_rationale_chars >= 0, "assign.min_rationale_chars",
              f"must be >= 0, got {self.min_rationale_chars}")
        check(self.routing in ("specialty", "any"), "assign.routing", f"must be 'specialty' or 'any', got {self.routing!r}")
        check(self.fallback in ("always", "after", "never"), "assign.fallback",
              f"must be 'always', 'after' or 'never', got {self.fallback!r}")
        check(self.fallback_after_s >= 0, "assign.fallback_after_s", f"must be >= 0, got {self.fallback_after_s}")
        check(self.lease_s > 0, "assign.lease_s", f"must be > 0, got {self.lease_s}")
        check(self.seed >= 0, "assign.seed", f"must be >= 0, got {self.seed}")


def open_round(
    session: Session,
    cfg: AssignConfig,
    *,
    project_id: int,
    name: str,
    kind: str,
    pair_ids: Sequence[str],
    guideline_version_id: int | None = None,
) -> int:
    """Create an open round over ``pair_ids`` with the policy ``cfg``; returns its id."""
    cfg.validate()
    return ops.create_round(
        session, project_id=project_id, name=name, kind=kind, pair_ids=pair_ids,
        guideline_version_id=guideline_version_id, overlap=cfg.overlap, duplicate_rate=cfg.duplicate_rate,
        duplicate_gap=cfg.duplicate_gap, allow_ties=cfg.allow_ties, min_rationale_chars=cfg.min_rationale_chars,
        routing=cfg.routing, fallback=cfg.fallback, fallback_after_s=cfg.fallback_after_s, lease_s=cfg.lease_s,
        seed=cfg.seed)


@dataclass(frozen=True)
class Load:
    """Expected work of a round."""

    n_items: int
    fresh_judgements: int  # n_items * overlap
    expected_duplicates: float  # fresh_judgements * duplicate_rate (an upper bound: see module docstring)
    per_rater: float  # (fresh + duplicates) / active raters, if evenly spread


def expected_load(*, n_items: int, overlap: int, duplicate_rate: float, n_raters: int) -> Load:
    """Judgements a round will take: ``n * k * (1 + d)``, spread over ``n_raters``."""
    if n_items < 0 or overlap < 1 or not 0 <= duplicate_rate <= 1 or n_raters < 1:
        raise ValueError("expected_load: need n_items >= 0, overlap >= 1, 0 <= duplicate_rate <= 1, n_raters >= 1")
    if overlap > n_raters:
        raise ValueError(f"expected_load: overlap {overlap} needs at least {overlap} raters, got {n_raters}")
    fresh = n_items * overlap
    dups = fresh * duplicate_rate
    return Load(n_items, fresh, dups, (fresh + dups) / n_raters)


def routing_gaps(
    *, domains: Sequence[str], specialties: Sequence[Sequence[str]], overlap: int, routing: str, fallback: str,
) -> list[str]:
    """Domains whose items cannot reach ``overlap`` raters under the routing (pure).

    ``domains``: one per item; ``specialties``: one list per active rater (empty = takes
    anything). With ``fallback='never'`` an item of domain D can only go to raters whose
    specialties include D or who have none; fewer than ``overlap`` of them leaves those
    items short forever. Other fallbacks can always reach every rater.
    """
    n_raters = len(specialties)
    out = []
    counts = Counter(domains)
    if n_raters < overlap:
        out.append(f"only {n_raters} active raters for overlap {overlap}: no item can be completed")
        return out
    if routing == "any" or fallback != "never":
        return out
    for d in sorted(counts):
        eligible = sum(1 for s in specialties if not s or d in s)
        if eligible < overlap:
            out.append(f"domain {d!r}: {counts[d]} items but only {eligible} eligible raters for overlap {overlap} "
                       f"(fallback='never')")
    return out


def round_routing_gaps(session: Session, *, round_id: int) -> list[str]:
    """``routing_gaps`` for a stored round and the project's active raters."""
    rnd = ops.get_round(session, round_id=round_id)
    topics = {p.id: p.topic for p in ops.list_pairs(session, project_id=rnd.project_id,
                                                      pair_ids=ops.round_pair_ids(session, round_id=round_id))}
    raters = ops.list_raters(session, project_id=rnd.project_id, active_only=True)
    gaps = routing_gaps(domains=list(topics.values()), specialties=[r.specialties for r in raters],
                        overlap=rnd.overlap, routing=rnd.routing, fallback=rnd.fallback)
    admins = sorted(r.name for r in raters if r.role == "admin")
    if admins:  # admins may rate too, so they count; say so, as a team may not mean them to
        gaps = [g.replace(" active raters ", f" active raters ({len(admins)} of them admin) ", 1) for g in gaps]
        n_raters = len(raters) - len(admins)
        if not gaps and rnd.overlap > n_raters:
            gaps.append(f"overlap {rnd.overlap} but only {n_raters} active raters who are not admins: no item is "
                        f"complete until an admin ({', '.join(admins)}) rates it too")
    return gaps
