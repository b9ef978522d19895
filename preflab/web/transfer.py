"""JSONL import/export for the web app's upload and download routes.

A thin adapter over the store's ops (``add_prompts``/``add_responses``/``add_pairs`` and
``round_judgements``) for request bodies held in memory. Errors name ``file:line``; the
caller's transaction makes an import all-or-nothing.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session


def _records(text: str, name: str) -> list[tuple[int, dict[str, Any]]]:
    from preflab.store.ops import StoreError

    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise StoreError(f"{name}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise StoreError(f"{name}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append((n, rec))
    if not out:
        raise StoreError(f"{name}: no records (expected one JSON object per line)")
    return out


def _field(rec: dict, key: str, where: str, kind: type = str) -> Any:
    from preflab.store.ops import StoreError

    if key not in rec:
        raise StoreError(f"{where}: missing field {key!r}")
    v = rec[key]
    if not isinstance(v, kind):
        raise StoreError(f"{where}.{key}: expected {kind.__name__}, got {type(v).__name__}")
    return v


def import_jsonl(session: Session, *, project_id: int, kind: str, text: str) -> dict[str, int]:
    """Import ``prompts`` (``{"prompt_id","text","topic"?,"meta"?}``) or ``pairs``
    (``{"pair_id","prompt":{prompt},"a":{"response_id","text","source"?},"b":{...}}``) lines.
    Returns counts of new rows."""
    from preflab.store import ops

    name = f"{kind}.jsonl"
    recs = _records(text, name)
    if kind == "prompts":
        prompts = [{"id": _field(r, "prompt_id", f"{name}:{n}"), "text": _field(r, "text", f"{name}:{n}"),
                    "topic": r.get("topic", ""), "meta": r.get("meta", {})} for n, r in recs]
        return {"prompts": ops.add_prompts(session, project_id=project_id, prompts=prompts, where=name)}
    prompts, responses, pairs = [], [], []
    for n, r in recs:
        where = f"{name}:{n}"
        p = _field(r, "prompt", where, dict)
        pid = _field(p, "prompt_id", f"{where}.prompt")
        prompts.append({"id": pid, "text": _field(p, "text", f"{where}.prompt"), "topic": p.get("topic", ""),
                        "meta": p.get("meta", {})})
        sides = []
        for side in ("a", "b"):
            s = _field(r, side, where, dict)
            rid = _field(s, "response_id", f"{where}.{side}")
            responses.append({"id": rid, "prompt_id": pid, "text": _field(s, "text", f"{where}.{side}"),
                              "source": s.get("source", ""), "meta": s.get("meta", {})})
            sides.append(rid)
        pairs.append({"id": _field(r, "pair_id", where), "prompt_id": pid, "response_a_id": sides[0],
                      "response_b_id": sides[1], "meta": r.get("meta", {})})
    return {"prompts": ops.add_prompts(session, project_id=project_id, prompts=prompts, where=name),
            "responses": ops.add_responses(session, project_id=project_id, responses=responses, where=name),
            "pairs": ops.add_pairs(session, project_id=project_id, pairs=pairs, where=name)}


def export_round(session: Session, *, round_id: int, fmt: str) -> str:
    """``jsonl``: one line per judgement (canonical ids, rater, duplicate flag);
    ``trl``: TRL's ``prompt/chosen/rejected/margin`` (ties and planted duplicates left out)."""
    from preflab.store import ops

    rows = ops.round_judgements(session, round_id=round_id)
    lines = []
    if fmt == "jsonl":
        for j in rows:
            lines.append(json.dumps({
                "judgement_id": j.judgement_id, "round_id": j.round_id, "pair_id": j.pair_id,
                "prompt_id": j.prompt_id, "topic": j.topic, "rater": j.rater_name,
                "response_a_id": j.response_a_id, "response_b_id": j.response_b_id, "source_a": j.source_a,
                "source_b": j.source_b, "winner_id": j.winner_id, "choice": j.choice, "strength": j.strength,
                "rationale": j.rationale, "time_on_task_s": j.time_on_task_s, "is_duplicate": j.is_duplicate,
                "guideline_version": j.guideline_label, "created_at": j.created_at.isoformat()}))
    else:
        texts = {}
        for j in rows:
            if j.winner_id is None or j.is_duplicate:
                continue
            if j.pair_id not in texts:
                p = ops.get_pair(session, pair_id=j.pair_id)
                texts[j.pair_id] = {p.response_a_id: p.response_a_text, p.response_b_id: p.response_b_text}
            loser = j.response_b_id if j.winner_id == j.response_a_id else j.response_a_id
            lines.append(json.dumps({"prompt": j.prompt_text, "chosen": texts[j.pair_id][j.winner_id],
                                     "rejected": texts[j.pair_id][loser], "margin": float(j.strength)}))
    return "\n".join(lines) + ("\n" if lines else "")
