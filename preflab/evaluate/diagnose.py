"""Knowledge or preference? Sample n answers per suite item and see whether any is right.

RLHF re-weights what a model can already say; it adds no knowledge. For each item of a
factual suite we sample ``n`` responses (default 16, temperature 1) and count the right ones:

- never right (0 of n): the checkpoint alone cannot tell a **knowledge gap** (the model
  never knew it: retrieval or new training data will fix it) from a fact the policy
  **lost by optimisation** (the SFT model said it, preference optimisation trained it
  away: re-rating the pairs that taught that is the cure). With a ``baseline`` (the SFT
  model, or the checkpoint before) sampled the same way, an item never right now but
  right at least once in the baseline is **lost by optimisation**, with Fisher's exact
  p (``fisher_lost_p``); never right in either is a **knowledge gap**;
- sometimes right (1..n-1 of n): **unreliable** (kind ``preference``): the model can say
  it, and RLHF (or better decoding) can make it say it first;
- always right: **solid** (kind ``ok``).

"0 of n" is not "never": ``upper_bound(0, n)`` = 1 - 0.05^(1/n) is the highest success
rate still consistent with it at 95% (0 of 16 allows 17%; 0 of 64, 4.6%).

Beside the sampled figures, each item is also answered once greedily (temperature 0),
which is what the gates' factual accuracy counts (``gates._suite_configs``), and the
share of sampled answers that are confident and wrong (``detectors.confident_wrong``,
the gates' ``confident_wrong`` detector) is reported per topic, with the shift from the
baseline and its CI as ``run_detectors_by_topic`` computes it for the gates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from preflab.config import check, field_doc
from preflab.evaluate.factual import FactualConfig, SuiteItem, SuiteRun, run_suite

KINDS = ("knowledge_gap", "lost_by_optimisation", "preference", "ok")
LABELS = {"knowledge_gap": "knowledge gap", "lost_by_optimisation": "lost by optimisation",
          "preference": "unreliable", "ok": "solid"}


@dataclass
class DiagnoseConfig:
    """How ``preflab diagnose`` samples a checkpoint (and its baseline, the same way)."""

    n_samples: int = field_doc(16, "Responses sampled per suite item.")
    temperature: float = field_doc(1.0, "Sampling temperature (must be > 0: greedy repeats itself).")
    max_new_tokens: int = field_doc(64, "Longest response generated per item.")
    batch_size: int = field_doc(64, "Prompts per generation batch.")
    seed: int = field_doc(0, "Seed of the sampler.")
    prompt_template: str = field_doc("User: {query}\nAssistant:", "Prompt around each query; {query} is replaced "
                                                                  "('chat': the tokenizer's chat template).")
    greedy: bool = field_doc(True, "Also answer each item once at temperature 0, as the gates' factual accuracy does.")
    alpha: float = field_doc(0.05, "Level of the per-item Fisher test that calls an item lost by optimisation "
                                   "significantly.")

    def validate(self) -> None:
        check(self.n_samples >= 2, "diagnose.n_samples", "must be >= 2")
        check(self.temperature > 0, "diagnose.temperature", "must be > 0")
        check(self.max_new_tokens >= 1, "diagnose.max_new_tokens", "must be >= 1")
        check(self.batch_size >= 1, "diagnose.batch_size", "must be >= 1")
        check("{query}" in self.prompt_template or self.prompt_template == "chat", "diagnose.prompt_template",
              "must contain {query} or be 'chat'")
        check(0 < self.alpha < 1, "diagnose.alpha", "must be in (0, 1)")


# ---- statistics (pure) -------------------------------------------------------------------


def upper_bound(k: int, n: int, level: float = 0.95) -> float:
    """One-sided upper confidence bound of a success rate from k successes in n trials.

    Clopper-Pearson (1934): the p with P[Binom(n, p) <= k] = 1 - level, i.e. the
    ``level`` quantile of Beta(k + 1, n - k); 1 when k = n. For k = 0 it is
    1 - (1 - level)^(1/n) (0 of 16 at 95%: 17.1%), about 3/n for large n: the "rule of
    three" (Hanley & Lippman-Hand 1983).
    """
    if not (0 <= k <= n and n >= 1):
        raise ValueError(f"upper_bound: need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0 < level < 1:
        raise ValueError(f"upper_bound: level must be in (0, 1), got {level}")
    if k == n:
        return 1.0
    if k == 0:
        return float(1.0 - (1.0 - level) ** (1.0 / n))
    from scipy.stats import beta

    return float(beta.ppf(level, k + 1, n - k))


def fisher_lost_p(base_right: int, base_n: int, right: int, n: int) -> float:
    """One-sided Fisher's exact p that the baseline's success rate exceeds the candidate's.

    The 2x2 table [[base_right, base_n - base_right], [right, n - right]]; with the margins
    fixed, the baseline's right count X is hypergeometric (population base_n + n, successes
    base_right + right, draws base_n) under H0 (equal rates): p = P[X >= base_right]
    (Fisher 1935; Agresti, Categorical Data Analysis, 2002, sec. 3.5.1). 18 of 64 vs
    0 of 64: p = 9.5e-7 (two-sided 1.9e-6); 1 of 16 vs 0 of 16: p = 0.5.

    The item was picked for being never right in the candidate's samples, so a p from the
    same samples is optimistic; confirm a borderline one with a fresh ``--seed`` or more ``--n``.
    """
    if not (0 <= base_right <= base_n and 0 <= right <= n and base_n >= 1 and n >= 1):
        raise ValueError(f"fisher_lost_p: bad counts {base_right}/{base_n} vs {right}/{n}")
    from scipy.stats import hypergeom

    return float(min(1.0, hypergeom.sf(base_right - 1, base_n + n, base_right + right, base_n)))


def classify(right: int, n: int, baseline_right: int | None = None) -> str:
    """knowledge_gap if never right (and, with a baseline count, never right there either);
    lost_by_optimisation if never right but the baseline was right at least once;
    ok if always right; else preference (unreliable)."""
    if right == 0:
        return "lost_by_optimisation" if baseline_right else "knowledge_gap"
    if right == n:
        return "ok"
    return "preference"


# ---- the diagnosis -----------------------------------------------------------------------


@dataclass(frozen=True)
class ItemDiagnosis:
    id: str
    topic: str
    group: str | None
    n: int
    right: int  # samples right out of n
    first_right: bool
    kind: str  # knowledge_gap | lost_by_optimisation | preference (unreliable) | ok (solid)
    upper95: float = 1.0  # one-sided 95% upper bound of the per-sample success rate (upper_bound)
    greedy_right: bool | None = None  # the temperature-0 answer (as the gates count accuracy)
    baseline_right: int | None = None  # the baseline's samples right out of baseline_n
    baseline_n: int | None = None
    p_lost: float | None = None  # fisher_lost_p: the baseline right more often (set with a baseline)


@dataclass(frozen=True)
class GroupRow:
    """Items of one topic (or group): accuracies, the split by kind, confident-wrong samples."""

    name: str
    items: int
    first_sample_accuracy: float  # first sample at diagnose's temperature (not the gates' greedy accuracy)
    any_of_n_accuracy: float
    mean_sample_accuracy: float
    knowledge_gap: int
    preference: int
    ok: int
    lost_by_optimisation: int = 0
    greedy_accuracy: float | None = None  # temperature 0: comparable to the gates' factual accuracy
    greedy_accuracy_baseline: float | None = None
    mean_sample_accuracy_baseline: float | None = None
    confident_wrong: float | None = None  # share of sampled answers confident and wrong (detectors.confident_wrong)
    confident_wrong_baseline: float | None = None
    confident_wrong_shift: float | None = None  # candidate - baseline
    confident_wrong_ci_low: float | None = None  # bootstrap CI of the shift (Bonferroni over topics, as the gates)
    confident_wrong_ci_high: float | None = None


@dataclass(frozen=True)
class Diagnosis:
    n_samples: int
    items: list[ItemDiagnosis]
    by_topic: list[GroupRow]
    by_group: list[GroupRow]
    verdict: str
    temperature: float | None = None
    baseline: str | None = None  # name of the baseline, None without one
    alpha: float = 0.05
    fixes: list[str] = field(default_factory=list)  # commands to run, e.g. preflab rerate --where topic=...

    def to_dict(self) -> dict[str, Any]:
        def clean(d: dict[str, Any]) -> dict[str, Any]:
            return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

        return {"n_samples": self.n_samples, "temperature": self.temperature, "baseline": self.baseline,
                "alpha": self.alpha, "verdict": self.verdict, "fixes": self.fixes,
                "lost_pooled": pooled_lost(self.items) if self.baseline is not None else None,
                "items": [clean(asdict(i)) for i in self.items],
                "by_topic": [clean(asdict(r)) for r in self.by_topic],
                "by_group": [clean(asdict(r)) for r in self.by_group]}

    def kind_of(self, item_id: str) -> str:
        return next(i.kind for i in self.items if i.id == item_id)


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _row(name: str, items: list[ItemDiagnosis], greedy_base: dict[str, bool] | None = None,
         cw: dict[str, Any] | None = None) -> GroupRow:
    cw = cw or {}
    g = [i.greedy_right for i in items if i.greedy_right is not None]
    gb = [greedy_base[i.id] for i in items if greedy_base and i.id in greedy_base]
    mb = [i.baseline_right / i.baseline_n for i in items if i.baseline_right is not None and i.baseline_n]
    return GroupRow(name=name, items=len(items),
                    first_sample_accuracy=float(np.mean([i.first_right for i in items])),
                    any_of_n_accuracy=float(np.mean([i.right > 0 for i in items])),
                    mean_sample_accuracy=float(np.mean([i.right / i.n for i in items])),
                    knowledge_gap=sum(i.kind == "knowledge_gap" for i in items),
                    preference=sum(i.kind == "preference" for i in items),
                    ok=sum(i.kind == "ok" for i in items),
                    lost_by_optimisation=sum(i.kind == "lost_by_optimisation" for i in items),
                    greedy_accuracy=_mean(g) if len(g) == len(items) else None,
                    greedy_accuracy_baseline=_mean(gb) if len(gb) == len(items) else None,
                    mean_sample_accuracy_baseline=_mean(mb) if len(mb) == len(items) else None,
                    **cw)


def _pct(x: float) -> str:
    return f"{x:.0%}" if x >= 0.01 or x == 0 else f"{x:.1%}"


def verdict_of(items: list[ItemDiagnosis], *, baseline: bool = False, alpha: float = 0.05,
               by_topic: list[GroupRow] | None = None) -> str:
    """One line: never-right items (gaps vs lost with a baseline; which groups are wholly
    gaps), unreliable and solid items, and topics whose confident-wrong answers went up."""
    n = len(items)
    ns = items[0].n if items else 0
    never = [i for i in items if i.right == 0]
    gaps = [i for i in items if i.kind == "knowledge_gap"]
    lost = [i for i in items if i.kind == "lost_by_optimisation"]
    pref = [i for i in items if i.kind == "preference"]
    groups: dict[str, list[ItemDiagnosis]] = {}
    for i in items:
        groups.setdefault(i.group or i.id, []).append(i)
    gap_groups = sorted(g for g, its in groups.items() if all(i.kind == "knowledge_gap" for i in its))
    shown = ", ".join(gap_groups[:6]) + (" ..." if len(gap_groups) > 6 else "")
    bound = f"0 of {ns} still allows a success rate up to {upper_bound(0, ns):.0%}, 95% bound" if ns else ""
    if baseline:
        sig = [i for i in lost if i.p_lost is not None and i.p_lost < alpha]
        line = (f"{len(lost)}/{n} items lost by optimisation (never right in {ns} samples, right in the baseline; "
                f"{len(sig)} with Fisher p < {alpha:g}")
        if len(lost) > 1:
            pooled = pooled_lost(items)
            line += (f"; pooled, the baseline {pooled['baseline_right']}/{pooled['baseline_n']} vs "
                     f"{pooled['right']}/{pooled['n']}, p = {pooled['p']:.2g}")
        line += ": re-rate, not new data)" if sig else ": none significant, rerun with more --n before acting)"
        line += f"; {len(gaps)}/{n} knowledge gaps (never right in either: retrieval or new data, not RLHF)"
        if gap_groups:
            line += f", wholly missing: {shown}"
    else:
        line = f"{len(never)}/{n} items never right in {ns} samples ({bound})"
        if gap_groups:
            line += f", wholly missing: {shown}"
        line += ("; each is a knowledge gap or a fact the policy lost to optimisation: run with --baseline "
                 "MODEL_DIR (the SFT model) to tell them apart")
    worse = [i for i in pref if i.p_lost is not None and i.p_lost < alpha]
    line += f"; {len(pref)}/{n} sometimes right (unreliable: preference problems RLHF can fix"
    line += f"; {len(worse)} of them right less often than in the baseline, Fisher p < {alpha:g})" if baseline else ")"
    line += f"; {n - len(never) - len(pref)}/{n} always right."
    up = [r for r in by_topic or [] if r.confident_wrong_ci_low is not None and r.confident_wrong_ci_low > 0]
    if up:
        line += " Confident-wrong answers up in " + ", ".join(
            f"{r.name} ({_pct(r.confident_wrong or 0)} of samples vs {_pct(r.confident_wrong_baseline or 0)})"
            for r in up) + "."
    return line


def pooled_lost(items: list[ItemDiagnosis]) -> dict[str, Any]:
    """The items lost by optimisation pooled: summed right/sample counts of the baseline and
    the candidate, and ``fisher_lost_p`` on the sums (one 2x2 table: more power than each
    item alone at 16 samples; a summary, not a stratified test)."""
    lost = [i for i in items if i.kind == "lost_by_optimisation"]
    br, bn = sum(i.baseline_right or 0 for i in lost), sum(i.baseline_n or 0 for i in lost)
    r, n = sum(i.right for i in lost), sum(i.n for i in lost)
    return {"items": len(lost), "baseline_right": br, "baseline_n": bn, "right": r, "n": n,
            "p": fisher_lost_p(br, bn, r, n) if lost else None}


def fixes_of(items: list[ItemDiagnosis], alpha: float = 0.05) -> list[str]:
    """A ``preflab rerate`` command per topic with items significantly lost by optimisation
    (most such items first): the pairs that taught the policy to drop those facts."""
    counts: dict[str, int] = {}
    for i in items:
        if i.kind == "lost_by_optimisation" and i.p_lost is not None and i.p_lost < alpha:
            counts[i.topic] = counts.get(i.topic, 0) + 1
    return [f"preflab rerate --where topic={t} --guideline NEW_VERSION --db DB --project PROJECT"
            for t in sorted(counts, key=lambda t: (-counts[t], t))]


def _confident_wrong(run: SuiteRun, baseline: SuiteRun | None) -> dict[str, dict[str, Any]]:
    """Per topic: the confident_wrong detector's value (and, with a baseline, the gates' shift and CI)."""
    from preflab.evaluate.detectors import DETECTORS, DetectorConfig, run_detectors_by_topic

    rc = run.responses()
    if baseline is not None:
        res = run_detectors_by_topic(rc, baseline.responses(), names=("confident_wrong",))
        return {t: {"confident_wrong": r["confident_wrong"].value, "confident_wrong_baseline": r["confident_wrong"].baseline,
                    "confident_wrong_shift": r["confident_wrong"].shift,
                    "confident_wrong_ci_low": r["confident_wrong"].ci_low,
                    "confident_wrong_ci_high": r["confident_wrong"].ci_high} for t, r in res.items()}
    v = DETECTORS["confident_wrong"].fn(rc, DetectorConfig())
    topics = np.array(rc.topics)
    return {t: {"confident_wrong": float(v[topics == t].mean())} for t in sorted(set(rc.topics or []))}


def diagnose_run(run: SuiteRun, *, greedy: SuiteRun | None = None, baseline: SuiteRun | None = None,
                 baseline_greedy: SuiteRun | None = None, baseline_name: str | None = None,
                 temperature: float | None = None, alpha: float = 0.05) -> Diagnosis:
    """Classify every item of a multi-sample suite run (pure: no model needed).

    ``greedy`` / ``baseline_greedy``: one temperature-0 answer per item; ``baseline``: the
    baseline's samples on the same items (same order), which splits never-right items into
    knowledge gaps and facts lost by optimisation.
    """
    n = run.correct.shape[1]
    if n < 2:
        raise ValueError("diagnose: needs at least 2 samples per item")
    ids = [it.id for it in run.items]
    for name, other in (("greedy", greedy), ("baseline", baseline), ("baseline_greedy", baseline_greedy)):
        if other is not None and [it.id for it in other.items] != ids:
            raise ValueError(f"diagnose: the {name} run is not on the same suite items in the same order")
    if baseline is not None and baseline.correct.shape[1] < 1:
        raise ValueError("diagnose: the baseline run has no samples")
    items = []
    for k, it in enumerate(run.items):
        right = int(run.correct[k].sum())
        b_right = int(baseline.correct[k].sum()) if baseline is not None else None
        b_n = int(baseline.correct.shape[1]) if baseline is not None else None
        p = fisher_lost_p(b_right, b_n, right, n) if baseline is not None else None
        items.append(ItemDiagnosis(it.id, it.topic, it.group, n, right, bool(run.correct[k, 0]),
                                   classify(right, n, b_right), upper_bound(right, n),
                                   bool(greedy.correct[k, 0]) if greedy is not None else None, b_right, b_n, p))
    gb = {it.id: bool(baseline_greedy.correct[k, 0]) for k, it in enumerate(baseline_greedy.items)} \
        if baseline_greedy is not None else None
    cw = _confident_wrong(run, baseline)
    topics = sorted({i.topic for i in items})
    groups = sorted({i.group for i in items if i.group})
    by_topic = [_row(t, [i for i in items if i.topic == t], gb, cw.get(t)) for t in topics]
    return Diagnosis(n_samples=n, items=items, by_topic=by_topic,
                     by_group=[_row(g, [i for i in items if i.group == g], gb) for g in groups],
                     verdict=verdict_of(items, baseline=baseline is not None, alpha=alpha, by_topic=by_topic),
                     temperature=temperature, baseline=(baseline_name or "baseline") if baseline is not None else None,
                     alpha=alpha, fixes=fixes_of(items, alpha) if baseline is not None else [])


def diagnose(model, tokenizer, items: list[SuiteItem], cfg: DiagnoseConfig | None = None, *,
             baseline=None, baseline_name: str = "baseline", progress: bool = False) -> tuple[Diagnosis, SuiteRun]:
    """Sample ``cfg.n_samples`` answers per item from the checkpoint and classify each item.

    ``baseline``: ``(model, tokenizer)`` sampled on the same items with the same settings
    (and seed), to tell facts lost by optimisation from knowledge gaps.
    """
    cfg = cfg or DiagnoseConfig()
    cfg.validate()
    fcfg = FactualConfig(n_samples=cfg.n_samples, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                         batch_size=cfg.batch_size, seed=cfg.seed, prompt_template=cfg.prompt_template)
    gcfg = FactualConfig(n_samples=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                         seed=cfg.seed, prompt_template=cfg.prompt_template)
    run = run_suite(model, tokenizer, items, fcfg, source="diagnose", progress=progress)
    greedy = run_suite(model, tokenizer, items, gcfg, source="diagnose greedy", progress=progress) \
        if cfg.greedy else None
    b_run = b_greedy = None
    if baseline is not None:
        b_run = run_suite(*baseline, items, fcfg, source=baseline_name, progress=progress)
        b_greedy = run_suite(*baseline, items, gcfg, source=f"{baseline_name} greedy", progress=progress) \
            if cfg.greedy else None
    d = diagnose_run(run, greedy=greedy, baseline=b_run, baseline_greedy=b_greedy, baseline_name=baseline_name,
                     temperature=cfg.temperature, alpha=cfg.alpha)
    return d, run


# ---- rendering ---------------------------------------------------------------------------


def _f(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else _pct(x)


def render_tables(d: Diagnosis, *, groups: bool = False):  # noqa: ANN201 - rich imported lazily
    """A rich table per topic (and optionally per group): greedy (T=0, the gates' accuracy)
    beside the sampled figures, the split by kind, and confident-wrong samples."""
    from rich.table import Table

    rows = d.by_group if groups else d.by_topic
    t_lbl = f"T={d.temperature:g}" if d.temperature is not None else "sampled"
    t = Table(title=f"knowledge or preference? ({d.n_samples} samples per item at {t_lbl}"
                    + (f"; baseline {d.baseline}" if d.baseline else "") + ")")
    has_base = d.baseline is not None
    cols = ["group" if groups else "topic", "items", "greedy right (T=0, as the gates)",
            f"first sample right ({t_lbl})", "mean sample right", f"any of {d.n_samples} right"]
    if has_base:
        cols += ["lost by optimisation", "knowledge gap"]
    else:
        cols += ["never right (gap or lost)"]
    cols += ["unreliable", "solid"]
    if not groups:
        cols += [f"confident-wrong ({t_lbl})"]
    for col in cols:
        t.add_column(col)
    for r in rows:
        def vs(a: float | None, b: float | None) -> str:
            return f"{_f(a)} (base {_f(b)})" if has_base and b is not None else _f(a)

        cells = [r.name, str(r.items), vs(r.greedy_accuracy, r.greedy_accuracy_baseline),
                 f"{r.first_sample_accuracy:.0%}", vs(r.mean_sample_accuracy, r.mean_sample_accuracy_baseline),
                 f"{r.any_of_n_accuracy:.0%}"]
        cells += [str(r.lost_by_optimisation), str(r.knowledge_gap)] if has_base else [str(r.knowledge_gap)]
        cells += [str(r.preference), str(r.ok)]
        if not groups:
            cw = _f(r.confident_wrong)
            if r.confident_wrong_shift is not None:
                cw += (f" (base {_f(r.confident_wrong_baseline)}, {r.confident_wrong_shift * 100:+.0f} pts, CI "
                       f"{(r.confident_wrong_ci_low or 0) * 100:+.0f}..{(r.confident_wrong_ci_high or 0) * 100:+.0f})")
            cells.append(cw)
        t.add_row(*cells)
    return t


def render_never_right(d: Diagnosis):  # noqa: ANN201 - rich imported lazily
    """A rich table of the items never right: the 95% upper bound of their success rate and,
    with a baseline, its count and the Fisher p that the baseline does better."""
    from rich.table import Table

    t = Table(title=f"never right in {d.n_samples} samples")
    cols = ["item", "topic", "right", "success rate up to (95%)"]
    if d.baseline:
        cols += ["baseline right", "Fisher p (baseline better)", "kind"]
    for col in cols:
        t.add_column(col)
    for i in d.items:
        if i.right:
            continue
        cells = [i.id, i.topic, f"0/{i.n}", f"{i.upper95:.0%}"]
        if d.baseline:
            weak = i.kind == "lost_by_optimisation" and i.p_lost is not None and i.p_lost >= d.alpha
            cells += [f"{i.baseline_right}/{i.baseline_n}", f"{i.p_lost:.2g}" if i.p_lost is not None else "-",
                      LABELS[i.kind] + (" (not significant)" if weak else "")]
        t.add_row(*cells)
    return t
