"""Agreement of any round with overlap >= 2 (not only the calibration workshop's pair of rounds):
the library function, the CLI and the admin page, against hand-worked kappas."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from preflab.cli import app
from preflab.collect.workshop import round_agreement
from preflab.store import db, ops
from tests.conftest import judge_all

# ann: a a b b   bob: a b b b  -> 3 of 4 items agree
ANN = {0: "a", 1: "a", 2: "b", 3: "b"}
BOB = {0: "a", 1: "b", 2: "b", 3: "b"}


def _judged_round(seed):
    st = seed(n_pairs=4, raters={"ann": [], "bob": []})
    with db.session_scope(st.engine) as s:
        rid = ops.create_round(s, project_id=st.project_id, name="week 1", kind="collection", pair_ids=st.pair_ids,
                               overlap=2, duplicate_rate=0.0, routing="any")
    for name, want in (("ann", ANN), ("bob", BOB)):
        judge_all(st.engine, rid, st.raters[name], lambda t, want=want: f"r{t.left_id[1:4]}{want[int(t.left_id[1:4])]}")
    return st, rid


def test_round_agreement_matches_hand_worked_kappas(seed):
    st, rid = _judged_round(seed)
    with db.session_scope(st.engine, readonly=True) as s:
        a = round_agreement(s, round_id=rid, n_boot=200, min_shared=4)
        by_default = round_agreement(s, round_id=rid, n_boot=200)
    # the raters share 4 items: fewer than the default 5, so the mean pairwise kappa is n/a, with the reason
    mk = by_default["statistics"]["mean_pairwise_kappa"]
    assert mk["value"] is None and mk["low"] is None and (mk["n_pairs"], mk["n_pairs_few_items"]) == (0, 1)
    assert "no pair of raters shares 5 or more items" in mk["reason"] and "Fleiss" in mk["reason"]
    assert by_default["statistics"]["fleiss_kappa"] == a["statistics"]["fleiss_kappa"]
    assert a["statistics"]["mean_pairwise_kappa"]["n_pairs"] == 1
    stats = {k: v["value"] for k, v in a["statistics"].items()}
    # Cohen: p_o = 3/4; ann a/b = 1/2, 1/2, bob 1/4, 3/4 -> p_e = 1/2 -> kappa = 1/2
    assert math.isclose(stats["mean_pairwise_kappa"], 0.5)
    # Fleiss: pooled p_a = 3/8, p_b = 5/8 -> P_e = 34/64; P_bar = 3/4 -> (3/4 - 34/64) / (30/64) = 7/15
    assert math.isclose(stats["fleiss_kappa"], 7 / 15)
    assert math.isclose(stats["percent_agreement"], 0.75)
    assert a["n_items"] == 4 and a["n_raters"] == 2 and a["round"]["name"] == "week 1"
    lo, hi = a["statistics"]["fleiss_kappa"]["low"], a["statistics"]["fleiss_kappa"]["high"]
    assert lo <= 7 / 15 <= hi  # 4 items: a wide interval, and it is shown
    assert a["raters"]["ann"]["n_compared"] == 4


def test_cli_quality_agreement(seed, tmp_path):
    st, rid = _judged_round(seed)
    url = st.engine.url.render_as_string(hide_password=False)
    r = CliRunner().invoke(app, ["quality", "agreement", "week 1", "--db", url, "--project", "proj", "--n-boot", "200"],
                           terminal_width=200)
    assert r.exit_code == 0, r.output  # 4 shared items: below the default 5
    assert "mean pairwise kappa n/a: no pair of raters shares 5 or more items" in r.output
    assert "0 rater pairs sharing 5+ items entered the mean; 1 sharing fewer left out" in r.output
    r = CliRunner().invoke(app, ["quality", "agreement", "week 1", "--db", url, "--project", "proj", "--n-boot", "200",
                                 "--min-shared", "4", "--out", str(tmp_path / "a.json")], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "1 rater pairs sharing 4+ items entered the mean" in r.output
    assert "week 1: 4 items judged by 2+ of 2 raters" in r.output and "fleiss kappa" in r.output and "0.47" in r.output
    assert math.isclose(json.loads((tmp_path / "a.json").read_text())["statistics"]["mean_pairwise_kappa"]["value"], 0.5)
    r = CliRunner().invoke(app, ["quality", "agreement", str(rid), "--db", url, "--project", "proj", "--n-boot", "50"])
    assert r.exit_code == 0, r.output  # by id too
    r = CliRunner().invoke(app, ["quality", "agreement", "week 9", "--db", url, "--project", "proj"])
    assert r.exit_code == 2 and "ROUND: no round named or numbered 'week 9'" in r.output
    with db.session_scope(st.engine) as s:
        ops.create_round(s, project_id=st.project_id, name="empty", kind="collection", pair_ids=st.pair_ids, overlap=2)
    r = CliRunner().invoke(app, ["quality", "agreement", "empty", "--db", url, "--project", "proj"],
                           terminal_width=200)
    assert r.exit_code == 2 and "no item has two raters' judgements yet" in r.output
