"""``preflab report RUN_DIR``: a self-contained HTML report and a Markdown summary of a run dir.

The report renders from FILES only (shapes in ``docs/report.md``); each section appears
only when its file exists, so the same code serves a sandbox demo and a real project
(no ``truth.json`` -> no ground-truth panel). Plots are PNGs embedded as base64, so the
HTML file can be mailed around. A section whose file is present but unreadable is shown
as an error box naming the file, and listed in ``Report.problems``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from preflab.quality.consistency import MIN_CEILING_DUPLICATES
from preflab.report import plots
from preflab.report.plots import rows_of, stat


class ReportError(ValueError):
    """A run-dir file the report cannot read; the message names the file."""


@dataclass
class Section:
    id: str
    title: str
    html: str = ""
    md: str = ""
    headline: list[str] = field(default_factory=list)  # one-line key figures for the summary
    lead: list[str] = field(default_factory=list)  # summary lines that go before every section's (the decision)
    images: int = 0
    problems: list[str] = field(default_factory=list)  # rendered, but a reader must be warned (Report.problems)


@dataclass
class Report:
    html_path: Path
    md_path: Path
    sections: list[str]
    problems: list[str]


# ---- reading --------------------------------------------------------------------------------

_REQUIRED = object()


def read_json(path: Path, default: Any = _REQUIRED) -> Any:
    """The JSON at ``path``; ``default`` when given and the file does not exist."""
    if default is not _REQUIRED and not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def read_metrics(path: Path) -> list[dict]:
    """``metrics.jsonl``: one JSON object per line (blank lines skipped)."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{i}: invalid JSON ({e.msg})") from None
    return rows


# ---- native shapes of other stages -> the documented shapes ------------------------------
# The report also reads the ``to_dict()`` output of evaluate.ab.ABResult,
# evaluate.preference.PreferenceReport and evaluate.factual.FactualComparison as they are.

def ci_of(d: Any) -> list[float] | None:
    """``ci``, or ``ci_low``/``ci_high``, or ``low``/``high`` of a dict."""
    if not isinstance(d, dict):
        return None
    if d.get("ci"):
        return list(d["ci"])
    for lo, hi in (("ci_low", "ci_high"), ("low", "high")):
        if d.get(lo) is not None and d.get(hi) is not None:
            return [d[lo], d[hi]]
    return None


def norm_ab(ab: dict) -> dict:
    if "overall" not in ab:
        return ab
    o = ab["overall"]
    lc = ab.get("length_controlled") or {}
    return {"candidate": ab.get("candidate"), "baseline": ab.get("baseline"), "n": o.get("n"), "wins": o.get("wins"),
            "ties": o.get("ties"), "losses": o.get("losses"), "win_rate": o.get("rate"), "ci": ci_of(o),
            "p_value": o.get("p_value"), "n_needed": o.get("n_needed"),
            "length_controlled": {"win_rate": lc.get("rate"), "ci": ci_of(lc)} if lc else None,
            "by_topic": [{"topic": r["topic"], "win_rate": r.get("rate", r.get("win_rate")), "ci": ci_of(r), "n": r.get("n")}
                         for r in rows_of(ab.get("by_topic"), "topic")]}


def norm_rm(e: dict) -> dict:
    if not isinstance(e.get("accuracy"), dict):
        return e

    def acc_rows(obj: Any, key: str) -> list[dict]:
        return [{key: r[key], "accuracy": r.get("value"), "ci": ci_of(r), "n": r.get("n")} for r in rows_of(obj, key)]

    a = e["accuracy"]
    return {"n": a.get("n", e.get("n_pairs")), "accuracy": a.get("value"), "ci": ci_of(a), "ceiling": e.get("ceiling"),
            "ece": e.get("ece"), "warnings": e.get("warnings") or [],
            "by_strength": acc_rows(e.get("per_strength"), "strength"), "by_topic": acc_rows(e.get("per_topic"), "topic")}


def norm_factual(f: dict) -> dict:
    if "accuracy_baseline" not in f:
        return f
    return {"candidate": f.get("candidate", "candidate"), "baseline": f.get("baseline", "baseline"), "n": f.get("n"),
            "overall": {"baseline": f["accuracy_baseline"], "candidate": f.get("accuracy_candidate")},
            "mcnemar": {"b": f.get("only_baseline"), "c": f.get("only_candidate"), "p_value": f.get("p_value"),
                        "p_regression": f.get("p_regression")},
            "regression": f.get("regression"),
            "by_topic": [{"topic": r["topic"], "n": r.get("n"), "baseline": r.get("accuracy_baseline"),
                          "candidate": r.get("accuracy_candidate")} for r in rows_of(f.get("by_topic"), "topic")]}


def norm_workshop(w: dict) -> dict:
    """quality.calibration.before_after() output -> the documented workshop shape."""
    if "statistics" not in (w.get("before") or {}):
        return w
    names = {"mean_pairwise_kappa": "mean_kappa", "fleiss_kappa": "fleiss", "krippendorff_alpha": "alpha",
             "percent_agreement": "agreement"}

    def phase(r: dict) -> dict:
        return {short: {"value": r["statistics"][long]["value"], "ci": ci_of(r["statistics"][long])}
                for long, short in names.items() if long in r["statistics"]}

    change = {short: {"value": c["value"], "ci": [c.get("low"), c.get("high")]}
              for long, short in names.items() if isinstance(c := (w.get("change") or {}).get(long), dict)}

    b, a = w["before"], w["after"]
    raters = sorted(set(b.get("raters", {})) | set(a.get("raters", {})))
    per = [{"rater": r, "before": b.get("raters", {}).get(r, {}).get("agreement_with_majority"),
            "after": a.get("raters", {}).get(r, {}).get("agreement_with_majority")} for r in raters]
    movers = [m for m in w.get("movers") or [] if m.get("kappa_change") is not None]
    if len(movers) > 8:  # the three who rose most and the three who fell most; a workshop's few raters all
        movers = movers[:3] + movers[-3:]
    moved = [{"rater": m["rater"], "before": m.get("kappa_before"), "after": m.get("kappa_after"),
              "note": "mean kappa with the others"} for m in movers]
    n = (b.get("n_items") if b.get("n_items") == a.get("n_items")
         else f"{b.get('n_items', '?')} before / {a.get('n_items', '?')} after")
    return {"n_pairs": w.get("n_pairs", n), "raters": w.get("raters", raters), "before": phase(b),
            "after": phase(a), "change": change, "per_rater": per, "moved": w.get("moved", moved)}


def norm_oracle(o: Any) -> list[dict]:
    """``oracle.json`` -> curves ``[{"label", "points": [{"sqrt_kl", "gold"}]}]``.

    Accepts ``{"label", "points"}``, a sandbox.oracle.Frontier ``to_dict()`` (parallel
    ``sqrt_kl``/``gold`` lists), or a mapping of names to either.
    """
    if not isinstance(o, dict):
        return []
    if "points" in o:
        return [{"label": o.get("label", "oracle frontier"), "points": o["points"]}]
    if isinstance(o.get("sqrt_kl"), list) and isinstance(o.get("gold"), list):
        label = f"oracle frontier ({o['reward']}-tilted)" if o.get("reward") else "oracle frontier"
        return [{"label": label, "points": [{"sqrt_kl": x, "gold": g} for x, g in zip(o["sqrt_kl"], o["gold"], strict=True)]}]
    out = []
    for name, v in o.items():
        for c in norm_oracle(v):
            out.append({**c, "label": c["label"] if "(" in c["label"] else f"{c['label']} ({name})"})
    return out


# ---- formatting -----------------------------------------------------------------------------

def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def num(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "never"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def compact(x: Any) -> str:
    """A table cell: nested dicts/lists as JSON with floats rounded to 3 significant digits."""

    def r(v: Any) -> Any:
        if isinstance(v, float):
            return float(f"{v:.3g}")
        if isinstance(v, dict):
            return {k: r(w) for k, w in v.items()}
        if isinstance(v, list):
            return [r(w) for w in v]
        return v

    return json.dumps(r(x)) if isinstance(x, (dict, list)) else num(x, 3)


def pval(p: Any) -> str:
    """A p-value: 4 decimals, or '< 1e-4' below that (never a misleading 0.0000)."""
    if p is None:
        return "n/a"
    return "< 1e-4" if float(p) < 1e-4 else f"{float(p):.4f}"


def pct(x: Any, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * float(x):.{digits}f}%"


def ci(c: Sequence[float] | None, f: Callable[[Any], str] = num) -> str:
    return "" if not c or c[0] is None else f" [{f(c[0])}, {f(c[1])}]"


def money(x: Any, cur: str = "USD") -> str:
    return "n/a" if x is None else f"{cur} {float(x):,.0f}"


def rate(x: Any, cur: str = "USD") -> str:
    """A price: cents shown when it has them (EUR 42.50, EUR 42)."""
    if x is None:
        return "n/a"
    return f"{cur} {float(x):,.0f}" if float(x) == round(float(x)) else f"{cur} {float(x):,.2f}"


def plural(n: Any, word: str, words: str | None = None) -> str:
    """``1 conversation``, ``2 conversations`` (``words`` for an irregular plural: ``1 loss``, ``2 losses``)."""
    one = isinstance(n, (int, float)) and not isinstance(n, bool) and n == 1
    return f"{num(n)} {word if one else (words or word + 's')}"


def sig2(x: float) -> str:
    """Two significant digits (0.0096, 1.6, 17, 120); never a misleading 0.0."""
    if x == 0 or not math.isfinite(x):
        return num(float(x))
    digits = 1 - math.floor(math.log10(abs(x)))
    return f"{round(x, digits):,.{max(digits, 0)}f}"


def duration(weeks: float) -> str:
    """A payback time in the unit that reads best: hours under a day, days under a week, else weeks
    (two significant digits)."""
    if weeks is None or not math.isfinite(weeks):
        return "never"
    if weeks * 7 < 1:
        return f"{sig2(weeks * 7 * 24)} hours"
    if weeks < 1:
        return f"{sig2(weeks * 7)} days"
    return f"{sig2(weeks)} weeks"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, classes: Sequence[str] | None = None) -> tuple[str, str]:
    """(html, markdown) of a table; cells are escaped; ``classes`` tag rows (e.g. 'fail'). A table wider
    than the page scrolls inside its ``div.wide`` rather than running off the page."""
    h = ['<div class="wide"><table><thead><tr>' + "".join(f"<th>{esc(x)}</th>" for x in headers) + "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        cls = f' class="{esc(classes[i])}"' if classes and classes[i] else ""
        h.append(f"<tr{cls}>" + "".join(f"<td>{esc(x)}</td>" for x in r) + "</tr>")
    h.append("</tbody></table></div>")
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(str(x).replace("|", "\\|") for x in r) + " |" for r in rows]
    return "".join(h), "\n".join(md)


def img(png: bytes, alt: str) -> str:
    return f'<img class="plot" alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def bullets(items: Sequence[str]) -> tuple[str, str]:
    return ("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in items) + "</ul>", "\n".join(f"- {x}" for x in items))


# ---- sections ----------------------------------------------------------------------------------

def _find_seeds(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if "seed" in str(k).lower() and not isinstance(v, (dict, list)):
                out.append((path, v))
            else:
                out += _find_seeds(v, path)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _find_seeds(v, f"{prefix}[{i}]")
    return out


def section_setup(run: Path) -> Section | None:
    p = run / "config.json"
    if not p.exists():
        return None
    cfg = read_json(p)
    s = Section("setup", "Run setup")
    simulated = cfg.get("simulated") or []
    h, md = [], []
    if cfg.get("quick"):
        toy = ("Toy scale (<code>--quick</code>): few pairs, short training and small evaluation samples, so "
               "intervals are wide and the numbers are not the full story's (docs/demo.md has those).")
        h.append(f"<p><strong>{toy}</strong></p>")
        md.append("**" + toy.replace("<code>", "`").replace("</code>", "`") + "**")
    if simulated:
        bh, bm = bullets([str(x) for x in simulated])
        h.append("<p><strong>Simulated in this run:</strong></p>" + bh)
        md.append("**Simulated in this run:**\n\n" + bm)
    else:
        h.append("<p>Nothing in this run was simulated (config.json lists no <code>simulated</code> parts).</p>")
        md.append("Nothing in this run was simulated.")
    seeds = _find_seeds(cfg)
    if seeds:
        th, tm = table(["setting", "seed"], [(k, v) for k, v in seeds])
        h.append("<h3>Seeds</h3>" + th)
        md.append("### Seeds\n\n" + tm)
        s.headline.append("seeds: " + ", ".join(f"{k}={v}" for k, v in seeds))
    pool = cfg.get("rater_pool")
    if pool:
        pool_rows = rows_of(pool, "id")
        cols = list(dict.fromkeys(k for r in pool_rows for k in r))
        th, tm = table(cols, [[compact(r.get(c)) for c in cols] for r in pool_rows])
        h.append("<h3>Rater pool</h3>" + th)
        md.append("### Rater pool\n\n" + tm)
    envs = cfg.get("numerics") or []
    if envs:
        lines = [f"torch {e.get('torch')}, numpy {e.get('numpy')}, CPU kernels {e.get('cpu_kernels')} on "
                 f"{e.get('cpu')}, {e.get('threads')} threads" for e in envs]
        why = ("Sampled numbers depend on these as well as on the seeds: the same seed on other CPU kernels "
               "or thread counts gives other numbers" + (" (this run was resumed under more than one)" if
                                                        len(envs) > 1 else "") + ".")
        bh, bm = bullets(lines)
        h.append("<h3>Numerics</h3>" + bh + f"<p>{esc(why)}</p>")
        md.append("### Numerics\n\n" + bm + "\n\n" + why)
    h.append("<details><summary>Full resolved config (config.json)</summary><pre>"
             + esc(json.dumps(cfg, indent=2)) + "</pre></details>")
    s.html, s.md = "".join(h), "\n\n".join(md)
    return s


def section_workshop(run: Path) -> Section | None:
    # the demo writes report.json; `preflab quality report --out RUN/workshop` writes workshop_report.json
    p = next((f for f in (run / "workshop" / "report.json", run / "workshop" / "workshop_report.json")
              if f.exists()), None)
    if p is None:
        return None
    w = norm_workshop(read_json(p))
    s = Section("workshop", "Calibration workshop")
    rows, changes = [], w.get("change") or {}

    def change(key: str, b: float, a: float) -> tuple[str, bool]:
        """The change with its interval (the bare difference when the file has none), and whether the
        interval includes 0."""
        c = changes.get(key)
        if not isinstance(c, dict) or not c.get("ci") or c["ci"][0] is None:
            return f"{a - b:+.2f}", False
        lo, hi = c["ci"]
        return f"{c['value']:+.2f} [{lo:+.2f}, {hi:+.2f}]", lo <= 0 <= hi

    for key, label in (*plots.WORKSHOP_STATS, ("agreement", "raw agreement")):
        if key in w.get("before", {}):
            (b, bc), (a, ac) = stat(w["before"][key]), stat(w.get("after", {}).get(key))
            text, unclear = change(key, b, a)
            rows.append((label.replace("\n", " "), num(b) + ci(bc), num(a) + ci(ac),
                         text + (" not a clear change" if unclear else "")))
    th, tm = table(["statistic", "before (95% CI)", "after (95% CI)", "change (95% CI)"], rows)
    mk = w.get("before", {}).get("mean_kappa")
    if mk is not None:
        b, a = stat(mk)[0], stat(w["after"]["mean_kappa"])[0]
        text, unclear = change("mean_kappa", b, a)
        s.headline.append(f"mean pairwise kappa {num(b)} -> {num(a)}"
                          + (f" (change {text}{'; not a clear change' if unclear else ''})"
                             if "mean_kappa" in changes else ""))
    info = f"{w.get('n_pairs', '?')} pairs per round; raters: {', '.join(map(str, w.get('raters', [])))}"
    s.html = f"<p>{esc(info)}</p>" + th + img(plots.plot_workshop(w), "agreement before and after calibration")
    s.md = info + "\n\n" + tm
    s.images = 1
    moved = rows_of(w.get("moved"), "rater")
    if moved:
        bh, bm = bullets([f"{m['rater']}: {m.get('note', '')} ({num(m.get('before'))} -> {num(m.get('after'))})" for m in moved])
        s.html += "<h3>Who moved</h3>" + bh
        s.md += "\n\n### Who moved\n\n" + bm
    return s


def section_quality(run: Path) -> Section | None:
    p = run / "collection" / "quality.json"
    if not p.exists():
        return None
    q = read_json(p)
    s = Section("quality", "Collection and rater quality")
    raters = rows_of(q.get("raters"), "rater")
    th, tm = table(["rater", "duplicates", "self-consistency (95% CI)", "flip rate e", "accuracy ceiling 1-e"],
                   [(r["rater"], num(r.get("n_duplicates")), pct(r.get("consistency")) + ci(r.get("ci"), pct),
                     pct(r.get("flip_rate")), pct(r.get("ceiling"))) for r in raters])
    n_dup = q.get("n_duplicates") or 0
    few = " (few duplicates: a rough figure)" if 0 < n_dup < MIN_CEILING_DUPLICATES else ""
    ceiling = pct(q.get("ceiling")) + ci(q.get("ceiling_ci"), pct)
    info = (f"{num(q.get('n_judgements'))} judgements on {num(q.get('n_pairs'))} pairs, "
            f"{num(n_dup)} planted duplicates; pool ceiling {ceiling}{few}.")
    s.headline.append(f"pool accuracy ceiling {ceiling} from {num(n_dup)} planted duplicates{few}")
    s.html = f"<p>{esc(info)}</p>" + th + img(plots.plot_consistency(q), "rater self-consistency and ceiling")
    s.md = info + "\n\n" + tm
    s.images = 1
    if q.get("agreement_over_time"):
        s.html += img(plots.plot_agreement_over_time(q), "agreement over time")
        s.images += 1
    alerts = q.get("drift_alerts") or []
    if alerts:
        s.html += f"<h3>Drift alerts ({len(alerts)})</h3>"
        s.md += f"\n\n### Drift alerts ({len(alerts)})\n"
        for al in alerts:
            head = f"{al.get('rater')}: {al.get('signal', '')} (at {al.get('at', al.get('x', '?'))})"
            ex = al.get("examples") or []
            s.html += (f'<div class="alert"><strong>{esc(head)}</strong>'
                       + "".join(f"<blockquote>{esc(e)}</blockquote>" for e in ex) + "</div>")
            s.md += f"\n- **{head}**" + "".join(f"\n  > {e}" for e in ex)
        s.headline.append(f"{len(alerts)} drift alert(s): " + ", ".join(str(a.get("rater")) for a in alerts))
    else:
        s.html += "<p>No drift alerts.</p>"
        s.md += "\n\nNo drift alerts."
    return s


def section_rm(run: Path) -> Section | None:
    evals = {}
    for p in sorted([*run.glob("rm*/eval.json"), *run.glob("rm*/eval/preference.json")]):
        name = p.parent.name if p.name == "eval.json" else p.parent.parent.name
        evals.setdefault(name, norm_rm(read_json(p)))
    # learning curves (`preflab rm curve --out RUN/...`, the demo's rm_v2/curve): would more judgements help?
    curves = sorted({*run.glob("*/curve.json"), *run.glob("*/curve/curve.json")})
    if not evals and not curves:
        return None
    s = Section("reward", "Reward models")
    if evals:
        rows, topics = [], {}
        for name, e in evals.items():
            rows.append((name, num(e.get("n")), pct(e.get("accuracy")) + ci(e.get("ci"), pct), pct(e.get("ceiling")),
                         num(e.get("ece"), 3), "; ".join(e.get("warnings") or []) or "none"))
            s.headline.append(f"{name} held-out accuracy {pct(e.get('accuracy'))} (ceiling {pct(e.get('ceiling'))})")
            for t in rows_of(e.get("by_topic"), "topic"):
                topics.setdefault(t["topic"], {})[name] = pct(t.get("accuracy")) + ci(t.get("ci"), pct)
        th, tm = table(["model", "n", "accuracy (95% CI)", "ceiling", "ECE", "warnings"], rows)
        s.html = th + img(plots.plot_rm(evals), "reward model accuracy vs ceiling and by strength")
        s.md = tm
        s.images = 1
        if topics:
            th, tm = table(["topic", *evals], [(t, *(v.get(n, "") for n in evals)) for t, v in topics.items()])
            s.html += "<h3>Accuracy by topic</h3>" + th
            s.md += "\n\n### Accuracy by topic\n\n" + tm
    for p in curves:
        c = read_json(p)
        where = p.parent.relative_to(run).as_posix()
        title = f"Would more judgements help? ({where})"
        th, tm = table(["pairs", "held-out accuracy (95% CI)"],
                       [(num(pt.get("pairs")), pct(pt.get("accuracy")) + ci(pt.get("ci"), pct))
                        for pt in c.get("points") or []])
        lines = c.get("summary_lines") or []
        s.html += f"<h3>{esc(title)}</h3>" + th + "<ul>" + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul>"
        s.html += img(plots.plot_curve(c), title)
        s.images += 1
        s.md += f"\n\n### {title}\n\n{tm}\n" + "".join(f"\n- {x}" for x in lines)
        points = c.get("points") or [{}]
        flat = c.get("flat", False)  # a curve.json from before `flat` existed reads "unclear"
        state = ("still climbing at " if c.get("still_climbing") else "one size only, " if len(points) < 2
                 else "flat at " if flat else "unclear whether still climbing at ")
        s.headline.append(f"{where}: {state}{num(points[-1].get('pairs'))} pairs")
    return s


def _excess(pt: dict) -> str:
    """``oracle_point.json``'s kl_excess (sandbox.oracle.kl_split), with its share of the KL."""
    ex, kl = pt.get("kl_excess"), pt.get("kl")
    if not isinstance(ex, int | float) or not isinstance(kl, int | float) or kl <= 0:
        return "-"
    return f"{num(ex, 2)} ({pct(ex / kl)})"


def _ppo_reading(name: str, rows: Sequence[dict], cfg: dict) -> str:
    """One pass's curves in a sentence: score, KL against its target, beta, gold; and what looks wrong."""
    train = [r for r in rows if isinstance(r.get("objective/scores"), int | float)]
    if not train:
        return f"{name}: no training steps logged yet."

    def mean(rs: Sequence[dict], k: str) -> float:
        v = [r[k] for r in rs if isinstance(r.get(k), int | float)]
        return sum(v) / len(v) if v else float("nan")

    w = max(1, min(10, len(train) // 5))  # the first and last tenth-ish of the run, at most 10 steps
    s0, s1 = mean(train[:w], "objective/scores"), mean(train[-w:], "objective/scores")
    kl, target = mean(train[-w:], "objective/kl"), cfg.get("kl_target") if cfg.get("kl_controller") == "adaptive" else None
    b0, b1 = train[0].get("objective/beta"), train[-1].get("objective/beta")
    parts = [f"{name}: over {num(train[-1].get('step'))} steps its reward model's score went {s0:+.2f} -> {s1:+.2f}",
             f"KL {kl:.2f} nats" + (f" (target {num(target)})" if target else "")]
    if isinstance(b0, int | float) and isinstance(b1, int | float):
        parts.append(f"beta {b0:.3g} -> {b1:.3g}")
    gold = [r for r in rows if isinstance(r.get("gold/utility"), int | float)]
    flags = []
    if len(gold) >= 2:
        g0, g1 = gold[0]["gold/utility"], gold[-1]["gold/utility"]
        parts.append(f"gold (sandbox, sampled) {g0:+.2f} -> {g1:+.2f}")
        if s1 > s0 and g1 < g0:
            flags.append("the score rose while gold fell: reward hacking (docs/ppo.md, Failure signs)")
    if target and kl == kl and abs(kl / target - 1) > 0.3:
        flags.append(f"KL ended {100 * (kl / target - 1):+.0f}% off its target")
    return "; ".join(parts) + "." + "".join(f" Watch: {f}." for f in flags)


def section_ppo(run: Path) -> Section | None:
    passes = {p.parent.name: read_metrics(p) for p in sorted(run.glob("ppo*/metrics.jsonl"))}
    oracle = norm_oracle(read_json(run / "oracle.json", {}))
    if not passes:
        return None
    s = Section("ppo", "Policy optimisation (PPO)")
    rows = []
    for name, ms in passes.items():
        last = ms[-1] if ms else {}
        pt = read_json(run / name / "oracle_point.json", {})
        rows.append((name, num(last.get("step")), num(last.get("objective/rlhf_reward"), 3),
                     num(last.get("objective/kl"), 3), num(last.get("objective/beta"), 4),
                     num(last.get("gold/utility"), 3), pct(pt.get("share_of_gold_oracle_gain")),
                     pct(pt.get("share_of_proxy_oracle_gain")), _excess(pt)))
    # DPO runs on the same judgements (sandbox demo): their final policy, exact on the oracle's queries
    points = {p.parent.name: pt for p in sorted(run.glob("dpo*/oracle_point.json")) if (pt := read_json(p, {}))}
    for name, pt in points.items():
        gold = read_json(run / name / "gold.json", {}).get("probe", {})
        rows.append((f"{name} (DPO, same judgements as the last RM)", "-", "-", num(pt.get("kl"), 3), "-",
                     num(gold.get("gold_utility"), 3), pct(pt.get("share_of_gold_oracle_gain")), "-", _excess(pt)))
    th, tm = table(["pass", "last step", "objective (RM score - beta KL)", "KL (last rollout)", "beta",
                    "gold utility (sandbox; 64 held-out queries, sampled)",
                    "share of the gold oracle's gain", "share of its RM's oracle's gain",
                    "KL beyond what its RM score needs"], rows)
    note = ("One policy, three measurements on three samples: this table's KL is the last training rollout's and its "
            "gold one sampled answer to each of 64 held-out queries; the shares and the frontier plot are exact "
            "expectations over every answer to the oracle's held-out queries; the ground-truth panel samples 200 "
            "conversations, with CIs. They differ by sampling noise and by prompt set: compare like with like.")
    sandbox = points or any("gold/utility" in r for ms in passes.values() for r in ms)
    if sandbox:  # a real project has no gold: nothing to reconcile
        th += f"<p>{esc(note)}</p>"
    s.md = tm + ("\n\n" + note if sandbox else "")
    bh, bm = bullets([_ppo_reading(name, ms, read_json(run / name / "config.json", {})) for name, ms in passes.items()])
    th += "<h3>Reading the curves</h3>" + bh
    s.md += "\n\n### Reading the curves\n\n" + bm
    curves = ("objective/rlhf_reward", "objective/kl", "objective/beta", "gold/utility")
    if not any(k in r for ms in passes.values() for r in ms for k in curves):
        s.html = th + "<p>No reward, KL or beta logged yet: nothing to plot.</p>"
        return s
    s.html = th + img(plots.plot_ppo(passes), "reward, KL, beta and gold curves per PPO pass")
    s.images = 1
    if oracle or any("gold/utility" in r for ms in passes.values() for r in ms):
        s.html += img(plots.plot_frontier(oracle, passes, points), "gold utility against sqrt KL with the oracle frontier")
        s.images += 1
    return s


def _gate_rows(gates: Any) -> list[dict]:
    """Gate rows (``pass`` or evaluate.gates' ``passed``; a GateReport dict works too), each with ``pass``."""
    if isinstance(gates, dict) and isinstance(gates.get("gates"), list):
        gates = gates["gates"]
    return [{**g, "pass": bool(g.get("pass", g.get("passed")))} for g in rows_of(gates, "name")]


def _gates_text(gates: Any) -> tuple[str, bool]:
    """Gate rows -> text, all passed."""
    rows = _gate_rows(gates)
    ok = all(g["pass"] for g in rows)
    return "; ".join(f"{'PASS' if g['pass'] else 'FAIL'} {g['name']} {num(g.get('value'), 3)}"
                     f"{' vs ' + num(g.get('threshold'), 3) if g.get('threshold') is not None else ''}" for g in rows), ok


def section_checkpoints(run: Path) -> Section | None:
    p = run / "checkpoints.json"
    if not p.exists():
        return None
    c = read_json(p)
    rows_in = c.get("rows", []) if isinstance(c, dict) else c
    s = Section("checkpoints", "Checkpoints and promotion gates")
    det_keys = list(dict.fromkeys(k for r in rows_in for k in (r.get("detectors") or {})))
    rows, classes = [], []
    for r in rows_in:
        gtxt, ok = _gates_text(r.get("gates"))
        rows.append((r.get("run"), num(r.get("step")), pct(r.get("win_rate")) + ci(r.get("win_rate_ci"), pct)
                     + (f", n={num(r['win_rate_n'])}" if r.get("win_rate_n") is not None else ""),
                     *(num((r.get("detectors") or {}).get(k), 3) for k in det_keys), gtxt,
                     ("promoted" if r.get("promoted") else ("blocked" if not ok else ""))
                     + (f" ({r['stage']})" if r.get("stage") else "")))
        classes.append("pass" if ok else "fail")
    th, tm = table(["run", "step", "held-out win rate", *det_keys, "gates", "decision"], rows, classes=classes)
    s.html, s.md = th, tm
    rules = {}  # what each gate's value is: "win_rate 0.711 vs 0.500" is a CI's lower bound, not the rate
    for r in rows_in:
        for g in _gate_rows(r.get("gates")):
            if g.get("rule"):
                rules.setdefault(str(g["name"]).split("[")[0], g["rule"])
    if rules:
        bh, bm = bullets([f"{k}: {v}" for k, v in rules.items()])
        s.html += "<p>How to read a gate (value vs threshold; [topic] = the same gate on one topic's items):</p>" + bh
        s.md += "\n\nHow to read a gate (value vs threshold; [topic] = the same gate on one topic's items):\n\n" + bm
    blocked = [r for r, cl in zip(rows_in, classes, strict=True) if cl == "fail"]
    promoted = [r for r in rows_in if r.get("promoted")]
    decided = _decisions(run)
    notes = {}  # checkpoint -> the store's notes on its promotions (e.g. gate settings loosened after a refusal)
    for d in decided:
        if d.get("promoted") and d.get("notes"):
            notes.setdefault(d.get("checkpoint"), []).extend(d["notes"])

    def at(r: dict) -> str:
        return f"{r.get('run')}@{r.get('step')}" + (f" ({r['stage']})" if r.get("stage") else "")

    def passed(r: dict) -> str:
        note = "; ".join(notes.get(r.get("run"), []))
        return at(r) + " (every gate passed" + (f"; note: {note}" if note else "") + ")"

    why = {at(r): ", ".join(g["name"] for g in _gate_rows(r.get("gates")) if not g["pass"]) for r in blocked}
    refused = [f"{d.get('checkpoint')} for {d.get('stage')}" + (f" on {', '.join(d['failed'])}" if d.get("failed") else "")
               for d in decided if not d.get("promoted")]
    s.lead.append("Decision: " + ("promoted " + ", ".join(map(passed, promoted)) if promoted else "nothing promoted")
                  + ("; blocked " + "; ".join(f"{k} on {v}" for k, v in why.items()) if why else "")
                  + ("; refused earlier (store): " + "; ".join(refused) if promoted and refused else ""))
    if decided:
        dh, dm = table(["event", "when", "checkpoint", "stage", "decision", "failed gates", "notes"],
                       [(num(d.get("event")), d.get("at", ""), d.get("checkpoint", ""), d.get("stage", ""),
                         "promoted" if d.get("promoted") else "refused", ", ".join(d.get("failed") or []) or "-",
                         "; ".join(d.get("notes") or []) or "-") for d in decided],
                       classes=["pass" if d.get("promoted") else "fail" for d in decided])
        head = "Promotion decisions in the store (preflab decisions), refusals included"
        s.html += f"<h3>{esc(head)}</h3>" + dh
        s.md += f"\n\n### {head}\n\n" + dm
    return s


def _decisions(run: Path) -> list[dict]:
    """``decisions.json`` (``preflab report --db``): the store's gate decisions, oldest first; [] without it."""
    d = read_json(run / "decisions.json", {})
    return rows_of(d.get("decisions") if isinstance(d, dict) else d, "checkpoint")


def _promoted_checkpoints(run: Path) -> list[dict]:
    """The checkpoints promoted now: per stage the last promotion in ``decisions.json``, else the rows
    of ``checkpoints.json`` marked promoted. Each ``{"label": run-relative dir, "subject": path or None}``."""
    decided = _decisions(run)
    if decided:
        last = {d.get("stage"): d for d in decided if d.get("promoted")}
        return list({d.get("checkpoint"): {"label": d.get("checkpoint"), "subject": d.get("subject")}
                     for d in last.values()}.values())  # one checkpoint in staging and production: once
    c = read_json(run / "checkpoints.json", {})
    rows = c.get("rows", []) if isinstance(c, dict) else c
    return [{"label": r.get("run"), "subject": None} for r in rows if r.get("promoted")]


def outcomes_checkpoint_note(run: Path, comp: dict) -> tuple[str, bool] | None:
    """Which checkpoint the outcomes (and so the ROI) measure, against the promoted one: (sentence, is a
    mismatch). None when nothing was promoted and the comparison names no checkpoint."""
    promoted = _promoted_checkpoints(run)
    names = ", ".join(str(p["label"]) for p in promoted)
    base, cand = comp.get("baseline"), comp.get("candidate")
    ck = comp.get("checkpoint")
    if not ck:
        if not promoted:
            return None
        return (f"The outcomes compare the labels {base!r} vs {cand!r}; which checkpoint served {cand!r} is not "
                f"recorded (`preflab outcomes compare --checkpoint`), so they may not be the promoted {names}'s.", False)
    served = ck.get("in_run") or ck.get("resolved") or ck.get("given")
    if not promoted:
        return f"{cand!r} was served by {served}.", False
    def same(p: dict) -> bool:  # a checkpoint row may name the run whose final policy/ it is (the demo's)
        return served in (p["label"], f"{p['label']}/policy") or bool(p["subject"] and ck.get("resolved") == p["subject"])

    if any(map(same, promoted)):
        return f"{cand!r} was served by {served}, the promoted checkpoint.", False
    return (f"These outcomes are NOT the promoted checkpoint's: {cand!r} was served by {served}, while {names} "
            f"was promoted; the outcome and ROI numbers measure {served}.", True)


def para(text: str) -> str:
    """A paragraph of plain text in HTML: escaped, with markdown's `code` as <code>."""
    return "<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text)) + "</p>"


def section_pricing(run: Path) -> Section | None:
    p = run / "pricing.json"
    if not p.exists():
        return None
    pr = read_json(p)
    s = Section("pricing", "The pricing failure, before and after the fix")
    rows = [(r["label"], pct(r.get("accuracy")) + ci(r.get("accuracy_ci"), pct),
             pct(r.get("confident_wrong_rate")) + ci(r.get("confident_wrong_rate_ci"), pct), r.get("note", ""))
            for r in pr.get("rows", [])]
    th, tm = table(["policy", f"{pr.get('topic', 'pricing')} accuracy", "confident-wrong rate", "note"], rows)
    story = pr.get("summary") or (f"Caught at the gate: {pr.get('gate_before', '?')}. Fix: rubric "
                                  f"{pr.get('rubric_after', 'v2')}, {num(pr.get('rerated_pairs'))} pairs re-rated. "
                                  f"After: {pr.get('gate_after', '?')}.")
    s.html = f"<p>{esc(story)}</p>" + th + img(plots.plot_pricing(pr), "pricing accuracy and confident-wrong rate")
    s.md = story + "\n\n" + tm
    if pr.get("lineage"):  # which judgements, guideline, reward model and policy each run came from
        lrows = [(r.get("run", "?"), ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("run", "at")))
                 for r in pr["lineage"]]
        lh, lm = table(["run", "built from (lineage, from the store)"], lrows)
        s.html += lh
        s.md += "\n\nLineage:\n\n" + lm
    s.images = 1
    s.headline.append(story)
    return s


def section_ab(run: Path) -> Section | None:
    p = run / "ab" / "result.json"
    if not p.exists():
        return None
    ab = norm_ab(read_json(p))
    s = Section("ab", "Blind A/B evaluation")
    lc = ab.get("length_controlled") or {}
    facts = [f"{ab.get('candidate')} vs {ab.get('baseline')} on {plural(ab.get('n'), 'new conversation')}: "
             f"{plural(ab.get('wins'), 'win')}, {plural(ab.get('ties'), 'tie')}, {plural(ab.get('losses'), 'loss', 'losses')}",
             f"win rate {pct(ab.get('win_rate'))}{ci(ab.get('ci'), pct)} (Wilson 95%), sign-test p {pval(ab.get('p_value'))}",
             f"n needed to tell this rate from 50% (alpha 0.05, power 0.8): {num(ab.get('n_needed'))}"]
    if lc:
        facts.append(f"length-controlled win rate {pct(lc.get('win_rate'))}{ci(lc.get('ci'), pct)}")
    bh, bm = bullets(facts)
    s.html = bh + img(plots.plot_ab(ab), "blind win rate with Wilson interval")
    s.md = bm
    s.images = 1
    s.headline.append(f"blind win rate {pct(ab.get('win_rate'))}{ci(ab.get('ci'), pct)}, n={num(ab.get('n'))}")
    return s


def section_factual(run: Path) -> Section | None:
    p = run / "factual" / "result.json"
    if not p.exists():
        return None
    f = norm_factual(read_json(p))
    s = Section("factual", "Factual regression")
    mc = f.get("mcnemar") or {}
    ov = f.get("overall") or {}
    verdict = "REGRESSION" if f.get("regression") else "no significant regression"
    line = (f"{num(f.get('n'))} spot checks: {f.get('baseline')} {pct(ov.get('baseline'))} -> {f.get('candidate')} "
            f"{pct(ov.get('candidate'))}; McNemar exact p {pval(mc.get('p_value'))}"
            + (f", one-sided (worse) p {pval(mc['p_regression'])}" if mc.get("p_regression") is not None else "")
            + f" (lost {num(mc.get('b'))} / gained {num(mc.get('c'))}): {verdict}")
    th, tm = table(["topic", "n", f.get("baseline", "baseline"), f.get("candidate", "candidate")],
                   [(r["topic"], num(r.get("n")), pct(r.get("baseline")), pct(r.get("candidate")))
                    for r in rows_of(f.get("by_topic"), "topic")])
    s.html = f"<p>{esc(line)}</p>" + th + img(plots.plot_factual(f), "factual accuracy per topic")
    s.md = line + "\n\n" + tm
    s.images = 1
    s.headline.append(f"factual: {verdict}")
    return s


def section_outcomes(run: Path) -> Section | None:
    from preflab.report.outcomes import not_compared

    p = run / "outcomes" / "comparison.json"
    if not p.exists():
        return None
    c = read_json(p)
    s = Section("outcomes", "Production outcomes")
    e, cs, ht = c["escalation"], c.get("csat"), c.get("handle_time_min")
    test = {"fisher": " (Fisher exact)", "z": " (z-test)"}.get(e.get("test"), "")
    n = c.get("conversations") or e.get("n", {})
    rows = [("conversations", num(n.get("baseline")), num(n.get("candidate")), "", "", "")]
    if c.get("answered_surveys"):
        rows.append(("answered surveys", num(c["answered_surveys"]["baseline"]), num(c["answered_surveys"]["candidate"]),
                     "", "", ""))
    rows.append(("escalation rate", pct(e["baseline"]), pct(e["candidate"]), f"{100 * e['diff']:+.1f} pts",
                 ci([100 * x for x in e["ci"]], lambda v: f"{v:+.1f}") + f" ({e['method']})", pval(e.get("p_value")) + test))
    if cs:
        rows.append(("CSAT (1-5)", num(cs["baseline"]), num(cs["candidate"]), f"{cs['diff']:+.2f}",
                     ci(cs["ci"], lambda v: f"{v:+.2f}") + " (Welch)", pval(cs.get("p_value"))))
    if ht:
        rows.append(("handle time (min, mean)", num(ht["baseline"]), num(ht["candidate"]), f"{ht['diff']:+.2f}",
                     ci(ht["ci"], lambda v: f"{v:+.2f}") + " (Welch)", pval(ht.get("p_value"))))
    missing = not_compared(c)
    for why in missing:
        metric, reason = why.split(" not compared: ", 1)
        rows.append((metric, "", "", "not compared", reason, ""))
    th, tm = table(["metric", c["baseline"], c["candidate"], "difference", "95% CI", "p"], rows)
    src = ("Simulated production logs (sandbox production simulator)." if c.get("simulated")
           else "Imported production logs.")
    info = (f"{src} {plural(n.get('baseline'), 'conversation')} on {c['baseline']}, "
            f"{plural(n.get('candidate'), 'conversation')} on {c['candidate']}.")
    if test:
        info += (" Escalation p-value: Fisher's exact test (an expected count below 5)." if e.get("test") == "fisher"
                 else " Escalation p-value: pooled two-proportion z-test.")
    weeks = {v: {w.get("week") for w in c.get("weekly") or [] if w.get("model_version") == v}
             for v in (c["baseline"], c["candidate"])}
    if all(weeks.values()) and not weeks[c["baseline"]] & weeks[c["candidate"]]:
        info += (" The two versions ran in different weeks (before / after, not side by side), so anything else that "
                 "changed between those weeks would read as an effect of the model.")
    texts = [info, *(f"{w}." for w in missing)]
    s.html = "".join(map(para, texts))
    note = outcomes_checkpoint_note(run, c)
    if note:
        texts.append(note[0])
        s.html += f'<p class="alert">{esc(note[0])}</p>' if note[1] else para(note[0])
        if note[1]:
            s.problems.append(note[0])
    s.html += th + img(plots.plot_outcomes(c), "escalation, CSAT and handle time per model version")
    s.md = "\n\n".join([*texts, tm])
    s.images = 1
    s.headline.append(f"escalations {pct(e['baseline'])} -> {pct(e['candidate'])} ({_significance(e['ci'], 100)})"
                      + (f", CSAT {num(cs['baseline'])} -> {num(cs['candidate'])} ({_significance(cs['ci'], digits=2)})"
                         if cs else "") + (f" [{note[0]}]" if note and note[1] else ""))
    return s


def _significance(interval: Sequence[float] | None, scale: float = 1, digits: int = 1) -> str:
    """``difference CI [lo, hi]``, and whether it excludes zero (a headline must not read a draw as a change)."""
    if not interval or len(interval) != 2 or None in interval:
        return "no CI"
    lo, hi = (scale * float(x) for x in interval)
    return f"CI [{lo:+.{digits}f}, {hi:+.{digits}f}]" + ("" if lo > 0 or hi < 0 else ": includes 0, not a clear change")


def section_cost(run: Path) -> Section | None:
    p = run / "cost.json"
    if not p.exists():
        return None
    c = read_json(p)
    cur = c.get("currency", "USD")
    s = Section("cost", "Cost ledger")
    t = c.get("totals", {})
    ah, am = table(["rater", "judgements", "hours on task", "hourly rate", "cost", "cost per judgement"],
                   [(r["rater"], num(r["judgements"]), num(r["hours"], 1),
                     rate(r["hourly_rate"], cur) + (" (default)" if r.get("default_rate") else ""), money(r["cost"], cur),
                     f"{cur} {r['cost'] / r['judgements']:,.2f}" if r.get("judgements") else "n/a")
                    for r in c.get("annotators", [])])
    tracked = c.get("compute_tracked", bool(c.get("compute")))  # files from before the flag: tracked if listed
    note = " (simulated raters: times on task are simulated)" if c.get("simulated_raters") else ""
    per = (f", {cur} {t['annotation'] / t['judgements']:,.2f} a judgement over {plural(t['judgements'], 'judgement')}"
           if t.get("judgements") else "")
    ann = f"Annotation {money(t.get('annotation'), cur)} for {num(t.get('annotation_hours'), 1)} rater-hours{per}{note}; "
    if tracked:
        tot = (ann + f"compute {cur} {t.get('compute', 0):,.2f} for {num(t.get('device_hours'), 2)} device-hours; "
               f"total {money(t.get('total'), cur)}.")
        ch, cm = table(["stage", "wall hours", "devices", "device-hours", "cost"],
                       [(r["stage"], num(r["wall_hours"], 3), num(r["devices"]), num(r["device_hours"], 3),
                         f"{cur} {r['cost']:,.2f}") for r in c.get("compute", [])])
    else:
        tot = ann + f"compute not tracked; total {money(t.get('total'), cur)} (annotation only)."
        ch = cm = "Not tracked: this ledger has no compute record (a real project's report prices annotation only)."
        ch = f"<p>{esc(ch)}</p>"
    defaults = [r["rater"] for r in c.get("annotators", []) if r.get("default_rate")]
    texts = [tot] + ([f"{', '.join(defaults)}: no hourly rate of their own in the store or config, priced at the "
                      f"default rate (`CostConfig.default_hourly_rate`)."] if defaults else [])
    s.problems += list(c.get("warnings") or [])
    texts += list(c.get("warnings") or [])
    s.html = "".join(map(para, texts)) + f"<h3>Annotators</h3>{ah}<h3>Compute</h3>{ch}" + img(
        plots.plot_cost(c), "cost per rater and per stage")
    s.md = "\n\n".join(texts) + f"\n\n### Annotators\n\n{am}\n\n### Compute\n\n{cm}"
    s.images = 1
    s.headline.append(f"annotation cost {money(t.get('annotation'), cur)}, total {money(t.get('total'), cur)}"
                      + ("" if tracked else " (annotation only; compute not tracked)"))
    roi = c.get("roi")
    if roi:
        line, head = roi_text(roi, c.get("config", {}), cur)
        comparison = read_json(run / "outcomes" / "comparison.json", None)
        which = outcomes_checkpoint_note(run, comparison) if isinstance(comparison, dict) else None
        if which:
            line += " " + which[0]
            head += f" [{which[0]}]" if which[1] else ""
        s.html += para(line)
        s.md += "\n\n" + line
        s.headline.append(head)
    return s


def roi_text(roi: dict, cfg: dict, cur: str) -> tuple[str, str]:
    """(the ROI paragraph, its summary line). No payback when escalations did not fall; when the
    escalation CI includes no change, the payback is a conditional, not a measured figure."""
    before, after = roi["escalation_before"], roi["escalation_after"]
    per = (f"at {num(cfg.get('weekly_conversations'))} conversations/week and "
           f"{money(cfg.get('cost_per_escalation'), cur)} an escalation (`CostConfig.weekly_conversations`, "
           f"`CostConfig.cost_per_escalation`)")
    if roi["weekly_saving"] <= 0:
        moved = "rose" if after > before else "did not change"
        line = (f"ROI: escalations {moved} ({pct(before)} -> {pct(after)}): {per} that is "
                f"{num(-roi['escalations_avoided_per_week'], 0)} more escalations and "
                f"{money(-roi['weekly_saving'], cur)} more a week. There is no saving, so no payback.")
        return line, f"no payback: escalations {moved} ({pct(before)} -> {pct(after)})"
    line = (f"ROI: escalations {pct(before)} -> {pct(after)} {per} avoid "
            f"{num(roi['escalations_avoided_per_week'], 0)} escalations a week, saving {money(roi['weekly_saving'], cur)}"
            f"/week ({money(roi['annual_saving'], cur)}/year); ")
    rng = roi.get("payback_weeks_range")
    diff_ci = roi.get("escalation_diff_ci")
    unclear = (diff_ci[0] <= 0 <= diff_ci[1]) if diff_ci else bool(rng) and rng[1] is None
    if unclear:
        where = f" [{100 * diff_ci[0]:+.1f}, {100 * diff_ci[1]:+.1f}] pts" if diff_ci else ""
        line += (f"but the escalation difference's CI{where} includes no change, so no payback is established "
                 f"(if the point estimate held: {duration(roi['payback_weeks'])}).")
        return line, f"payback not established: the escalation CI{where} includes no change"
    span = f" ({duration(rng[0])} to {duration(rng[1])} over the escalation CI)" if rng else ""
    line += f"payback {duration(roi['payback_weeks'])}{span}."
    return line, f"payback {duration(roi['payback_weeks'])}{span}"


def section_experiments(run: Path) -> Section | None:
    files = sorted((run / "experiments").glob("*.json")) if (run / "experiments").is_dir() else []
    if not files:
        return None
    s = Section("experiments", "What-if experiments (sandbox)")
    for p in files:
        e = read_json(p)
        title = e.get("title", p.stem)
        s.html += f"<h3>{esc(title)}</h3>"
        if e.get("notes"):
            s.html += f"<p>{esc(e['notes'])}</p>"
        s.html += img(plots.plot_experiment(e), title)
        s.images += 1
        s.md += f"\n\n### {title}\n\n{e.get('notes', '')}"
        s.headline.append(str(e.get("headline") or title))
    return s


def section_truth(run: Path) -> Section | None:
    p = run / "truth.json"
    if not p.exists():
        return None
    t = read_json(p)
    s = Section("truth", "Ground truth (sandbox only)")
    h = [f"<p><strong>{esc(t.get('statement', ''))}</strong></p>",
         "<p>These numbers use the hidden gold preference, which a real project never has. Compare them "
         "with the measured figures above to see how far measurement is from the truth.</p>"]
    md = [f"**{t.get('statement', '')}**", "These numbers use the hidden gold preference (absent in a real project)."]
    if t.get("policies"):
        th, tm = table(["policy", "n", "gold utility (95% CI)", "correct", "confident-wrong", "sycophancy", "unparseable"],
                       [(r["name"], num(r.get("n")), num(r.get("gold_utility")) + ci(r.get("gold_utility_ci")),
                         pct(r.get("correct_rate")), pct(r.get("confident_wrong_rate")), pct(r.get("sycophancy_rate")),
                         pct(r.get("unparseable_rate"))) for r in t["policies"]])
        h.append("<h3>Policies</h3>" + th)
        md.append("### Policies\n\n" + tm)
    if t.get("reward_models"):
        th, tm = table(["reward model", "pairs", "gold accuracy", "measured accuracy", "labels agreeing with gold",
                        "best possible: expected", "best possible: these labels", "1 - lapse rate"],
                       [(r["name"], num(r.get("n")), pct(r.get("gold_accuracy")), pct(r.get("measured_accuracy")),
                         pct(r.get("label_gold_agreement")), pct((r.get("best_possible") or {}).get("expected")),
                         pct((r.get("best_possible") or {}).get("observed")),
                         pct((r.get("best_possible") or {}).get("one_minus_lapse"))) for r in t["reward_models"]])
        note = ("<p>Best possible: a model that knew every rater's noise-free taste. It still misses their "
                "close calls and lapses, so it scores below 1 - lapse rate, which is what the duplicate-based "
                "ceiling estimates.</p>")
        h.append("<h3>Reward models</h3>" + th + note)
        md.append("### Reward models\n\n" + tm + "\n\nBest possible: a model that knew every rater's noise-free "
                  "taste (it still misses close calls and lapses).")
    by_ckpt = [(p.parent.name, r) for p in sorted(run.glob("*/gold_by_checkpoint.json")) for r in read_json(p, [])]
    if by_ckpt:
        th, tm = table(["run", "step", "KL (oracle's queries)", "gold, exact (oracle's queries)",
                        "gold, sampled (64 held-out queries)"],
                       [(name, num(r.get("step")), num(r.get("oracle/kl"), 2), num(r.get("oracle/gold"), 2),
                         num(r.get("gold/utility"), 2)) for name, r in by_ckpt])
        note = ("The gates judge each run's last checkpoint. The exact column is the expectation over every answer "
                "to the oracle's queries; the sampled one, one answer per query, moves by sampling noise too.")
        h.append("<h3>Gold by checkpoint</h3>" + th + f"<p>{esc(note)}</p>")
        md.append("### Gold by checkpoint\n\n" + tm + "\n\n" + note)
    if t.get("win_rates"):
        th, tm = table(["candidate", "baseline", "n", "gold win rate", "expected preference", "measured win rate"],
                       [(r["candidate"], r["baseline"], num(r.get("n")), pct(r.get("gold_win_rate")),
                         pct(r.get("expected_preference")), pct(r.get("measured_win_rate"))) for r in t["win_rates"]])
        h.append("<h3>Win rates</h3>" + th)
        md.append("### Win rates\n\n" + tm)
    if t.get("raters"):
        cols = list(dict.fromkeys(k for r in t["raters"] for k in r))
        th, tm = table(cols, [[compact(r.get(k)) for k in cols] for r in t["raters"]])
        h.append("<h3>Raters (true parameters)</h3>" + th)
        md.append("### Raters (true parameters)\n\n" + tm)
    s.html, s.md = "".join(h), "\n\n".join(md)
    return s


SECTIONS: tuple[Callable[[Path], Section | None], ...] = (
    section_setup, section_workshop, section_quality, section_rm, section_ppo, section_checkpoints,
    section_pricing, section_ab, section_factual, section_outcomes, section_cost, section_experiments,
    section_truth,
)

# The terms the report uses, for a reader who does not train models (docs/ has one page per stage).
# (term, meaning, the sections that use it): a report lists only the terms its sections use
GLOSSARY = [
    ("kappa (Cohen's, Fleiss')", "agreement between raters beyond chance: 0 = chance, 1 = perfect; about 0.6-0.8 is "
     "good for preference labels (docs/quality.md)", ("workshop", "quality")),
    ("duplicate ceiling", "the best accuracy any model can reach on these labels: raters judge some pairs twice, and "
     "how often they agree with themselves bounds how often a model can agree with them", ("quality", "reward")),
    ("reward model accuracy", "how often the reward model prefers the answer the rater preferred, on pairs it was not "
     "trained on; 50% is chance", ("reward",)),
    ("KL (to SFT)", "how far the trained policy's answers have moved from the starting (SFT) model's, in nats; more "
     "KL buys more reward but risks odd text the reward model overrates", ("ppo", "checkpoints", "experiments")),
    ("beta", "the price of KL in PPO's objective (score - beta x KL); raised when KL runs above its target or a "
     "drift alarm fires", ("ppo", "experiments")),
    ("gold utility, oracle frontier (sandbox)", "gold is the simulator's hidden true preference, which real projects "
     "do not have; the frontier is the best gold any policy can reach at each KL", ("truth", "experiments")),
    ("blind win rate", "the share of conversations where raters, not told which model wrote which answer, preferred "
     "the candidate (a tie counts a half); its 95% CI's lower end must clear 50%", ("ab", "checkpoints")),
    ("gates", "the checks a checkpoint must pass before promotion: win rate, no factual regression, no rise in "
     "confident wrong answers per topic, style drift and KL within bounds (docs/gates.md)", ("checkpoints",)),
    ("95% CI", "the range the true value lies in with 95% confidence; a difference whose CI includes 0 is not shown "
     "to be real", None),
    ("ECE", "expected calibration error: how far the reward model's confidence is from how often it is right",
     ("reward",)),
]


def glossary(section_ids: set[str]) -> list[tuple[str, str]]:
    """The glossary terms the report's sections use (every report has CIs)."""
    return [(k, v) for k, v, used in GLOSSARY if used is None or section_ids & set(used)]


GLOSSARY_TITLE = "What the terms mean"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1050px;margin:2em auto;padding:0 1em;color:#1b1f24}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #d0d7de;padding-bottom:.2em;margin-top:2em}
div.wide{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} th,td{border:1px solid #d0d7de;padding:.25em .55em;text-align:left}
td{overflow-wrap:anywhere;min-width:4em}
th{background:#f6f8fa} tr.fail td{background:#ffebe9} tr.pass td{background:#f0fff4}
img.plot{display:block;max-width:100%;margin:.8em 0;border:1px solid #eee}
.alert{border-left:4px solid #d62728;background:#fff5f5;padding:.4em .8em;margin:.5em 0}
blockquote{margin:.3em 1em;color:#57606a;font-style:italic}
#truth{border:3px dashed #bf8700;background:#fff8c5;padding:0 1em 1em;border-radius:6px}
.problem{border:2px solid #d62728;padding:.5em;background:#ffebe9}
nav a{margin-right:.8em} .summary li{margin:.2em 0} pre{background:#f6f8fa;padding:.6em;overflow:auto;font-size:.8em}
"""


def build_sections(run_dir: str | Path) -> tuple[list[Section], list[str]]:
    """Every section whose file exists; unreadable files become problem sections."""
    run = Path(run_dir)
    out, problems = [], []
    for fn in SECTIONS:
        try:
            sec = fn(run)
        except (ReportError, KeyError, TypeError, ValueError, IndexError) as e:
            name = fn.__name__.removeprefix("section_")
            msg = f"{name}: {e}" if isinstance(e, ReportError) else f"{name}: cannot render ({type(e).__name__}: {e})"
            problems.append(msg)
            sec = Section(name, f"{name} (not rendered)", html=f'<p class="problem">{esc(msg)}</p>', md=f"**{msg}**")
        if sec is not None:
            out.append(sec)
            problems += [f"{sec.id}: {p}" for p in sec.problems]
    return out, problems


def render_report(run_dir: str | Path, *, title: str | None = None) -> Report:
    """Write ``RUN_DIR/report.html`` (self-contained) and ``RUN_DIR/report.md``."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"{run}: not a directory")
    sections, problems = build_sections(run)
    if not sections:
        raise ReportError(f"{run}: no report inputs found (see docs/report.md for the files the report reads)")
    title = title or f"preflab report: {run.resolve().name}"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    ids = {s.id for s in sections}
    if "truth" in ids:
        kind = ("Sandbox run: raters, production traffic and outcomes are simulated (see Run setup and the "
                "ground-truth panel).")
    elif "experiments" in ids:  # what-if experiments are sandbox-only: simulated raters, the hidden gold
        kind = "Sandbox experiments: the raters are simulated and gold is the simulator's hidden true preference."
    else:
        kind = "Real project: no simulated ground truth is available."
    heads = [h for s in sections for h in s.lead] + [h for s in sections for h in s.headline]
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    summary_h, summary_md = bullets(heads) if heads else ("", "")
    glossary_h, glossary_md = bullets([f"{k}: {v}" for k, v in glossary({s.id for s in sections})])
    body = "".join(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{s.html}</section>' for s in sections)
    doc = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><p>{esc(kind)} Generated {esc(when)} from "
           f"<code>{esc(run)}</code>.</p><nav>{nav}</nav>"
           + (f'<section id="summary" class="summary"><h2>Summary</h2>{summary_h}</section>' if heads else "")
           + f"<details><summary>{esc(GLOSSARY_TITLE)}</summary>"
           + glossary_h + "</details>"
           + body + "</body></html>")
    html_path = run / "report.html"
    md_path = run / "report.md"
    html_path.write_text(doc)
    md = [f"# {title}", "", f"{kind} Generated {when}.", ""]
    if heads:
        md += ["## Summary", "", summary_md, ""]
    md += [f"## {GLOSSARY_TITLE}", "", glossary_md, ""]
    for s in sections:
        md += [f"## {s.title}", "", s.md.strip(), ""]
    md_path.write_text("\n".join(md))
    return Report(html_path, md_path, [s.id for s in sections], problems)
