"""Import and export: JSONL of prompts and pairs in; judgements, TRL and HF datasets out.

Import formats (one JSON object per line; blank lines are skipped):

``prompts.jsonl``::

    {"id": "q1", "text": "How much is Team?", "topic": "pricing", "meta": {...}}

``pairs.jsonl`` (prompt and responses inline, or by id when stored or defined earlier in the file)::

    {"id": "p1",
     "prompt": {"id": "q1", "text": "How much is Team?", "topic": "pricing"},
     "response_a": {"id": "r1", "text": "Team is $20 a seat.", "source": "sft"},
     "response_b": {"id": "r2", "text": "I think around $25?", "source": "ppo-step500"},
     "meta": {...}}
    {"id": "p2", "prompt_id": "q1", "response_a_id": "r1", "response_b": {...}}

An import is one transaction in the caller's session: the first bad line raises
``StoreError("pairs.jsonl:812: unknown response id 'r_9'")`` and, because the caller's
``session_scope`` rolls back, nothing is imported.

Exports: judgements as JSONL (one ``JudgementRow`` per line, canonical ids, sources);
TRL's preference format ``{"prompt", "chosen", "rejected"[, "margin"]}`` as JSONL or as
a Hugging Face ``datasets.Dataset`` (built from ``ops.preference_examples``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from preflab.store import ops
from preflab.store.ops import PairIn, PromptIn, ResponseIn, StoreError

MAX_LINE = 1_000_000  # bytes; a longer line is rejected before parsing

PROMPT_FIELDS = {"id", "text", "topic", "meta"}
RESPONSE_FIELDS = {"id", "text", "source", "meta"}
PAIR_FIELDS = {"id", "prompt", "prompt_id", "response_a", "response_a_id", "response_b", "response_b_id", "meta"}


@dataclass(frozen=True)
class ImportResult:
    """How many rows an import added (identical rows already stored are not counted)."""

    prompts: int = 0
    responses: int = 0
    pairs: int = 0


def jsonl_objects(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line``, object) for each non-blank line of a JSONL file; a line that is not UTF-8,
    not JSON or not an object is a ``StoreError`` (a ValueError) naming it."""
    path = Path(path)
    try:
        fh = path.open("rb")
    except OSError as e:
        raise StoreError(f"{path}: cannot open ({e.strerror})", code="not_found") from None
    with fh:
        for n, raw in enumerate(fh, start=1):
            where = f"{path}:{n}"
            if len(raw) > MAX_LINE:
                raise StoreError(f"{where}: line longer than {MAX_LINE} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise StoreError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # a truncated line fails at its end, not "line 2 column 1"
            except json.JSONDecodeError as e:
                hint = (" - expected JSON lines, one object per line (docs/store.md); a CSV or spreadsheet "
                        "export must be converted first") if n == 1 and not line.lstrip().startswith(("{", "[")) else ""
                raise StoreError(f"{where}: invalid JSON ({e.msg} at column {e.colno}){hint}") from None
            if not isinstance(obj, dict):
                raise StoreError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def listed_pair_ids(path: str | Path, *, stored: Collection[str], qualifier: str = "") -> list[str]:
    """The ``id`` of each line of a JSONL file (e.g. a pairs file just imported), in order and once
    each; an id not in ``stored`` is an error naming its line (``qualifier`` says which pairs, e.g.
    "with topic 'pricing'")."""
    out: list[str] = []
    for where, obj in jsonl_objects(path):
        pid = _need(obj, "id", where)
        if pid not in stored:
            raise StoreError(f"{where}: no pair {pid!r}{qualifier} in the project (import it first)", code="not_found")
        out.append(pid)
    if not out:
        raise StoreError(f"{path}: lists no pairs")
    return list(dict.fromkeys(out))


def _check_fields(obj: Mapping[str, Any], allowed: set[str], where: str, hint: str = "") -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise StoreError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))}){hint}")


def _need(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise StoreError(f"{where}: missing field {key!r}")
    return obj[key]


def _prompt(obj: Any, where: str) -> PromptIn:
    if not isinstance(obj, dict):
        raise StoreError(f"{where}: expected an object, got {type(obj).__name__}")
    _check_fields(obj, PROMPT_FIELDS, where)
    return PromptIn(id=_need(obj, "id", where), text=_need(obj, "text", where), topic=obj.get("topic", ""),
                    meta=obj.get("meta") or {})


def import_prompts(session: Session, *, project_id: int, path: str | Path) -> ImportResult:
    """Import ``prompts.jsonl`` into the project (see the module docstring for the format)."""
    items, locs = [], []
    for where, obj in jsonl_objects(path):
        items.append(_prompt(obj, where))
        locs.append(where)
    n = ops.add_prompts(session, project_id=project_id, prompts=items, where=locs)
    return ImportResult(prompts=n)


def import_pairs(session: Session, *, project_id: int, path: str | Path) -> ImportResult:
    """Import ``pairs.jsonl`` (prompts and responses inline or by id) in one transaction."""
    prompts: list[PromptIn] = []
    p_locs: list[str] = []
    responses: list[ResponseIn] = []
    r_locs: list[str] = []
    pairs: list[PairIn] = []
    pair_locs: list[str] = []
    for where, obj in jsonl_objects(path):
        _check_fields(obj, PAIR_FIELDS, where, hint="; a prompts file? --kind prompts" if set(obj) <= PROMPT_FIELDS
                      else "")
        if "prompt" in obj and "prompt_id" in obj:
            raise StoreError(f"{where}: give 'prompt' or 'prompt_id', not both")
        if "prompt" in obj:
            p = _prompt(obj["prompt"], f"{where}: prompt")
            prompts.append(p)
            p_locs.append(f"{where}: prompt")
            prompt_id = p.id
        else:
            prompt_id = _need(obj, "prompt_id", where)
        side_ids = []
        for side in ("response_a", "response_b"):
            if side in obj and f"{side}_id" in obj:
                raise StoreError(f"{where}: give '{side}' or '{side}_id', not both")
            if side in obj:
                r = obj[side]
                w = f"{where}: {side}"
                if not isinstance(r, dict):
                    raise StoreError(f"{w}: expected an object, got {type(r).__name__}")
                _check_fields(r, RESPONSE_FIELDS, w)
                responses.append(ResponseIn(id=_need(r, "id", w), prompt_id=prompt_id, text=_need(r, "text", w),
                                            source=r.get("source", ""), meta=r.get("meta") or {}))
                r_locs.append(w)
                side_ids.append(r["id"])
            else:
                side_ids.append(_need(obj, f"{side}_id", where))
        pairs.append(PairIn(id=_need(obj, "id", where), prompt_id=prompt_id, response_a_id=side_ids[0],
                            response_b_id=side_ids[1], meta=obj.get("meta") or {}))
        pair_locs.append(where)
    n_p = ops.add_prompts(session, project_id=project_id, prompts=prompts, where=p_locs)
    n_r = ops.add_responses(session, project_id=project_id, responses=responses, where=r_locs)
    n_pairs = ops.add_pairs(session, project_id=project_id, pairs=pairs, where=pair_locs)
    return ImportResult(prompts=n_p, responses=n_r, pairs=n_pairs)


# ---- export ------------------------------------------------------------------------------


def jsonable(v: Any) -> Any:
    """A record value as JSON has it (datetimes in ISO 8601, as every export writes them)."""
    if isinstance(v, dt.datetime):
        return v.isoformat()
    if isinstance(v, tuple):
        return list(v)
    return v


def _write_jsonl(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> int:
    """Write atomically (temp file + rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({k: jsonable(v) for k, v in row.items()}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(rows)


def judgement_records(
    session: Session, *, project_id: int, round_id: int | None = None, round_kinds: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Judgements as plain dicts (``JudgementRow`` fields), oldest first."""
    if round_id is not None:
        if ops.get_round(session, round_id=round_id).project_id != project_id:
            raise StoreError(f"round {round_id} is not in project {project_id}", code="not_found")
        rows = ops.round_judgements(session, round_id=round_id)
    else:
        rows = ops.project_judgements(session, project_id=project_id, round_kinds=round_kinds)
    return [dataclasses.asdict(r) for r in rows]


def export_judgements_jsonl(
    session: Session, *, project_id: int, path: str | Path, round_id: int | None = None,
    round_kinds: Sequence[str] | None = None,
) -> int:
    """Write judgements to ``path`` as JSONL; returns the number written."""
    return _write_jsonl(path, judgement_records(session, project_id=project_id, round_id=round_id,
                                                round_kinds=round_kinds))


def trl_records(
    session: Session,
    *,
    project_id: int,
    round_kinds: Sequence[str] = ("calibration", "collection", "rerate"),
    latest_guideline: bool = True,
    margin: Mapping[int, float] | None = None,
    prompt_template: str = "{prompt}",
    response_prefix: str = "",
) -> list[dict[str, Any]]:
    """TRL's explicit-prompt preference format: ``{"prompt", "chosen", "rejected"}``.

    One record per ``ops.preference_examples`` example (latest judgement per pair and
    rater under the newest guideline); ties are left out (they have no chosen side).
    ``margin`` maps a rater's strength 0..3 to a ``"margin"`` column (TRL's reward
    margin); None leaves the column out. ``prompt_template`` formats the prompt text
    (e.g. ``"User: {prompt}\\nAssistant:"``) and ``response_prefix`` is put before each
    response (e.g. ``" "``), so ``prompt + chosen`` is the dialogue the policy sees.
    """
    if "{prompt}" not in prompt_template:
        raise StoreError("prompt_template: must contain '{prompt}'")
    if margin is not None:
        missing = [k for k in range(4) if k not in margin]
        if missing:
            raise StoreError(f"margin: no value for strength {missing[0]} (give all of 0..3)")
    out = []
    for e in ops.preference_examples(session, project_id=project_id, round_kinds=round_kinds,
                                     latest_guideline=latest_guideline, include_ties=False):
        rec: dict[str, Any] = {"prompt": prompt_template.replace("{prompt}", e.prompt_text),
                               "chosen": response_prefix + e.chosen_text,
                               "rejected": response_prefix + e.rejected_text}
        if margin is not None:
            rec["margin"] = float(margin[e.strength])
        out.append(rec)
    return out


def export_trl_jsonl(session: Session, *, project_id: int, path: str | Path, **kw: Any) -> int:
    """Write ``trl_records(...)`` to ``path``; returns the number written."""
    return _write_jsonl(path, trl_records(session, project_id=project_id, **kw))


def to_hf_dataset(session: Session, *, project_id: int, **kw: Any):  # noqa: ANN201 - datasets is optional
    """``trl_records(...)`` as a Hugging Face ``datasets.Dataset`` (columns prompt/chosen/rejected[/margin])."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - an optional dependency
        raise StoreError("to_hf_dataset needs the 'datasets' package (pip install 'preflab[hf]')") from e
    recs = trl_records(session, project_id=project_id, **kw)
    cols = ["prompt", "chosen", "rejected"] + (["margin"] if kw.get("margin") is not None else [])
    return datasets.Dataset.from_dict({c: [r[c] for r in recs] for c in cols})


def export_pairs_jsonl(
    session: Session, *, project_id: int, path: str | Path, pair_ids: Sequence[str] | None = None,
) -> int:
    """Write pairs in the import format above (prompt and responses inline)."""
    rows = []
    for p in ops.list_pairs(session, project_id=project_id, pair_ids=pair_ids):
        rows.append({"id": p.id, "prompt": {"id": p.prompt_id, "text": p.prompt_text, "topic": p.topic},
                     "response_a": {"id": p.response_a_id, "text": p.response_a_text, "source": p.response_a_source},
                     "response_b": {"id": p.response_b_id, "text": p.response_b_text, "source": p.response_b_source},
                     "meta": p.meta})
    return _write_jsonl(path, rows)
