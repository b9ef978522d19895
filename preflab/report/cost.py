"""The cost ledger: what the preference data and the compute cost, and when it pays back.

- annotator cost = sum over a rater's judgements of measured time on task (seconds) / 3600
  x that rater's hourly rate (real raters: times from the web app; sandbox: simulated times);
- compute cost = measured wall time of a stage (seconds) / 3600 x devices x price per
  device-hour;
- ROI: weekly saving = weekly conversations x (escalation before - escalation after) x
  cost per escalation; payback weeks = total cost / weekly saving (infinite when the
  saving is not positive). With a CI on the escalation difference, the payback is also
  given at both ends of the interval;
- cost per judgement = a rater's cost / their judgements (and annotation total / all judgements).

Pure functions; ``build_ledger`` assembles the ``RUN/cost.json`` shape the report reads.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from preflab.config import ConfigError, check, field_doc, to_dict


@dataclass
class CostConfig:
    """Prices behind the cost ledger (all in ``currency``)."""

    currency: str = field_doc("USD", "Currency of every price.")
    default_hourly_rate: float = field_doc(60.0, "Hourly rate of a rater without an entry in hourly_rates.")
    hourly_rates: dict[str, float] = field_doc({}, "Hourly rate per rater id.")
    device_hour_price: float = field_doc(2.5, "Price of one device-hour (an on-demand GPU, or a CPU box).")
    weekly_conversations: int = field_doc(4000, "Production conversations per week (for the ROI).")
    cost_per_escalation: float = field_doc(20.0, "Cost of one escalation to a human agent.")

    def validate(self) -> None:
        check(self.default_hourly_rate >= 0, "CostConfig.default_hourly_rate", "must be >= 0")
        for rater, rate in self.hourly_rates.items():
            check(rate >= 0, f"CostConfig.hourly_rates.{rater}", "must be >= 0")
        check(self.device_hour_price >= 0, "CostConfig.device_hour_price", "must be >= 0")
        check(self.weekly_conversations >= 0, "CostConfig.weekly_conversations", "must be >= 0")
        check(self.cost_per_escalation >= 0, "CostConfig.cost_per_escalation", "must be >= 0")


@dataclass(frozen=True)
class RaterCost:
    rater: str
    judgements: int
    hours: float
    hourly_rate: float
    cost: float
    default_rate: bool = False  # priced at the default rate: no rate of its own in the store or config
    cost_per_judgement: float = 0.0


@dataclass(frozen=True)
class StageCost:
    stage: str
    wall_hours: float
    devices: int
    device_hours: float
    cost: float


def annotator_costs(times: Iterable[tuple[str, float]], rates: Mapping[str, float],
                    default_rate: float | None = None) -> list[RaterCost]:
    """Per-rater cost from ``(rater, seconds_on_task)`` per judgement: hours x hourly rate.

    A rater with no rate and no ``default_rate`` is an error naming the rater.
    """
    secs: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for rater, s in times:
        if s is None or not math.isfinite(s) or s < 0:
            raise ValueError(f"judgement time of rater {rater!r}: must be a number >= 0, got {s!r}")
        secs[rater] += s
        count[rater] += 1
    out = []
    for rater in sorted(secs):
        rate = rates.get(rater, default_rate)
        if rate is None:
            raise ConfigError(f"CostConfig.hourly_rates.{rater}: no hourly rate for this rater")
        hours = secs[rater] / 3600
        out.append(RaterCost(rater, count[rater], hours, float(rate), hours * rate, rater not in rates,
                             hours * rate / count[rater]))
    return out


def unknown_rate_keys(rates: Mapping[str, float], raters: Iterable[str]) -> list[str]:
    """Warnings for ``hourly_rates`` keys that name no rater of the project (a typo prices nobody:
    that rater is then charged the default rate)."""
    known = sorted(set(raters))
    return [f"CostConfig.hourly_rates.{k}: no rater of this project is named {k!r} (its raters: "
            f"{', '.join(known) or 'none'}); the rate is not used" for k in rates if k not in known]


def compute_costs(stage_seconds: Mapping[str, float], price_per_device_hour: float,
                  devices: Mapping[str, int] | None = None) -> list[StageCost]:
    """Per-stage compute cost: wall seconds / 3600 x devices (default 1) x price."""
    out = []
    for stage, s in stage_seconds.items():
        if s is None or not math.isfinite(s) or s < 0:
            raise ValueError(f"stage {stage!r}: wall time must be a number >= 0, got {s!r}")
        n = (devices or {}).get(stage, 1)
        hours = s / 3600
        out.append(StageCost(stage, hours, n, hours * n, hours * n * price_per_device_hour))
    return out


def payback(*, weekly_conversations: float, escalation_before: float, escalation_after: float,
            cost_per_escalation: float, total_cost: float) -> dict:
    """Weekly saving = conversations x (before - after) x cost per escalation; payback = cost / saving."""
    avoided = weekly_conversations * (escalation_before - escalation_after)
    saving = avoided * cost_per_escalation
    weeks = total_cost / saving if saving > 0 else math.inf
    return {"escalations_avoided_per_week": avoided, "weekly_saving": saving,
            "annual_saving": saving * 52, "payback_weeks": weeks}


def build_ledger(cfg: CostConfig, *, judgement_times: Iterable[tuple[str, float]] = (),
                 stage_seconds: Mapping[str, float] | None = None, devices: Mapping[str, int] | None = None,
                 escalation_before: float | None = None, escalation_after: float | None = None,
                 escalation_diff_ci: tuple[float, float] | None = None, simulated_raters: bool = False,
                 raters: Iterable[str] | None = None) -> dict:
    """The ``cost.json`` ledger: annotators, compute, totals and (given escalation rates) the ROI.

    ``escalation_diff_ci`` is the CI of (after - before); the payback is repeated at both
    ends of it (the slowest payback uses the smallest reduction). ``stage_seconds=None`` records
    ``compute_tracked: false`` (the report says "not tracked" rather than a cost of 0).
    """
    cfg.validate()
    warnings = unknown_rate_keys(cfg.hourly_rates, raters) if raters is not None else []
    raters = annotator_costs(judgement_times, cfg.hourly_rates, cfg.default_hourly_rate)
    stages = compute_costs(stage_seconds or {}, cfg.device_hour_price, devices)
    annot = sum(r.cost for r in raters)
    comp = sum(s.cost for s in stages)
    ledger: dict = {
        "currency": cfg.currency,
        "config": to_dict(cfg),
        "simulated_raters": simulated_raters,
        "annotators": [asdict(r) for r in raters],
        "compute": [asdict(s) for s in stages],
        "compute_tracked": stage_seconds is not None,  # a real project records no compute: "not tracked", not 0
        "warnings": warnings,
        "totals": {"annotation": annot, "compute": comp, "total": annot + comp,
                   "judgements": sum(r.judgements for r in raters),
                   "cost_per_judgement": annot / n if (n := sum(r.judgements for r in raters)) else None,
                   "annotation_hours": sum(r.hours for r in raters),
                   "device_hours": sum(s.device_hours for s in stages)},
        "roi": None,
    }
    if escalation_before is not None and escalation_after is not None:
        kw = dict(weekly_conversations=cfg.weekly_conversations, cost_per_escalation=cfg.cost_per_escalation,
                  total_cost=annot + comp)
        roi = payback(escalation_before=escalation_before, escalation_after=escalation_after, **kw)
        roi.update(escalation_before=escalation_before, escalation_after=escalation_after)
        if escalation_diff_ci is not None:
            lo, hi = escalation_diff_ci
            roi["escalation_diff_ci"] = [lo, hi]
            # diff = after - before: the most negative end is the biggest reduction.
            best = payback(escalation_before=escalation_before, escalation_after=escalation_before + lo, **kw)
            worst = payback(escalation_before=escalation_before, escalation_after=escalation_before + hi, **kw)
            roi["payback_weeks_range"] = [best["payback_weeks"], worst["payback_weeks"]]
        ledger["roi"] = roi
    return ledger


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no infinity: null means "never pays back"
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_ledger(run_dir: str | Path, ledger: dict) -> Path:
    """Write ``RUN/cost.json`` (infinite payback is written as null)."""
    out = Path(run_dir) / "cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_json_safe(ledger), indent=2) + "\n")
    return out


def judgement_times(rows: Iterable) -> list[tuple[str, float]]:
    """``(rater name, seconds)`` from the store's judgement rows (``store.ops.project_judgements``)."""
    return [(r.rater_name, float(r.time_on_task_s)) for r in rows]
