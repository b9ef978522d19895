"""Promotion: a checkpoint moves to a stage only when every gate passes; every decision is stored.

``promote_checkpoint`` loads the checkpoint's evidence (``<ckpt>/eval/``), evaluates the
gates of the project config, writes ``gate.json`` next to the evidence and, in one store
transaction, records the decision (event ``kind='gate_decision'``, payload: stage,
promoted, the full gate report, the gate settings, notes) and, if every gate passed, the
promotion (event ``kind='promotion'``). A refused checkpoint is recorded too. Promotion to
``production`` also requires an earlier promotion of the same checkpoint to ``staging``.
Evidence about other weights than the checkpoint's fails the gates it would decide
(``gates.evidence_problems``); a promotion under other gate settings than an earlier refusal,
or than the staging decision, carries a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from preflab.evaluate.gates import Evidence, Gate, GateReport, GatesConfig, evaluate_gates
from preflab.store import db, ops

STAGES = ("staging", "production")


@dataclass(frozen=True)
class Decision:
    checkpoint: str
    stage: str
    promoted: bool
    report: GateReport
    event_id: int  # the gate_decision event
    notes: tuple[str, ...] = ()  # what a reviewer should know: gate settings changed after a refusal, etc.


def checkpoint_subject(checkpoint: str | Path) -> str:
    """The store's name for a checkpoint: its resolved path."""
    return str(Path(checkpoint).resolve())


def promoted_to(session, *, project_id: int, stage: str) -> str | None:
    """The checkpoint most recently promoted to ``stage`` (None if none)."""
    events = [e for e in ops.list_events(session, project_id=project_id, kind="promotion")
              if e.payload.get("stage") == stage]
    return events[-1].subject if events else None


def decisions(session, *, project_id: int, checkpoint: str | Path | None = None) -> list[ops.EventInfo]:
    """Every recorded gate decision (optionally for one checkpoint), oldest first."""
    subject = checkpoint_subject(checkpoint) if checkpoint is not None else None
    return ops.list_events(session, project_id=project_id, kind="gate_decision", subject=subject)


def record_decision(session, *, project_id: int, checkpoint: str | Path, stage: str, report: GateReport,
                    gates: GatesConfig | None = None) -> Decision:
    """Store the decision for ``report`` (and the gate settings it was made under, ``gates``) and, when
    it passed, the promotion (caller's transaction)."""
    from dataclasses import asdict

    if stage not in STAGES:
        raise ValueError(f"stage: must be one of {list(STAGES)}, got {stage!r}")
    subject = checkpoint_subject(checkpoint)
    if stage == "production":
        staged = any(e.subject == subject and e.payload.get("stage") == "staging"
                     for e in ops.list_events(session, project_id=project_id, kind="promotion"))
        why = {} if staged else {"reason": "never promoted to staging: promote it --to staging first"}
        report = GateReport(report.gates + [Gate("staged_first", staged, None, None,
                                                 "promoted to staging before production", why)], report.subject)
    report = GateReport(report.gates, report.subject, stage)
    promoted = report.passed
    config = asdict(gates) if gates is not None else None
    notes = []
    prior = decisions(session, project_id=project_id, checkpoint=checkpoint)
    refusals = [e for e in prior if e.payload.get("stage") == stage and not e.payload.get("promoted")]
    if promoted and refusals:  # a promotion after a refusal: loosened settings stay visible
        other = [e.id for e in refusals if config is not None and e.payload.get("gates_config") not in (None, config)]
        unknown = [e.id for e in refusals if config is None or e.payload.get("gates_config") is None]
        if other:
            notes.append(f"promoted under other gate settings than the refusal(s) of this checkpoint for {stage} "
                         f"(decision event {', '.join(map(str, other))})")
        if unknown:
            notes.append(f"promoted after the refusal(s) of this checkpoint for {stage} (decision event "
                         f"{', '.join(map(str, unknown))}); the gate settings of one side were not recorded: "
                         "compare them by hand")
    if config is not None and stage == "production":
        staged = [e.id for e in prior if e.payload.get("stage") == "staging" and e.payload.get("promoted")
                  and e.payload.get("gates_config") not in (None, config)]
        if staged:
            notes.append(f"production gate settings differ from those it was staged under (event {staged[-1]})")
    eid = ops.record_event(session, project_id=project_id, kind="gate_decision", subject=subject,
                           payload={"stage": stage, "promoted": promoted, "failed": report.failed,
                                    "report": report.to_dict(), **({"gates_config": config} if config else {}),
                                    **({"notes": notes} if notes else {})})
    if promoted:
        ops.record_event(session, project_id=project_id, kind="promotion", subject=subject,
                         payload={"stage": stage, "decision_event": eid})
    return Decision(subject, stage, promoted, report, eid, tuple(notes))


def promote_checkpoint(checkpoint: str | Path, *, stage: str, db_url: str, project: str = "default",
                       gates: GatesConfig | None = None, eval_dir: str | Path | None = None) -> Decision:
    """Evaluate the gates on the checkpoint's evidence, write ``gate.json``, record the decision."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise ValueError(f"{checkpoint}: no such checkpoint")
    if stage not in STAGES:
        raise ValueError(f"--to: must be one of {list(STAGES)}, got {stage!r}")
    eval_dir = Path(eval_dir) if eval_dir is not None else checkpoint / "eval"
    report = evaluate_gates(gates or GatesConfig(), Evidence.load(eval_dir), subject=str(checkpoint),
                            checkpoint=checkpoint)
    engine = db.make_engine(db_url)
    try:
        db.upgrade(engine)

        def run(s) -> Decision:
            pid = ops.ensure_project(s, name=project)
            return record_decision(s, project_id=pid, checkpoint=checkpoint, stage=stage, report=report,
                                   gates=gates or GatesConfig())

        decision = db.transact(engine, run)
    finally:
        engine.dispose()
    decision.report.save(eval_dir / "gate.json")
    return decision
