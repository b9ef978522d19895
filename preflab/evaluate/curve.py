"""Learning curve of a reward model: held-out accuracy against the number of judged pairs.

"Would more judgements help?" The same reward model (same start, settings and seed) is trained
on nested subsets of the training split and scored on the same validation pairs:

- subsets are whole prompts taken in one seeded order, so each contains the smaller ones and no
  prompt crosses into validation; a subset keeps its pairs in the training split's order, so the
  full-size point is exactly the model ``rm train`` would give;
- every point's accuracy is on the same pairs, so the gain between two sizes is a *paired*
  difference of per-pair hits (``quality.paired``; hit = 1, 0, or 0.5 for a tied reward), far
  tighter than two separate Wilson intervals;
- ``per_doubling``: the least-squares slope of accuracy on log2(pairs) over all points, a
  summary of the whole curve; early points often rise fast and the tail flattens, so the
  decision rests on the last step instead:
- ``still_climbing``: the last step's paired gain has a 95% interval above zero;
- ``pairs_to_target``: only while still climbing, the pairs at which the last step's gain per
  doubling would reach ``ceiling - within``. Gains shrink as a model nears its limit, so this
  is a lower bound on the pairs needed (optimistic) and an order of magnitude. It is None when
  the last step's gain cannot be told from zero (a flat tail: more of the same labels are not
  shown to help), and the largest size when it is already there.

Each size trains in ``RUN/n_<pairs>/`` (a resumable ``train_reward`` run dir); a finished
size writes ``hits.json`` and is not trained again, so an interrupted curve resumes where it
stopped. ``RUN/curve.json`` holds the points and the summary, ``RUN/curve.png`` the plot.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preflab.config import ConfigError, check, field_doc, to_dict


@dataclass
class CurveConfig:
    sizes: list[float] = field_doc([0.125, 0.25, 0.5, 1.0], "training-set sizes, ascending: a share of the training "
                                                          "split (<= 1) or a number of pairs (> 1)")
    within: float = field_doc(0.03, "pairs_to_target aims at the ceiling minus this (accuracy points / 100)")
    seed: int = field_doc(0, "order in which prompts join the nested subsets")

    def validate(self) -> None:
        check(len(self.sizes) >= 1, "CurveConfig.sizes", "must name at least one size")
        check(all(s > 0 for s in self.sizes), "CurveConfig.sizes", f"must all be > 0, got {self.sizes}")
        check(list(self.sizes) == sorted(set(self.sizes)), "CurveConfig.sizes",
              f"must be strictly ascending, got {self.sizes}")
        check(0 <= self.within < 0.5, "CurveConfig.within", "must be in [0, 0.5)")

    def __post_init__(self) -> None:
        self.validate()


# ---- pure pieces ---------------------------------------------------------------------------------


def resolve_sizes(sizes: Sequence[float], n_train: int, *, where: str = "CurveConfig.sizes") -> list[int]:
    """Sizes as pair counts: a share (<= 1) of ``n_train``, or a count (> 1) that must not exceed it."""
    out = []
    for s in sizes:
        n = max(1, round(s * n_train)) if s <= 1 else int(s)
        if s > 1 and s != int(s):
            raise ConfigError(f"{where}: {s} is neither a share (<= 1) nor a whole number of pairs")
        if n > n_train:
            raise ConfigError(f"{where}: {int(s):,} pairs asked, the training split has {n_train:,}")
        out.append(n)
    if out != sorted(set(out)):
        raise ConfigError(f"{where}: {list(sizes)} gives pair counts {out} for {n_train:,} training pairs; "
                          "they must be strictly ascending")
    return out


def nested_subsets(train: Sequence, sizes: Sequence[int], *, seed: int) -> list[list]:
    """For each size, the training pairs of the fewest whole prompts (in one seeded order) that hold
    at least that many pairs, in ``train``'s own order; each subset contains the smaller ones."""
    prompts = sorted({e.prompt for e in train})
    random.Random(f"curve:{seed}").shuffle(prompts)
    count: dict[str, int] = {}
    for e in train:
        count[e.prompt] = count.get(e.prompt, 0) + 1
    out, taken, total, i = [], set(), 0, 0
    for n in sizes:
        while total < n:
            taken.add(prompts[i])
            total += count[prompts[i]]
            i += 1
        out.append([e for e in train if e.prompt in taken])
    return out


def curve_summary(points: Sequence[dict], *, ceiling: float | None = None, within: float = 0.03) -> dict[str, Any]:
    """Accuracy (Wilson 95%) per point, paired gains between neighbours, the gain per doubling.

    ``points``: ``{"pairs": n, "hits": [1 | 0 | 0.5 | None per validation pair]}`` in ascending
    ``pairs``, hits on the same validation pairs (None: a tie label, not scored)."""
    from preflab.quality.consistency import wilson_interval
    from preflab.quality.paired import paired_diff

    if not points:
        raise ValueError("curve_summary: no points")
    rows = []
    for p in points:
        h = [x for x in p["hits"] if x is not None]
        if not h:
            raise ValueError(f"curve_summary: the point at {p['pairs']} pairs scored no validation pair")
        acc = math.fsum(h) / len(h)
        rows.append({"pairs": p["pairs"], "accuracy": acc, "ci": list(wilson_interval(math.fsum(h), len(h))),
                     "n": len(h), **{k: v for k, v in p.items() if k not in ("pairs", "hits")}})
    gains = []
    for a, b in zip(points, points[1:], strict=False):
        d = paired_diff(b["hits"], a["hits"])
        gains.append({"from": a["pairs"], "to": b["pairs"], **d,
                      "per_doubling": d["diff"] / math.log2(b["pairs"] / a["pairs"])})
    slope = None
    if len(rows) >= 2:
        x = [math.log2(r["pairs"]) for r in rows]
        y = [r["accuracy"] for r in rows]
        mx, my = math.fsum(x) / len(x), math.fsum(y) / len(y)
        slope = math.fsum((u - mx) * (v - my) for u, v in zip(x, y, strict=True)) / math.fsum((u - mx) ** 2 for u in x)
    last, step = rows[-1], (gains[-1] if gains else None)
    climbing = step is not None and step["n"] > 0 and step["ci"][0] > 0
    # flat: even the optimistic end of the last step's gain is under ``within``; neither climbing nor
    # flat: the interval is too wide to say (more validation pairs would tell)
    flat = step is not None and step["n"] > 0 and step["ci"][1] < within
    out: dict[str, Any] = {"points": rows, "gains": gains, "per_doubling": slope, "still_climbing": climbing,
                           "flat": flat, "ceiling": ceiling, "within": within, "gap_to_ceiling": None,
                           "pairs_to_target": None}
    if ceiling is not None:
        out["gap_to_ceiling"] = ceiling - last["accuracy"]
        short = ceiling - within - last["accuracy"]
        if short <= 0:
            out["pairs_to_target"] = last["pairs"]
        elif climbing:
            out["pairs_to_target"] = round(last["pairs"] * 2 ** (short / step["per_doubling"]))
    return out


def data_digest(examples: Sequence) -> str:
    """A digest of the pairs (prompt, texts, strength, tie, margin) a curve is trained on."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, e.chosen, e.rejected, e.strength, e.is_tie, e.margin]).encode())
    return h.hexdigest()[:16]


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def describe(summary: dict[str, Any]) -> list[str]:
    """The summary as sentences for a console or a report."""
    pts, lines = summary["points"], []
    for g in summary["gains"]:
        lines.append(f"{g['from']:,} -> {g['to']:,} pairs: {_pts(g['diff'])} points [{_pts(g['ci'][0])}, "
                     f"{_pts(g['ci'][1])}] on the same {g['n']} validation pairs")
    if summary["per_doubling"] is not None:
        hi = summary["gains"][-1]["ci"][1]
        lines.append(f"fitted gain per doubling over the whole curve: {_pts(summary['per_doubling'])} points; the last step "
                     + ("still climbs" if summary["still_climbing"] else
                        f"is flat (at most {_pts(hi)} points)" if summary.get("flat") else
                        f"cannot be told from zero, nor called flat (its interval reaches {_pts(hi)} points): more "
                        "validation pairs would tell"))
    c = summary["ceiling"]
    if c is not None:
        lines.append(f"at {pts[-1]['pairs']:,} pairs: {pts[-1]['accuracy']:.1%}, {100 * summary['gap_to_ceiling']:.1f} "
                     f"points under the duplicate ceiling {c:.1%}")
        target, need = c - summary["within"], summary["pairs_to_target"]
        if need == pts[-1]["pairs"]:
            lines.append(f"already within {100 * summary['within']:g} points of the ceiling")
        elif need is None and summary.get("flat"):
            lines.append(f"no projection to {target:.1%} (the ceiling - {100 * summary['within']:g} points): more pairs "
                         "of this kind are not shown to help (the limit is the model or the kind of labels, not their "
                         "number)")
        elif need is None:
            lines.append(f"no projection to {target:.1%} (the ceiling - {100 * summary['within']:g} points): whether "
                         "more pairs help is not known from this curve")
        else:
            lines.append(f"{target:.1%} (the ceiling - {100 * summary['within']:g} points) at the last step's gain per "
                         f"doubling: about {need:,} pairs, a lower bound (gains shrink near a model's limit)")
    return lines


# ---- the curve -----------------------------------------------------------------------------------


def learning_curve(cfg: CurveConfig, rm_cfg, *, start_from: str | Path, train: Sequence, val: Sequence,
                   run_dir: str | Path, ceiling: float | None = None, show_progress: bool = True,
                   log: Callable[[str], None] = print, extra: Callable[[Path], dict] | None = None,
                   full_model: str | Path | None = None) -> dict[str, Any]:
    """Train a reward model (``rm_cfg``, from ``start_from``) per size of ``cfg.sizes`` and score each
    on ``val``; writes ``RUN/curve.json`` and ``RUN/curve.png`` and returns the curve.

    ``extra(model_dir)``: more numbers for a point (the sandbox adds gold accuracy).
    ``full_model``: a model already trained on all of ``train`` with ``rm_cfg`` from ``start_from``
    (``rm train``'s, which the full size would reproduce bit for bit); it is scored instead of
    trained again."""
    import numpy as np

    from preflab.evaluate.preference import pair_correct
    from preflab.models.hf import load_reward_model
    from preflab.report.plots import plot_curve
    from preflab.train.reward import initial_reward_model, score_pairs, train_reward

    run_dir = Path(run_dir)
    if not train:
        raise ValueError("train: no training pairs")
    scored = [e for e in val if not e.is_tie]
    if not scored:
        raise ValueError("val: no strict (non-tie) validation pairs to score")
    sizes = resolve_sizes(cfg.sizes, len(train))
    key = {"curve": to_dict(cfg), "reward": to_dict(rm_cfg), "start_from": str(Path(start_from).resolve()),
           "train": data_digest(train), "val": data_digest(val)}
    # a curve resumes only on the same data and settings: its finished sizes would not match otherwise
    kpath = run_dir / "curve_config.json"
    if kpath.is_file():
        old = json.loads(kpath.read_text())
        for k in key:
            if old.get(k) != json.loads(json.dumps(key[k])):
                what = {"train": "training pairs", "val": "validation pairs"}.get(k, f"{k} settings")
                raise ConfigError(f"{run_dir}: this curve was made with other {what} (see {kpath}); "
                                  "give a new output directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    kpath.write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")

    points = []
    for n, subset in zip(sizes, nested_subsets(train, sizes, seed=cfg.seed), strict=True):
        d = run_dir / f"n_{len(subset):06d}"
        done = d / "hits.json"
        if done.is_file():
            log(f"  {len(subset):,} pairs: done ({d})")
        else:
            if full_model is not None and len(subset) == len(train):
                log(f"  {len(subset):,} pairs (all): the model in {full_model}")
                model_dir, steps = Path(full_model).resolve(), None
            else:
                log(f"  {len(subset):,} pairs ({len(subset) / len(train):.0%} of the training split): training in {d}")
                model, tok = initial_reward_model(start_from, seed=rm_cfg.seed)
                res = train_reward(rm_cfg, model=model, tokenizer=tok, train=subset, val=[], run_dir=d, resume=True,
                                   show_progress=show_progress)
                model_dir, steps = res.model_dir, res.steps
            model, tok = load_reward_model(model_dir)
            rc, rr = score_pairs(model, tok, scored, max_length=rm_cfg.max_length, prompt_format=rm_cfg.prompt_format,
                                 batch_size=rm_cfg.eval_batch_size)
            d.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps({"pairs": len(subset), "asked": n, "steps": steps, "model_dir": str(model_dir),
                                        "hits": pair_correct(np.asarray(rc), np.asarray(rr)).tolist(),
                                        **(extra(Path(model_dir)) if extra is not None else {})}) + "\n")
        p = json.loads(done.read_text())
        points.append(p)
        h = p["hits"]
        log(f"  {p['pairs']:,} pairs: held-out accuracy {sum(h) / len(h):.1%} on {len(h)} pairs")
    summary = curve_summary(points, ceiling=ceiling, within=cfg.within)
    out = {**summary, "n_train": len(train), "n_val": len(scored), "n_val_ties": len(val) - len(scored),
           "config": key}
    out["summary_lines"] = describe(out)  # the report shows these as they are
    (run_dir / "curve.json").write_text(json.dumps(out, indent=2) + "\n")
    (run_dir / "curve.png").write_bytes(plot_curve(out))
    return out
