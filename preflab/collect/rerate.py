"""The fix loop: new guideline versions with rubric items, targeted re-rating, lineage.

When evaluation shows the raters rewarded the wrong thing (the story: confident tone on
prices nobody checked), the fix is a rubric item ("verify every price against the price
list"), a re-rate round over the affected pairs under the new guideline, and a reward model
trained on the newest guideline's judgements (``ops.preference_examples`` drops the old
labels of a re-rated pair). Lineage events record which judgements, guideline, reward model
and policy each run came from.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from preflab.store import ops
from preflab.store.ops import StoreError

WHERE_KEYS = ("topic", "round_kind", "source")


def parse_where(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["topic=pricing", "round_kind=collection"]`` -> dict; errors name the bad item."""
    out: dict[str, str] = {}
    for i, item in enumerate(items):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise StoreError(f"--where[{i}]: expected KEY=VALUE, got {item!r}")
        if key not in WHERE_KEYS:
            raise StoreError(f"--where[{i}]: unknown key {key!r} (known: {', '.join(WHERE_KEYS)})")
        out[key] = value
    return out


def add_rubric(
    session: Session,
    *,
    project_id: int,
    label: str,
    items: list[str] | tuple[str, ...],
    text: str | None = None,
) -> int:
    """A new guideline version ``label``: the newest version's text and rubric plus ``items``."""
    if not items:
        raise StoreError("rubric.items: give at least one rubric item")
    prev = ops.latest_guideline(session, project_id=project_id)
    base_text = prev.text if prev else ""
    base_rubric = list(prev.rubric) if prev else []
    for i, it in enumerate(items):
        if not it.strip():
            raise StoreError(f"rubric.items[{i}]: empty")
        if it in base_rubric or it in items[:i]:
            where = f"guideline {prev.label}'s rubric" if it in base_rubric else "the items given"
            raise StoreError(f"rubric.items[{i}]: {it!r} is already in {where} (a new version keeps the newest "
                             "one's items; give only the new ones)")
    if text is None:
        text = base_text + "".join(f"\n- {it}" for it in items)
    return ops.create_guideline_version(session, project_id=project_id, label=label, text=text,
                                        rubric=tuple(base_rubric + list(items)))


# Re-rating relabels pairs raters judged for training; calibration-workshop rounds are practice
# (their pairs need not be in the training set) and eval rounds are blind A/Bs.
SELECT_KINDS = ("collection", "rerate")


@dataclass(frozen=True)
class Selection:
    """The pairs ``select_pairs`` keeps, out of how many matched, and how many it skipped."""

    pair_ids: list[str]  # at most ``limit``: the first of a seeded shuffle of the eligible pairs
    matched: int  # judged pairs matching ``where``, less the skipped and queued ones
    skipped: int  # matching pairs already judged under the target guideline (0 with ``include_rerated``)
    queued: int  # matching pairs waiting in an open round under the target guideline, not judged yet
    guideline: str | None  # the target guideline version of the skip rule


def _queued_under(session: Session, *, project_id: int, guideline: str, rows: list[Any]) -> set[str]:
    """Items of open (non-eval) rounds under ``guideline`` not judged there yet: raters will judge
    them under it anyway."""
    judged_in: dict[int, set[str]] = {}
    for r in rows:
        judged_in.setdefault(r.round_id, set()).add(r.pair_id)
    out: set[str] = set()
    for rnd in ops.list_rounds(session, project_id=project_id):
        if rnd.status == "open" and rnd.kind != "eval" and rnd.guideline_label == guideline:
            out.update(set(ops.round_pair_ids(session, round_id=rnd.id)) - judged_in.get(rnd.id, set()))
    return out


def selection(
    session: Session,
    *,
    project_id: int,
    where: Mapping[str, str],
    limit: int,
    seed: int = 0,
    guideline: str | None = None,
    include_rerated: bool = False,
    round_kinds: tuple[str, ...] = SELECT_KINDS,
) -> Selection:
    """Pairs for re-rating (the rule docs/collect.md spells out).

    Only judged pairs are candidates (their labels are what a new rubric changes), judged in
    collection or re-rate rounds unless ``where["round_kind"]`` names another kind; ``topic`` and
    ``source`` filter on the pair. Pairs already judged under ``guideline`` (default: the newest
    version) are skipped unless ``include_rerated``, and pairs waiting in an open round under it
    always are (re-rating either pays for the same labels twice). The rest are shuffled with
    ``seed`` (reproducible, an unbiased sample) and the first ``limit`` kept.
    """
    if limit < 1:
        raise StoreError(f"rerate.limit: must be >= 1, got {limit}")
    if guideline is None:
        newest = ops.latest_guideline(session, project_id=project_id)
        guideline = newest.label if newest else None
    kinds = (where["round_kind"],) if "round_kind" in where else round_kinds
    rows = [r for r in ops.project_judgements(session, project_id=project_id) if r.round_kind != "eval"]
    matching: set[str] = set()
    for r in rows:
        if r.is_duplicate or r.round_kind not in kinds:
            continue
        if "topic" in where and r.topic != where["topic"]:
            continue
        if "source" in where and where["source"] not in (r.source_a, r.source_b):
            continue
        matching.add(r.pair_id)
    judged = set() if guideline is None else matching & {r.pair_id for r in rows if r.guideline_label == guideline}
    queued = set() if guideline is None else matching & _queued_under(session, project_id=project_id,
                                                                       guideline=guideline, rows=rows)
    skip = queued if include_rerated else queued | judged
    ids = sorted(matching - skip)
    random.Random(f"rerate:{seed}").shuffle(ids)
    return Selection(ids[:limit], len(ids), len(skip - queued), len(queued), guideline)


def select_pairs(
    session: Session,
    *,
    project_id: int,
    where: Mapping[str, str],
    limit: int,
    seed: int = 0,
    include_rerated: bool = False,
) -> list[str]:
    """The pair ids of ``selection`` (under the newest guideline version)."""
    return selection(session, project_id=project_id, where=where, limit=limit, seed=seed,
                     include_rerated=include_rerated).pair_ids


def default_name(session: Session, *, project_id: int, guideline: str, where: Mapping[str, str]) -> str:
    """``rerate-<guideline>[-<filter values>]``, with ``-2``, ``-3``... if a round already has that name
    (a second topic, or a second round taking the rest, under the same guideline)."""
    base = "-".join(["rerate", guideline, *(where[k] for k in WHERE_KEYS if k in where)])
    name, n = base, 1
    while ops.round_by_name(session, project_id=project_id, name=name) is not None:
        n += 1
        name = f"{base}-{n}"
    return name


@dataclass(frozen=True)
class RerateRound:
    round_id: int
    n_pairs: int
    guideline: str
    name: str = ""
    matched: int = 0  # eligible pairs (``Selection.matched``); n_pairs < matched: truncated at ``limit``
    skipped: int = 0  # matching pairs already judged under ``guideline``
    queued: int = 0  # matching pairs waiting in an open round under ``guideline``
    seed: int = 0


def create_rerate_round(
    session: Session,
    *,
    project_id: int,
    name: str | None,
    where: Mapping[str, str],
    limit: int,
    guideline: str,
    overlap: int = 1,
    seed: int = 0,
    duplicate_rate: float = 0.0,
    include_rerated: bool = False,
    round_kinds: tuple[str, ...] = SELECT_KINDS,
) -> RerateRound:
    """Select pairs (``selection``) and open a ``rerate`` round under guideline ``guideline``.

    ``name`` None: ``default_name``. ``duplicate_rate`` stays 0 here, as the demo's re-rate has
    always run; ``preflab rerate`` plants duplicates at a collection round's rate by default.
    """
    if name is not None and (taken := ops.round_by_name(session, project_id=project_id, name=name)) is not None:
        raise StoreError(f"rerate.name: a round named {name!r} already exists (round {taken.id}, {taken.kind}); "
                         "give another name, or none for a fresh default", code="conflict")
    g = next((g for g in ops.list_guidelines(session, project_id=project_id) if g.label == guideline), None)
    if g is None:
        raise StoreError(f"rerate.guideline: unknown guideline version {guideline!r}", code="not_found")
    newest = ops.latest_guideline(session, project_id=project_id)
    if g.id != newest.id:
        raise StoreError(f"rerate.guideline: {guideline!r} is not the newest guideline version ({newest.label!r}); "
                         "a re-rate replaces labels under the newest one")
    sel = selection(session, project_id=project_id, where=where, limit=limit, seed=seed, guideline=guideline,
                    include_rerated=include_rerated, round_kinds=round_kinds)
    if not sel.pair_ids and (sel.skipped or sel.queued):
        raise StoreError(f"rerate.where: all {sel.skipped + sel.queued} judged pairs matching {dict(where)} are "
                         f"already judged ({sel.skipped}) or waiting in an open round ({sel.queued}) under guideline "
                         f"{guideline!r}" + (" (--include-rerated selects the judged ones again)" if sel.skipped
                                             else ""), code="not_found")
    if not sel.pair_ids:
        raise StoreError(f"rerate.where: no judged pairs match {dict(where)} (in {', '.join(SELECT_KINDS)} rounds "
                         "unless round_kind= says otherwise)", code="not_found")
    name = name if name is not None else default_name(session, project_id=project_id, guideline=guideline, where=where)
    rid = ops.create_round(session, project_id=project_id, name=name, kind="rerate", pair_ids=sel.pair_ids,
                           guideline_version_id=g.id, overlap=overlap, duplicate_rate=duplicate_rate,
                           seed=seed, meta={"where": dict(where), "limit": limit, "matched": sel.matched,
                                            "skipped": sel.skipped, "queued": sel.queued,
                                            "include_rerated": include_rerated})
    ops.record_event(session, kind="rerate", subject=name, project_id=project_id,
                     payload={"round_id": rid, "n_pairs": len(sel.pair_ids), "guideline": guideline,
                              "where": dict(where), "matched": sel.matched, "skipped": sel.skipped,
                              "queued": sel.queued})
    return RerateRound(rid, len(sel.pair_ids), guideline, name, sel.matched, sel.skipped, sel.queued, seed)


@dataclass(frozen=True)
class OpenRerate:
    """An open re-rate round with pairs nobody has judged yet (they keep their old labels)."""

    round_id: int
    name: str
    guideline: str | None
    judged: int  # pairs with at least one judgement in the round
    total: int


def unfinished_rerates(session: Session, *, project_id: int) -> list[OpenRerate]:
    """Open re-rate rounds of the project with pairs not yet judged, oldest first."""
    rounds = [r for r in ops.list_rounds(session, project_id=project_id, kind="rerate") if r.status == "open"]
    if not rounds:
        return []
    judged: dict[int, set[str]] = {}
    for r in ops.project_judgements(session, project_id=project_id, round_kinds=("rerate",)):
        if not r.is_duplicate:
            judged.setdefault(r.round_id, set()).add(r.pair_id)
    out = [OpenRerate(r.id, r.name, r.guideline_label, len(judged.get(r.id, ())), r.n_items) for r in rounds]
    return [o for o in out if o.judged < o.total]


def record_lineage(session: Session, *, project_id: int, run: str, **payload: Any) -> None:
    """Record what a run was built from (judgement count, guideline, reward model, parent policy;
    ``round_ids``: the rounds whose judgements it trained on)."""
    ops.record_event(session, kind="lineage", subject=run, project_id=project_id, payload=payload)


def trained_round_ids(session: Session, *, project_id: int, round_kinds: tuple[str, ...]) -> list[int]:
    """The rounds whose judgements ``ops.preference_examples`` gives for ``round_kinds`` (what a
    reward model trained on the store reads)."""
    return sorted({e.round_id for e in ops.preference_examples(session, project_id=project_id,
                                                                round_kinds=round_kinds)})


def _reward_model_run(ref: str, rows: list[dict[str, Any]]) -> str:
    """The run a ``reward_model`` reference names: a run of the lineage, the run whose ``model_dir``
    it is, or, for a path ending in ``model``, the run directory above it."""
    if any(r["run"] == ref for r in rows):
        return ref
    owner = next((r["run"] for r in rows if r.get("model_dir") == ref), None)
    if owner is not None:
        return owner
    path = ref.rstrip("/")
    return path.rsplit("/", 1)[0] if path.endswith("/model") else ref


def lineage(session: Session, *, project_id: int) -> list[dict[str, Any]]:
    """Every lineage record of the project, oldest first. Added to what was recorded:
    ``trained_rounds`` (id, name, kind, guideline of each of ``round_ids``) and ``reward_model_run``
    (the lineage row of ``reward_model``, which PPO records as the reward model's ``model/``)."""
    rows = [{"run": e.subject, "at": e.created_at.isoformat(), **e.payload}
            for e in ops.list_events(session, project_id=project_id, kind="lineage")]
    rounds = {r.id: r for r in ops.list_rounds(session, project_id=project_id)}
    for r in rows:
        if isinstance(r.get("round_ids"), list):
            r["trained_rounds"] = [{"id": i, "name": rounds[i].name, "kind": rounds[i].kind,
                                    "guideline": rounds[i].guideline_label} if i in rounds
                                   else {"id": i, "name": None, "kind": None, "guideline": None}
                                   for i in r["round_ids"]]
        if isinstance(r.get("reward_model"), str) and (run := _reward_model_run(r["reward_model"], rows)) != r["reward_model"]:
            r["reward_model_run"] = run  # only where the reference is not already the run's name
    return rows
