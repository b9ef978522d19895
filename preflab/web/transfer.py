"""Uploads and downloads for the web app, over the store's ``io`` (which reads and writes files).

An upload arrives as a request body: it is written to a private temp file under the name the
user knows (``pairs.jsonl``) so the store's ``file:line`` errors read naturally, then imported
in the caller's transaction (all or nothing).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

#: strength 0..3 -> TRL ``margin`` column (the rater's stated strength as the reward margin)
STRENGTH_MARGIN = {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0}


def _safe_name(name: str | None, default: str) -> str:
    base = Path(name or default).name
    return base if re.fullmatch(r"[A-Za-z0-9_.\- ]{1,100}", base) else default


def import_jsonl(session: Session, *, project_id: int, kind: str, text: str, filename: str | None = None
                 ) -> dict[str, int]:
    """Import ``prompts`` or ``pairs`` JSONL (formats: ``preflab.store.io``); returns counts of new rows."""
    from preflab.store import io
    from preflab.store.ops import StoreError

    with tempfile.TemporaryDirectory(prefix="preflab-upload-") as tmp:
        path = Path(tmp) / _safe_name(filename, f"{kind}.jsonl")
        path.write_text(text, encoding="utf-8")
        try:
            res = (io.import_prompts if kind == "prompts" else io.import_pairs)(
                session, project_id=project_id, path=path)
        except StoreError as e:
            raise StoreError(str(e).replace(f"{tmp}/", ""), code=e.code) from None
    return {"prompts": res.prompts, "responses": res.responses, "pairs": res.pairs}


def pair_ids_of(text: str, filename: str | None = None) -> list[str]:
    """The ``id`` of each line of a pairs JSONL (to build a round from some imported pairs)."""
    from preflab.store.ops import StoreError

    ids = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise StoreError(f"{_safe_name(filename, 'pairs.jsonl')}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            raise StoreError(f"{_safe_name(filename, 'pairs.jsonl')}:{n}: expected an object with a string 'id'")
        ids.append(obj["id"])
    return ids


def _line(rec: dict[str, Any]) -> str:
    from preflab.store.io import jsonable

    return json.dumps({k: jsonable(v) for k, v in rec.items()}, ensure_ascii=False, default=str)  # as the CLI's


def export_round_jsonl(session: Session, *, project_id: int, round_id: int) -> str:
    """Every judgement of the round, one JSON line each (canonical ids, rater, sources: admin only)."""
    from preflab.store import io

    return "".join(_line(r) + "\n" for r in io.judgement_records(session, project_id=project_id, round_id=round_id))


def export_trl_jsonl(session: Session, *, project_id: int) -> str:
    """TRL ``prompt/chosen/rejected/margin`` lines: latest judgement per (pair, rater) under the
    newest guideline, ties left out, margin = the rater's strength (``STRENGTH_MARGIN``)."""
    from preflab.store import io

    return "".join(_line(r) + "\n" for r in io.trl_records(session, project_id=project_id, margin=STRENGTH_MARGIN))
