"""JSONL import (errors name file:line, nothing imported) and export (judgements, TRL, HF datasets)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from preflab.store import db, io, ops
from preflab.store.schema import Pair, Prompt, Response


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pair_line(i, *, inline_prompt=True):
    row = {"id": f"p{i}", "response_a": {"id": f"r{i}a", "text": f"A{i}", "source": "sft"},
           "response_b": {"id": f"r{i}b", "text": f"B{i}", "source": "ppo"}}
    if inline_prompt:
        row["prompt"] = {"id": f"q{i}", "text": f"question {i}", "topic": "pricing"}
    else:
        row["prompt_id"] = f"q{i}"
    return row


def counts(engine):
    with db.session_scope(engine) as s:
        return tuple(s.scalar(select(func.count()).select_from(m)) for m in (Prompt, Response, Pair))


@pytest.fixture
def project(engine):
    with db.session_scope(engine) as s:
        return ops.create_project(s, name="io")


def test_import_pairs_inline_and_by_id(engine, project, tmp_path):
    rows = [pair_line(i) for i in range(3)]
    rows.append({"id": "p3", "prompt_id": "q0", "response_a_id": "r0a",
                 "response_b": {"id": "r0c", "text": "C0", "source": "dpo"}})
    path = write(tmp_path / "pairs.jsonl", rows + [""])  # a trailing blank line is fine
    with db.session_scope(engine) as s:
        res = io.import_pairs(s, project_id=project, path=path)
    assert res == io.ImportResult(prompts=3, responses=7, pairs=4)
    with db.session_scope(engine) as s:
        res2 = io.import_pairs(s, project_id=project, path=path)  # re-import: nothing new, no error
        p = ops.get_pair(s, pair_id="p3")
    assert res2 == io.ImportResult()
    assert (p.prompt_text, p.response_a_text, p.response_b_source) == ("question 0", "A0", "dpo")


def test_a_csv_is_named_as_not_json_lines(engine, project, tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("id,prompt,response_a,response_b\np1,How much?,5,6\n")
    with pytest.raises(ops.StoreError, match=r"pairs.csv:1: invalid JSON .* expected JSON lines, one object per "
                                             r"line .* a CSV or spreadsheet export must be converted first"), \
            db.session_scope(engine) as s:
        io.import_pairs(s, project_id=project, path=path)
    assert counts(engine) == (0, 0, 0)


@pytest.mark.parametrize("bad, message", [
    ({"id": "p9", "prompt_id": "q1", "response_a_id": "r1a", "response_b_id": "r_9"},
     "pairs.jsonl:3: unknown response id 'r_9'"),
    ("{not json", "pairs.jsonl:3: invalid JSON"),
    ('{"id": "p9", "prompt_id": "q1"', "pairs.jsonl:3: invalid JSON (Expecting ',' delimiter at column 31)"),
    ("[1, 2]", "pairs.jsonl:3: expected a JSON object, got list"),
    ({"id": "p9", "prompt_id": "q1", "response_a_id": "r1a", "response_b_id": "r1b", "colour": 1},
     "pairs.jsonl:3: unknown field 'colour'"),
    ({"id": "p9", "prompt_id": "q1", "response_a_id": "r1a"}, "pairs.jsonl:3: missing field 'response_b_id'"),
    ({"id": "q9", "text": "How much?", "topic": "pricing"}, "unknown field 'text' (known: id, meta, prompt, prompt_id, "
                                                             "response_a, response_a_id, response_b, response_b_id); "
                                                             "a prompts file? --kind prompts"),
    ({"id": 9, "prompt_id": "q1", "response_a_id": "r1a", "response_b_id": "r1b"},
     "pairs.jsonl:3.id: expected a string"),
    ({"id": "p9", "prompt_id": "nope", "response_a_id": "r1a", "response_b_id": "r1b"},
     "pairs.jsonl:3: unknown prompt id 'nope'"),
    ({"id": "p9", "prompt": {"id": "q9", "text": ""}, "response_a_id": "r1a", "response_b_id": "r1b"},
     "pairs.jsonl:3: prompt.text: must not be empty"),
    ({"id": "p1", "prompt_id": "q1", "response_a_id": "r1b", "response_b_id": "r1a"},
     "pairs.jsonl:3: pair id 'p1' given twice with different content"),
    ({"id": "p9", "prompt_id": "q0", "response_a_id": "r0a", "response_b_id": "r1b"},
     "pairs.jsonl:3: response 'r1b' answers prompt 'q1', not 'q0'"),
])
def test_bad_pairs_line_is_named_and_nothing_is_imported(engine, project, tmp_path, bad, message):
    path = write(tmp_path / "pairs.jsonl", [pair_line(0), pair_line(1), bad])
    with pytest.raises(ops.StoreError) as e, db.session_scope(engine) as s:
        io.import_pairs(s, project_id=project, path=path)
    assert message in str(e.value)
    assert str(e.value).startswith(str(tmp_path))
    assert counts(engine) == (0, 0, 0)


def test_oversize_text_and_non_utf8_are_rejected(engine, project, tmp_path):
    big = pair_line(0)
    big["response_a"]["text"] = "x" * 25_000
    with pytest.raises(ops.StoreError, match=r"pairs.jsonl:1: response_a.text: longer than 20000"), \
            db.session_scope(engine) as s:
        io.import_pairs(s, project_id=project, path=write(tmp_path / "pairs.jsonl", [big]))
    (tmp_path / "p.jsonl").write_bytes(b'{"id": "q1", "text": "\xff"}\n')
    with pytest.raises(ops.StoreError, match=r"p.jsonl:1: not UTF-8"), db.session_scope(engine) as s:
        io.import_prompts(s, project_id=project, path=tmp_path / "p.jsonl")
    with pytest.raises(ops.StoreError, match="cannot open"), db.session_scope(engine) as s:
        io.import_prompts(s, project_id=project, path=tmp_path / "missing.jsonl")
    assert counts(engine) == (0, 0, 0)


def test_import_prompts(engine, project, tmp_path):
    path = write(tmp_path / "prompts.jsonl", [{"id": "q1", "text": "hi", "topic": "billing", "meta": {"k": 1}},
                                              {"id": "q2", "text": "yo"}])
    with db.session_scope(engine) as s:
        assert io.import_prompts(s, project_id=project, path=path).prompts == 2
        assert [p.topic for p in ops.list_prompts(s, project_id=project)] == ["billing", ""]
    bad = write(tmp_path / "bad.jsonl", [{"id": "q3", "text": "ok"}, {"id": "q4"}])
    with pytest.raises(ops.StoreError, match="bad.jsonl:2: missing field 'text'"), db.session_scope(engine) as s:
        io.import_prompts(s, project_id=project, path=bad)
    assert counts(engine)[0] == 2


def _judged_project(engine, tmp_path):
    with db.session_scope(engine) as s:
        pid = ops.create_project(s, name="exp")
        ops.create_guideline_version(s, project_id=pid, label="v1")
        ann = ops.create_rater(s, project_id=pid, name="ann")
        io.import_pairs(s, project_id=pid, path=write(tmp_path / "pairs.jsonl", [pair_line(i) for i in range(4)]))
        rid = ops.create_round(s, project_id=pid, name="r", kind="collection", pair_ids=[f"p{i}" for i in range(4)],
                               duplicate_rate=0.0)
    choices = {"p0": "r0a", "p1": "r1b", "p2": "tie", "p3": "r3a"}
    for n in range(4):
        with db.session_scope(engine) as s:
            t = ops.next_task(s, round_id=rid, rater_id=ann)
            pair = t.left_id[:-1].replace("r", "p")
            ops.submit_judgement(s, assignment_id=t.assignment_id, rater_id=ann, choice=choices[pair],
                                 strength=n % 4, rationale="clear reasons here", time_on_task_s=5,
                                 idempotency_key=f"k{n}")
    return pid, rid


def test_exports(engine, tmp_path):
    pid, rid = _judged_project(engine, tmp_path)
    with db.session_scope(engine) as s:
        n = io.export_judgements_jsonl(s, project_id=pid, path=tmp_path / "out" / "judgements.jsonl")
        recs = io.trl_records(s, project_id=pid, margin={0: 0.0, 1: 0.5, 2: 1.0, 3: 2.0},
                              prompt_template="User: {prompt}\nAssistant:", response_prefix=" ")
        plain = io.trl_records(s, project_id=pid)
        with pytest.raises(ops.StoreError, match="margin: no value for strength 3"):
            io.trl_records(s, project_id=pid, margin={0: 0, 1: 1, 2: 2})
        io.export_trl_jsonl(s, project_id=pid, path=tmp_path / "trl.jsonl")
        io.export_pairs_jsonl(s, project_id=pid, path=tmp_path / "pairs_out.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "out" / "judgements.jsonl").read_text().splitlines()]
    assert n == 4 and {x["pair_id"]: x["winner_id"] for x in lines} == {"p0": "r0a", "p1": "r1b", "p2": None,
                                                                        "p3": "r3a"}
    assert {x["pair_id"]: x["choice"] for x in lines}["p1"] == "b"
    by_prompt = {r["prompt"]: r for r in recs}
    assert len(recs) == 3  # the tie has no chosen side
    assert by_prompt["User: question 1\nAssistant:"]["chosen"] == " B1"
    assert by_prompt["User: question 1\nAssistant:"]["rejected"] == " A1"
    assert all(set(r) == {"prompt", "chosen", "rejected", "margin"} for r in recs)
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in plain)
    assert [json.loads(x) for x in (tmp_path / "trl.jsonl").read_text().splitlines()] == plain
    # the pairs export is importable as is (into a fresh project)
    with db.session_scope(engine) as s:
        other = ops.create_project(s, name="again")
        with pytest.raises(ops.StoreError, match="already belongs to project 'exp'"):  # ids are global
            io.import_pairs(s, project_id=other, path=tmp_path / "pairs_out.jsonl")
    with db.session_scope(engine) as s:
        assert io.import_pairs(s, project_id=pid, path=tmp_path / "pairs_out.jsonl") == io.ImportResult()


def test_hf_dataset(sqlite_url, tmp_path):
    pytest.importorskip("datasets")
    engine = db.make_engine(sqlite_url)
    pid, _ = _judged_project(engine, tmp_path)
    with db.session_scope(engine) as s:
        ds = io.to_hf_dataset(s, project_id=pid, margin={0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0})
    engine.dispose()
    assert ds.column_names == ["prompt", "chosen", "rejected", "margin"] and len(ds) == 3
    assert sorted(ds["chosen"]) == ["A0", "A3", "B1"]
