"""The calibration workshop and rater monitoring, as flows through the store.

    create_calibration_round  -> every active rater judges every pair, rationale required
    disagreement_review       -> items sorted by how split the raters were, each side's rationales
    record_guideline_revision -> a new guideline version (+ an event) after the discussion
    create_calibration_round  -> a second round on fresh pairs
    write_workshop_report     -> before/after JSON + Markdown, and the style guide (Markdown)

During collection, ``monitor_drift`` compares each rater's recent rationales and agreement
with their post-calibration baseline and stores "reconvene" alerts; ``rater_status`` gives
per-rater self-consistency (planted duplicates), agreement with the others and open alerts.
The numbers are pure functions in ``preflab.quality``; this module only reads and writes.
``sandbox_workshop`` runs the whole workshop with the sandbox's simulated raters.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from preflab.config import check, field_doc
from preflab.quality.agreement import MIN_SHARED, agreement_with_reference, majority_labels
from preflab.quality.calibration import (
    before_after,
    report_markdown,
    round_stats,
    style_guide_excerpts,
    style_guide_markdown,
)
from preflab.quality.consistency import self_consistency, side_preference
from preflab.quality.drift import DriftCheck, DriftConfig, check_drift, hits_vs_others, tfidf_embed
from preflab.store import ops
from preflab.store.schema import Judgement


@dataclass
class WorkshopConfig:
    n_pairs: int = field_doc(50, "Pairs per calibration round (every rater judges every pair).")
    min_rationale_chars: int = field_doc(10, "Shortest rationale accepted (a rationale is required).")
    n_boot: int = field_doc(1000, "Bootstrap replicates for the confidence intervals.")
    n_excerpts: int = field_doc(3, "Rationale excerpts per rubric item in the style guide.")
    calibration_pull: float = field_doc(0.85, "Sandbox only: how far the discussion pulls simulated raters' "
                                              "biases toward the shared standard (0..1).")
    seed: int = field_doc(0, "Seed of pair order, screen sides and the bootstrap.")

    def validate(self) -> None:
        check(self.n_pairs >= 2, "WorkshopConfig.n_pairs", "must be >= 2")
        check(self.min_rationale_chars >= 1, "WorkshopConfig.min_rationale_chars", "must be >= 1 (rationale required)")
        check(self.n_boot >= 1, "WorkshopConfig.n_boot", "must be >= 1")
        check(self.n_excerpts >= 0, "WorkshopConfig.n_excerpts", "must be >= 0")
        check(0.0 <= self.calibration_pull <= 1.0, "WorkshopConfig.calibration_pull", "must be in [0, 1]")
        check(self.seed >= 0, "WorkshopConfig.seed", "must be >= 0")


def _raters(s: Session, project_id: int) -> list[ops.RaterInfo]:
    return [r for r in ops.list_raters(s, project_id=project_id, active_only=True) if r.role == "rater"]


# ---- rounds --------------------------------------------------------------------------------------


def create_calibration_round(s: Session, *, project_id: int, name: str, pair_ids: Sequence[str],
                             cfg: WorkshopConfig | None = None, guideline_version_id: int | None = None) -> int:
    """A calibration round: overlap = every active rater, no planted duplicates, no routing,
    rationale of at least ``min_rationale_chars`` required."""
    cfg = cfg or WorkshopConfig()
    cfg.validate()
    raters = _raters(s, project_id)
    if len(raters) < 2:
        raise ops.StoreError(f"calibration round {name!r}: needs at least 2 active raters, found {len(raters)}")
    return ops.create_round(s, project_id=project_id, name=name, kind="calibration", pair_ids=list(pair_ids),
                            guideline_version_id=guideline_version_id, overlap=len(raters), duplicate_rate=0.0,
                            routing="any", fallback="always", allow_ties=True,
                            min_rationale_chars=cfg.min_rationale_chars, seed=cfg.seed,
                            meta={"workshop": True, "raters": [r.name for r in raters]})


def round_labels(s: Session, *, round_id: int) -> dict[str, dict[str, str]]:
    """``labels[pair_id][rater_name]`` = canonical 'a' | 'b' | 'tie' (planted duplicates left out)."""
    out: dict[str, dict[str, str]] = {}
    for j in ops.round_judgements(s, round_id=round_id, include_duplicates=False):
        out.setdefault(j.pair_id, {})[j.rater_name] = j.choice
    return out


def _agreement_round(s: Session, round_id: int, *, project_id: int | None = None):  # noqa: ANN202
    """The round and its items judged by two raters or more; refused (naming the round) when it is
    another project's, has overlap 1 or has no such item yet."""
    rnd = ops.get_round(s, round_id=round_id)
    if project_id is not None and rnd.project_id != project_id:
        raise ops.StoreError(f"round {round_id}: belongs to another project", code="not_found")
    if rnd.overlap < 2:
        raise ops.StoreError(f"round {rnd.name!r}: overlap 1, each item goes to one rater, so there is no agreement "
                             "to measure (raters' consistency comes from planted duplicates: preflab quality status)",
                             code="conflict")
    labels = round_labels(s, round_id=round_id)
    shared = {pid: lab for pid, lab in labels.items() if len(lab) >= 2}
    if not shared:
        raise ops.StoreError(f"round {rnd.name!r}: no item has two raters' judgements yet (overlap {rnd.overlap})",
                             code="conflict")
    return rnd, labels, shared


def round_agreement(s: Session, *, round_id: int, n_boot: int = 1000, seed: int = 0,
                    min_shared: int = MIN_SHARED) -> dict:
    """Agreement between a round's raters (any kind of round with overlap >= 2): mean pairwise
    Cohen's kappa (over rater pairs sharing >= ``min_shared`` items; how many pairs entered is in
    its entry), Fleiss' kappa, Krippendorff's alpha and raw agreement with bootstrap CIs over
    items, and per rater agreement with the others' majority (``quality.calibration.round_stats``).
    Planted duplicates are left out; items judged once carry no agreement and are not counted."""
    rnd, labels, shared = _agreement_round(s, round_id)
    stats = round_stats(shared, n_boot=n_boot, seed=seed, min_shared=min_shared)
    return {"round": {"id": rnd.id, "name": rnd.name, "kind": rnd.kind, "overlap": rnd.overlap,
                      "guideline": rnd.guideline_label},
            "n_items_judged": len(labels), **stats}


def round_judgement_version(s: Session, *, round_id: int) -> tuple[int, int | None]:
    """(number of judgements, newest judgement id) of a round, duplicates included: a cheap key that
    changes whenever :func:`round_agreement`'s input may have (the web app caches on it)."""
    n, newest = s.execute(select(func.count(Judgement.id), func.max(Judgement.id))
                          .where(Judgement.round_id == round_id)).one()
    return int(n), newest


@dataclass(frozen=True)
class ReviewItem:
    """One pair for the discussion: how split the raters were and each side's reasons."""

    pair_id: str
    prompt_text: str
    response_a_text: str
    response_b_text: str
    counts: dict[str, int]  # 'a' | 'b' | 'tie' -> raters
    majority_share: float  # share of raters in the largest camp (low = split)
    rationales: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # choice -> [(rater, rationale)]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def disagreement_review(s: Session, *, round_id: int) -> list[ReviewItem]:
    """Items of a round, most split first (then by more camps, then pair id)."""
    by_pair: dict[str, list[ops.JudgementRow]] = {}
    for j in ops.round_judgements(s, round_id=round_id, include_duplicates=False):
        by_pair.setdefault(j.pair_id, []).append(j)
    items = []
    for pid, rows in by_pair.items():
        pair = ops.get_pair(s, pair_id=pid)
        counts = Counter(j.choice for j in rows)
        rationales: dict[str, list[tuple[str, str]]] = {}
        for j in sorted(rows, key=lambda j: j.rater_name):
            rationales.setdefault(j.choice, []).append((j.rater_name, j.rationale))
        items.append(ReviewItem(pid, pair.prompt_text, pair.response_a_text, pair.response_b_text, dict(counts),
                                max(counts.values()) / len(rows), rationales))
    items.sort(key=lambda it: (it.majority_share, -len(it.counts), it.pair_id))
    return items


def review_markdown(items: Sequence[ReviewItem], *, limit: int = 15) -> str:
    """The disagreement review as Markdown for the discussion."""
    lines = ["# Disagreement review", "", "Most split items first. Each side's reasons, in the raters' words.", ""]
    for it in items[:limit]:
        camp = ", ".join(f"{k}: {v}" for k, v in sorted(it.counts.items()))
        lines += [f"## {it.pair_id} ({camp})", "", f"**Prompt:** {it.prompt_text}", "",
                  f"**A:** {it.response_a_text}", "", f"**B:** {it.response_b_text}", ""]
        for choice, rs in sorted(it.rationales.items()):
            lines.append(f"- chose **{choice}**: " + " / ".join(f"{r}: \"{t}\"" for r, t in rs))
        lines.append("")
    return "\n".join(lines)


def record_guideline_revision(s: Session, *, project_id: int, label: str, text: str, rubric: Sequence[str],
                              notes: str = "") -> int:
    """Store the revised guideline agreed in the discussion (``ops.create_guideline_version`` records
    the ``guideline_revision`` event, with ``notes``)."""
    return ops.create_guideline_version(s, project_id=project_id, label=label, text=text, rubric=list(rubric),
                                        notes=notes)


# ---- the report ----------------------------------------------------------------------------------


def _calibration_rounds(s: Session, project_id: int) -> list[ops.RoundInfo]:
    return sorted(ops.list_rounds(s, project_id=project_id, kind="calibration"), key=lambda r: r.id)


def workshop_report(s: Session, *, before_round_id: int, after_round_id: int,
                    cfg: WorkshopConfig | None = None, project_id: int | None = None) -> dict:
    """:func:`preflab.quality.calibration.before_after` on two rounds, with their names. With
    ``project_id`` both rounds must be that project's."""
    cfg = cfg or WorkshopConfig()
    if before_round_id == after_round_id:
        raise ops.StoreError(f"quality report: before and after are the same round ({before_round_id}); the workshop "
                             "compares the round before the discussion with the round after it", code="invalid")
    rb, before, _ = _agreement_round(s, before_round_id, project_id=project_id)
    ra, after, _ = _agreement_round(s, after_round_id, project_id=project_id)
    rep = before_after(before, after, n_boot=cfg.n_boot, seed=cfg.seed)
    rep["rounds"] = {"before": {"id": rb.id, "name": rb.name, "guideline": rb.guideline_label},
                     "after": {"id": ra.id, "name": ra.name, "guideline": ra.guideline_label}}
    return rep


def agreed_rationales(s: Session, *, round_ids: Sequence[int]) -> list[str]:
    """Rationales of judgements that agree with their round's majority (the agreed standard)."""
    out = []
    for rid in round_ids:
        rows = ops.round_judgements(s, round_id=rid, include_duplicates=False)
        maj = majority_labels({pid: lab for pid, lab in round_labels(s, round_id=rid).items()})
        out += [j.rationale for j in rows if j.choice != "tie" and maj.get(j.pair_id) == j.choice]
    return out


def style_guide(s: Session, *, project_id: int, round_ids: Sequence[int], n_excerpts: int = 3,
                embed: Callable[[Sequence[str]], np.ndarray] = tfidf_embed) -> str:
    """The latest guideline text plus representative agreed rationales per rubric item (Markdown)."""
    g = ops.latest_guideline(s, project_id=project_id)
    if g is None:
        raise ops.StoreError("style guide: the project has no guideline version", code="not_found")
    ex = style_guide_excerpts(g.rubric, agreed_rationales(s, round_ids=round_ids), embed=embed,
                              n_per_item=n_excerpts)
    return style_guide_markdown(f"Style guide ({g.label})", g.text, ex)


def write_workshop_report(s: Session, *, project_id: int, out_dir: str | Path, before_round_id: int | None = None,
                          after_round_id: int | None = None, cfg: WorkshopConfig | None = None,
                          embed: Callable[[Sequence[str]], np.ndarray] = tfidf_embed) -> tuple[dict, dict[str, Path]]:
    """Write ``workshop_report.json``, ``workshop_report.md`` and ``style_guide.md`` to ``out_dir``;
    returns (report, paths). Rounds default to the project's first and last calibration rounds.
    """
    cfg = cfg or WorkshopConfig()
    cal = _calibration_rounds(s, project_id)
    if before_round_id is None or after_round_id is None:
        if len(cal) < 2:
            raise ops.StoreError(f"quality report: need two calibration rounds, the project has {len(cal)}",
                                 code="not_found")
        before_round_id = cal[0].id if before_round_id is None else before_round_id
        after_round_id = cal[-1].id if after_round_id is None else after_round_id
    rep = workshop_report(s, before_round_id=before_round_id, after_round_id=after_round_id, cfg=cfg,
                          project_id=project_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "workshop_report.json", "markdown": out / "workshop_report.md",
             "style_guide": out / "style_guide.md"}
    paths["json"].write_text(json.dumps(rep, indent=2, default=str) + "\n")
    paths["markdown"].write_text(report_markdown(rep))
    paths["style_guide"].write_text(style_guide(s, project_id=project_id, round_ids=[before_round_id, after_round_id],
                                                n_excerpts=cfg.n_excerpts, embed=embed))
    return rep, paths


# ---- monitoring during collection ------------------------------------------------------------------


def rater_status(s: Session, *, project_id: int) -> list[dict]:
    """Per rater: duplicate self-consistency (95% Wilson CI, implied flip rate and accuracy
    ceiling), agreement with the others' majority over every overlapped item, the share of
    non-tie judgements that picked the left answer (``side_preference``), open alerts."""
    every = ops.project_judgements(s, project_id=project_id)
    rows = [j for j in every if not j.is_duplicate]
    sides: dict[str, list[bool]] = {}
    for j in every:  # duplicates included: they show the sides swapped
        if j.winner_id is not None:
            sides.setdefault(j.rater_name, []).append(j.winner_id == j.left_id)
    table: dict = {}
    for j in rows:
        table.setdefault((j.round_id, j.pair_id), {})[j.rater_name] = j.choice
    agree = agreement_with_reference(table) if table else {}
    dups: dict[str, list[tuple[str, str]]] = {}
    for d in ops.duplicate_pairs(s, project_id=project_id):
        dups.setdefault(d.rater_name, []).append((d.first, d.second))
    alerts = Counter(a.rater_id for a in ops.list_alerts(s, project_id=project_id, resolved=False))
    out = []
    for r in _raters(s, project_id):
        c = self_consistency(dups[r.name]).to_dict() if dups.get(r.name) else None
        a = agree.get(r.name)
        out.append({"rater": r.name, "judgements": sum(1 for j in rows if j.rater_name == r.name),
                    "consistency": c, "agreement_with_majority": a.agreement if a else None,
                    "agreement_n": a.n if a else 0,
                    "picks_left": side_preference(sum(sides.get(r.name, [])), len(sides.get(r.name, []))).to_dict(),
                    "open_alerts": alerts.get(r.id, 0)})
    return out


def monitor_drift(s: Session, *, project_id: int, cfg: DriftConfig | None = None, baseline_n: int = 200,
                  round_kinds: Sequence[str] = ("collection", "rerate"), store_alerts: bool = True,
                  embed: Callable[[Sequence[str]], np.ndarray] = tfidf_embed) -> list[DriftCheck]:
    """Check every rater's latest window against their first ``baseline_n`` judgements (after
    calibration) and the agreed standard (calibration rounds' majority rationales); store a
    "reconvene" alert for each newly flagged rater (one open alert per rater)."""
    cfg = cfg or DriftConfig()
    rows = [j for j in ops.project_judgements(s, project_id=project_id, round_kinds=list(round_kinds))
            if not j.is_duplicate]
    rows.sort(key=lambda j: j.judgement_id)
    labels = [((j.round_id, j.pair_id), j.rater_name, j.choice) for j in rows]
    standard = agreed_rationales(s, round_ids=[r.id for r in _calibration_rounds(s, project_id)])
    open_for = {a.rater_id for a in ops.list_alerts(s, project_id=project_id, resolved=False, kind="reconvene")}
    raters = _raters(s, project_id)

    def check(name: str, hits: dict) -> DriftCheck:
        mine = [j.rationale for j in rows if j.rater_name == name]
        h = hits.get(name, [])
        recent_from = max(baseline_n, len(mine) - cfg.window)
        return check_drift(name, mine[:baseline_n], mine[recent_from:],
                           baseline_hits=[x for x in h[:baseline_n] if x is not None],
                           recent_hits=[x for x in h[recent_from:] if x is not None],
                           standard_rationales=standard, cfg=cfg, embed=embed)

    first = {r.name: check(r.name, hits_vs_others(labels)) for r in raters}
    flagged = {n for n, c in first.items() if c.flagged}
    if len(flagged) > 1:  # each flagged rater again, against the raters not flagged themselves
        honest = hits_vs_others(labels, exclude=flagged)
        for n in flagged:
            again = check(n, honest)
            if again.n_recent and again.agreement_recent is not None:  # still someone to compare with
                first[n] = again
    checks = []
    for r in raters:
        c = first[r.name]
        checks.append(c)
        if c.flagged and store_alerts and r.id not in open_for:
            ops.add_alert(s, project_id=project_id, kind="reconvene", rater_id=r.id,
                          message=f"{r.name}: {c.reason}; reconvene the calibration group",
                          payload={k: v for k, v in c.to_dict().items() if k != "rater"})
    return checks


# ---- the sandbox workshop ----------------------------------------------------------------------------

SANDBOX_GUIDELINE = """Judge which answer a senior support agent would rather send to this customer.
Read both answers fully. Prefer the answer that is right, then the one that treats the customer well."""
SANDBOX_RUBRIC = (
    "Accuracy: gives the current figure for what was asked, not a vague answer.",
    "Tone: warmer answers are better; never dismissive.",
    "Directness: answers directly; hedges only when unsure.",
    "Plain language: reads naturally, not stilted or formal.",
    "Confidence: sounds confident and sure when the facts support it.",
    "Brevity: has no filler.",
)
REVISION_NOTES = ("Agreed in the discussion: personal taste (formality, padding, tone preferences) does not "
                  "outweigh the rubric order; when two answers differ only in style, follow the rubric items "
                  "in order.")


def _add_sandbox_pairs(s: Session, project_id: int, tag: str, pairs: list) -> list[str]:
    prompts, responses, items = {}, [], []
    for i, (q, first, second) in enumerate(pairs):
        pid = f"{tag}-{i:03d}"
        prompts[q.id] = ops.PromptIn(q.id, q.text, q.topic, {"fact_id": q.fact_id})
        responses += [ops.ResponseIn(f"{pid}:a", q.id, first, "sft"), ops.ResponseIn(f"{pid}:b", q.id, second, "sft")]
        items.append(ops.PairIn(pid, q.id, f"{pid}:a", f"{pid}:b"))
    ops.add_prompts(s, project_id=project_id, prompts=list(prompts.values()))
    ops.add_responses(s, project_id=project_id, responses=responses)
    ops.add_pairs(s, project_id=project_id, pairs=items)
    return [p.id for p in items]


def sandbox_workshop(engine, *, project: str, out_dir: str | Path, cfg: WorkshopConfig | None = None,  # noqa: ANN001
                     rubric: str = "v1", embed: Callable[[Sequence[str]], np.ndarray] = tfidf_embed) -> dict:
    """The whole workshop with the sandbox's five simulated senior agents acting through the
    store: round 1, review, guideline revision (+ the discussion's calibration of each rater),
    round 2 on fresh pairs, report and style guide. Returns the report dict (+ ``paths``)."""
    from preflab.sandbox.raters import default_pool, sft_style_pairs, work_round
    from preflab.store import db

    cfg = cfg or WorkshopConfig()
    cfg.validate()
    pool = default_pool(cfg.seed)
    tag = f"ws{cfg.seed}"
    with db.session_scope(engine) as s:
        pid = ops.ensure_project(s, name=project)
        existing = {r.name: r.id for r in ops.list_raters(s, project_id=pid)}
        ids = {}
        for r in pool:
            ids[r.name] = existing.get(r.name) or ops.create_rater(s, project_id=pid, name=r.name,
                                                                   specialties=(r.specialty,))
        if ops.latest_guideline(s, project_id=pid) is None:
            ops.create_guideline_version(s, project_id=pid, label="v1", text=SANDBOX_GUIDELINE, rubric=SANDBOX_RUBRIC)
        first = _add_sandbox_pairs(s, pid, f"{tag}-r1", sft_style_pairs(cfg.n_pairs, seed=cfg.seed))
        second = _add_sandbox_pairs(s, pid, f"{tag}-r2", sft_style_pairs(cfg.n_pairs, seed=cfg.seed + 1000))
        r1 = create_calibration_round(s, project_id=pid, name=f"{tag} calibration 1", pair_ids=first, cfg=cfg)
    sims = {ids[r.name]: r for r in pool}
    work_round(engine, round_id=r1, raters=sims, rubric=rubric, seed=cfg.seed)
    with db.session_scope(engine) as s:
        ops.set_round_status(s, round_id=r1, status="closed")
        review = disagreement_review(s, round_id=r1)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "disagreement_review.md").write_text(review_markdown(review))
        for r in pool:  # the discussion: everyone moves toward the shared standard
            r.calibrate(cfg.calibration_pull)
        label = f"v1.{len(ops.list_guidelines(s, project_id=pid))}"
        record_guideline_revision(s, project_id=pid, label=label, text=SANDBOX_GUIDELINE + "\n\n" + REVISION_NOTES,
                                  rubric=SANDBOX_RUBRIC, notes=f"{len(review)} items reviewed")
        r2 = create_calibration_round(s, project_id=pid, name=f"{tag} calibration 2", pair_ids=second, cfg=cfg)
    work_round(engine, round_id=r2, raters=sims, rubric=rubric, seed=cfg.seed + 1)
    with db.session_scope(engine) as s:
        ops.set_round_status(s, round_id=r2, status="closed")
        rep, paths = write_workshop_report(s, project_id=pid, out_dir=out, before_round_id=r1, after_round_id=r2,
                                           cfg=cfg, embed=embed)
    rep["paths"] = {k: str(v) for k, v in paths.items()} | {"review": str(out / "disagreement_review.md")}
    return rep
