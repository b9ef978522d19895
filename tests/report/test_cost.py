"""The cost ledger with hand-worked numbers."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from preflab.config import ConfigError, from_dict
from preflab.report.cost import (
    CostConfig,
    annotator_costs,
    build_ledger,
    compute_costs,
    judgement_times,
    payback,
    write_ledger,
)


def test_annotator_costs_hand_worked():
    # ana: 3 x 1200 s = 1 h at $60 = $60; ben: 1800 s = 0.5 h at the default $40 = $20
    rows = annotator_costs([("ana", 1200), ("ben", 1800), ("ana", 1200), ("ana", 1200)], {"ana": 60.0}, 40.0)
    assert [(r.rater, r.judgements, r.hours, r.hourly_rate, r.cost) for r in rows] == [
        ("ana", 3, 1.0, 60.0, 60.0), ("ben", 1, 0.5, 40.0, 20.0)]


def test_annotator_without_rate_is_named():
    with pytest.raises(ConfigError, match="CostConfig.hourly_rates.zoe"):
        annotator_costs([("zoe", 10.0)], {}, None)
    with pytest.raises(ValueError, match="rater 'ana'"):
        annotator_costs([("ana", -1.0)], {}, 10.0)


def test_compute_costs_hand_worked():
    # ppo: 2 h wall x 4 devices x $2.5 = $20; rm: 0.5 h x 1 x $2.5 = $1.25
    rows = compute_costs({"ppo": 7200.0, "rm": 1800.0}, 2.5, {"ppo": 4})
    assert [(s.stage, s.wall_hours, s.devices, s.device_hours, s.cost) for s in rows] == [
        ("ppo", 2.0, 4, 8.0, 20.0), ("rm", 0.5, 1, 0.5, 1.25)]


def test_payback_hand_worked():
    # 4000 conversations x (0.31 - 0.19) = 480 escalations avoided x $20 = $9,600/week; $18,000 / 9,600 = 1.875 weeks
    r = payback(weekly_conversations=4000, escalation_before=0.31, escalation_after=0.19, cost_per_escalation=20,
                total_cost=18_000)
    assert r["escalations_avoided_per_week"] == pytest.approx(480)
    assert r["weekly_saving"] == pytest.approx(9600)
    assert r["annual_saving"] == pytest.approx(9600 * 52)
    assert r["payback_weeks"] == pytest.approx(1.875)
    assert math.isinf(payback(weekly_conversations=4000, escalation_before=0.2, escalation_after=0.25,
                              cost_per_escalation=20, total_cost=1)["payback_weeks"])


def test_ledger_totals_and_roi_range(tmp_path):
    cfg = CostConfig(default_hourly_rate=50.0, device_hour_price=3.0, weekly_conversations=1000, cost_per_escalation=10.0)
    led = build_ledger(cfg, judgement_times=[("a", 3600), ("b", 7200)], stage_seconds={"rm": 3600},
                       escalation_before=0.3, escalation_after=0.2, escalation_diff_ci=(-0.15, 0.01))
    assert led["totals"] == {"annotation": 150.0, "compute": 3.0, "total": 153.0, "judgements": 2, "cost_per_judgement": 75.0,
                             "annotation_hours": 3.0, "device_hours": 1.0}
    # 1000 x 0.1 x $10 = $1000/week -> 0.153 weeks; CI ends: 0.15 -> $1500/week; -0.01 -> never
    assert led["roi"]["payback_weeks"] == pytest.approx(0.153)
    lo, hi = led["roi"]["payback_weeks_range"]
    assert lo == pytest.approx(0.102) and math.isinf(hi)
    out = json.loads(write_ledger(tmp_path, led).read_text())
    assert out["roi"]["payback_weeks_range"][1] is None  # "never" is null in JSON


def test_config_validation_and_store_rows():
    with pytest.raises(ConfigError, match="CostConfig.device_hour_price"):
        from_dict(CostConfig, {"device_hour_price": -1})
    with pytest.raises(ConfigError, match="CostConfig.hourly_rates.ana"):
        from_dict(CostConfig, {"hourly_rates": {"ana": -5}})
    rows = [SimpleNamespace(rater_name="ana", time_on_task_s=12.5), SimpleNamespace(rater_name="ben", time_on_task_s=3)]
    assert judgement_times(rows) == [("ana", 12.5), ("ben", 3.0)]
