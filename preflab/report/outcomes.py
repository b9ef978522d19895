"""Production outcomes: import logs and compare model versions (pure statistics + file import).

Log format (CSV with a header, or JSON lines), one conversation per row:

    conversation_id   unique string
    model_version     string (e.g. ``sft``, ``ppo_v2``)
    escalated         0/1 (also true/false, yes/no)
    csat              integer 1..5, or empty / null / N/A / NA / none / - when the customer gave no rating
    handle_time_min   number >= 0
    timestamp         ISO 8601 (``2026-01-05T09:13:22Z``)

Other columns are ignored. Files are read as UTF-8 (a BOM, as Excel's "CSV UTF-8" writes, is
allowed). Bad rows raise ``OutcomeImportError('logs.csv:17: csat: ...')`` naming every bad row
(the first 20 shown), and nothing is imported.

Comparisons (candidate minus baseline):

- escalation rate difference with Newcombe's hybrid score interval (Newcombe 1998,
  "Interval estimation for the difference between independent proportions", method 10:
  the Wilson intervals of each rate combined by square-and-add); the Wald interval
  ``d +- z sqrt(p1 q1/n1 + p2 q2/n2)`` is available as ``method="wald"``. p-value: Fisher's
  exact test (two-sided) when an expected cell count of the 2x2 table is below 5, the pooled
  two-proportion z-test otherwise (``"test": "fisher" | "z"``).
- CSAT mean difference with Welch's t interval (unequal variances, Welch-Satterthwaite df).
- handle time mean difference with Welch's interval, plus both medians.
"""

from __future__ import annotations

import csv
import io
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
    """A bad production log; the message names ``file:line`` and the field of every bad row
    (the first ``MAX_SHOWN``); ``errors`` holds them all."""

    def __init__(self, message: str, errors: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.errors = list(errors) or [message]


MAX_SHOWN = 20  # bad rows named in one error message


def _bad_rows(errors: Sequence[str]) -> OutcomeImportError:
    """One error for every bad row: the first ``MAX_SHOWN`` lines, then how many more."""
    shown = list(errors[:MAX_SHOWN])
    if len(errors) > MAX_SHOWN:
        shown.append(f"... and {len(errors) - MAX_SHOWN} more bad rows")
    if len(errors) > 1:
        shown.append(f"{len(errors)} bad rows; nothing imported")
    return OutcomeImportError("\n".join(shown), errors)


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
        # NaN / inf: finite first (int(nan) raises); a JSON bool is not a rating
        if isinstance(raw, bool) or not math.isfinite(f) or f != int(f) or not 1 <= f <= 5:
            raise OutcomeImportError(f"{where}: csat: expected an integer 1-5 or empty, got {raw!r}")
        csat = int(f)
    try:
        if isinstance(row["handle_time_min"], bool):  # JSON true is not 1 minute
            raise TypeError
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


def _decode(path: Path) -> str:
    """The file's text as UTF-8 (a leading BOM dropped); a non-UTF-8 byte names its line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise OutcomeImportError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}; a Windows/cp1252 export?): save the file "
            f"as UTF-8 (Excel: Save As > 'CSV UTF-8 (Comma delimited)')") from None


def _csv_rows(path: Path, text: str) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(line, row) per CSV record, and the records whose field count differs from the header's."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise OutcomeImportError(f"{path}:1: missing column {missing[0]!r} in header")
    rows, errors = [], []
    for fields in reader:
        if not fields:  # a blank line
            continue
        if len(fields) < len(header):
            errors.append((reader.line_num, f"{path}:{reader.line_num}: row has {len(fields)} fields where the "
                                            f"header has {len(header)} (a truncated row?)"))
            continue
        rows.append((reader.line_num, dict(zip(header, fields, strict=False))))
    return rows, errors


def _jsonl_rows(path: Path, text: str) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    rows, errors = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append((i, f"{path}:{i}: invalid JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict):
            errors.append((i, f"{path}:{i}: expected a JSON object"))
            continue
        rows.append((i, obj))
    return rows, errors


def _read_lines(path: Path) -> list[tuple[int, OutcomeRecord]]:
    """``read_outcomes`` with each record's line in the file (for errors that name it).

    Every bad row is collected; any bad row raises one ``OutcomeImportError`` naming them all.
    """
    if not path.exists():
        raise OutcomeImportError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise OutcomeImportError(f"{path}: a .json file: JSON lines are expected (.jsonl, one object per line), "
                                 f"or .csv")
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise OutcomeImportError(f"{path}: unknown format (use .csv or .jsonl)")
    text = _decode(path)
    rows, errors = (_csv_rows if suffix == ".csv" else _jsonl_rows)(path, text)
    out, seen = [], {}
    for line, row in rows:
        try:
            rec = _parse_row(row, f"{path}:{line}")
        except OutcomeImportError as e:
            errors.append((line, str(e)))
            continue
        if rec.conversation_id in seen:
            errors.append((line, f"{path}:{line}: conversation_id {rec.conversation_id!r} repeats line "
                                 f"{seen[rec.conversation_id]}"))
            continue
        seen[rec.conversation_id] = line
        out.append((line, rec))
    if errors:
        raise _bad_rows([msg for _, msg in sorted(errors, key=lambda e: e[0])])  # in file order
    if not out:
        raise OutcomeImportError(f"{path}: no rows")
    return out


def similar_labels(labels: Iterable[str]) -> list[list[str]]:
    """Groups of distinct labels equal up to case and surrounding whitespace (``PPO1`` / ``ppo1``):
    likely one model written two ways, which a comparison would treat as two versions."""
    groups: dict[str, set[str]] = defaultdict(set)
    for label in labels:
        groups[label.strip().casefold()].add(label)
    return [sorted(g) for _, g in sorted(groups.items()) if len(g) > 1]


def load_run_outcomes(run_dir: str | Path) -> list[OutcomeRecord]:
    """The imported outcomes of a run dir (``RUN/outcomes/logs.jsonl``), or []."""
    p = Path(run_dir) / "outcomes" / "logs.jsonl"
    if not p.exists():
        return []
    return [OutcomeRecord(**json.loads(line)) for line in p.read_text().splitlines() if line.strip()]


def import_outcomes(path: str | Path, run_dir: str | Path) -> dict:
    """Validate ``path`` and append it to ``RUN/outcomes/logs.jsonl`` atomically.

    A conversation id already imported is an error (nothing is written). Returns counts, and in
    ``similar_versions`` the version labels (new or already imported) that differ only by case or
    surrounding whitespace (``similar_labels``): imported as they are, as separate versions.
    """
    lines = _read_lines(Path(path))
    new = [r for _, r in lines]
    old = load_run_outcomes(run_dir)
    have = {r.conversation_id for r in old}
    again = [f"{path}:{line}: conversation_id {r.conversation_id!r} already imported"
             for line, r in lines if r.conversation_id in have]
    if again:
        raise _bad_rows(again)
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
    return {"imported": len(new), "total": len(old) + len(new), "by_version": dict(by_version), "path": str(out),
            "similar_versions": similar_labels({r.model_version for r in [*old, *new]})}


# ---- statistics (pure) --------------------------------------------------------------------

def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


MIN_EXPECTED = 5  # the usual rule for the z (chi-square) approximation: every expected cell count >= 5


def min_expected_count(x1: int, n1: int, x2: int, n2: int) -> float:
    """Smallest expected cell count of the 2x2 table [[x1, n1-x1], [x2, n2-x2]] under equal rates:
    n_i x (x1+x2)/N and n_i x (N-x1-x2)/N."""
    total, events = n1 + n2, x1 + x2
    return min(n * k / total for n in (n1, n2) for k in (events, total - events))


def two_proportion_diff(x1: int, n1: int, x2: int, n2: int, *, method: str = "newcombe",
                        confidence: float = 0.95) -> dict:
    """Difference p2 - p1 of two independent proportions with a CI and a two-sided p-value.

    ``newcombe`` (Newcombe 1998, method 10): with Wilson limits (l_i, u_i) of each rate,
    lower = d - sqrt((p2 - l2)^2 + (u1 - p1)^2), upper = d + sqrt((u2 - p2)^2 + (p1 - l1)^2).
    ``wald``: d +- z sqrt(p1 q1/n1 + p2 q2/n2).
    p-value (``test``): Fisher's exact test (``"fisher"``, scipy.stats.fisher_exact, two-sided) when an
    expected cell count is below ``MIN_EXPECTED`` (the z-test's normal approximation is then poor:
    1/10 vs 0/50 gives z p 0.024 where Fisher gives 0.167 and the interval includes 0); otherwise
    the pooled z-test (``"z"``): z = d / sqrt(p (1-p) (1/n1 + 1/n2)), p = (x1 + x2)/(n1 + n2).
    """
    from scipy.stats import fisher_exact, norm

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
    if min_expected_count(x1, n1, x2, n2) < MIN_EXPECTED:
        test = "fisher"
        pval = float(fisher_exact([[x1, n1 - x1], [x2, n2 - x2]], alternative="two-sided")[1])
    else:
        test = "z"
        pool = (x1 + x2) / (n1 + n2)
        se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
        pval = 1.0 if se == 0 else float(2 * norm.sf(abs(d) / se))
    return {"baseline": p1, "candidate": p2, "diff": d, "ci": [lo, hi], "p_value": pval, "test": test,
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
    """The comparison of ``candidate`` against ``baseline`` (the ``comparison.json`` shape).

    ``conversations`` and ``answered_surveys`` count each side; ``csat`` / ``handle_time_min`` are
    None when a side has fewer than 2 values (``not_compared`` says why).
    """
    if baseline == candidate:
        raise ValueError(f"candidate: the same model version as the baseline ({candidate!r}): compare two versions")
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
            "handle_time_min": handle, "weekly": weekly_summary([*base, *cand]),
            "conversations": {"baseline": len(base), "candidate": len(cand)},
            "answered_surveys": {"baseline": len(cb), "candidate": len(cc)}}


def not_compared(comp: dict) -> list[str]:
    """Why CSAT / handle time are missing from a comparison: fewer than 2 values on a side."""
    out = []
    names = comp["baseline"], comp["candidate"]
    for key, what, counts in (("csat", "answered survey", comp.get("answered_surveys")),
                              ("handle_time_min", "conversation", comp.get("conversations"))):
        if comp.get(key) is None and counts:
            label = "CSAT" if key == "csat" else "handle time"
            b, c = counts["baseline"], counts["candidate"]
            out.append(f"{label} not compared: {b} {what}{'' if b == 1 else 's'} on {names[0]}, {c} on {names[1]} "
                       f"(at least 2 on each side needed)")
    return out


def checkpoint_record(checkpoint: str | Path, run_dir: str | Path) -> dict:
    """Which model directory served the candidate label: as given, resolved, and relative to the run
    dir when inside it (the report matches that against the promoted checkpoint)."""
    path, run = Path(checkpoint).resolve(), Path(run_dir).resolve()
    return {"given": str(checkpoint), "resolved": str(path),
            "in_run": str(path.relative_to(run)) if path.is_relative_to(run) else None}


def write_comparison(run_dir: str | Path, comparison: dict, *, simulated: bool,
                     checkpoint: str | Path | None = None) -> Path:
    """Write ``RUN/outcomes/comparison.json`` (``simulated`` says where the logs came from;
    ``checkpoint``, the model directory that served the candidate, is recorded by ``checkpoint_record``)."""
    out = Path(run_dir) / "outcomes" / "comparison.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {"checkpoint": checkpoint_record(checkpoint, run_dir)} if checkpoint is not None else {}
    out.write_text(json.dumps({**comparison, "simulated": simulated, **ckpt}, indent=2) + "\n")
    return out
