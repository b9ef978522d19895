"""Blind A/B evaluation: win rate with a Wilson interval, sign test, n needed, length control.

Outcomes are always in *canonical* terms, from the candidate's side: 1.0 = the candidate's
response was preferred, 0.0 = the baseline's, 0.5 = a tie. Screen sides never enter: the
store keeps judgements against canonical response ids, and ``outcome_of`` maps a judgement
to an outcome from those ids alone, so swapping what was shown left and right cannot change
any number here.

The statistics are pure functions (numpy/scipy); the round flow at the bottom
(``create_ab_round``, ``ab_result_from_round``) goes through the store and the sampler.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from preflab.config import check, field_doc
from preflab.quality.consistency import wilson_interval

Z = NormalDist().inv_cdf


@dataclass
class ABConfig:
    """How a blind A/B round is built and scored."""

    n_queries: int = field_doc(200, "Held-out queries in the round (one candidate/baseline pair each).")
    max_new_tokens: int = field_doc(64, "Longest response generated per query.")
    temperature: float = field_doc(1.0, "Sampling temperature for both models (0 = greedy).")
    top_p: float = field_doc(1.0, "Nucleus sampling mass for both models.")
    overlap: int = field_doc(1, "Raters who judge each pair.")
    seed: int = field_doc(0, "Seed for query choice and sampling.")
    confidence: float = field_doc(0.95, "Confidence level of the Wilson interval.")
    alpha: float = field_doc(0.05, "Two-sided significance level used for the n-needed figure.")
    power: float = field_doc(0.8, "Power used for the n-needed figure.")

    def validate(self) -> None:
        check(self.n_queries >= 1, "ab.n_queries", "must be >= 1")
        check(self.max_new_tokens >= 1, "ab.max_new_tokens", "must be >= 1")
        check(self.temperature >= 0, "ab.temperature", "must be >= 0")
        check(0 < self.top_p <= 1, "ab.top_p", "must be in (0, 1]")
        check(self.overlap >= 1, "ab.overlap", "must be >= 1")
        check(0 < self.confidence < 1, "ab.confidence", "must be in (0, 1)")
        check(0 < self.alpha < 1, "ab.alpha", "must be in (0, 1)")
        check(0 < self.power < 1, "ab.power", "must be in (0, 1)")


# ---- pure statistics -------------------------------------------------------------------


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: binomial test of ``wins`` out of ``wins + losses`` at p = 1/2.

    Ties are dropped (the standard sign test; Conover 1999, ch. 3.4). With k = min(wins,
    losses) and m = wins + losses: p = min(1, 2 * P[Binom(m, 1/2) <= k]); 1.0 when m = 0.
    """
    from scipy.stats import binom

    m = wins + losses
    if m == 0:
        return 1.0
    k = min(wins, losses)
    return float(min(1.0, 2.0 * binom.cdf(k, m, 0.5)))


def n_needed(rate: float, *, p0: float = 0.5, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Comparisons needed to tell a true win rate ``rate`` from ``p0`` (normal approximation).

    One-sample two-sided test of a proportion (Fleiss, Levin & Paik 2003, eq. 2.5)::

        n = ( z_{1-alpha/2} sqrt(p0 (1-p0)) + z_{power} sqrt(p (1-p)) )^2 / (p - p0)^2

    rounded up. ``None`` when rate == p0 (no n suffices). Ties make the true variance a
    little smaller than p(1-p), so this is slightly conservative for tie-heavy rounds.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"rate: must be in [0, 1], got {rate}")
    if abs(rate - p0) < 1e-12:
        return None
    za, zb = Z(1 - alpha / 2), Z(power)
    n = (za * math.sqrt(p0 * (1 - p0)) + zb * math.sqrt(rate * (1 - rate))) ** 2 / (rate - p0) ** 2
    return int(math.ceil(n - 1e-9))


@dataclass(frozen=True)
class WinRate:
    """Win rate of a candidate over a baseline: (wins + ties/2) / n with its statistics."""

    n: int
    wins: int
    losses: int
    ties: int
    rate: float
    ci_low: float
    ci_high: float
    p_value: float  # sign test, ties dropped
    n_needed: int | None  # comparisons to tell `rate` from 0.5 (alpha 0.05, power 0.8)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_outcomes(outcomes: Sequence[float]) -> np.ndarray:
    o = np.asarray(outcomes, dtype=float).reshape(-1)
    bad = ~np.isin(o, (0.0, 0.5, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"outcomes[{i}]: must be 1 (candidate), 0 (baseline) or 0.5 (tie), got {o[i]}")
    return o


def win_rate(outcomes: Sequence[float], *, confidence: float = 0.95, alpha: float = 0.05,
             power: float = 0.8) -> WinRate:
    """Win rate = (wins + ties/2) / n, Wilson CI on it, sign-test p (ties dropped), n needed."""
    o = _check_outcomes(outcomes)
    wins, losses = int((o == 1).sum()), int((o == 0).sum())
    ties = int(o.size - wins - losses)
    n = int(o.size)
    rate = (wins + ties / 2) / n if n else float("nan")
    lo, hi = wilson_interval(wins + ties / 2, n, confidence=confidence)
    return WinRate(n=n, wins=wins, losses=losses, ties=ties, rate=rate, ci_low=lo, ci_high=hi,
                   p_value=sign_test_p(wins, losses),
                   n_needed=n_needed(rate, alpha=alpha, power=power) if n else None)


def outcome_of(chosen: str | None, *, candidate: str, baseline: str) -> float:
    """Canonical outcome of one judgement: ``chosen`` is the preferred response id, None = tie."""
    if chosen is None:
        return 0.5
    if chosen == candidate:
        return 1.0
    if chosen == baseline:
        return 0.0
    raise ValueError(f"chosen: {chosen!r} is neither the candidate {candidate!r} nor the baseline {baseline!r}")


@dataclass(frozen=True)
class LengthControlled:
    """Win probability at zero length difference from a logistic fit on the length gap."""

    rate: float  # sigmoid(intercept): P(candidate preferred) when both are equally long
    ci_low: float
    ci_high: float
    slope_per_100_words: float  # log-odds change per 100 words of extra candidate length
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_logistic(x: np.ndarray, y: np.ndarray, *, weights: np.ndarray | None = None,
                 ridge: float = 1e-6, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Weighted logistic regression y ~ sigmoid(X b) by Newton-Raphson (IRLS).

    ``x``: (N, K) design (include a column of ones for an intercept); ``y`` in [0, 1] (a
    fractional response is the quasi-binomial fit, the same as splitting each tie into half
    a win and half a loss). A tiny ridge keeps the fit finite under perfect separation.
    Returns (coefficients (K,), covariance = inverse observed information (K, K)).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
    b = np.zeros(x.shape[1])
    eye = ridge * np.eye(x.shape[1])
    for _ in range(max_iter):
        p = 1 / (1 + np.exp(-(x @ b)))
        grad = x.T @ (w * (y - p)) - ridge * b
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + eye
        step = np.linalg.solve(hess, grad)
        b = b + step
        if np.max(np.abs(step)) < 1e-10:
            break
    p = 1 / (1 + np.exp(-(x @ b)))
    hess = (x * (w * p * (1 - p))[:, None]).T @ x + eye
    return b, np.linalg.inv(hess)


def length_controlled_win_rate(outcomes: Sequence[float], length_diff: Sequence[float], *,
                               confidence: float = 0.95) -> LengthControlled:
    """Length-controlled win rate (in the spirit of AlpacaEval-LC, Dubois et al. 2024).

    Fit ``logit P(candidate preferred) = a + b * d`` with d = candidate length - baseline
    length in words (ties as outcome 0.5), and report sigmoid(a): the win probability
    when both responses are equally long. The interval is sigmoid(a +- z se(a)) with se
    from the inverse Fisher information (Wald, delta method). If the raw rate is high only
    because the candidate writes more, ``rate`` falls towards 0.5 and the slope is positive.
    """
    o = _check_outcomes(outcomes)
    d = np.asarray(length_diff, dtype=float).reshape(-1)
    if d.size != o.size:
        raise ValueError(f"length_diff: has {d.size} entries, outcomes has {o.size}")
    if o.size == 0:
        return LengthControlled(float("nan"), 0.0, 1.0, 0.0, 0)
    x = np.column_stack([np.ones_like(d), d / 100.0])
    b, cov = fit_logistic(x, o)
    z = Z(1 - (1 - confidence) / 2)
    se = math.sqrt(max(cov[0, 0], 0.0))

    def sig(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    return LengthControlled(rate=sig(b[0]), ci_low=sig(b[0] - z * se), ci_high=sig(b[0] + z * se),
                            slope_per_100_words=float(b[1]), n=int(o.size))


def n_words(text: str) -> int:
    return len(text.split())


def per_topic(outcomes: Sequence[float], topics: Sequence[str], *, confidence: float = 0.95) -> dict[str, WinRate]:
    """Win rate per topic (sorted by topic name)."""
    o = _check_outcomes(outcomes)
    if len(topics) != o.size:
        raise ValueError(f"topics: has {len(topics)} entries, outcomes has {o.size}")
    t = np.asarray(topics, dtype=object)
    return {k: win_rate(o[t == k], confidence=confidence) for k in sorted(set(topics))}


@dataclass(frozen=True)
class ABResult:
    """Everything a blind A/B round reports."""

    overall: WinRate
    length_controlled: LengthControlled
    by_topic: dict[str, WinRate]
    candidate: str
    baseline: str
    # where it came from: the round (id, name, status, pairs judged, judgements per rater) and both models'
    # weights (models.hf.weights_fingerprint) when they were read; the gates check them against the
    # checkpoint and the baseline of the other evidence
    round: dict[str, Any] | None = None
    candidate_weights: str | None = None
    baseline_weights: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "baseline": self.baseline, "overall": self.overall.to_dict(),
                "length_controlled": self.length_controlled.to_dict(),
                "by_topic": {k: v.to_dict() for k, v in self.by_topic.items()},
                **({"round": self.round} if self.round else {}),
                **({"candidate_weights": self.candidate_weights} if self.candidate_weights else {}),
                **({"baseline_weights": self.baseline_weights} if self.baseline_weights else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ABResult:
        return cls(overall=WinRate(**d["overall"]), length_controlled=LengthControlled(**d["length_controlled"]),
                   by_topic={k: WinRate(**v) for k, v in d["by_topic"].items()},
                   candidate=d["candidate"], baseline=d["baseline"], round=d.get("round"),
                   candidate_weights=d.get("candidate_weights"), baseline_weights=d.get("baseline_weights"))


def ab_result(outcomes: Sequence[float], *, topics: Sequence[str], candidate_texts: Sequence[str],
              baseline_texts: Sequence[str], candidate: str = "candidate", baseline: str = "baseline",
              cfg: ABConfig | None = None) -> ABResult:
    """All A/B statistics from canonical outcomes and the two responses of each comparison."""
    cfg = cfg or ABConfig()
    diff = [n_words(a) - n_words(b) for a, b in zip(candidate_texts, baseline_texts, strict=True)]
    return ABResult(
        overall=win_rate(outcomes, confidence=cfg.confidence, alpha=cfg.alpha, power=cfg.power),
        length_controlled=length_controlled_win_rate(outcomes, diff, confidence=cfg.confidence),
        by_topic=per_topic(outcomes, topics, confidence=cfg.confidence),
        candidate=candidate, baseline=baseline)


# Type of a response generator: prompts -> one response text each.
Generate = Callable[[list[str]], list[str]]


# ---- the round flow (store + sampler) ---------------------------------------------------


@dataclass(frozen=True)
class ABQuery:
    """A held-out query for an A/B round."""

    id: str
    text: str
    topic: str = ""


def _hash(*parts: object) -> str:
    import hashlib

    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()


def generate_responses(model, tokenizer, queries: Sequence[ABQuery], cfg: ABConfig | None = None, *,
                       prompt_template: str = "User: {query}\nAssistant:", batch_size: int = 64) -> list[str]:
    """One sampled response per query (``cfg.temperature``, 0 = greedy), seeded by ``cfg.seed``.

    ``prompt_template``: a string with ``{query}``, or "chat" for the tokenizer's chat template."""
    import torch

    from preflab.models.sampling import sample

    cfg = cfg or ABConfig()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    from preflab.models.hf import render_query

    prompts = [render_query(tokenizer, q.text, prompt_template) for q in queries]
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        s = sample(model, tokenizer, prompts[start : start + batch_size], max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, top_p=cfg.top_p, generator=gen)
        out.extend(t.strip() for t in s.texts)
    return out


EMPTY_RESPONSE = "(no response)"


def store_ab_round(session, *, project_id: int, name: str, queries: Sequence[ABQuery], candidate_source: str,
                   baseline_source: str, candidate_texts: Sequence[str], baseline_texts: Sequence[str],
                   overlap: int = 1, seed: int = 0, guideline_version_id: int | None = None,
                   id_key: str | None = None) -> int:
    """Store prompts, both responses and one pair per query, and open an ``eval`` round.

    Response and pair ids, and which response is side ``a``, are hashed from ``id_key`` (default: the
    round's name) and the query id.

    Blindness: response and pair ids are opaque hashes, which response is canonical side
    ``a`` is drawn per pair (seeded), and model identity lives only in ``Response.source``
    (never shown to raters); the store randomises screen sides per rater. No planted
    duplicates in eval rounds. An empty response is stored as ``(no response)``.
    """
    from preflab.store import ops

    n = len(queries)
    if not n:
        raise ValueError("queries: an A/B round needs at least one query")
    if len(candidate_texts) != n or len(baseline_texts) != n:
        raise ValueError(f"texts: need one candidate and one baseline response per query ({n})")
    if candidate_source == baseline_source:
        raise ValueError(f"candidate_source: the same as the baseline ({baseline_source!r})")
    prompts, responses, pairs = [], [], []
    key = name if id_key is None else id_key
    for q, ct, bt in zip(queries, candidate_texts, baseline_texts, strict=True):
        prompts.append(ops.PromptIn(id=q.id, text=q.text, topic=q.topic))
        rc = "r_" + _hash(key, q.id, candidate_source)[:16]
        rb = "r_" + _hash(key, q.id, baseline_source)[:16]
        responses.append(ops.ResponseIn(id=rc, prompt_id=q.id, text=ct or EMPTY_RESPONSE, source=candidate_source))
        responses.append(ops.ResponseIn(id=rb, prompt_id=q.id, text=bt or EMPTY_RESPONSE, source=baseline_source))
        a, b = (rc, rb) if int(_hash("side", seed, key, q.id), 16) % 2 == 0 else (rb, rc)
        pairs.append(ops.PairIn(id="p_" + _hash(key, q.id)[:16], prompt_id=q.id, response_a_id=a, response_b_id=b))
    ops.add_prompts(session, project_id=project_id, prompts=prompts)
    ops.add_responses(session, project_id=project_id, responses=responses)
    ops.add_pairs(session, project_id=project_id, pairs=pairs)
    return ops.create_round(session, project_id=project_id, name=name, kind="eval", pair_ids=[p.id for p in pairs],
                            guideline_version_id=guideline_version_id, overlap=overlap, duplicate_rate=0.0,
                            routing="any", seed=seed,
                            meta={"candidate_source": candidate_source, "baseline_source": baseline_source})


def create_ab_round(session, *, project_id: int, name: str, queries: Sequence[ABQuery],
                    candidate: tuple[Any, Any, str], baseline: tuple[Any, Any, str], cfg: ABConfig | None = None,
                    prompt_template: str = "User: {query}\nAssistant:") -> int:
    """Generate both checkpoints' responses to ``queries`` and open a blind eval round.

    ``candidate`` / ``baseline``: ``(model, tokenizer, source label)``; the label (e.g. the
    checkpoint path) is how ``ab_result_from_round`` tells the two apart.
    """
    cfg = cfg or ABConfig()
    ct = generate_responses(candidate[0], candidate[1], queries, cfg, prompt_template=prompt_template)
    bt = generate_responses(baseline[0], baseline[1], queries, cfg, prompt_template=prompt_template)
    return store_ab_round(session, project_id=project_id, name=name, queries=queries, candidate_source=candidate[2],
                          baseline_source=baseline[2], candidate_texts=ct, baseline_texts=bt, overlap=cfg.overlap,
                          seed=cfg.seed)


def ab_result_from_round(session, round_id: int, candidate_source: str | None = None, *,
                         cfg: ABConfig | None = None) -> ABResult:
    """Read a round's judgements and compute the A/B statistics for the candidate.

    Every judgement is one outcome (planted duplicates excluded); with overlap > 1 the
    judgements of one pair are correlated and the interval is somewhat optimistic.
    ``candidate_source`` defaults to the one recorded when the round was created.
    """
    from preflab.store import ops

    rnd = ops.get_round(session, round_id=round_id)
    candidate_source = candidate_source or rnd.meta.get("candidate_source")
    if not candidate_source:
        if rnd.kind != "eval":
            raise ValueError(f"round {round_id}: {rnd.name!r} is a {rnd.kind} round, not a blind A/B round (`preflab "
                             "ab create` makes those)")
        raise ValueError(f"round {round_id}: no candidate_source given or recorded")
    rows = ops.round_judgements(session, round_id=round_id, include_duplicates=False)
    texts = {}
    if rows:
        for p in ops.list_pairs(session, project_id=rnd.project_id, pair_ids=sorted({r.pair_id for r in rows})):
            texts[p.response_a_id], texts[p.response_b_id] = p.response_a_text, p.response_b_text
    outcomes, topics, ct, bt = [], [], [], []
    baseline_source = rnd.meta.get("baseline_source", "")
    for r in rows:
        if r.source_a == candidate_source and r.source_b != candidate_source:
            cand, base = r.response_a_id, r.response_b_id
            baseline_source = r.source_b
        elif r.source_b == candidate_source and r.source_a != candidate_source:
            cand, base = r.response_b_id, r.response_a_id
            baseline_source = r.source_a
        else:
            raise ValueError(f"round {round_id}: pair {r.pair_id!r} has no response from {candidate_source!r} "
                             f"(sources {r.source_a!r}, {r.source_b!r})")
        outcomes.append(outcome_of(r.winner_id, candidate=cand, baseline=base))
        topics.append(r.topic)
        ct.append(texts[cand])
        bt.append(texts[base])
    res = ab_result(outcomes, topics=topics, candidate_texts=ct, baseline_texts=bt, candidate=candidate_source,
                    baseline=baseline_source, cfg=cfg)
    from pathlib import Path

    from preflab.models.hf import weights_fingerprint

    prog = ops.round_progress(session, round_id=round_id)

    # both models' weights as they are now (when their directories are here): the gates check them against
    # the checkpoint they judge, wherever it has moved since, and against the other evidence's baseline
    def weights(source: str) -> str | None:
        return weights_fingerprint(source) if source and Path(source).is_dir() else None

    by_rater: dict[str, int] = {}
    for r in rows:
        by_rater[r.rater_name] = by_rater.get(r.rater_name, 0) + 1
    return dataclasses.replace(res, round={"id": rnd.id, "name": rnd.name, "status": rnd.status,
                                           "pairs_judged": len({r.pair_id for r in rows}), "n_pairs": prog.n_items,
                                           "judgements_by_rater": dict(sorted(by_rater.items())),
                                           "sides": screen_sides(rows, candidate_source)},
                               candidate_weights=weights(candidate_source), baseline_weights=weights(baseline_source))


def screen_sides(rows, candidate_source: str) -> dict[str, Any]:  # noqa: ANN001 - store.ops.JudgementRow
    """Where the candidate was shown and which side raters picked. Sides are drawn per rater and pair,
    not balanced, so the candidate may sit left in, say, 32 of 80 showings; a rater who clicks one side
    then moves the win rate. ``left_picks`` of ``decided`` (ties left out) with the exact two-sided
    binomial p at 1/2 (``quality.consistency.side_preference``): a small p is position bias."""
    from preflab.quality.consistency import side_preference

    cand_left = sum((r.source_a if r.left_id == r.response_a_id else r.source_b) == candidate_source for r in rows)
    decided = [r for r in rows if r.winner_id is not None]
    left = sum(r.winner_id == r.left_id for r in decided)
    side = side_preference(left, len(decided))
    return {"candidate_left": cand_left, "n": len(rows), "left_picks": left, "decided": len(decided),
            "p_left": side.p_value}


def top_rater_share(result: ABResult) -> tuple[str, float] | None:
    """The rater who made the most of the round's judgements and their share (None without the counts):
    the Wilson interval treats judgements as independent, which one rater's taste is not."""
    counts = (result.round or {}).get("judgements_by_rater") or {}
    total = sum(counts.values())
    if not total:
        return None
    name = max(counts, key=lambda k: (counts[k], k))
    return name, counts[name] / total
