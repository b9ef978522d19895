"""The report's plots: each takes one run-dir JSON object and returns PNG bytes.

matplotlib's object API (``Figure``, Agg canvas) keeps no global state, so plots are safe
to draw from any thread. Every plot labels its axes and draws 95% intervals where the
input has them (``ci`` pairs); reference lines (50%, ceiling, zero) are labelled.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
BEFORE, AFTER = "#9aa5b1", "#1f77b4"


def _fig(w: float = 7.0, h: float = 3.6, ncols: int = 1, nrows: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _err(value: float, ci: Sequence[float] | None) -> list[float]:
    """Asymmetric error-bar lengths [below, above] from a CI (0 when absent)."""
    if not ci or ci[0] is None or ci[1] is None:
        return [0.0, 0.0]
    return [max(0.0, value - ci[0]), max(0.0, ci[1] - value)]


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _bottom(default: float, rows: Sequence[Mapping], key: str = "accuracy") -> float:
    """The y-axis' lower end: ``default`` (a zoom on the useful range), lowered to show every value
    and CI lower end below it (a 12% bucket is a finding, not something to clip away)."""
    lows = [v for r in rows for v in (r.get(key), *(r.get("ci") or [None])[:1])
            if isinstance(v, int | float) and v == v]
    return max(0.0, min([default, *[math.floor((v - 0.05) * 10) / 10 for v in lows]]))


def rows_of(obj: Any, key: str) -> list[dict]:
    """Normalise ``[{key: k, ...}, ...]`` or ``{k: {...}}`` to a list of dicts with ``key``."""
    if obj is None:
        return []
    if isinstance(obj, Mapping):
        return [{key: k, **(v if isinstance(v, Mapping) else {"value": v})} for k, v in obj.items()]
    return [dict(r) for r in obj]


def stat(obj: Any) -> tuple[float, list[float] | None]:
    """``{"value": v, "ci": [lo, hi]}`` or a bare number -> (value, ci)."""
    if isinstance(obj, Mapping):
        return _num(obj.get("value")), obj.get("ci")
    return _num(obj), None


# ---- calibration workshop ----------------------------------------------------------------

WORKSHOP_STATS = (("mean_kappa", "mean pairwise\nCohen's kappa"), ("fleiss", "Fleiss' kappa"),
                  ("alpha", "Krippendorff's\nalpha"))


def plot_workshop(report: Mapping) -> bytes:
    """Agreement before/after the workshop (bars with 95% CIs) and per-rater agreement with the majority."""
    per = rows_of(report.get("per_rater"), "rater")
    fig, ax = _fig(9, 3.6, ncols=2 if per else 1)
    a = ax[0][0]
    names = [(k, lab) for k, lab in WORKSHOP_STATS if k in report.get("before", {})]
    for j, (phase, color) in enumerate((("before", BEFORE), ("after", AFTER))):
        vals = [stat(report.get(phase, {}).get(k)) for k, _ in names]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(names))]
        a.bar(xs, [v for v, _ in vals], 0.38, color=color, label=phase,
              yerr=list(zip(*[_err(v, c) for v, c in vals], strict=True)) if vals else None, capsize=4)
        for x, (v, _) in zip(xs, vals, strict=True):
            a.text(x, 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=8, color="white")
    a.set_xticks(range(len(names)), [lab for _, lab in names], fontsize=8)
    a.set_ylim(0, 1)
    a.set_ylabel("agreement (95% CI)")
    a.set_title("Agreement before / after calibration")
    a.legend(loc="upper left", fontsize=8)
    if per:
        b = ax[0][1]
        for i, r in enumerate(per):
            b.plot([0, 1], [_num(r.get("before")), _num(r.get("after"))], marker="o", color=COLORS[i % len(COLORS)],
                   label=str(r["rater"]))
        b.set_xticks([0, 1], ["before", "after"])
        b.set_xlim(-0.3, 1.3)
        b.set_ylim(0, 1)
        b.set_ylabel("agreement with majority")
        b.set_title("Per rater")
        b.legend(fontsize=7, ncols=2)
    return _png(fig)


# ---- collection quality -------------------------------------------------------------------

def plot_consistency(quality: Mapping) -> bytes:
    """Per-rater duplicate self-consistency with 95% CIs, and the accuracy ceiling it implies."""
    raters = rows_of(quality.get("raters"), "rater")
    fig, ax = _fig(7, 3.4)
    a = ax[0][0]
    xs = range(len(raters))
    cons = [_num(r.get("consistency")) for r in raters]
    a.bar(xs, cons, 0.5, color=AFTER, label="self-consistency (duplicates)",
          yerr=list(zip(*[_err(v, r.get("ci")) for v, r in zip(cons, raters, strict=True)], strict=True)) if raters else None,
          capsize=4)
    a.scatter(xs, [_num(r.get("ceiling")) for r in raters], marker="_", s=600, color="#d62728", zorder=3,
              label="accuracy ceiling 1 - e")
    a.set_xticks(list(xs), [str(r["rater"]) for r in raters])
    a.set_ylim(_bottom(0.4, raters, "consistency"), 1.12)  # the legend sits in the band above 1
    a.set_ylabel("share / accuracy")
    a.set_xlabel("rater")
    a.set_title("Rater self-consistency and the ceiling it implies")
    a.legend(fontsize=8, loc="upper left", ncols=2)
    return _png(fig)


def plot_agreement_over_time(quality: Mapping) -> bytes:
    """Each rater's agreement with the others' majority over time, alerts marked."""
    aot = quality.get("agreement_over_time") or {}
    fig, ax = _fig(7, 3.4)
    a = ax[0][0]
    for i, (rater, s) in enumerate(sorted((aot.get("series") or {}).items())):
        a.plot(s["x"], s["y"], marker=".", color=COLORS[i % len(COLORS)], label=rater)
    for al in quality.get("drift_alerts") or []:
        if al.get("x") is not None:
            a.axvline(al["x"], color="#d62728", ls="--", lw=1)
            a.text(al["x"], 0.02, f" alert: {al.get('rater')}", color="#d62728", fontsize=8, rotation=90,
                   va="bottom", transform=a.get_xaxis_transform())
    from matplotlib.ticker import MaxNLocator

    a.xaxis.set_major_locator(MaxNLocator(integer=True))  # weeks / windows are whole numbers
    a.set_xlabel(aot.get("x_label", "window"))
    a.set_ylabel("agreement with majority")
    a.set_ylim(0, 1)
    a.set_title("Agreement over time")
    a.legend(fontsize=7, ncols=3)
    return _png(fig)


# ---- reward models ------------------------------------------------------------------------

def plot_rm(evals: Mapping[str, Mapping]) -> bytes:
    """Held-out accuracy of each reward model with CI vs its ceiling, and accuracy by strength."""
    fig, ax = _fig(9, 3.5, ncols=2)
    a, b = ax[0]
    names = list(evals)
    ceiling_label = "duplicate ceiling"  # in the legend once (matplotlib leaves out labels starting with "_")
    for i, name in enumerate(names):
        e = evals[name]
        acc = _num(e.get("accuracy"))
        a.errorbar([i], [acc], yerr=[[v] for v in _err(acc, e.get("ci"))], fmt="o", color=COLORS[i % len(COLORS)],
                   capsize=5, ms=8)
        if e.get("ceiling") is not None:
            a.hlines(e["ceiling"], i - 0.3, i + 0.3, color="black", lw=2, label=ceiling_label)
            ceiling_label = "_" + ceiling_label
    a.axhline(0.85, color="#ff7f0e", ls=":", lw=1, label="0.85: fitting rater quirks?")
    a.axhline(0.5, color="grey", ls=":", lw=1, label="0.5: chance")
    a.legend(fontsize=7, loc="upper left", ncols=2)
    a.set_xticks(range(len(names)), names)
    a.set_xlim(-0.5, len(names) - 0.3)
    a.set_ylim(_bottom(0.45, list(evals.values())), 1.12)  # the legend sits in the band above 1
    a.set_ylabel("held-out accuracy (95% CI)")
    a.set_title("Reward-model accuracy vs ceiling")
    width = 0.8 / max(len(names), 1)
    labels: list[str] = []
    for i, name in enumerate(names):
        rows = rows_of(evals[name].get("by_strength"), "strength")
        labels = labels or [str(r["strength"]) for r in rows]
        vals = [_num(r.get("accuracy")) for r in rows]
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(rows))]
        b.bar(xs, vals, width, color=COLORS[i % len(COLORS)], label=name,
              yerr=list(zip(*[_err(v, r.get("ci")) for v, r in zip(vals, rows, strict=True)], strict=True)) if rows else None,
              capsize=3)
    b.set_xticks(range(len(labels)), labels)
    b.set_xlabel("rater's stated strength")
    b.set_ylabel("accuracy (95% CI)")
    b.set_ylim(_bottom(0.4, [r for e in evals.values() for r in rows_of(e.get("by_strength"), "strength")]), 1.0)
    b.set_title("Accuracy by preference strength")
    b.legend(fontsize=8)
    return _png(fig)


def plot_curve(curve: Mapping) -> bytes:
    """A reward model's learning curve (``evaluate.curve``): held-out accuracy (95% CI) against the
    judged pairs it was trained on, log2 axis, beside the duplicate ceiling; gold accuracy too
    where the points have it (sandbox)."""
    fig, ax = _fig(7, 3.6)
    a = ax[0][0]
    pts = list(curve.get("points") or [])
    xs = [p["pairs"] for p in pts]
    acc = [_num(p.get("accuracy")) for p in pts]
    if pts:
        a.errorbar(xs, acc, yerr=list(zip(*[_err(v, p.get("ci")) for v, p in zip(acc, pts, strict=True)], strict=True)),
                   fmt="o-", color=COLORS[0], capsize=4, label="held-out accuracy (raters' labels)")
    gold = [p.get("gold_accuracy") for p in pts]
    if pts and all(g is not None for g in gold):
        a.errorbar(xs, gold, yerr=list(zip(*[_err(g, p.get("gold_ci")) for g, p in zip(gold, pts, strict=True)],
                                            strict=True)),
                   fmt="s--", color=COLORS[2], capsize=4, label="accuracy against gold (sandbox)")
    c = curve.get("ceiling")
    if c is not None:
        a.axhline(c, color="black", lw=1.5, label=f"duplicate ceiling {c:.3f}")
        if curve.get("within"):
            a.axhline(c - curve["within"], color="black", lw=1, ls=":",
                      label=f"ceiling - {curve['within']:.2f}")
    best = (curve.get("best_possible") or {}).get("observed")
    if best is not None:  # sandbox: a model that knew each rater's noise-free taste, on these labels
        a.axhline(best, color=COLORS[4], lw=1, ls="--", label=f"best possible model (sandbox) {best:.3f}")
    a.axhline(0.5, color="grey", ls=":", lw=1)
    a.set_xscale("log", base=2)
    if xs:
        a.set_xticks(xs, [f"{x:,}" for x in xs], fontsize=8)
        a.minorticks_off()
    a.set_xlabel("judged pairs trained on (log scale)")
    a.set_ylabel("accuracy (95% CI)")
    gains = curve.get("gains") or []
    g = gains[-1] if gains else None
    a.set_title("Reward-model learning curve" + (
        f": last step {100 * g['diff']:+.1f} points [{100 * g['ci'][0]:+.1f}, {100 * g['ci'][1]:+.1f}]"
        if g and g.get("n") else ""), fontsize=10)
    a.legend(fontsize=8, loc="best")  # never over the points it explains
    return _png(fig)


# ---- policy optimisation --------------------------------------------------------------------

PPO_KEYS = (("objective/rlhf_reward", "reward-model reward"), ("objective/kl", "KL to SFT (nats)"),
            ("objective/beta", "KL coefficient beta"), ("gold/utility", "gold utility (sandbox)"),
            # sandbox.oracle.kl_split at each checkpoint: the least KL its RM score needs, and the rest
            ("oracle/kl_needed", "KL its RM score needs (sandbox)"),
            ("oracle/kl_excess", "KL beyond that need (sandbox)"))


def plot_ppo(passes: Mapping[str, Sequence[Mapping]]) -> bytes:
    """Reward, KL, beta and (sandbox) gold utility and the KL split against step for each PPO pass
    (a panel per key that some pass logged)."""
    keys = [(k, lab) for k, lab in PPO_KEYS if any(k in row for rows in passes.values() for row in rows)]
    fig, ax = _fig(9, 2.6 * math.ceil(len(keys) / 2), ncols=2, nrows=max(1, math.ceil(len(keys) / 2)))
    flat = [a for row in ax for a in row]
    for a, (key, label) in zip(flat, keys, strict=False):
        for i, (name, rows) in enumerate(passes.items()):
            pts = [(r["step"], r[key]) for r in rows if key in r and r.get(key) is not None and "step" in r]
            if pts:
                a.plot(*zip(*pts, strict=True), color=COLORS[i % len(COLORS)], label=name)
        a.set_xlabel("PPO step")
        a.set_ylabel(label)
        a.set_title(label, fontsize=9)
        a.legend(fontsize=7)
    for a in flat[len(keys):]:
        a.set_axis_off()
    return _png(fig)


def plot_frontier(oracle: Sequence[Mapping], passes: Mapping[str, Sequence[Mapping]],
                  points: Mapping[str, Mapping] | None = None) -> bytes:
    """Gold utility vs sqrt(KL): each PPO pass's path against the oracle frontier curve(s), and
    ``points`` (e.g. a DPO run's final policy: ``{"kl", "gold"}``) as single markers."""
    fig, ax = _fig(7, 3.8)
    a = ax[0][0]
    for k, curve in enumerate(oracle or []):
        pts = sorted((p["sqrt_kl"], p["gold"]) for p in curve["points"] if p.get("sqrt_kl") is not None)
        if pts:
            a.plot(*zip(*pts, strict=True), color=("black", "grey")[k % 2], ls=("--", ":")[k % 2], marker="x",
                   label=curve.get("label", "oracle frontier"))
    exact = True
    for i, (name, rows) in enumerate(passes.items()):
        # exact points on the oracle's own queries when the run has them, else the sampled probe gold
        kl_key, gold_key = (("oracle/kl", "oracle/gold") if any("oracle/gold" in r for r in rows)
                            else ("objective/kl", "gold/utility"))
        exact = exact and kl_key == "oracle/kl"
        pts = [(math.sqrt(max(r[kl_key], 0.0)), r[gold_key]) for r in rows
               if r.get(kl_key) is not None and r.get(gold_key) is not None]
        if pts:
            a.plot(*zip(*pts, strict=True), marker=".", color=COLORS[i % len(COLORS)], label=name)
    for j, (name, pt) in enumerate((points or {}).items()):
        if pt.get("kl") is not None and pt.get("gold") is not None:
            a.plot([math.sqrt(max(pt["kl"], 0.0))], [pt["gold"]], marker="*", ms=12, ls="none",
                   color=COLORS[(len(passes) + j) % len(COLORS)], label=name)
    a.set_xlabel("sqrt(KL to SFT)" + (", exact on the oracle's queries" if exact else ""))
    a.set_ylabel("gold utility (sandbox" + (", exact)" if exact else ", sampled)"))
    a.set_title("Gold reward gained per unit of KL")
    a.legend(fontsize=8)
    return _png(fig)


def plot_pricing(pricing: Mapping) -> bytes:
    """Pricing accuracy and confident-wrong rate before and after the fix, with 95% CIs."""
    rows = pricing.get("rows") or []
    fig, ax = _fig(9, 3.4, ncols=2)
    for a, key, title in ((ax[0][0], "accuracy", f"{pricing.get('topic', 'pricing')} accuracy"),
                          (ax[0][1], "confident_wrong_rate", "confident-wrong rate")):
        vals = [_num(r.get(key)) for r in rows]
        a.bar(range(len(rows)), vals, 0.55, color=[COLORS[i % len(COLORS)] for i in range(len(rows))],
              yerr=list(zip(*[_err(v, r.get(key + "_ci")) for v, r in zip(vals, rows, strict=True)], strict=True)) if rows else None,
              capsize=4)
        for i, v in enumerate(vals):
            a.text(i, v + 0.02, f"{v:.0%}", ha="center", fontsize=8)
        a.set_xticks(range(len(rows)), [r["label"] for r in rows], fontsize=8)
        a.set_ylim(0, 1.05)
        a.set_ylabel(f"{key.replace('_', ' ')} (95% CI)")
        a.set_title(title)
    return _png(fig)


# ---- evaluation ------------------------------------------------------------------------------

def plot_ab(ab: Mapping) -> bytes:
    """Blind win rate with Wilson CI, overall and per topic, against the 50% line."""
    topics = rows_of(ab.get("by_topic"), "topic")
    rows = [("overall", ab.get("win_rate"), ab.get("ci"), ab.get("n"))]
    if ab.get("length_controlled"):
        lc = ab["length_controlled"]
        rows.append(("length-controlled", lc.get("win_rate"), lc.get("ci"), None))
    rows += [(t["topic"], t.get("win_rate"), t.get("ci"), t.get("n")) for t in topics]
    fig, ax = _fig(7, 0.5 * len(rows) + 1.4)
    a = ax[0][0]
    for i, (_label, v, ci, _n) in enumerate(rows):
        v = _num(v)
        a.errorbar([v], [i], xerr=[[e] for e in _err(v, ci)], fmt="o", color=AFTER if i else "#d62728",
                   capsize=4, ms=7 if i == 0 else 5)
    a.axvline(0.5, color="grey", ls="--", lw=1)
    a.set_yticks(range(len(rows)), [f"{r[0]} (n={r[3]})" if r[3] else r[0] for r in rows], fontsize=8)
    a.invert_yaxis()
    a.set_xlim(0, 1)
    a.set_xlabel(f"win rate of {ab.get('candidate', 'candidate')} vs {ab.get('baseline', 'baseline')} (95% CI)")
    a.set_title("Blind A/B")
    return _png(fig)


def plot_factual(factual: Mapping) -> bytes:
    """Factual spot-check accuracy per topic, baseline vs candidate."""
    rows = rows_of(factual.get("by_topic"), "topic")
    fig, ax = _fig(7, 3.4)
    a = ax[0][0]
    has_ci = any(r.get(k + "_ci") for r in rows for k in ("baseline", "candidate"))
    for j, (key, color) in enumerate((("baseline", BEFORE), ("candidate", AFTER))):
        vals = [_num(r.get(key)) for r in rows]
        a.bar([i + (j - 0.5) * 0.38 for i in range(len(rows))], vals, 0.38, color=color,
              label=f"{key}: {factual.get(key, key)}",
              yerr=list(zip(*[_err(v, r.get(key + "_ci")) for v, r in zip(vals, rows, strict=True)], strict=True))
              if rows and has_ci else None, capsize=3)
    a.set_xticks(range(len(rows)), [f"{r['topic']}\n(n={r.get('n', '?')})" for r in rows], fontsize=8)
    a.set_ylim(0, 1.2)  # the legend sits in the band above 1
    a.set_ylabel("share of spot checks correct" + ("\n(95% CI)" if has_ci else ""))
    a.set_title("Factual regression suite")
    a.legend(fontsize=8, loc="upper left", ncols=2)
    return _png(fig)


# ---- outcomes and cost -------------------------------------------------------------------------

def bar_label_place(value: float, top: float, ci_high: float | None) -> tuple[float, str, str]:
    """(y, vertical alignment, colour) of a bar's value label: inside a bar tall enough to hold it (white,
    centred), else above the bar and its CI whisker in dark text (a 0.0% bar has no inside)."""
    if top > 0 and value >= 0.25 * top:
        return value / 2, "center", "white"
    return max(value, ci_high if ci_high is not None else value) + 0.02 * top, "bottom", "#1b1f24"


def plot_outcomes(comp: Mapping) -> bytes:
    """Escalation rate, CSAT and handle time per version (95% CIs), and weekly escalation. A metric that
    could not be compared (fewer than 2 values on a side) says so in its panel, with the counts."""
    fig, ax = _fig(10, 3.3, ncols=4)
    names = [comp["baseline"], comp["candidate"]]
    counts = {"csat": (comp.get("answered_surveys"), "answered surveys"),
              "handle_time_min": (comp.get("conversations"), "conversations")}
    for a, title, key, lab in ((ax[0][0], "Escalation rate", "escalation", "share escalated"),
                               (ax[0][1], "CSAT", "csat", "mean CSAT (1-5)"),
                               (ax[0][2], "Handle time", "handle_time_min", "mean minutes")):
        block = comp.get(key)
        if not block:
            n, what = counts.get(key, (None, ""))
            a.set_axis_off()
            a.text(0.5, 0.5, f"{title}: not compared\n" + (f"{what}: {n['baseline']} on {names[0]},\n"
                                                            f"{n['candidate']} on {names[1]}\n(2 a side needed)"
                                                            if n else "(too few values)"),
                   ha="center", va="center", fontsize=8, transform=a.transAxes)
            continue
        vals = [block["baseline"], block["candidate"]]
        cis = block.get("ci_by_version") or {}
        a.bar([0, 1], vals, 0.55, color=[BEFORE, AFTER],
              yerr=list(zip(*[_err(v, cis.get(k)) for v, k in zip(vals, ("baseline", "candidate"), strict=True)], strict=True)),
              capsize=4)
        uppers = [ci[1] for ci in cis.values() if ci]
        top = max([*vals, *uppers]) * 1.15 or 1.0  # the whole CI shows, not only the bar (1 when all are 0)
        a.set_ylim(0, top)
        for i, (v, k) in enumerate(zip(vals, ("baseline", "candidate"), strict=True)):
            y, va, color = bar_label_place(v, top, (cis.get(k) or [None, None])[1])
            a.text(i, y, f"{v:.2f}" if lab != "share escalated" else f"{v:.1%}", ha="center", va=va,
                   fontsize=8, color=color, fontweight="bold")
        lo, hi = block["ci"]
        a.set_xticks([0, 1], names, fontsize=8)
        a.set_ylabel(lab + " (95% CI)")
        a.set_title(f"{title}\ndiff {block['diff']:+.3g} [{lo:+.3g}, {hi:+.3g}]", fontsize=9)
    from preflab.quality.consistency import wilson_interval

    a = ax[0][3]
    tops = []
    for i, name in enumerate(names):
        wk = [w for w in comp.get("weekly", []) if w["model_version"] == name]
        rates = [w["escalation_rate"] for w in wk]
        cis = [wilson_interval(round(w["escalation_rate"] * w["n"]), w["n"]) if w.get("n") else None for w in wk]
        tops += [ci[1] if ci else r for r, ci in zip(rates, cis, strict=True)]
        a.errorbar([w["week"] for w in wk], rates, capsize=3, marker="o", color=[BEFORE, AFTER][i], label=name,
                   yerr=list(zip(*[_err(r, ci) for r, ci in zip(rates, cis, strict=True)], strict=True)) if wk else None)
        for w in wk:  # a week's n: a rate from a handful of conversations is not a trend
            a.annotate(f"n={w['n']}", (w["week"], w["escalation_rate"]), textcoords="offset points", xytext=(4, 4),
                       fontsize=6, color=[BEFORE, AFTER][i])
    a.set_ylim(0, min(1.0, max(tops)) * 1.35 if tops else None)  # room above the bars for the legend
    a.tick_params(axis="x", labelrotation=60, labelsize=7)
    a.set_xlabel("ISO week")
    a.set_ylabel("share escalated (95% CI)")
    a.set_title("Escalation by week", fontsize=9)
    a.legend(fontsize=7, loc="upper center", ncols=2)
    return _png(fig)


def plot_cost(ledger: Mapping) -> bytes:
    """Annotation cost per rater and compute cost per stage."""
    cur = ledger.get("currency", "USD")
    ann = ledger.get("annotators") or []
    comp = ledger.get("compute") or []
    fig, ax = _fig(9 if comp else 5, 3.2, ncols=2 if comp else 1)  # no compute measured (a real project): one panel
    a = ax[0][0]
    a.barh([r["rater"] for r in ann], [r["cost"] for r in ann], color=AFTER)
    a.set_xlabel(f"annotation cost ({cur})")
    a.set_title("Annotators: time on task x hourly rate", fontsize=9)
    if not comp:
        return _png(fig)
    b = ax[0][1]
    b.barh([s["stage"] for s in comp], [s["cost"] for s in comp], color="#ff7f0e")
    b.set_xlabel(f"compute cost ({cur})")
    b.set_title("Compute: wall time x device-hour price", fontsize=9)
    return _png(fig)


def plot_experiment(exp: Mapping) -> bytes:
    """A what-if experiment: ``lines`` (series of x/y, optional CI bands) or ``bars`` (value + CI)."""
    if exp.get("kind") == "curve":
        return plot_curve(exp)
    fig, ax = _fig(7, 3.6)
    a = ax[0][0]
    if exp.get("kind", "lines") == "bars":
        bars = exp.get("bars") or []
        vals = [_num(r.get("value")) for r in bars]
        a.bar(range(len(bars)), vals, 0.55, color=[COLORS[i % len(COLORS)] for i in range(len(bars))],
              yerr=list(zip(*[_err(v, r.get("ci")) for v, r in zip(vals, bars, strict=True)], strict=True)) if bars else None,
              capsize=4)
        a.set_xticks(range(len(bars)), [r["label"] for r in bars], fontsize=8)
    else:
        for i, s in enumerate(exp.get("series") or []):
            c = "black" if s.get("reference") else COLORS[i % len(COLORS)]
            a.plot(s["x"], s["y"], marker="o" if not s.get("reference") else "x", ls="--" if s.get("reference") else "-",
                   color=c, label=s.get("label"))
            if s.get("ci_low") and s.get("ci_high"):
                a.fill_between(s["x"], s["ci_low"], s["ci_high"], color=c, alpha=0.15)
        a.legend(fontsize=8)
    a.set_xlabel(exp.get("x_label", ""))
    a.set_ylabel(exp.get("y_label", ""))
    a.set_title(exp.get("title", exp.get("name", "experiment")))
    return _png(fig)
