"""Held-out preference accuracy of a reward model, honestly framed.

    accuracy = (#{r_chosen > r_rejected} + 0.5 #{r_chosen = r_rejected}) / n   over strict (non-tie) pairs

reported overall, per rater, per topic and per stated strength, each with a percentile
bootstrap 95% CI (Efron & Tibshirani 1993, ch. 13) that resamples *pairs* (all raters'
judgements of one pair stay together). Beside it:

- calibration: top-label expected calibration error of p = sigmoid(r_chosen - r_rejected)
  (Naeini et al. 2015; Guo et al. 2017): ECE = sum_b n_b/n |acc_b - conf_b| over equal-width
  confidence bins of max(p, 1-p);
- length bias: Pearson correlation of reward with response length (words), and of the
  reward gap with the length gap;
- the accuracy ceiling implied by the raters' duplicate self-consistency (passed in by the
  caller, from ``quality.consistency``): no model can beat the raters' own agreement with
  themselves, so accuracy above it means a leak;
- warnings: < 60% weak signal, > 85% likely fitting rater quirks, above the ceiling: leak.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

WEAK_SIGNAL = 0.60
QUIRKS = 0.85


@dataclass(frozen=True)
class Accuracy:
    n: int
    value: float
    low: float
    high: float


@dataclass
class PreferenceReport:
    n_pairs: int  # strict (non-tie) judged pairs evaluated
    n_ties: int
    accuracy: Accuracy
    per_rater: dict[str, Accuracy]
    per_topic: dict[str, Accuracy]
    per_strength: dict[str, Accuracy]
    strength_monotonic: bool | None  # accuracy non-decreasing with strength (None: < 2 buckets)
    ece: float
    calibration: list[dict[str, float]]  # per bin: confidence, accuracy, n
    length_corr: float  # reward vs response length (words), all responses
    length_gap_corr: float  # (r_c - r_r) vs (len_c - len_r)
    mean_reward_gap: float
    ceiling: float | None
    reference_accuracy: Accuracy | None  # agreement with an outside judge (e.g. the sandbox gold), report only
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able (NaN -> None)."""
        return _clean(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    return x


def pair_correct(r_chosen: np.ndarray, r_rejected: np.ndarray) -> np.ndarray:
    """1 if chosen scores higher, 0.5 on an exact tie of rewards, 0 otherwise."""
    d = np.asarray(r_chosen, dtype=float) - np.asarray(r_rejected, dtype=float)
    return np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0))


def bootstrap_mean(values: np.ndarray, clusters: Sequence[Hashable] | None = None, *, n_boot: int = 1000,
                   seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of ``values``, resampling whole clusters (default: each value)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return math.nan, math.nan
    if clusters is None:
        sums, counts = values, np.ones_like(values)
    else:
        _, inv = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
        sums = np.bincount(inv, weights=values)
        counts = np.bincount(inv).astype(float)
    rng = np.random.default_rng(seed)
    k = sums.size
    idx = rng.integers(0, k, size=(n_boot, k))
    reps = sums[idx].sum(1) / counts[idx].sum(1)
    a = (1 - level) / 2
    return float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a))


def _acc(correct: np.ndarray, clusters, n_boot: int, seed: int) -> Accuracy:
    if correct.size == 0:
        return Accuracy(0, math.nan, math.nan, math.nan)
    lo, hi = bootstrap_mean(correct, clusters, n_boot=n_boot, seed=seed)
    return Accuracy(int(correct.size), float(correct.mean()), lo, hi)


def expected_calibration_error(d: np.ndarray, *, n_bins: int = 10) -> tuple[float, list[dict[str, float]]]:
    """Top-label ECE of p = sigmoid(d) against the label "chosen wins" (every strict pair).

    confidence = max(p, 1-p), correct = (p > 0.5) (p = 0.5 counts half); bins of equal width on [0.5, 1].
    """
    d = np.asarray(d, dtype=float)
    if d.size == 0:
        return math.nan, []
    p = 1.0 / (1.0 + np.exp(-d))
    conf = np.maximum(p, 1 - p)
    correct = pair_correct(d, np.zeros_like(d))
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    b = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece, bins = 0.0, []
    for i in range(n_bins):
        sel = b == i
        if not sel.any():
            continue
        acc_b, conf_b, n_b = float(correct[sel].mean()), float(conf[sel].mean()), int(sel.sum())
        ece += n_b / d.size * abs(acc_b - conf_b)
        bins.append({"low": float(edges[i]), "high": float(edges[i + 1]), "confidence": conf_b,
                     "accuracy": acc_b, "n": n_b})
    return float(ece), bins


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def preference_report(
    examples: Sequence,  # PreferenceExample-like: pair_id, chosen, rejected, rater, topic, strength, is_tie
    r_chosen: Sequence[float],
    r_rejected: Sequence[float],
    *,
    ceiling: float | None = None,
    reference: Sequence[bool | None] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = 10,
) -> PreferenceReport:
    """The held-out report (see the module docstring). ``reference[i]`` (optional): True if an
    outside judge also prefers example i's chosen response (None: no verdict)."""
    n = len(examples)
    if len(r_chosen) != n or len(r_rejected) != n:
        raise ValueError(f"preference_report: {n} examples but {len(r_chosen)}/{len(r_rejected)} rewards")
    if ceiling is not None and not 0.0 <= ceiling <= 1.0:
        raise ValueError(f"ceiling: must be in [0, 1], got {ceiling}")
    rc, rr = np.asarray(r_chosen, dtype=float), np.asarray(r_rejected, dtype=float)
    tie = np.array([bool(e.is_tie) for e in examples], dtype=bool)
    strict = ~tie
    correct = pair_correct(rc, rr)[strict]
    pairs = [e.pair_id for e, s in zip(examples, strict, strict=True) if s]
    ex_s = [e for e, s in zip(examples, strict, strict=True) if s]

    def grouped(key) -> dict[str, Accuracy]:
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(ex_s):
            k = key(e)
            if k is not None:
                groups.setdefault(str(k), []).append(i)
        return {k: _acc(correct[ix], [pairs[i] for i in ix], n_boot, seed) for k, ix in sorted(groups.items())}

    per_strength = grouped(lambda e: e.strength)
    ordered = [per_strength[k].value for k in sorted(per_strength, key=int)]
    monotonic = None if len(ordered) < 2 else all(b >= a for a, b in zip(ordered, ordered[1:], strict=False))
    d = (rc - rr)[strict]
    ece, bins = expected_calibration_error(d, n_bins=n_bins)
    len_c = np.array([len(e.chosen.split()) for e in examples], dtype=float)
    len_r = np.array([len(e.rejected.split()) for e in examples], dtype=float)
    ref_acc = None
    if reference is not None:
        if len(reference) != n:
            raise ValueError(f"reference: {len(reference)} verdicts for {n} examples")
        ok = [i for i, v in enumerate(reference) if v is not None]
        ref_correct = np.array([pair_correct(rc[i], rr[i]) if reference[i] else 1 - pair_correct(rc[i], rr[i])
                                for i in ok], dtype=float)
        ref_acc = _acc(ref_correct, [examples[i].pair_id for i in ok], n_boot, seed)

    acc = _acc(correct, pairs, n_boot, seed)
    report = PreferenceReport(
        n_pairs=int(strict.sum()), n_ties=int(tie.sum()), accuracy=acc,
        per_rater=grouped(lambda e: e.rater), per_topic=grouped(lambda e: e.topic), per_strength=per_strength,
        strength_monotonic=monotonic, ece=ece, calibration=bins,
        length_corr=_pearson(np.concatenate([rc, rr]), np.concatenate([len_c, len_r])),
        length_gap_corr=_pearson(rc - rr, len_c - len_r), mean_reward_gap=float(d.mean()) if d.size else math.nan,
        ceiling=ceiling, reference_accuracy=ref_acc,
    )
    report.warnings = accuracy_warnings(acc, ceiling)
    return report


def accuracy_warnings(acc: Accuracy, ceiling: float | None) -> list[str]:
    """The three honest-accuracy warnings (thresholds from the design brief's reference story)."""
    out = []
    ci = f"{acc.value:.1%} (95% CI {acc.low:.1%}-{acc.high:.1%}, n={acc.n})"
    if acc.n == 0 or math.isnan(acc.value):
        return ["no strict pairs to evaluate"]
    if acc.value < WEAK_SIGNAL:
        out.append(f"weak signal: held-out accuracy {ci} is below {WEAK_SIGNAL:.0%}; the labels may be "
                   "noisy, too few, or the model too small")
    if acc.value > QUIRKS:
        out.append(f"suspiciously high: held-out accuracy {ci} is above {QUIRKS:.0%}; the model may be "
                   "fitting rater quirks (length, confidence markers) rather than quality")
    if ceiling is not None and acc.value > ceiling:
        out.append(f"above the ceiling: held-out accuracy {ci} exceeds the duplicate-consistency ceiling "
                   f"{ceiling:.1%}; check for a leak between training and validation")
    return out


def evaluate_run(run_dir: str | Path, *, ceiling: float | None = None, n_boot: int = 1000,
                 batch_size: int = 32) -> PreferenceReport:
    """Score ``run_dir/data/val.jsonl`` with ``run_dir/model`` and write ``run_dir/eval/preference.json``."""
    from preflab.models.hf import load_reward_model
    from preflab.train.data import load_jsonl
    from preflab.train.reward import score_pairs

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    if not (run_dir / "model").is_dir():
        raise FileNotFoundError(f"{run_dir}: no model/ directory (has `rm train` finished?)")
    val = load_jsonl(run_dir / "data" / "val.jsonl")
    model, tok = load_reward_model(run_dir / "model")
    rc, rr = score_pairs(model, tok, val, batch_size=batch_size, max_length=cfg.get("max_length", 256),
                         prompt_format=cfg.get("prompt_format", "dialogue"))
    report = preference_report(val, rc, rr, ceiling=ceiling, n_boot=n_boot, seed=cfg.get("seed", 0))
    out = run_dir / "eval" / "preference.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.to_json() + "\n")
    return report


def store_ceiling(db_url: str, *, project: str):
    """The pooled duplicate self-consistency of all raters' planted duplicates
    (``quality.consistency.Consistency``: ``ceiling``, its interval, ``n``); None if there are none."""
    from preflab.quality.consistency import self_consistency
    from preflab.store import db, ops

    engine = db.make_engine(db_url, create=False)
    with db.session_scope(engine, readonly=True) as s:
        pid = ops.require_project(s, name=project, where=db_url)
        dups = ops.duplicate_pairs(s, project_id=pid)
    if not dups:
        return None
    return self_consistency([(d.first, d.second) for d in dups])
