"""Outcome statistics against statsmodels/scipy and Newcombe's worked example; the importer's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import (
    confint_proportions_2indep,
    proportion_confint,
    proportions_ztest,
)

from preflab.report.outcomes import (
    OutcomeImportError,
    compare_versions,
    import_outcomes,
    load_run_outcomes,
    read_outcomes,
    two_proportion_diff,
    welch_diff,
    wilson_interval,
)


def test_newcombe_textbook_example():
    # Newcombe (1998), Table II example (56/70 vs 48/80): method 10 gives 0.0524 to 0.3339.
    r = two_proportion_diff(48, 80, 56, 70)
    assert r["diff"] == pytest.approx(0.2)
    assert r["ci"] == pytest.approx([0.0524, 0.3339], abs=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_two_proportion_matches_statsmodels(seed):
    rng = np.random.default_rng(seed)
    n1, n2 = int(rng.integers(20, 5000)), int(rng.integers(20, 5000))
    x1, x2 = int(rng.integers(0, n1 + 1)), int(rng.integers(0, n2 + 1))
    for method, sm in (("newcombe", "newcomb"), ("wald", "wald")):
        r = two_proportion_diff(x1, n1, x2, n2, method=method)
        lo, hi = confint_proportions_2indep(x2, n2, x1, n1, method=sm, compare="diff")
        assert r["ci"] == pytest.approx([lo, hi], abs=1e-9)
    _, p = proportions_ztest([x2, x1], [n2, n1])
    if np.isfinite(p):
        assert r["p_value"] == pytest.approx(p, rel=1e-9, abs=1e-12)
    for x, n in ((x1, n1), (x2, n2)):
        assert wilson_interval(x, n) == pytest.approx(proportion_confint(x, n, method="wilson"), abs=1e-9)


def test_two_proportion_rejects_bad_counts():
    with pytest.raises(ValueError, match="bad counts"):
        two_proportion_diff(5, 4, 1, 10)
    with pytest.raises(ValueError, match="method"):
        two_proportion_diff(1, 4, 1, 10, method="exact")


@pytest.mark.parametrize("seed", range(4))
def test_welch_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(3.6, 1.1, int(rng.integers(5, 400))).tolist()
    b = rng.normal(4.0, 0.7, int(rng.integers(5, 400))).tolist()
    r = welch_diff(a, b)
    t = stats.ttest_ind(b, a, equal_var=False)
    lo, hi = t.confidence_interval(0.95)
    assert r["diff"] == pytest.approx(np.mean(b) - np.mean(a))
    assert r["ci"] == pytest.approx([lo, hi], rel=1e-9)
    assert r["p_value"] == pytest.approx(t.pvalue, rel=1e-9)
    assert r["df"] == pytest.approx(t.df, rel=1e-9)


def test_welch_hand_worked():
    # a = [1, 2, 3] (mean 2, var 1), b = [2, 4, 6] (mean 4, var 4): se = sqrt(1/3 + 4/3) = 1.2910,
    # df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 2.7778/0.9444 = 2.9412
    r = welch_diff([1, 2, 3], [2, 4, 6])
    assert r["diff"] == 2.0
    assert r["df"] == pytest.approx(2.9411765, rel=1e-6)
    q = stats.t.ppf(0.975, r["df"])
    assert r["ci"] == pytest.approx([2 - q * 1.2909944, 2 + q * 1.2909944], rel=1e-6)


CSV_HEAD = "conversation_id,model_version,escalated,csat,handle_time_min,timestamp,topic\n"


def test_import_reads_csv_and_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text(CSV_HEAD + "c1,sft,1,3,12.5,2026-01-05T10:00:00Z,pricing\n"
                                    "c2,sft,false,,4,2026-01-05T11:00:00+01:00,billing\n"
                                    "c3,sft,0,N/A,4,2026-01-05,billing\nc4,sft,0,-,4,2026-01-05,billing\n")
    recs = read_outcomes(tmp_path / "a.csv")
    assert recs[0].escalated is True and recs[0].csat == 3 and recs[0].handle_time_min == 12.5
    assert recs[1].escalated is False and recs[1].csat is None
    assert recs[2].csat is None and recs[3].csat is None  # survey exports' "no rating"
    assert recs[1].timestamp == "2026-01-05T10:00:00Z"  # normalised to UTC
    (tmp_path / "b.jsonl").write_text(json.dumps({"conversation_id": "c3", "model_version": "v2", "escalated": 0,
                                                  "csat": 5, "handle_time_min": 3, "timestamp": "2026-01-12"}) + "\n\n")
    assert read_outcomes(tmp_path / "b.jsonl")[0].timestamp == "2026-01-12T00:00:00Z"


@pytest.mark.parametrize("row, message", [
    ("c1,sft,2,3,1,2026-01-05", "a.csv:3: escalated: expected 0/1"),
    ("c1,sft,1,6,1,2026-01-05", "a.csv:3: csat: expected an integer 1-5"),
    ("c1,sft,1,3.5,1,2026-01-05", "a.csv:3: csat"),
    ("c1,sft,1,3,-1,2026-01-05", "a.csv:3: handle_time_min: must be"),
    ("c1,sft,1,3,abc,2026-01-05", "a.csv:3: handle_time_min: expected a number"),
    ("c1,sft,1,3,1,yesterday", "a.csv:3: timestamp: expected ISO 8601"),
    (",sft,1,3,1,2026-01-05", "a.csv:3: conversation_id: empty"),
    ("c0,sft,1,3,1,2026-01-05", "a.csv:3: conversation_id 'c0' repeats line 2"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    p = tmp_path / "a.csv"
    p.write_text(CSV_HEAD.replace(",topic", "") + "c0,sft,0,4,2,2026-01-05\n" + row + "\n")
    with pytest.raises(OutcomeImportError, match=message):
        read_outcomes(p)


def test_bad_files(tmp_path):
    (tmp_path / "h.csv").write_text("conversation_id,model_version\nc1,sft\n")
    with pytest.raises(OutcomeImportError, match=r"h.csv:1: missing column 'escalated'"):
        read_outcomes(tmp_path / "h.csv")
    (tmp_path / "j.jsonl").write_text('{"conversation_id": "c1"}\n{oops\n')
    with pytest.raises(OutcomeImportError, match=r"j.jsonl:2: invalid JSON"):
        read_outcomes(tmp_path / "j.jsonl")
    (tmp_path / "m.jsonl").write_text('{"conversation_id": "c1"}\n')
    with pytest.raises(OutcomeImportError, match=r"m.jsonl:1: missing column 'model_version'"):
        read_outcomes(tmp_path / "m.jsonl")
    (tmp_path / "k.jsonl").write_text("[1]\n")
    with pytest.raises(OutcomeImportError, match=r"k.jsonl:1: expected a JSON object"):
        read_outcomes(tmp_path / "k.jsonl")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(OutcomeImportError, match="unknown format"):
        read_outcomes(tmp_path / "x.txt")


def test_import_is_all_or_nothing(tmp_path):
    run = tmp_path / "run"
    good = tmp_path / "good.csv"
    good.write_text(CSV_HEAD + "c1,sft,1,3,12.5,2026-01-05T10:00:00Z,x\nc2,v2,0,5,4,2026-01-12T10:00:00Z,x\n")
    res = import_outcomes(good, run)
    assert res["imported"] == 2 and res["by_version"] == {"sft": 1, "v2": 1}
    before = (run / "outcomes" / "logs.jsonl").read_text()
    bad = tmp_path / "bad.csv"
    bad.write_text(CSV_HEAD + "c3,sft,1,3,12.5,2026-01-05T10:00:00Z,x\nc4,sft,1,9,1,2026-01-05,x\n")
    with pytest.raises(OutcomeImportError, match="bad.csv:3: csat"):
        import_outcomes(bad, run)
    with pytest.raises(OutcomeImportError, match="good.csv:2: conversation_id 'c1' already imported"):
        import_outcomes(good, run)
    assert (run / "outcomes" / "logs.jsonl").read_text() == before
    assert len(load_run_outcomes(run)) == 2


def test_compare_versions(tmp_path):
    p = tmp_path / "l.csv"
    lines = [f"b{i},sft,{int(i % 10 < 3)},{3 + i % 2},{10 + i % 3},2026-01-05T10:00:00Z,x" for i in range(100)]
    lines += [f"c{i},v2,{int(i % 10 < 2)},{4 + i % 2},{8 + i % 3},2026-01-12T10:00:00Z,x" for i in range(100)]
    p.write_text(CSV_HEAD + "\n".join(lines) + "\n")
    comp = compare_versions(read_outcomes(p), "sft", "v2")
    assert comp["escalation"]["baseline"] == 0.3 and comp["escalation"]["candidate"] == 0.2
    assert comp["escalation"]["diff"] == pytest.approx(-0.1)
    assert comp["csat"]["diff"] == pytest.approx(1.0)
    assert comp["handle_time_min"]["diff"] == pytest.approx(-2.0)
    assert comp["handle_time_min"]["median"] == {"baseline": 11.0, "candidate": 9.0}
    assert [w["week"] for w in comp["weekly"]] == ["2026-W02", "2026-W03"]
    with pytest.raises(ValueError, match="candidate: no conversations for model version 'v9'"):
        compare_versions(read_outcomes(p), "sft", "v9")
