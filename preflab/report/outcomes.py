"""Production outcomes: import logs and compare model versions (pure statistics + file import).

Log format (CSV with a header, or JSON lines), one conversation per row:

    conversation_id   unique string
    model_version     string (e.g. ``sft``, ``ppo_v2``)
    escalated         0/1 (also true/false, yes/no)
    csat              integer 1..5, or empty / null / N/A / NA / none / - when the customer gave no rating
    handle_time_min   number >= 0
    timestamp         ISO 8601 (``2026-01-05T09:13:22Z``)

Other columns are ignored. A bad row raises ``OutcomeImportError('logs.csv:17: csat: ...')``
and nothing is imported.

Comparisons (candidate minus baseline):

- escalation rate difference with Newcombe's hybrid score interval (Newcombe 1998,
  "Interval estimation for the difference between independent proportions", method 10:
  the Wilson intervals of each rate combined by square-and-add); the Wald interval
  ``d +- z sqrt(p1 q1/n1 + p2 q2/n2)`` is available as ``method="wald"``. p-value: the pooled
  two-proportion z-test.
- CSAT mean difference with Welch's t interval (unequal variances, Welch-Satterthwaite df).
- handle time mean difference with Welch's interval, plus both medians.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from preflab.quality.consistency import wilson_interval

# what survey exports write where the customer gave no rating
NO_RATING = ("", "na", "n/a", "none", "null", "-")
REQUIRED = ("conversation_id", "model_version", "escalated", "csat", "handle_time_min", "timestamp")
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}


class OutcomeImportError(ValueError):
    """A bad production log; the message names ``file:line`` and the field."""


@dataclass(frozen=True)
class OutcomeRecord:
    conversation_id: str
    model_version: str
    escalated: bool
    csat: int | None
    handle_time_min: float
    timestamp: str  # normalised ISO 8601 UTC

    def to_json(self) -> dict:
        return asdict(self)


# ---- reading ----------------------------------------------------------------------------

def _parse_row(row: dict, where: str) -> OutcomeRecord:
    missing = [c for c in REQUIRED if c not in row]
    if missing:
        raise OutcomeImportError(f"{where}: missing column {missing[0]!r}")
    cid = row["conversation_id"]
    if cid is None or str(cid).strip() == "":
        raise OutcomeImportError(f"{where}: conversation_id: empty")
    version = row["model_version"]
    if version is None or str(version).strip() == "":
        raise OutcomeImportError(f"{where}: model_version: empty")
    esc = row["escalated"]
    if isinstance(esc, bool):
        escalated = esc
    elif isinstance(esc, int) and esc in (0, 1):
        escalated = bool(esc)
    elif isinstance(esc, str) and esc.strip().lower() in _TRUE | _FALSE:
        escalated = esc.strip().lower() in _TRUE
    else:
        raise OutcomeImportError(f"{where}: escalated: expected 0/1 or true/false, got {esc!r}")
    raw = row["csat"]
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in NO_RATING):
        csat = None
    else:
        try:
            f = float(raw)
        except (TypeError, ValueError):
            raise OutcomeImportError(f"{where}: csat: expected an integer 1-5 or empty, got {raw!r}") from None
        if isinstance(raw, bool) or f != int(f) or not 1 <= f <= 5:
            raise OutcomeImportError(f"{where}: csat: expected an integer 1-5 or empty, got {raw!r}")
        csat = int(f)
    try:
        handle = float(row["handle_time_min"])
    except (TypeError, ValueError):
        raise OutcomeImportError(f"{where}: handle_time_min: expected a number, got {row['handle_time_min']!r}") from None
    if not math.isfinite(handle) or handle < 0:
        raise OutcomeImportError(f"{where}: handle_time_min: must be a finite number >= 0, got {handle!r}")
    try:
        ts = datetime.fromisoformat(str(row["timestamp"]).strip())
    except ValueError:
        raise OutcomeImportError(f"{where}: timestamp: expected ISO 8601, got {row['timestamp']!r}") from None
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)  # naive times are taken as UTC
    return OutcomeRecord(str(cid).strip(), str(version).strip(), escalated, csat, handle,
                         ts.strftime("%Y-%m-%dT%H:%M:%SZ"))


def read_outcomes(path: str | Path) -> list[OutcomeRecord]:
    """Read and validate a whole CSV/JSONL production log (all-or-nothing)."""
    return [rec for _, rec in _read_lines(Path(path))]


def _read_lines(path: Path) -> list[tuple[int, OutcomeRecord]]:
    """``read_outcomes`` with each record's line in the file (for errors that name it)."""
    if not path.exists():
        raise OutcomeImportError(f"{path}: no such file")
    rows: list[tuple[int, dict]] = []
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                raise OutcomeImportError(f"{path}:1: missing column {missing[0]!r} in header")
            for row in reader:
                rows.append((reader.line_num, row))
    elif path.suffix in (".jsonl", ".ndjson"):
        with path.open() as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise OutcomeImportError(f"{path}:{i}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise OutcomeImportError(f"{path}:{i}: expected a JSON object")
                rows.append((i, obj))
    else:
        raise OutcomeImportError(f"{path}: unknown format (use .csv or .jsonl)")
    out, seen = [], {}
    for line, row in rows:
        rec = _parse_row(row, f"{path}:{line}")
        if rec.conversation_id in seen:
            raise OutcomeImportError(f"{path}:{line}: conversation_id {rec.conversation_id!r} repeats line {seen[rec.conversation_id]}")
        seen[rec.conversation_id] = line
        out.append((line, rec))
    if not out:
        raise OutcomeImportError(f"{path}: no rows")
    return out


def load_run_outcomes(run_dir: str | Path) -> list[OutcomeRecord]:
    """The imported outcomes of a run dir (``RUN/outcomes/logs.jsonl``), or []."""
    p = Path(run_dir) / "outcomes" / "logs.jsonl"
    if not p.exists():
        return []
    return [OutcomeRecord(**json.loads(line)) for line in p.read_text().splitlines() if line.strip()]


def import_outcomes(path: str | Path, run_dir: str | Path) -> dict:
    """Validate ``path`` and append it to ``RUN/outcomes/logs.jsonl`` atomically.

    A conversation id already imported is an error (nothing is written). Returns counts.
    """
    lines = _read_lines(Path(path))
    new = [r for _, r in lines]
    old = load_run_outcomes(run_dir)
    have = {r.conversation_id for r in old}
    for line, r in lines:
        if r.conversation_id in have:
            raise OutcomeImportError(f"{path}:{line}: conversation_id {r.conversation_id!r} already imported")
    out = Path(run_dir) / "outcomes" / "logs.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        for r in [*old, *new]:
            f.write(json.dumps(r.to_json()) + "\n")
    os.replace(tmp, out)
    by_version: dict[str, int] = defaultdict(int)
    for r in new:
        by_version[r.model_version] += 1
    return {"imported": len(new), "total": len(old) + len(new), "by_version": dict(by_version), "path": str(out)}


# ---- statistics (pure) --------------------------------------------------------------------

def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def two_proportion_diff(x1: int, n1: int, x2: int, n2: int, *, method: str = "newcombe",
                        confidence: float = 0.95) -> dict:
    """Difference p2 - p1 of two independent proportions with a CI and a z-test p-value.

    ``newcombe`` (Newcombe 1998, method 10): with Wilson limits (l_i, u_i) of each rate,
    lower = d - sqrt((p2 - l2)^2 + (u1 - p1)^2), upper = d + sqrt((u2 - p2)^2 + (p1 - l1)^2).
    ``wald``: d +- z sqrt(p1 q1/n1 + p2 q2/n2).
    p-value: pooled z = d / sqrt(p (1-p) (1/n1 + 1/n2)), p = (x1 + x2)/(n1 + n2), two-sided.
    """
    from scipy.stats import norm

    if n1 <= 0 or n2 <= 0 or not (0 <= x1 <= n1 and 0 <= x2 <= n2):
        raise ValueError(f"two_proportion_diff: bad counts {x1}/{n1}, {x2}/{n2}")
    p1, p2 = x1 / n1, x2 / n2
    d = p2 - p1
    if method == "newcombe":
        l1, u1 = wilson_interval(x1, n1, confidence=confidence)
        l2, u2 = wilson_interval(x2, n2, confidence=confidence)
        lo = d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
        hi = d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    elif method == "wald":
        half = _z(confidence) * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
        lo, hi = d - half, d + half
    else:
        raise ValueError(f"method: must be 'newcombe' or 'wald', got {method!r}")
    pool = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    pval = 1.0 if se == 0 else float(2 * norm.sf(abs(d) / se))
    return {"baseline": p1, "candidate": p2, "diff": d, "ci": [lo, hi], "p_value": pval,
            "ci_by_version": {"baseline": list(wilson_interval(x1, n1, confidence=confidence)),
                              "candidate": list(wilson_interval(x2, n2, confidence=confidence))},
            "n": {"baseline": n1, "candidate": n2}, "method": method, "confidence": confidence}


def welch_diff(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95) -> dict:
    """Mean difference mean(b) - mean(a) with Welch's t interval and two-sided p-value.

    se = sqrt(s_a^2/n_a + s_b^2/n_b); df = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))
    (Welch 1947, Satterthwaite 1946).
    """
    from scipy.stats import t as tdist

    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        raise ValueError(f"welch_diff: need >= 2 values per group, got {na} and {nb}")
    ma, mb = math.fsum(a) / na, math.fsum(b) / nb
    va = math.fsum((x - ma) ** 2 for x in a) / (na - 1)
    vb = math.fsum((x - mb) ** 2 for x in b) / (nb - 1)
    d = mb - ma

    def mean_ci(m: float, v: float, n: int) -> list[float]:  # one-sample t interval of a mean
        h = float(tdist.ppf(0.5 + confidence / 2, n - 1)) * math.sqrt(v / n)
        return [m - h, m + h]

    by_version = {"baseline": mean_ci(ma, va, na), "candidate": mean_ci(mb, vb, nb)}
    se2 = va / na + vb / nb
    if se2 == 0:
        return {"baseline": ma, "candidate": mb, "diff": d, "ci": [d, d], "p_value": 1.0 if d == 0 else 0.0,
                "df": float(na + nb - 2), "n": {"baseline": na, "candidate": nb}, "method": "welch",
                "confidence": confidence, "ci_by_version": by_version}
    se = math.sqrt(se2)
    df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    q = float(tdist.ppf(0.5 + confidence / 2, df))
    p = float(2 * tdist.sf(abs(d) / se, df))
    return {"baseline": ma, "candidate": mb, "diff": d, "ci": [d - q * se, d + q * se], "p_value": p,
            "df": df, "n": {"baseline": na, "candidate": nb}, "method": "welch", "confidence": confidence,
            "ci_by_version": by_version}


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def weekly_summary(records: Iterable[OutcomeRecord]) -> list[dict]:
    """Per ISO week and version: n, escalation rate, mean CSAT, mean handle time."""
    groups: dict[tuple[str, str], list[OutcomeRecord]] = defaultdict(list)
    for r in records:
        y, w, _ = datetime.fromisoformat(r.timestamp.rstrip("Z")).isocalendar()
        groups[(f"{y}-W{w:02d}", r.model_version)].append(r)
    out = []
    for (week, version), rs in sorted(groups.items()):
        cs = [r.csat for r in rs if r.csat is not None]
        out.append({"week": week, "model_version": version, "n": len(rs),
                    "escalation_rate": sum(r.escalated for r in rs) / len(rs),
                    "csat_mean": (sum(cs) / len(cs)) if cs else None,
                    "handle_time_mean": sum(r.handle_time_min for r in rs) / len(rs)})
    return out


def compare_versions(records: Sequence[OutcomeRecord], baseline: str, candidate: str, *,
                     method: str = "newcombe", confidence: float = 0.95) -> dict:
    """The comparison of ``candidate`` against ``baseline`` (the ``comparison.json`` shape)."""
    base = [r for r in records if r.model_version == baseline]
    cand = [r for r in records if r.model_version == candidate]
    versions = sorted({r.model_version for r in records})
    for name, rs in (("baseline", base), ("candidate", cand)):
        if not rs:
            raise ValueError(f"{name}: no conversations for model version "
                             f"{baseline if name == 'baseline' else candidate!r} (have: {', '.join(versions)})")
    esc = two_proportion_diff(sum(r.escalated for r in base), len(base), sum(r.escalated for r in cand), len(cand),
                              method=method, confidence=confidence)
    cb = [r.csat for r in base if r.csat is not None]
    cc = [r.csat for r in cand if r.csat is not None]
    csat = welch_diff(cb, cc, confidence=confidence) if len(cb) >= 2 and len(cc) >= 2 else None
    hb = [r.handle_time_min for r in base]
    hc = [r.handle_time_min for r in cand]
    handle = welch_diff(hb, hc, confidence=confidence) if len(hb) >= 2 and len(hc) >= 2 else None
    if handle is not None:
        handle["median"] = {"baseline": _median(hb), "candidate": _median(hc)}
    return {"baseline": baseline, "candidate": candidate, "escalation": esc, "csat": csat,
            "handle_time_min": handle, "weekly": weekly_summary([*base, *cand])}


def write_comparison(run_dir: str | Path, comparison: dict, *, simulated: bool) -> Path:
    """Write ``RUN/outcomes/comparison.json`` (``simulated`` says where the logs came from)."""
    out = Path(run_dir) / "outcomes" / "comparison.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**comparison, "simulated": simulated}, indent=2) + "\n")
    return out
