"""Simulated raters: the gold utility seen through a rubric, personal biases, noise, lapses.

A rater judging "A vs B" for a query:

1. perceives each text's utility: the gold weights of its style parts as the *rubric* lets
   them be seen, plus the rater's personal bias weights (likes confidence, likes formality...);
   - rubric ``"v1"`` (the original guidelines): on pricing nobody checks the price list; prices
     are judged from memory, which holds the old list (``V1_PRICE_MEMORY``: a stale price looks
     right, the current one doubtful, and neither the confident-and-stale nor the false-premise
     penalty is seen); confident tone is rewarded (+``V1_CONFIDENCE_BONUS``) everywhere;
   - rubric ``"v2"`` (the factual-accuracy rubric): facts are checked like the gold;
2. adds Bradley-Terry noise: a logistic draw times the rater's temperature (lower on their
   specialty topic). The draw is fixed per (rater, query, pair of texts), i.e. the rater's
   considered opinion of that item, so showing the item again gives the same opinion;
3. answers "tie" when the noisy difference is within ``tie_band``, else the better side;
4. lapses: with probability ``flip_rate`` the answer is flipped (a tie becomes a random side).
   Duplicates differ only through lapses, so consistency is c = (1-e)^2 + e^2 up to ties;
5. writes a rationale naming the style parts that drove the choice ("Gives the current figure
   ($30 per user per month) and is warmer": about the chosen answer, without a screen-side
   letter, since sides differ per rater) and takes a lognormal number of seconds.

The noise is drawn over the texts in a fixed (sorted) order, so which screen side a text is
on never changes the judgement. ``calibrate`` pulls bias weights toward the shared standard
(bias 0); ``DriftSchedule`` shifts them after the rater's N-th judgement.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from dataclasses import dataclass, field

from preflab.sandbox import gold
from preflab.sandbox.domain import FACTS, STYLE_AXES, TOPICS, Query, parse

RUBRICS = ("v1", "v2")
V1_CONFIDENCE_BONUS = 0.8  # the v1 guideline praised "confident, direct answers"
# Under v1 nobody checks prices against the price list; the agents judge them from memory, and
# their memory is the old list: a stale price looks right, the new one looks doubtful.
V1_PRICE_MEMORY = {"stale": "current", "current": "vague"}
FLIP_LOW, FLIP_HIGH = 0.02, 0.06  # lapse rates of the pool (tuned: see docs/calibration.md)

# Plain words for "the chosen text has <value>", per axis, used in rationales.
_PHRASES: dict[str, dict[str, str]] = {
    "factuality": {"current": "gives the current figure ({current})", "stale": "gives a specific figure ({stale})",
                   "vague": "avoids committing to a wrong figure"},
    "tone": {"warm": "is warmer", "neutral": "keeps a neutral, polite tone", "dismissive": "gets to the point"},
    "directness": {"direct": "answers directly", "hedged": "is appropriately cautious"},
    "formality": {"plain": "reads more naturally", "stilted": "sounds more professional and formal"},
    "confidence": {"confident": "sounds confident and sure", "none": "does not overclaim"},
    "padding": {"none": "has no filler", "padded": "shows we value the customer"},
}
_VAGUE_BEATEN = "gives a concrete answer instead of a vague one"


@dataclass(frozen=True)
class SimJudgement:
    choice: str  # 'a' | 'b' | 'tie' (screen sides of this showing)
    strength: int  # 0 (tie) .. 3 (much better)
    rationale: str
    seconds: float


@dataclass(frozen=True)
class DriftSchedule:
    """After the rater's ``after``-th judgement, add ``shift[axis][value]`` to their bias weights."""

    after: int
    shift: dict[str, dict[str, float]]


def _zero_bias() -> dict[str, dict[str, float]]:
    return {axis: {v: 0.0 for v in values} for axis, values in STYLE_AXES.items()}


def _unit(key: str) -> float:
    """A deterministic uniform in (0, 1) from a string key."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return (h + 0.5) / 2**64


@dataclass
class SimRater:
    """One simulated rater (a person with habits); ``judge`` is their only way to answer."""

    name: str
    specialty: str
    bias: dict[str, dict[str, float]] = field(default_factory=_zero_bias)
    temperature: float = 0.25 # Bradley-Terry noise scale off-specialty
    specialty_temperature: float = 0.15
    flip_rate: float = 0.04 # TRUE lapse probability per judgement (what duplicates estimate)
    tie_band: float = 0.08
    median_seconds: float = 45.0
    sigma_seconds: float = 0.45  # lognormal shape of seconds per judgement
    drift: DriftSchedule | None = None
    n_judged: int = 0
    calibrated: float = 0.0  # total pull toward the standard applied so far

    def __post_init__(self) -> None:
        if self.specialty not in TOPICS:
            raise ValueError(f"SimRater.specialty: must be one of {TOPICS}, got {self.specialty!r}")
        if not 0.0 <= self.flip_rate < 0.5:
            raise ValueError(f"SimRater.flip_rate: must be in [0, 0.5), got {self.flip_rate}")

    # ---- perception ---------------------------------------------------------------------------

    def contributions(self, query: Query, text: str, *, rubric: str) -> dict[str, float] | None:
        """Per-axis perceived utility of ``text`` (plus an ``"other"`` entry for interactions);
        None when the text is unparseable or about another fact."""
        if rubric not in RUBRICS:
            raise ValueError(f"rubric: must be one of {RUBRICS}, got {rubric!r}")
        parsed = parse(text)
        if parsed is None or parsed.fact_id != query.fact_id:
            return None
        s = parsed.style
        blind = rubric == "v1" and query.topic == "pricing"
        out = {}
        for axis in STYLE_AXES:
            value = getattr(s, axis)
            if blind and axis == "factuality" and value in V1_PRICE_MEMORY:
                value = V1_PRICE_MEMORY[value]  # judged from memory: the old price list
            out[axis] = gold.WEIGHTS[axis][value] + self.bias[axis][getattr(s, axis)]
        if rubric == "v1" and s.confidence == "confident":
            out["confidence"] += V1_CONFIDENCE_BONUS
        other = 0.0
        if not blind:
            if s.factuality == "stale" and s.confidence == "confident":
                other += gold.CONFIDENT_STALE
            if parsed.agrees_with_premise:
                other += gold.SYCOPHANCY
        out["other"] = other
        return out

    def perceived_utility(self, query: Query, text: str, *, rubric: str) -> float:
        c = self.contributions(query, text, rubric=rubric)
        if c is None:
            parsed = parse(text)
            return gold.UNPARSEABLE if parsed is None else gold.WRONG_FACT
        return sum(c.values())

    def effective_temperature(self, query: Query) -> float:
        return self.specialty_temperature if query.topic == self.specialty else self.temperature

    # ---- judging ------------------------------------------------------------------------------

    def judge(self, query: Query, text_a: str, text_b: str, *, rubric: str, rng: random.Random) -> SimJudgement:
        """Judge screen sides A and B of one showing; ``rng`` drives lapses and time only."""
        if self.drift is not None and self.n_judged == self.drift.after:
            for axis, shift in self.drift.shift.items():
                for value, w in shift.items():
                    self.bias[axis][value] += w
        self.n_judged += 1
        # considered opinion over the texts in sorted order (side-independent, fixed per item)
        x, y = sorted((text_a, text_b))
        u = _unit(f"{self.name}|{query.id}|{x}|{y}")
        noise = self.effective_temperature(query) * math.log(u / (1.0 - u))  # Logistic(0, T)
        d = self.perceived_utility(query, x, rubric=rubric) - self.perceived_utility(query, y, rubric=rubric) + noise
        winner = "tie" if abs(d) <= self.tie_band else (x if d > 0 else y)
        if rng.random() < self.flip_rate:  # a lapse
            if winner == "tie":
                winner = rng.choice((x, y))
            else:
                winner = y if winner == x else x
        if winner == "tie" or text_a == text_b:
            choice, strength = "tie", 0
        else:
            choice = "a" if winner == text_a else "b"
            strength = 1 if abs(d) < 1.0 else 2 if abs(d) < 2.2 else 3
        seconds = self.median_seconds * (0.8 if query.topic == self.specialty else 1.0)
        seconds *= math.exp(self.sigma_seconds * rng.gauss(0.0, 1.0)) * (1.15 if strength <= 1 else 1.0)
        return SimJudgement(choice, strength, self.rationale(query, text_a, text_b, choice, rubric=rubric),
                            round(seconds, 2))

    def rationale(self, query: Query, text_a: str, text_b: str, choice: str, *, rubric: str) -> str:
        """Plain words for what drove ``choice``: the axes where the chosen text gains most."""
        if choice == "tie":
            return "Both answers are about equally good; neither stands out."
        win, lose = (text_a, text_b) if choice == "a" else (text_b, text_a)
        cw = self.contributions(query, win, rubric=rubric)
        cl = self.contributions(query, lose, rubric=rubric)
        if cw is None:
            return "Seemed slightly better overall, though both miss the question."
        if cl is None:
            return "Actually answers the question that was asked."
        pw, pl = parse(win).style, parse(lose).style
        gains = sorted(((cw[a] - cl[a], a) for a in STYLE_AXES if getattr(pw, a) != getattr(pl, a)), reverse=True)
        fact = FACTS[query.fact_id]
        parts = []
        for gain, axis in gains:
            if gain <= 0.15 or len(parts) == 2:
                break
            value = getattr(pw, axis)
            if axis == "factuality" and pl.factuality == "vague":
                parts.append(_VAGUE_BEATEN)
            else:
                parts.append(_PHRASES[axis][value].format(current=fact.current, stale=fact.stale))
        if not parts:
            return "Seemed slightly better overall."
        text = " and ".join(parts)
        return text[0].upper() + text[1:] + "."

    # ---- calibration ---------------------------------------------------------------------------

    def calibrate(self, pull: float = 0.85) -> None:
        """Pull bias weights toward the shared standard (0): bias <- (1 - pull) * bias."""
        if not 0.0 <= pull <= 1.0:
            raise ValueError(f"calibrate.pull: must be in [0, 1], got {pull}")
        for axis in self.bias:
            for value in self.bias[axis]:
                self.bias[axis][value] *= 1.0 - pull
        self.calibrated = 1.0 - (1.0 - self.calibrated) * (1.0 - pull)

    def bias_norm(self) -> float:
        """Size of the personal bias (root sum of squares): 0 = the shared standard."""
        return math.sqrt(sum(w * w for axis in self.bias.values() for w in axis.values()))


SENIOR_NAMES = ("ana", "ben", "chloe", "dev", "eli")


def uncalibrated_pool(n: int, seed: int, *, bias_scale: float = 0.45, temperature: float = 0.25,
                      names: tuple[str, ...] | None = None) -> list[SimRater]:
    """``n`` raters with personal biases drawn N(0, bias_scale) per style value, specialties spread
    over the topics, lapse rates in [FLIP_LOW, FLIP_HIGH], median 35-60 s per judgement."""
    if n < 1:
        raise ValueError(f"uncalibrated_pool.n: must be >= 1, got {n}")
    rng = random.Random(f"raters:{seed}")
    topics = list(TOPICS)
    rng.shuffle(topics)
    out = []
    for i in range(n):
        bias = {axis: {v: rng.gauss(0.0, bias_scale) for v in values} for axis, values in STYLE_AXES.items()}
        name = names[i] if names and i < len(names) else f"rater{i + 1:02d}"
        out.append(SimRater(
            name=name,
            specialty=topics[i % len(topics)],
            bias=bias,
            temperature=temperature * rng.uniform(0.85, 1.15),
            specialty_temperature=temperature * 0.6,
            flip_rate=round(rng.uniform(FLIP_LOW, FLIP_HIGH), 3),
            median_seconds=rng.uniform(35.0, 60.0),
        ))
    return out


def default_pool(seed: int) -> list[SimRater]:
    """The story's five senior support agents, one specialty per topic, before calibration."""
    return uncalibrated_pool(5, seed, names=SENIOR_NAMES)


def sft_style_pairs(n: int, *, seed: int, split: str = "train") -> list[tuple[Query, str, str]]:
    """``n`` (query, first, second) pairs of SFT-style responses in two random styles
    (``compose(query, sample_style(rng))`` twice), the material of a calibration round."""
    from preflab.sandbox.domain import compose, generate_queries, sample_style

    rng = random.Random(f"pairs:{seed}:{split}")
    out = []
    for q in generate_queries(n, seed=seed, split=split):
        out.append((q, compose(q, sample_style(rng)), compose(q, sample_style(rng))))
    return out


def simulate_round(pool: list[SimRater], pairs: list[tuple[Query, str, str]], *, rubric: str,
                   seed: int) -> dict[int, dict[str, str]]:
    """Every rater judges every pair once on random screen sides, without a store.

    Returns ``labels[pair_index][rater] = 'first' | 'second' | 'tie'``: the canonical position
    of the chosen text in the pair (never the screen side).
    """
    rng = random.Random(f"round:{seed}")
    labels: dict[int, dict[str, str]] = {}
    for i, (q, first, second) in enumerate(pairs):
        row = {}
        for r in pool:
            swap = rng.random() < 0.5
            a, b = (second, first) if swap else (first, second)
            j = r.judge(q, a, b, rubric=rubric, rng=rng)
            if j.choice == "tie":
                row[r.name] = "tie"
            else:
                row[r.name] = "first" if (j.choice == "a") != swap else "second"
        labels[i] = row
    return labels


def simulate_stream(pool: list[SimRater], n_items: int, *, rubric: str, seed: int,
                    overlap: int = 3) -> list[dict]:
    """A collection stream without a store: each SFT-style pair is judged by ``overlap`` random
    raters of ``pool`` on random screen sides. Returns judgements in time order as dicts
    ``{item, rater, label ('first'|'second'|'tie'), rationale, seconds}``."""
    if not 1 <= overlap <= len(pool):
        raise ValueError(f"simulate_stream.overlap: must be in [1, {len(pool)}], got {overlap}")
    rng = random.Random(f"stream:{seed}")
    out = []
    for i, (q, first, second) in enumerate(sft_style_pairs(n_items, seed=seed)):
        for r in rng.sample(pool, overlap):
            swap = rng.random() < 0.5
            a, b = (second, first) if swap else (first, second)
            j = r.judge(q, a, b, rubric=rubric, rng=rng)
            label = "tie" if j.choice == "tie" else ("first" if (j.choice == "a") != swap else "second")
            out.append({"item": i, "rater": r.name, "label": label, "rationale": j.rationale,
                        "seconds": j.seconds})
    return out


# ---- acting through the store, like a person in the browser ----------------------------------


@functools.cache
def _queries_by_text() -> dict[str, Query]:
    from preflab.sandbox.domain import all_queries

    return {q.text: q for q in all_queries(include_gaps=True)}


def query_for_prompt(text: str) -> Query:
    """The sandbox query behind a stored prompt text (raw query or ``format_prompt`` form)."""
    raw = text
    if raw.startswith("User: ") and raw.endswith("\nAssistant:"):
        raw = raw[len("User: "): -len("\nAssistant:")]
    q = _queries_by_text().get(raw)
    if q is None:
        raise ValueError(f"prompt {text[:60]!r}: not a sandbox query")
    return q


def work_round(engine, *, round_id: int, raters: dict[int, SimRater], rubric: str, seed: int,  # noqa: ANN001
               max_tasks: int | None = None) -> int:
    """Simulated raters take turns through the store ops (next task -> judge -> submit), one
    transaction per step like the web app, until none gets a task. Returns judgements made."""
    from preflab.store import db, ops

    rng = random.Random(f"work:{seed}:{round_id}")
    made, active = 0, dict(raters)
    while active and (max_tasks is None or made < max_tasks):
        for rater_id, rater in list(active.items()):
            with db.session_scope(engine) as s:
                task = ops.next_task(s, round_id=round_id, rater_id=rater_id)
                if task is None:
                    del active[rater_id]
                    continue
                j = rater.judge(query_for_prompt(task.prompt_text), task.left_text, task.right_text,
                                rubric=rubric, rng=rng)
                ops.submit_judgement(s, assignment_id=task.assignment_id, rater_id=rater_id,
                                     choice={"a": "left", "b": "right", "tie": "tie"}[j.choice],
                                     strength=j.strength, rationale=j.rationale, time_on_task_s=j.seconds,
                                     idempotency_key=f"sim:{round_id}:{task.assignment_id}")
            made += 1
    return made
