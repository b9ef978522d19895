"""What real exports do to the outcomes importer and `outcomes compare` (the ops walkthrough's files):
Excel's BOM, cp1252 bytes, NaN, truncated rows, .CSV / .json, many bad rows, labels differing by case,
the same version twice, Fisher's exact p at small counts, sample sizes and the serving checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import fisher_exact
from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest
from typer.testing import CliRunner

from preflab.cli import app
from preflab.report.outcomes import (
    MAX_SHOWN,
    OutcomeImportError,
    compare_versions,
    import_outcomes,
    min_expected_count,
    not_compared,
    read_outcomes,
    similar_labels,
    two_proportion_diff,
)

HEAD = "conversation_id,model_version,escalated,csat,handle_time_min,timestamp"


def row(i: int, version: str = "sft", esc: int = 0, csat: str = "4", handle: str = "5") -> str:
    return f"c{i},{version},{esc},{csat},{handle},2026-01-05T10:00:00Z"


def flat(e: pytest.ExceptionInfo) -> str:
    return " ".join(str(e.value).split())


# ---- reading ------------------------------------------------------------------------------------

def test_excel_csv_utf8_bom_and_jsonl_bom_are_read(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_bytes(("\ufeff" + HEAD + "\r\n" + row(1, "ppö") + "\r\n").encode("utf-8"))
    (rec,) = read_outcomes(p)
    assert (rec.conversation_id, rec.model_version) == ("c1", "ppö")
    j = tmp_path / "b.jsonl"
    j.write_bytes(("\ufeff" + json.dumps({"conversation_id": "c1", "model_version": "sft", "escalated": 0, "csat": 5,
                                          "handle_time_min": 3, "timestamp": "2026-01-12"}) + "\n").encode("utf-8"))
    assert read_outcomes(j)[0].csat == 5


def test_a_cp1252_file_names_the_line_of_the_bad_byte_and_the_fix(tmp_path):
    p = tmp_path / "win.csv"
    p.write_bytes((HEAD + "\n" + row(1) + "\n" + row(2, "caf\xe9")).encode("cp1252") + b"\n")
    with pytest.raises(OutcomeImportError) as e:
        read_outcomes(p)
    assert str(e.value).startswith(f"{p}:3: not UTF-8 text (byte 0xe9")
    assert "save the file as UTF-8" in str(e.value) and "CSV UTF-8" in str(e.value)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf"])
def test_csat_nan_and_inf_are_a_csat_error(tmp_path, value):
    p = tmp_path / "a.csv"
    p.write_text(HEAD + "\n" + row(1) + "\n" + row(2, csat=value) + "\n")
    with pytest.raises(OutcomeImportError, match=f"a.csv:3: csat: expected an integer 1-5 or empty, got '{value}'"):
        read_outcomes(p)


def test_jsonl_nan_csat_and_a_boolean_handle_time_are_refused(tmp_path):
    base = {"conversation_id": "c1", "model_version": "sft", "escalated": 0, "csat": 4, "handle_time_min": 3,
            "timestamp": "2026-01-12"}
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps(base) + "\n" + json.dumps({**base, "conversation_id": "c2", "csat": float("nan")}) + "\n"
                 + json.dumps({**base, "conversation_id": "c3", "handle_time_min": True}) + "\n")
    with pytest.raises(OutcomeImportError) as e:
        read_outcomes(p)
    assert e.value.errors == [f"{p}:2: csat: expected an integer 1-5 or empty, got nan",
                              f"{p}:3: handle_time_min: expected a number, got True"]


def test_a_truncated_row_says_how_many_fields_it_has(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text(HEAD + "\n" + row(1) + "\nc2,sft,0,4\n")
    with pytest.raises(OutcomeImportError, match="a.csv:3: row has 4 fields where the header has 6"):
        read_outcomes(p)


def test_suffix_case_and_json_arrays(tmp_path):
    p = tmp_path / "EXPORT.CSV"
    p.write_text(HEAD + "\n" + row(1) + "\n")
    assert len(read_outcomes(p)) == 1
    j = tmp_path / "export.json"
    j.write_text("[]")
    with pytest.raises(OutcomeImportError, match=r"JSON lines are expected \(\.jsonl, one object per line\)"):
        read_outcomes(j)


def test_every_bad_row_is_reported_first_error_first_and_nothing_imported(tmp_path):
    p = tmp_path / "a.csv"
    lines = [row(0)] + [row(i, csat="9") for i in range(1, MAX_SHOWN + 6)] + ["c999,sft,2,4,5,2026-01-05"]
    p.write_text(HEAD + "\n" + "\n".join(lines) + "\n")
    run = tmp_path / "run"
    with pytest.raises(OutcomeImportError) as e:
        import_outcomes(p, run)
    msg = str(e.value).splitlines()
    assert msg[0] == f"{p}:3: csat: expected an integer 1-5 or empty, got '9'"  # line 2 is the good row
    assert len(e.value.errors) == MAX_SHOWN + 6 and e.value.errors[-1].startswith(f"{p}:{len(lines) + 1}: escalated")
    assert msg[MAX_SHOWN - 1] == e.value.errors[MAX_SHOWN - 1]
    assert msg[MAX_SHOWN] == "... and 6 more bad rows" and msg[-1] == f"{MAX_SHOWN + 6} bad rows; nothing imported"
    assert not (run / "outcomes").exists()


def test_ids_already_imported_are_all_named(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text(HEAD + "\n" + row(1) + "\n" + row(2) + "\n")
    import_outcomes(p, tmp_path / "run")
    with pytest.raises(OutcomeImportError) as e:
        import_outcomes(p, tmp_path / "run")
    assert e.value.errors == [f"{p}:2: conversation_id 'c1' already imported",
                              f"{p}:3: conversation_id 'c2' already imported"]


def test_labels_differing_only_by_case_are_listed_and_the_cli_warns(tmp_path):
    assert similar_labels(["PPO1", "ppo1", "sft", " Ppo1 ", "dpo"]) == [[" Ppo1 ", "PPO1", "ppo1"]]
    assert similar_labels(["sft", "ppo1"]) == []
    run = tmp_path / "run"
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text(HEAD + "\n" + row(1, "sft") + "\n" + row(2, "ppo1") + "\n")
    b.write_text(HEAD + "\n" + row(3, " PPO1 ") + "\n")  # surrounding spaces are stripped; the case is kept
    assert import_outcomes(a, run)["similar_versions"] == []
    r = CliRunner().invoke(app, ["outcomes", "import", str(b), "--run", str(run)])
    assert r.exit_code == 0, r.output
    assert "warning: model versions 'PPO1', 'ppo1' differ only by case" in " ".join(r.output.split())


# ---- comparing ----------------------------------------------------------------------------------

def test_fisher_below_five_expected_and_z_otherwise_match_scipy_and_statsmodels():
    r = two_proportion_diff(1, 10, 0, 50)  # the walkthrough's case: z said p 0.024 while the CI includes 0
    assert r["test"] == "fisher" and r["ci"][0] < 0 < r["ci"][1]
    assert r["p_value"] == pytest.approx(fisher_exact([[1, 9], [0, 50]])[1], rel=1e-12)
    assert r["p_value"] == pytest.approx(1 / 6)  # hypergeometric: P(the one escalation falls in the 10) = 10/60
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        n1, n2 = int(rng.integers(5, 400)), int(rng.integers(5, 400))
        x1, x2 = int(rng.integers(0, min(n1, 12) + 1)), int(rng.integers(0, n2 + 1))
        r = two_proportion_diff(x1, n1, x2, n2)
        small = min(n * k / (n1 + n2) for n in (n1, n2) for k in (x1 + x2, n1 + n2 - x1 - x2)) < 5
        assert r["test"] == ("fisher" if small else "z")
        if small:
            expected = fisher_exact([[x1, n1 - x1], [x2, n2 - x2]], alternative="two-sided")[1]
        else:
            expected = proportions_ztest([x2, x1], [n2, n1])[1]
        assert r["p_value"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        lo, hi = confint_proportions_2indep(x2, n2, x1, n1, method="newcomb", compare="diff")
        assert r["ci"] == pytest.approx([lo, hi], abs=1e-9)  # the interval does not depend on the test
        seen.add(r["test"])
    assert seen == {"fisher", "z"}
    assert min_expected_count(1, 10, 0, 50) == pytest.approx(1 / 6)


def test_the_same_version_on_both_sides_is_refused(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text(HEAD + "\n" + row(1) + "\n" + row(2) + "\n")
    with pytest.raises(ValueError, match="candidate: the same model version as the baseline"):
        compare_versions(read_outcomes(p), "sft", "sft")
    run = tmp_path / "run"
    import_outcomes(p, run)
    r = CliRunner().invoke(app, ["outcomes", "compare", "--run", str(run), "--baseline", "sft", "--candidate", "sft"])
    assert r.exit_code == 2 and "--candidate: the same model version as --baseline ('sft')" in r.output
    assert not (run / "outcomes" / "comparison.json").exists()


def test_counts_are_shown_and_a_metric_that_cannot_be_compared_says_why(tmp_path):
    p = tmp_path / "a.csv"
    lines = [row(i, "sft", esc=int(i < 2), csat="4" if i < 3 else "") for i in range(10)]
    lines += [row(100 + i, "ppo1", csat="5" if i == 0 else "") for i in range(20)]
    p.write_text(HEAD + "\n" + "\n".join(lines) + "\n")
    comp = compare_versions(read_outcomes(p), "sft", "ppo1")
    assert comp["conversations"] == {"baseline": 10, "candidate": 20}
    assert comp["answered_surveys"] == {"baseline": 3, "candidate": 1}
    assert comp["csat"] is None and comp["handle_time_min"] is not None
    assert not_compared(comp) == ["CSAT not compared: 3 answered surveys on sft, 1 on ppo1 "
                                  "(at least 2 on each side needed)"]
    r = CliRunner().invoke(app, ["outcomes", "compare", "--file", str(p), "--baseline", "sft", "--candidate", "ppo1"],
                           terminal_width=120)
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "conversations │ 10 │ 20" in out and "answered surveys │ 3 │ 1" in out
    assert "warning: CSAT not compared: 3 answered surveys on sft, 1 on ppo1" in out
    assert "escalation p: Fisher's exact test" in out


def test_checkpoint_is_recorded_as_given_resolved_and_inside_the_run(tmp_path):
    run = tmp_path / "run"
    (run / "dpo1" / "policy").mkdir(parents=True)
    p = tmp_path / "a.csv"
    p.write_text(HEAD + "\n" + row(1) + "\n" + row(2) + "\n" + row(3, "ppo1") + "\n" + row(4, "ppo1") + "\n")
    import_outcomes(p, run)
    args = ["outcomes", "compare", "--run", str(run), "--baseline", "sft", "--candidate", "ppo1"]
    r = CliRunner().invoke(app, [*args, "--checkpoint", str(run / "dpo1" / "policy")])
    assert r.exit_code == 0, r.output
    ck = json.loads((run / "outcomes" / "comparison.json").read_text())["checkpoint"]
    assert ck == {"given": str(run / "dpo1" / "policy"), "resolved": str((run / "dpo1" / "policy").resolve()),
                  "in_run": "dpo1/policy"}
    r = CliRunner().invoke(app, [*args, "--checkpoint", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "is not a directory" in r.output
    r = CliRunner().invoke(app, ["outcomes", "compare", "--file", str(p), "--baseline", "sft", "--candidate", "ppo1",
                                 "--checkpoint", str(run)])
    assert r.exit_code == 2 and "--checkpoint: give --run too" in r.output
