"""The production simulator: weeks of support conversations and their outcomes.

Each simulated conversation takes a held-out query, asks a policy for a response (any
callable ``respond(queries) -> texts``: composed, sampled from a checkpoint, ...), scores
it with the hidden gold utility ``u`` and draws outcomes as noisy functions of ``u``:

    z ~ N(0, 1)                                    the customer's mood / case difficulty
    escalated ~ Bernoulli(sigmoid(a + b*u + mood_sd*z))
    csat = clip(round(c0 + c1*u - drop*escalated - csat_mood*z + e), 1, 5),  e ~ N(0, csat_sd)
    handle_min = exp(log(handle_base_min) + handle_slope*u + 0.15*z + handle_sd*n1)
                 + escalated * exp(log(handle_escalation_min) + handle_sd*n2)

(a, b) and (c0, c1) are *calibrated*, not guessed: they solve, exactly over the style
distribution (Gauss-Hermite over z), for the story's anchors: answers in the SFT style mix
(``domain.SFT_STYLE_MIX``) give ``sft_escalation`` (31%) and ``sft_csat`` (3.6); answers in
``GOOD_STYLE_MIX`` (what a successful RLHF pass makes: current facts, warm, direct, plain)
give ``good_escalation`` (19%) and ``good_csat`` (4.1). Everything is seeded.

The logs have the columns ``preflab outcomes import`` reads (``LOG_COLUMNS``) plus
``topic`` and ``query_id``; only the production *outcomes* are simulated, never their
analysis (``preflab/report/outcomes.py`` treats these logs like real ones).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from preflab.config import check, field_doc
from preflab.sandbox.domain import (
    FACTS,
    SFT_STYLE_MIX,
    STYLE_AXES,
    Query,
    Style,
    all_styles,
    compose,
    format_prompt,
    generate_queries,
    make_query,
    parse,
    sample_style,
)
from preflab.sandbox.gold import gold_utility, utility_of

# What a successful RLHF pass produces (the calibration anchor for "good answers").
GOOD_STYLE_MIX: dict[str, dict[str, float]] = {
    "tone": {"warm": 0.75, "neutral": 0.22, "dismissive": 0.03},
    "directness": {"direct": 0.90, "hedged": 0.10},
    "factuality": {"current": 0.90, "stale": 0.04, "vague": 0.06},
    "formality": {"plain": 0.90, "stilted": 0.10},
    "confidence": {"none": 0.70, "confident": 0.30},
    "padding": {"none": 0.85, "padded": 0.15},
}

LOG_COLUMNS = ("conversation_id", "model_version", "escalated", "csat", "handle_time_min", "timestamp")

Respond = Callable[[list[Query]], list[str]]


@dataclass
class ProductionConfig:
    """Simulated production traffic and its outcome model."""

    conversations_per_week: int = field_doc(4000, "Conversations per simulated week.")
    weeks: int = field_doc(3, "Weeks to simulate per model version.")
    start: str = field_doc("2026-01-05", "ISO date of the first simulated week's Monday.")
    seed: int = field_doc(0, "Seed of queries, timestamps and outcome noise.")
    false_premise_rate: float = field_doc(0.1, "Share of customers who assert a stale fact.")
    sft_escalation: float = field_doc(0.31, "Calibration anchor: escalation rate of SFT-mix answers.")
    good_escalation: float = field_doc(0.19, "Calibration anchor: escalation rate of GOOD_STYLE_MIX answers.")
    sft_csat: float = field_doc(3.6, "Calibration anchor: mean CSAT (1-5) of SFT-mix answers.")
    good_csat: float = field_doc(4.1, "Calibration anchor: mean CSAT (1-5) of GOOD_STYLE_MIX answers.")
    mood_sd: float = field_doc(1.0, "SD of the per-conversation mood term in the escalation logit.")
    csat_sd: float = field_doc(0.9, "SD of the CSAT noise before rounding.")
    csat_mood: float = field_doc(0.3, "How much mood lowers CSAT (per SD).")
    escalation_csat_drop: float = field_doc(0.8, "CSAT points lost when a conversation is escalated.")
    handle_base_min: float = field_doc(6.0, "Median bot handle time in minutes at utility 0.")
    handle_slope: float = field_doc(-0.08, "Change of log handle time per unit of gold utility.")
    handle_escalation_min: float = field_doc(14.0, "Median extra minutes of a human hand-off.")
    handle_sd: float = field_doc(0.35, "Log-normal sigma of handle times.")

    def validate(self) -> None:
        w = "ProductionConfig"
        check(self.conversations_per_week >= 1, f"{w}.conversations_per_week", "must be >= 1")
        check(self.weeks >= 1, f"{w}.weeks", "must be >= 1")
        try:
            datetime.fromisoformat(self.start)
        except ValueError:
            check(False, f"{w}.start", f"must be an ISO date, got {self.start!r}")
        check(0 <= self.false_premise_rate <= 1, f"{w}.false_premise_rate", "must be in [0, 1]")
        for name in ("sft_escalation", "good_escalation"):
            check(0 < getattr(self, name) < 1, f"{w}.{name}", "must be in (0, 1)")
        check(self.good_escalation < self.sft_escalation, f"{w}.good_escalation", "must be below sft_escalation")
        for name in ("sft_csat", "good_csat"):
            check(1 < getattr(self, name) < 5, f"{w}.{name}", "must be in (1, 5)")
        check(self.good_csat > self.sft_csat, f"{w}.good_csat", "must be above sft_csat")
        for name in ("mood_sd", "csat_sd", "handle_sd", "handle_base_min", "handle_escalation_min"):
            check(getattr(self, name) > 0, f"{w}.{name}", "must be > 0")


@dataclass(frozen=True)
class OutcomeParams:
    """The calibrated coefficients of the outcome model (see the module docstring)."""

    a: float
    b: float
    c0: float
    c1: float


@dataclass
class Conversation:
    """One row of a production log."""

    conversation_id: str
    model_version: str
    escalated: int
    csat: int
    handle_time_min: float
    timestamp: str
    topic: str
    query_id: str


# ---- calibration ------------------------------------------------------------------------

def style_mix_utilities(mix: dict[str, dict[str, float]], *, false_premise_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """The exact distribution of gold utility for answers in style ``mix``: (values, weights).

    Utility depends on the query only through the false premise, so one plain and one
    false-premise query of a fact cover every case.
    """
    fact = FACTS["price_team"]
    plain, premise = make_query(fact, 0, 0), make_query(fact, 0, 0, false_premise=True)
    values, weights = [], []
    for style in all_styles():
        p = math.prod(mix[axis][getattr(style, axis)] for axis in STYLE_AXES)
        if p == 0:
            continue
        for q, pq in ((plain, 1 - false_premise_rate), (premise, false_premise_rate)):
            if pq == 0:
                continue
            values.append(utility_of(q, parse(compose(q, style))))
            weights.append(p * pq)
    return np.asarray(values), np.asarray(weights) / np.sum(weights)


_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(40)  # E[f(z)], z ~ N(0,1) = sum w f(x) / sqrt(2 pi)
_GH_W = _GH_W / _GH_W.sum()


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def expected_escalation(a: float, b: float, u: np.ndarray, w: np.ndarray, mood_sd: float) -> float:
    """E[sigmoid(a + b u + mood_sd z)] over the utility distribution and z ~ N(0,1)."""
    p = _sigmoid(a + b * u[:, None] + mood_sd * _GH_X[None, :])  # (U, Z)
    return float(w @ p @ _GH_W)


def _expected_rounded(m: np.ndarray, sd: float) -> np.ndarray:
    """E[clip(round(m + sd e), 1, 5)] = 1 + sum_{k=1..4} P(m + sd e >= k + 1/2)."""
    from scipy.stats import norm

    return 1.0 + sum(norm.cdf((m - k - 0.5) / sd) for k in range(1, 5))


def expected_csat(p: OutcomeParams, u: np.ndarray, w: np.ndarray, cfg: ProductionConfig) -> float:
    """Mean CSAT over the utility distribution, z, the escalation draw and the CSAT noise."""
    z = _GH_X[None, :]
    pe = _sigmoid(p.a + p.b * u[:, None] + cfg.mood_sd * z)  # (U, Z)
    m = p.c0 + p.c1 * u[:, None] - cfg.csat_mood * z
    e = pe * _expected_rounded(m - cfg.escalation_csat_drop, cfg.csat_sd) + (1 - pe) * _expected_rounded(m, cfg.csat_sd)
    return float(w @ e @ _GH_W)


def calibrate(cfg: ProductionConfig) -> OutcomeParams:
    """Solve (a, b) and then (c0, c1) so both style mixes hit their anchors exactly."""
    return _calibrate(cfg.false_premise_rate, cfg.sft_escalation, cfg.good_escalation, cfg.sft_csat,
                      cfg.good_csat, cfg.mood_sd, cfg.csat_sd, cfg.csat_mood, cfg.escalation_csat_drop)


@functools.lru_cache(maxsize=16)
def _calibrate(fpr, sft_esc, good_esc, sft_csat, good_csat, mood_sd, csat_sd, csat_mood, drop) -> OutcomeParams:
    from scipy.optimize import fsolve

    cfg = ProductionConfig(false_premise_rate=fpr, sft_escalation=sft_esc, good_escalation=good_esc,
                           sft_csat=sft_csat, good_csat=good_csat, mood_sd=mood_sd, csat_sd=csat_sd,
                           csat_mood=csat_mood, escalation_csat_drop=drop)
    us, ws = style_mix_utilities(SFT_STYLE_MIX, false_premise_rate=fpr)
    ug, wg = style_mix_utilities(GOOD_STYLE_MIX, false_premise_rate=fpr)

    def esc(x):
        return [expected_escalation(x[0], x[1], us, ws, mood_sd) - sft_esc,
                expected_escalation(x[0], x[1], ug, wg, mood_sd) - good_esc]

    (a, b), info, ok, msg = fsolve(esc, [-1.0, -0.2], full_output=True)
    if ok != 1 or max(abs(v) for v in esc([a, b])) > 1e-6:
        raise ValueError(f"ProductionConfig: escalation anchors cannot be met ({msg})")

    def sat(x):
        p = OutcomeParams(a, b, x[0], x[1])
        return [expected_csat(p, us, ws, cfg) - sft_csat, expected_csat(p, ug, wg, cfg) - good_csat]

    (c0, c1), info, ok, msg = fsolve(sat, [3.5, 0.2], full_output=True)
    if ok != 1 or max(abs(v) for v in sat([c0, c1])) > 1e-6:
        raise ValueError(f"ProductionConfig: CSAT anchors cannot be met ({msg})")
    return OutcomeParams(float(a), float(b), float(c0), float(c1))


# ---- simulation -------------------------------------------------------------------------

def draw_outcomes(utilities: Sequence[float], params: OutcomeParams, cfg: ProductionConfig,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(escalated 0/1, csat 1..5, handle minutes) for conversations with gold ``utilities``."""
    u = np.asarray(utilities, dtype=float)
    n = len(u)
    z = rng.standard_normal(n)
    escalated = (rng.random(n) < _sigmoid(params.a + params.b * u + cfg.mood_sd * z)).astype(int)
    latent = params.c0 + params.c1 * u - cfg.escalation_csat_drop * escalated - cfg.csat_mood * z
    csat = np.clip(np.rint(latent + cfg.csat_sd * rng.standard_normal(n)), 1, 5).astype(int)
    bot = np.exp(math.log(cfg.handle_base_min) + cfg.handle_slope * u + 0.15 * z + cfg.handle_sd * rng.standard_normal(n))
    human = np.exp(math.log(cfg.handle_escalation_min) + cfg.handle_sd * rng.standard_normal(n))
    return escalated, csat, np.round(bot + escalated * human, 2)


def simulate_production(respond: Respond, *, model_version: str, cfg: ProductionConfig | None = None,
                        first_week: int = 0) -> list[Conversation]:
    """``cfg.weeks`` weeks of conversations answered by ``respond``, from week ``first_week``.

    ``respond(queries)`` returns one response text per query (the policy under test).
    Queries come from the held-out split, so no policy has trained on them.
    """
    cfg = cfg or ProductionConfig()
    cfg.validate()
    params = calibrate(cfg)
    start = datetime.fromisoformat(cfg.start).replace(tzinfo=UTC)
    rows: list[Conversation] = []
    for week in range(first_week, first_week + cfg.weeks):
        queries = generate_queries(cfg.conversations_per_week, seed=cfg.seed * 1009 + week, split="heldout",
                                   false_premise_rate=cfg.false_premise_rate)
        texts = respond(queries)
        if len(texts) != len(queries):
            raise ValueError(f"respond: returned {len(texts)} texts for {len(queries)} queries")
        rng = np.random.default_rng([cfg.seed, week, 7])
        esc, csat, handle = draw_outcomes([gold_utility(q, t) for q, t in zip(queries, texts, strict=True)],
                                          params, cfg, rng)
        offsets = np.sort(rng.uniform(0, 7 * 86400, len(queries)))
        for i, q in enumerate(queries):
            ts = start + timedelta(weeks=week, seconds=float(offsets[i]))
            rows.append(Conversation(f"{model_version}-w{week:02d}-{i:05d}", model_version, int(esc[i]),
                                     int(csat[i]), float(handle[i]), ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                     q.topic, q.id))
    return rows


def style_policy(mix: dict[str, dict[str, float]], *, seed: int = 0) -> Respond:
    """A policy that answers every query with a composed response in a random style from ``mix``."""
    rng = random.Random(f"style_policy:{seed}")

    def respond(queries: list[Query]) -> list[str]:
        return [compose(q, sample_style(rng, mix)) for q in queries]

    return respond


def sampling_policy(model, tokenizer, *, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                    batch_size: int = 128, seed: int = 0) -> Respond:
    """A policy that samples one response per query from a causal LM (a checkpoint in production).

    Prompts use ``domain.format_prompt``; batches of ``batch_size``; seeded torch generator.
    """
    import torch

    from preflab.models.sampling import sample

    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)

    def respond(queries: list[Query]) -> list[str]:
        out: list[str] = []
        with torch.no_grad():
            for i in range(0, len(queries), batch_size):
                prompts = [format_prompt(q.text) for q in queries[i:i + batch_size]]
                s = sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, generator=gen)
                out += [t.strip() for t in s.texts]
        return out

    return respond


def cached_policy(respond: Respond, *, samples_per_query: int = 8, seed: int = 0) -> Respond:
    """Answer from a pool of ``samples_per_query`` responses per distinct query text.

    Production repeats query texts (the held-out pool has a few hundred), so sampling a
    checkpoint once per conversation (4,000 a week) wastes compute: this draws each answer
    uniformly from k samples of the policy for that text, sampled once on first sight.
    The outcome noise stays independent per conversation; only the response distribution
    is approximated by k draws.
    """
    if samples_per_query < 1:
        raise ValueError(f"samples_per_query: must be >= 1, got {samples_per_query}")
    pool: dict[str, list[str]] = {}
    rng = random.Random(f"cached_policy:{seed}")

    def answer(queries: list[Query]) -> list[str]:
        new = list({q.text: q for q in queries if q.text not in pool}.values())
        if new:
            texts = respond([q for q in new for _ in range(samples_per_query)])
            if len(texts) != len(new) * samples_per_query:
                raise ValueError(f"respond: returned {len(texts)} texts for {len(new) * samples_per_query} queries")
            for i, q in enumerate(new):
                pool[q.text] = texts[i * samples_per_query:(i + 1) * samples_per_query]
        return [rng.choice(pool[q.text]) for q in queries]

    return answer


def fixed_style_policy(style: Style) -> Respond:
    """A policy that always answers in one style (e.g. the gold-best style, for bounds)."""
    return lambda queries: [compose(q, style) for q in queries]


def write_production_log(rows: Sequence[Conversation], path: str | Path) -> Path:
    """Write ``rows`` as CSV (``.csv``) or JSON lines (``.jsonl``), LOG_COLUMNS first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(asdict(rows[0]) if rows else LOG_COLUMNS))
            w.writeheader()
            for r in rows:
                w.writerow(asdict(r))
    elif path.suffix == ".jsonl":
        with path.open("w") as f:
            for r in rows:
                f.write(json.dumps(asdict(r)) + "\n")
    else:
        raise ValueError(f"{path}: unknown log format (use .csv or .jsonl)")
    return path
