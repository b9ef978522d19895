"""Ground truth of a sandbox run: gold-based numbers written to ``RUN/truth.json``.

Measured figures (kappa, RM accuracy on rater labels, blind win rate) are what a real
project sees. In the sandbox we also know the hidden gold preference, so we can say how
far the measured figures are from the truth. The report reads only the JSON this module
writes; it never calls the gold itself. Shapes are documented in ``docs/report.md``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from preflab.sandbox.domain import Query, parse
from preflab.sandbox.gold import gold_utility, is_correct

STATEMENT = (
    "Sandbox run: the support domain, the raters (their labels, rationales and time on task) and the "
    "production traffic and its outcomes are simulated. The hidden gold preference is known only to the "
    "simulator and to this panel. The store, web app, trainers, evaluators and statistics all ran for real."
)


def _mean_ci(xs: Sequence[float]) -> tuple[float, list[float]]:
    """Mean with a normal-approximation 95% CI (mean +- 1.96 s / sqrt(n))."""
    n = len(xs)
    m = math.fsum(xs) / n
    if n < 2:
        return m, [m, m]
    s = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))
    return m, [m - 1.96 * s / math.sqrt(n), m + 1.96 * s / math.sqrt(n)]


def policy_truth(name: str, queries: Sequence[Query], texts: Sequence[str]) -> dict:
    """Gold utility of a policy's responses (mean, CI), correctness, confident-wrong and sycophancy."""
    if len(queries) != len(texts) or not queries:
        raise ValueError(f"policy_truth({name}): need one text per query, got {len(texts)} for {len(queries)}")
    utils = [gold_utility(q, t) for q, t in zip(queries, texts, strict=True)]
    parsed = [parse(t) for t in texts]
    correct = [is_correct(q, t) for q, t in zip(queries, texts, strict=True)]
    conf_wrong = [p is not None and p.style.confidence == "confident" and not c for p, c in zip(parsed, correct, strict=True)]
    probes = [(q, p) for q, p in zip(queries, parsed, strict=True) if q.false_premise]
    by_topic: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(queries):
        by_topic[q.topic].append(i)
    mean, ci = _mean_ci(utils)
    return {
        "name": name,
        "n": len(texts),
        "gold_utility": mean,
        "gold_utility_ci": ci,
        "correct_rate": sum(correct) / len(correct),
        "confident_wrong_rate": sum(conf_wrong) / len(conf_wrong),
        "unparseable_rate": sum(p is None for p in parsed) / len(parsed),
        "sycophancy_rate": (sum(bool(p and p.agrees_with_premise) for _, p in probes) / len(probes)) if probes else None,
        "by_topic": {t: {"n": len(ix), "gold_utility": math.fsum(utils[i] for i in ix) / len(ix),
                         "correct_rate": sum(correct[i] for i in ix) / len(ix)} for t, ix in sorted(by_topic.items())},
    }


def win_rate_truth(candidate: str, baseline: str, queries: Sequence[Query], cand_texts: Sequence[str],
                   base_texts: Sequence[str], *, measured: float | None = None) -> dict:
    """Gold win rate of candidate over baseline on the same queries: (wins + ties/2) / n.

    ``expected_preference`` is the mean Bradley-Terry probability sigmoid(u_c - u_b): the
    win rate noiseless-but-human raters would produce in expectation.
    """
    if not (len(queries) == len(cand_texts) == len(base_texts)) or not queries:
        raise ValueError("win_rate_truth: need one candidate and one baseline text per query")
    wins = ties = 0
    bt = []
    for q, c, b in zip(queries, cand_texts, base_texts, strict=True):
        d = gold_utility(q, c) - gold_utility(q, b)
        wins += d > 0
        ties += d == 0
        bt.append(1 / (1 + math.exp(-d)))
    n = len(queries)
    return {"candidate": candidate, "baseline": baseline, "n": n, "gold_win_rate": (wins + ties / 2) / n,
            "gold_ties": ties / n, "expected_preference": math.fsum(bt) / n, "measured_win_rate": measured}


def reward_model_truth(name: str, pairs: Iterable[tuple[Query, str, str, float]], *,
                       measured_accuracy: float | None = None) -> dict:
    """Gold accuracy of a reward model on labelled pairs ``(query, chosen, rejected, r_chosen - r_rejected)``.

    ``gold_accuracy``: share of pairs with a gold difference where the RM orders them like
    gold; ``label_gold_agreement``: share where the raters' label (chosen) agrees with gold,
    i.e. how good the labels the RM learned from were.
    """
    n = agree_rm = agree_label = 0
    for q, chosen, rejected, margin in pairs:
        d = gold_utility(q, chosen) - gold_utility(q, rejected)
        if d == 0:
            continue
        n += 1
        agree_rm += (margin > 0) == (d > 0)
        agree_label += d > 0
    if n == 0:
        raise ValueError(f"reward_model_truth({name}): no pair has a gold difference")
    return {"name": name, "n": n, "gold_accuracy": agree_rm / n, "label_gold_agreement": agree_label / n,
            "measured_accuracy": measured_accuracy}


def label_ceiling(items: Iterable[tuple[Query, str, str, object, str]]) -> dict:
    """The best accuracy any reward model could reach on these labels (sandbox only).

    ``items``: ``(query, chosen, rejected, rater, rubric)`` for every strict held-out pair,
    ``rater`` the ``sandbox.raters.SimRater`` who gave the label, configured as they were
    then (bias, temperature, lapse rate). The best model knows each rater's noise-free
    perceived utility u; it cannot know the rater's close-call noise (Logistic(0, T), fixed per
    item, so duplicates never reveal it) nor their lapses (rate e). For a pair with
    d = u(chosen) - u(rejected) it picks the side u prefers, and agrees with the label with
    probability (1 - e) s + e (1 - s), s = sigmoid(|d| / T) (one half when d = 0):

    - ``expected``: the mean of that probability (what the best model scores on average);
    - ``observed``: the share of these labels the best model's picks agree with (a tie d = 0
      counts one half): the same, on the labels this run happened to draw;
    - ``one_minus_lapse``: the mean of 1 - e, what the duplicate-based ceiling estimates.
    """
    n = 0
    expected = observed = no_lapse = 0.0
    for q, chosen, rejected, rater, rubric in items:
        d = rater.perceived_utility(q, chosen, rubric=rubric) - rater.perceived_utility(q, rejected, rubric=rubric)
        e, t = rater.flip_rate, rater.effective_temperature(q)
        s = 1.0 / (1.0 + math.exp(-abs(d) / t))
        n += 1
        expected += (1 - e) * s + e * (1 - s)
        observed += 0.5 if d == 0 else float(d > 0)
        no_lapse += 1 - e
    if n == 0:
        raise ValueError("label_ceiling: no pairs")
    return {"n": n, "expected": expected / n, "observed": observed / n, "one_minus_lapse": no_lapse / n}


def rater_pool_truth(pool: Iterable) -> list[dict]:
    """The true parameters of simulated raters (``sandbox.raters.SimRater``), JSON-able.

    Every numeric/str attribute is kept; bias tables keep only non-zero weights; a drift
    schedule is kept as a dict.
    """
    import dataclasses

    out = []
    for r in pool:
        fields = dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(vars(r))
        row: dict = {}
        for k, v in fields.items():
            if k == "bias" and isinstance(v, dict):
                row[k] = {f"{axis}.{val}": w for axis, vals in v.items() for val, w in
                          (vals.items() if isinstance(vals, dict) else [("", vals)]) if w}
            elif isinstance(v, (int, float, str, bool, dict)) or v is None:
                row[k] = v
        out.append(row)
    return out


def write_truth(run_dir: str | Path, *, policies: Sequence[dict] = (), reward_models: Sequence[dict] = (),
                win_rates: Sequence[dict] = (), raters: Sequence[dict] = (), outcomes: dict | None = None,
                statement: str = STATEMENT) -> Path:
    """Write ``RUN/truth.json`` (see docs/report.md for the shape)."""
    out = Path(run_dir) / "truth.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"simulated": True, "statement": statement, "policies": list(policies),
               "reward_models": list(reward_models), "win_rates": list(win_rates), "raters": list(raters),
               "outcomes": outcomes}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out
