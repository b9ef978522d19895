"""Assignment policy: config validation, opening rounds, expected load, routing gaps."""

from __future__ import annotations

import pytest

from preflab.collect.assign import (
    AssignConfig,
    expected_load,
    open_round,
    round_routing_gaps,
    routing_gaps,
)
from preflab.config import ConfigError, from_dict
from preflab.store import db, ops


@pytest.mark.parametrize("field, value, message", [
    ("overlap", 0, "assign.overlap: must be >= 1"),
    ("duplicate_rate", 1.5, "assign.duplicate_rate: must be in [0, 1]"),
    ("lease_s", 0, "assign.lease_s: must be > 0"),
    ("fallback", "sometimes", "AssignConfig.fallback: must be one of"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(AssignConfig, {field: value})


def test_expected_load_by_hand():
    # 50 items x 5 raters each = 250 fresh; 10% planted -> 25; 275 / 5 raters = 55 each
    load = expected_load(n_items=50, overlap=5, duplicate_rate=0.1, n_raters=5)
    assert (load.fresh_judgements, load.expected_duplicates, load.per_rater) == (250, 25.0, 55.0)
    with pytest.raises(ValueError, match="needs at least 3 raters"):
        expected_load(n_items=5, overlap=3, duplicate_rate=0.0, n_raters=2)


def test_routing_gaps_pure():
    specs = [["pricing"], ["pricing"], ["billing"], []]
    assert routing_gaps(domains=["pricing", "billing"], specialties=specs, overlap=2, routing="specialty",
                        fallback="always") == []
    gaps = routing_gaps(domains=["pricing", "billing", "billing"], specialties=specs, overlap=3,
                        routing="specialty", fallback="never")
    assert gaps == ["domain 'billing': 2 items but only 2 eligible raters for overlap 3 (fallback='never')"]
    assert "no item can be completed" in routing_gaps(domains=["x"], specialties=specs, overlap=5,
                                                      routing="any", fallback="always")[0]


def test_open_round_applies_the_policy_and_gaps_match_reality(seed):
    st = seed(n_pairs=6, raters={"p1": ["pricing"], "p2": ["pricing"], "b1": ["billing"]})
    cfg = from_dict(AssignConfig, {"overlap": 2, "fallback": "never", "duplicate_rate": 0.0, "seed": 4})
    with db.session_scope(st.engine) as s:
        rid = open_round(s, cfg, project_id=st.project_id, name="r", kind="collection", pair_ids=st.pair_ids)
        info = ops.get_round(s, round_id=rid)
        gaps = round_routing_gaps(s, round_id=rid)
    assert (info.overlap, info.fallback, info.seed, info.duplicate_rate) == (2, "never", 4, 0.0)
    assert gaps == ["domain 'billing': 3 items but only 1 eligible raters for overlap 2 (fallback='never')"]
    for r in st.raters.values():  # everyone works until nothing is left
        while True:
            with db.session_scope(st.engine) as s:
                t = ops.next_task(s, round_id=rid, rater_id=r)
                if t is None:
                    break
                ops.submit_judgement(s, assignment_id=t.assignment_id, rater_id=r, choice="left", strength=1,
                                     rationale="reason enough", time_on_task_s=1, idempotency_key=str(t.assignment_id))
    with db.session_scope(st.engine) as s:
        prog = ops.round_progress(s, round_id=rid)
    assert prog.items_complete == 3  # the pricing items; billing ones stay short, as warned


def test_the_too_few_raters_warning_says_admins_were_counted(seed):
    st = seed(n_pairs=2, raters={"p1": ["pricing"]})
    cfg = from_dict(AssignConfig, {"overlap": 3, "duplicate_rate": 0.0})
    with db.session_scope(st.engine) as s:
        ops.create_rater(s, project_id=st.project_id, name="lead", role="admin")
        rid = open_round(s, cfg, project_id=st.project_id, name="r", kind="collection", pair_ids=st.pair_ids)
        gaps = round_routing_gaps(s, round_id=rid)
    assert gaps == ["only 2 active raters (1 of them admin) for overlap 3: no item can be completed"]
