"""Before/after statistics of a calibration workshop (pure; the flow is collect/workshop.py).

A round's label table (``labels[pair][rater] = 'a' | 'b' | 'tie'``, canonical order of the
pair, never screen sides) gives: mean pairwise Cohen's kappa, Fleiss' kappa, Krippendorff's
alpha and raw agreement, each with a percentile bootstrap 95% CI over items; per rater the
agreement with the others' majority and their mean kappa with the others. Two rounds give
the change of each figure; the CI of a change resamples each round's items independently
(the rounds are on different pairs): quantiles of (after replicate - before replicate).
"Who moved": raters sorted by the change of their mean kappa with the others.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from preflab.quality.agreement import (
    MIN_SHARED,
    LabelMatrix,
    LabelTable,
    agreement_with_reference,
    encode,
    fleiss_kappa,
    krippendorff_alpha,
    mean_pairwise_kappa,
    pairwise_kappa,
    percent_agreement,
)
from preflab.quality.bootstrap import bootstrap_ci, bootstrap_replicates

STATISTICS: dict[str, Callable[[LabelMatrix], float]] = {
    "mean_pairwise_kappa": mean_pairwise_kappa,
    "fleiss_kappa": fleiss_kappa,
    "krippendorff_alpha": krippendorff_alpha,
    "percent_agreement": percent_agreement,
}


def round_stats(labels: LabelTable | LabelMatrix, *, n_boot: int = 1000, seed: int = 0,
                min_shared: int = MIN_SHARED) -> dict:
    """Agreement figures of one round with bootstrap CIs, and per-rater figures (JSON-able).

    The mean pairwise kappa takes the rater pairs sharing >= ``min_shared`` items
    (``PairwiseKappa.mean_detail``); its entry says how many pairs entered and how many were left
    out, and when none qualifies its value and interval are None with the reason."""
    m = encode(labels)
    pk = pairwise_kappa(m)
    mean = pk.mean_detail(min_shared)
    if mean.value is None:  # no pair qualifies: "n/a" with the reason
        kappa = {"value": None, "low": None, "high": None, "level": 0.95, "n_boot": 0, "n_failed": 0}
    else:
        kappa = bootstrap_ci(m, functools.partial(mean_pairwise_kappa, min_shared=min_shared), n_boot=n_boot,
                             seed=seed).to_dict()
    stats = {"mean_pairwise_kappa": kappa | {k: v for k, v in mean.to_dict().items() if k != "value"}}
    stats |= {name: bootstrap_ci(m, fn, n_boot=n_boot, seed=seed).to_dict()
              for name, fn in STATISTICS.items() if name != "mean_pairwise_kappa"}
    maj = agreement_with_reference(m)
    mk = {r: pk.rater_mean(i) for i, r in enumerate(pk.raters)}
    raters = {str(r): {"agreement_with_majority": maj[r].agreement, "n_compared": maj[r].n,
                       "mean_kappa_with_others": mk[r]} for r in m.raters}
    return {"n_items": len(m.items), "n_raters": len(m.raters), "statistics": stats, "raters": raters,
            "pairwise_kappa": {"raters": [str(r) for r in pk.raters],
                               "matrix": [[None if np.isnan(v) else float(v) for v in row] for row in pk.matrix]}}


def change_ci(before: LabelTable | LabelMatrix, after: LabelTable | LabelMatrix,
              statistic: Callable[[LabelMatrix], float], *, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict:
    """after - before with a 95% CI from independent item bootstraps of the two rounds."""
    b, a = encode(before), encode(after)
    rb, _ = bootstrap_replicates(b, statistic, n_boot=n_boot, seed=seed)
    ra, _ = bootstrap_replicates(a, statistic, n_boot=n_boot, seed=seed + 1)
    k = min(len(ra), len(rb))
    diff = ra[:k] - rb[:k]
    value = float(statistic(a) - statistic(b))
    if k == 0:
        return {"value": value, "low": value, "high": value, "level": level}
    lo, hi = np.quantile(diff, [(1 - level) / 2, (1 + level) / 2])
    return {"value": value, "low": float(lo), "high": float(hi), "level": level}


def before_after(before: LabelTable | LabelMatrix, after: LabelTable | LabelMatrix, *, n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """The workshop report's numbers: both rounds, each figure's change with a CI, who moved."""
    rb, ra = round_stats(before, n_boot=n_boot, seed=seed), round_stats(after, n_boot=n_boot, seed=seed)
    changes = {name: change_ci(before, after, fn, n_boot=n_boot, seed=seed) for name, fn in STATISTICS.items()}
    movers = []
    for r in sorted(set(rb["raters"]) | set(ra["raters"])):
        kb = rb["raters"].get(r, {}).get("mean_kappa_with_others")
        ka = ra["raters"].get(r, {}).get("mean_kappa_with_others")
        gb = rb["raters"].get(r, {}).get("agreement_with_majority")
        ga = ra["raters"].get(r, {}).get("agreement_with_majority")
        movers.append({"rater": r, "kappa_before": kb, "kappa_after": ka,
                       "kappa_change": None if kb is None or ka is None else ka - kb,
                       "majority_before": gb, "majority_after": ga,
                       "majority_change": None if gb is None or ga is None else ga - gb})
    movers.sort(key=lambda x: -(x["kappa_change"] if x["kappa_change"] is not None else -np.inf))
    return {"before": rb, "after": ra, "change": changes, "movers": movers}


FEW_ITEMS = 5


def few_items(stats: Mapping, min_items: int = FEW_ITEMS) -> dict[str, int]:
    """Raters of a :func:`round_stats` result compared with the others on fewer than ``min_items``
    items: their own figures rest on too little to read (the round's mean kappa weighs each pair of
    raters by the items it shares, so they move it little)."""
    return {r: x["n_compared"] for r, x in stats["raters"].items() if x["n_compared"] < min_items}


def few_items_note(stats: Mapping, round_name: str) -> str | None:
    few = few_items(stats)
    if not few:
        return None
    names = ", ".join(f"{r} ({n})" for r, n in sorted(few.items(), key=lambda kv: kv[1]))
    return (f"{round_name}: {names} shared fewer than {FEW_ITEMS} items with the others; their own figures rest on "
            "too little to read")


def _f(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def report_markdown(report: Mapping, *, title: str = "Calibration workshop: before / after") -> str:
    """The :func:`before_after` report as Markdown."""
    b, a, ch = report["before"], report["after"], report["change"]
    lines = [f"# {title}", "",
             f"Before: {b['n_items']} pairs x {b['n_raters']} raters. After: {a['n_items']} pairs x "
             f"{a['n_raters']} raters. Intervals: bootstrap 95% over pairs.", "",
             "| statistic | before | after | change |", "| --- | --- | --- | --- |"]
    for name in STATISTICS:
        sb, sa, c = b["statistics"][name], a["statistics"][name], ch[name]
        lines.append(f"| {name.replace('_', ' ')} | {_f(sb['value'])} [{_f(sb['low'])}, {_f(sb['high'])}] | "
                     f"{_f(sa['value'])} [{_f(sa['low'])}, {_f(sa['high'])}] | "
                     f"{c['value']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] |")
    lines += ["", "## Who moved", "",
              "| rater | mean kappa with others (before -> after) | agreement with majority (before -> after) |",
              "| --- | --- | --- |"]
    for m in report["movers"]:
        lines.append(f"| {m['rater']} | {_f(m['kappa_before'])} -> {_f(m['kappa_after'])} | "
                     f"{_f(m['majority_before'])} -> {_f(m['majority_after'])} |")
    notes = [n for n in (few_items_note(b, "Before"), few_items_note(a, "After")) if n]
    lines += ["", "Kappa near 0.4-0.6 is moderate agreement, above ~0.7 a usable shared standard; "
              "a change whose interval includes 0 is not yet evidence the workshop helped. The mean pairwise "
              "kappa weighs each pair of raters by the items they share.", *(f"\nNote: {n}." for n in notes), ""]
    return "\n".join(lines)


# ---- the style guide --------------------------------------------------------------------------


@dataclass(frozen=True)
class Excerpt:
    rubric_item: str
    rationale: str
    similarity: float


def style_guide_excerpts(rubric_items: Sequence[str], rationales: Sequence[str], *,
                         embed: Callable[[Sequence[str]], np.ndarray], n_per_item: int = 3) -> dict[str, list[Excerpt]]:
    """Representative rationales per rubric item.

    Rubric items and rationales are embedded together (rows L2-normalised, so dot = cosine);
    each rationale goes to its most similar rubric item (ignored if the similarity is 0); per
    item the distinct rationales closest to the item's assigned-rationale centroid are kept.
    """
    items, texts = list(rubric_items), list(dict.fromkeys(rationales))
    out: dict[str, list[Excerpt]] = {it: [] for it in items}
    if not items or not texts:
        return out
    z = embed(items + texts)
    zi, zt = z[: len(items)], z[len(items):]
    sim = zt @ zi.T  # (n_texts, n_items)
    best = sim.argmax(1)
    for k, it in enumerate(items):
        idx = [i for i in range(len(texts)) if best[i] == k and sim[i, k] > 0]
        if not idx:
            continue
        centroid = zt[idx].mean(0)
        idx.sort(key=lambda i: -float(zt[i] @ centroid))
        out[it] = [Excerpt(it, texts[i], float(sim[i, k])) for i in idx[:n_per_item]]
    return out


def style_guide_markdown(title: str, guideline_text: str, excerpts: Mapping[str, Sequence[Excerpt]]) -> str:
    """The agreed standard as a Markdown style guide: guideline text, then excerpts per rubric item."""
    lines = [f"# {title}", "", guideline_text.strip(), "", "## Rubric items, in the raters' own words", ""]
    for item, ex in excerpts.items():
        lines.append(f"### {item}")
        lines.append("")
        if not ex:
            lines.append("_No rationale in the agreed judgements matched this item._")
        lines += [f"> {e.rationale}" for e in ex]
        lines.append("")
    return "\n".join(lines)
