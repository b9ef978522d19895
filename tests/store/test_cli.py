"""The ``preflab store`` commands through Typer: migrate, import, round, export, progress."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from preflab.cli import app


def test_store_commands_end_to_end(tmp_path):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    rows = [{"id": f"p{i}", "prompt": {"id": f"q{i}", "text": f"question {i}", "topic": "pricing"},
             "response_a": {"id": f"r{i}a", "text": f"A{i}"}, "response_b": {"id": f"r{i}b", "text": f"B{i}"}}
            for i in range(3)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    def run(*args):
        res = CliRunner().invoke(*args)
        res.text = " ".join(res.output.split())  # rich wraps long lines
        return res

    r = run(app, ["store", "migrate", "--db", db])
    assert r.exit_code == 0 and "revision" in r.text
    r = run(app, ["store", "import", str(tmp_path / "pairs.jsonl"), "--db", db, "--project", "cli"])
    assert r.exit_code == 0, r.output
    assert "imported 3 prompts, 6 responses, 3 pairs" in r.text
    (tmp_path / "bad.jsonl").write_text('{"id": "p9", "prompt_id": "q0", "response_a_id": "r0a", "response_b_id": "zz"}\n')
    r = run(app, ["store", "import", str(tmp_path / "bad.jsonl"), "--db", db, "--project", "cli"])
    assert r.exit_code == 2 and "bad.jsonl:1: unknown response id 'zz'" in r.text
    r = run(app, ["store", "round", "first", "--overlap", "2", "--db", db, "--project", "cli"])
    assert r.exit_code == 0 and "3 pairs, overlap 2" in r.text
    assert "no item can be completed" in r.text  # the project has no raters yet: warned
    # a round over only the pairs of one file (e.g. a new checkpoint's answers, just imported)
    (tmp_path / "new.jsonl").write_text(json.dumps({"id": "p3", "prompt_id": "q0", "response_a": {"id": "r3a", "text": "C"},
                                                    "response_b": {"id": "r3b", "text": "D"}}) + "\n")
    r = run(app, ["store", "import", str(tmp_path / "new.jsonl"), "--db", db, "--project", "cli"])
    assert r.exit_code == 0, r.output
    r = run(app, ["store", "round", "on-policy", "--pairs", str(tmp_path / "new.jsonl"), "--db", db, "--project", "cli"])
    assert r.exit_code == 0 and "1 pairs, overlap 1" in r.text, r.text
    (tmp_path / "typo.jsonl").write_text('{"id": "p3"}\n{"id": "p99"}\n')
    r = run(app, ["store", "round", "typo", "--pairs", str(tmp_path / "typo.jsonl"), "--db", db, "--project", "cli"])
    assert r.exit_code == 2 and "typo.jsonl:2: no pair 'p99' in the project" in r.text, r.text
    r = run(app, ["store", "progress", "typo", "--db", db, "--project", "cli"])
    assert r.exit_code == 2 and "no round 'typo'" in r.text  # nothing was created
    r = run(app, ["store", "progress", "first", "--db", db, "--project", "cli"])
    assert r.exit_code == 0 and "0/3 items complete" in r.text
    r = run(app, ["store", "export", "pairs", str(tmp_path / "out.jsonl"), "--db", db, "--project", "cli"])
    assert r.exit_code == 0 and len((tmp_path / "out.jsonl").read_text().splitlines()) == 4  # 3 + the new one
    r = run(app, ["store", "export", "trl", str(tmp_path / "trl.jsonl"), "--margin", "0,1", "--db", db,
                  "--project", "cli"])
    assert r.exit_code == 2 and "--margin: need 4 values" in r.text
