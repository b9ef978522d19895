"""The ``preflab store`` commands through Typer: migrate, import, round, export, progress."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from preflab.cli import app


def _pairs_file(path, n: int) -> None:
    rows = [{"id": f"p{i}", "prompt": {"id": f"q{i}", "text": f"question {i}", "topic": "pricing"},
             "response_a": {"id": f"r{i}a", "text": f"A{i}"}, "response_b": {"id": f"r{i}b", "text": f"B{i}"}}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_store_commands_end_to_end(tmp_path):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    _pairs_file(tmp_path / "pairs.jsonl", 3)
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
    r = run(app, ["store", "round", "t", "--topic", "billing", "--db", db, "--project", "cli"])
    assert r.exit_code == 2 and "--topic: no pairs with topic 'billing' in project 'cli' (topics there: pricing)" in r.text
    for flags, words in ((["--duplicate-rate", "1.5"], "--duplicate-rate: must be in [0, 1]"),
                         (["--kind", "calib"], "--kind: must be one of"), ([], "NAME: 'first' already exists")):
        r = run(app, ["store", "round", "first", *flags, "--db", db, "--project", "cli"])  # named as typed
        assert r.exit_code == 2 and words in r.text, (flags, r.text)
    r = run(app, ["store", "progress", "typo", "--db", db, "--project", "cli"])
    assert r.exit_code == 2 and "no round named or numbered 'typo'" in r.text  # nothing was created
    r = run(app, ["store", "progress", "first", "--db", db, "--project", "cli"])
    assert r.exit_code == 0 and "0/3 items complete" in r.text
    r = run(app, ["store", "progress", "1", "--db", db, "--project", "cli"])  # or by id, as quality takes it
    assert r.exit_code == 0 and "first: 0/3 items complete" in r.text
    r = run(app, ["store", "export", "judgements", str(tmp_path / "j.jsonl"), "--round", "9", "--db", db,
                  "--project", "cli"])
    assert r.exit_code == 2 and "--round: no round named or numbered '9'" in r.text
    r = run(app, ["store", "export", "pairs", str(tmp_path / "out.jsonl"), "--db", db, "--project", "cli"])
    assert r.exit_code == 0 and len((tmp_path / "out.jsonl").read_text().splitlines()) == 4  # 3 + the new one
    r = run(app, ["store", "export", "trl", str(tmp_path / "trl.jsonl"), "--margin", "0,1", "--db", db,
                  "--project", "cli"])
    assert r.exit_code == 2 and "--margin: need 4 values" in r.text


def _tiny_policy(path, seed):
    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer
    from preflab.sandbox.domain import sandbox_texts

    tok = train_tokenizer(sandbox_texts(seed=0, n=200), 300)
    cfg = tiny_gpt2_config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=128,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tiny_gpt2(cfg, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_store_sample_adds_a_new_checkpoints_answers_as_pairs(tmp_path):
    """`store sample`: two policies' answers to the project's prompts become cross-source pairs in the
    store and in a file `store round --pairs` takes; a re-run adds nothing; bad input changes nothing."""
    import torch

    torch.set_num_threads(1)
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    new, old = _tiny_policy(tmp_path / "new", 0), _tiny_policy(tmp_path / "old", 1)
    prompts = [{"id": f"q{i}", "text": f"How much is the Team plan? ({i})", "topic": "pricing" if i < 3 else "billing"}
               for i in range(5)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))

    def run(*args):
        res = CliRunner().invoke(app, list(args))
        res.text = " ".join(res.output.split())
        return res

    r = run("store", "import", str(tmp_path / "prompts.jsonl"), "--kind", "prompts", "--db", db, "--project", "bot")
    assert r.exit_code == 0 and "no store at" in r.text and "creating a new one" in r.text, r.text
    out = tmp_path / "new_pairs.jsonl"
    args = ["store", "sample", str(out), "--policy", f"ppo1={new}", "--policy", f"sft={old}", "--topic", "pricing",
            "--max-new-tokens", "8", "--seed", "3", "--db", db, "--project", "bot"]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "sampled 12 answers to 3 prompts from ppo1, sft; 3 pairs (3 new) in 'bot'" in r.text, r.text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["prompt"]["id"] for row in rows) == ["q0", "q1", "q2"]  # the topic's prompts only
    for row in rows:  # cross_source: each pair sets the new checkpoint against the old one
        assert {row["response_a"]["source"], row["response_b"]["source"]} == {"ppo1", "sft"}
        assert row["response_a"]["text"] != row["response_b"]["text"]
    first = out.read_text()
    r = run(*args)  # same seed, same samples, content-hash ids: nothing new, the same file
    assert r.exit_code == 0 and "3 pairs (0 new)" in r.text and out.read_text() == first, r.text
    r = run("store", "round", "ppo1-vs-sft", "--pairs", str(out), "--db", db, "--project", "bot")
    assert r.exit_code == 0 and "3 pairs" in r.text, r.text

    bad = tmp_path / "bad.jsonl"
    for extra, message in [
        (["--policy", f"a={new}", "--policy", f"a={old}"], "label 'a' given twice"),
        (["--policy", str(tmp_path / "nowhere")], "nowhere"),
        (["--policy", new, "--n-per-policy", "1"], "one policy with one response per prompt cannot make a pair"),
        (["--policy", new, "--temperature", "0"], "no pairs: no prompt got two distinct usable answers"),
        (["--policy", new, "--topic", "refunds"], "--topic: no prompts with topic 'refunds' in 'bot'"),
        (["--policy", new, "--project", "nobody"], "--project: no project named 'nobody'"),
        (["--policy", new, "--strategy", "best"], "PairsConfig.strategy: must be one of ['random', 'cross_source'], got 'best'"),
    ]:
        r = run("store", "sample", str(bad), "--db", db, "--project", "bot", *extra)  # a later --project wins
        assert r.exit_code == 2 and message in r.text, (extra, r.text)
        assert not bad.exists()
    r = run("store", "export", "pairs", str(tmp_path / "all.jsonl"), "--db", db, "--project", "bot")
    assert r.exit_code == 0 and len((tmp_path / "all.jsonl").read_text().splitlines()) == 3  # nothing was added
    for cmd in (["lineage"], ["guidelines", "list"]):  # a mistyped project is an error, not an empty table
        r = run(*cmd, "--db", db, "--project", "bot ")
        assert r.exit_code == 2 and "--project: no project named 'bot '" in r.text, (cmd, r.text)

    # a blind A/B round's prompts are held out: later samples leave them out unless asked
    (tmp_path / "ab.jsonl").write_text(next(line for line in first.splitlines() if '"q0"' in line) + "\n")
    r = run("store", "round", "ab", "--kind", "eval", "--pairs", str(tmp_path / "ab.jsonl"), "--db", db,
            "--project", "bot")
    assert r.exit_code == 0, r.text
    r = run(*args)
    assert r.exit_code == 0 and "left out 1 prompts of blind A/B rounds" in r.text and "to 2 prompts" in r.text, r.text
    assert sorted(json.loads(x)["prompt"]["id"] for x in out.read_text().splitlines()) == ["q1", "q2"]
    r = run(*args, "--include-eval-prompts")
    assert r.exit_code == 0 and "left out" not in r.text and "to 3 prompts" in r.text, r.text


def test_an_unreachable_or_unmigrated_store_is_a_named_error_not_a_traceback(tmp_path):
    import subprocess
    import sys

    def preflab(*args):
        return subprocess.run([sys.executable, "-m", "preflab.cli", *args], capture_output=True, text=True,
                              timeout=120)

    r = preflab("store", "export", "pairs", str(tmp_path / "o.jsonl"), "--db", str(tmp_path / "typo" / "new.db"))
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert "--db: no store at" in r.stdout and "preflab store migrate" in r.stdout, r.stdout
    assert not (tmp_path / "typo").exists()  # a mistyped --db leaves no new, empty store behind
    (tmp_path / "new.db").touch()  # there, but never migrated
    r = preflab("store", "export", "pairs", str(tmp_path / "o.jsonl"), "--db", str(tmp_path / "new.db"))
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert "the store (--db) failed: no such table" in r.stdout and "preflab store migrate" in r.stdout, r.stdout
    r = preflab("store", "round", "r1", "--db", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert r.returncode == 2 and "the store (--db) failed: connection" in r.stdout, r.stdout + r.stderr
    assert "is PostgreSQL running at the host and port" in r.stdout
    r = preflab("store", "round", "r1", "--db", "postgresql+psycopg2://nobody:hunter2@127.0.0.1/none")
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert "--db: cannot use postgresql+psycopg2://nobody:***@127.0.0.1/none: No module named" in r.stdout, r.stdout
    assert not (tmp_path / "o.jsonl").exists()


def test_postgres_errors_say_what_to_fix():
    from preflab.cli import _db_hint
    from preflab.store.db import normalise_url

    assert normalise_url("postgres://u@h:5432/d") == "postgresql+psycopg://u@h:5432/d"  # as hosting providers print it
    assert normalise_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert "createdb acme" in _db_hint('connection failed: FATAL:  database "acme" does not exist')
    assert "user name and password" in _db_hint('FATAL:  role "bob" does not exist')
    assert "user name and password" in _db_hint('FATAL:  password authentication failed for user "bob"')
    assert "store migrate" in _db_hint('relation "projects" does not exist')
    assert "store migrate" in _db_hint("no such table: projects")


@pytest.mark.parametrize("key", ["short", ""])  # "": an unset $KEY in --secret-key "$KEY"
def test_serve_names_a_short_secret_key(tmp_path, key):
    r = CliRunner().invoke(app, ["serve", "--secret-key", key, "--db", f"sqlite:///{tmp_path / 's.db'}"])
    assert r.exit_code == 2 and "--secret-key / PREFLAB_SECRET_KEY: String should have at least 16 characters" in \
        " ".join(r.output.split()), r.output


def test_reset_password_gives_a_locked_out_admin_new_credentials(tmp_path):
    from preflab.store import db as store_db
    from preflab.store import ops

    url = f"sqlite:///{tmp_path / 's.db'}"
    store_db.upgrade(url)
    engine = store_db.make_engine(url)
    with store_db.session_scope(engine) as s:
        pid = ops.ensure_project(s, name="acme")
        rid = ops.create_rater(s, project_id=pid, name="boss", password="forgotten-long-ago", role="admin")
        old_token = ops.issue_api_token(s, rater_id=rid)
    r = CliRunner().invoke(app, ["store", "reset-password", "boss", "--db", url, "--project", "acme"])
    assert r.exit_code == 0, r.output
    password = r.output.split("password: ")[1].split()[0]
    token = r.output.split("API token: ")[1].split()[0]
    with store_db.session_scope(engine, readonly=True) as s:
        assert ops.check_password(s, project_id=pid, name="boss", password=password).id == rid
        assert ops.check_password(s, project_id=pid, name="boss", password="forgotten-long-ago") is None
        assert ops.rater_by_token(s, token=token).id == rid and ops.rater_by_token(s, token=old_token) is None
    r = CliRunner().invoke(app, ["store", "reset-password", "bos", "--db", url, "--project", "acme"])
    assert r.exit_code == 2 and "no rater 'bos' in project 'acme'" in r.output
    r = CliRunner().invoke(app, ["store", "reset-password", "boss", "--db", f"sqlite:///{tmp_path / 'typo.db'}"])
    assert r.exit_code == 2 and "no store at" in " ".join(r.output.split())
    assert not (tmp_path / "typo.db").exists()


def test_a_mistyped_project_is_refused_not_created(tmp_path):
    from preflab.store import db as store_db
    from preflab.store import ops

    url = f"sqlite:///{tmp_path / 's.db'}"
    store_db.upgrade(url)
    engine = store_db.make_engine(url)
    with store_db.session_scope(engine) as s:
        ops.ensure_project(s, name="support")
    for args in (["guidelines", "add-rubric", "--label", "v9", "--item", "x"],
                 ["rerate", "--where", "topic=pricing", "--guideline", "v9"],
                 ["promote", str(tmp_path), "--to", "staging"]):
        r = CliRunner().invoke(app, [*args, "--db", url, "--project", "suport"], terminal_width=200)
        assert r.exit_code == 2, (args, r.output)
        assert "--project: no project named 'suport' in the store (it has 'support')" in " ".join(r.output.split())
    with store_db.session_scope(engine, readonly=True) as s:
        assert ops.list_projects(s) == ["support"]  # nothing was created
    # an import into the mistyped project names where its prompt ids are, and creates nothing either
    (tmp_path / "q.jsonl").write_text('{"id": "q1", "text": "How much is the plan?", "topic": "pricing"}\n')
    assert CliRunner().invoke(app, ["store", "import", str(tmp_path / "q.jsonl"), "--kind", "prompts", "--db", url,
                                    "--project", "support"]).exit_code == 0
    (tmp_path / "p.jsonl").write_text('{"id": "p1", "prompt_id": "q1", "response_a": {"id": "a1", "text": "10"}, '
                                      '"response_b": {"id": "b1", "text": "20"}}\n')
    r = CliRunner().invoke(app, ["store", "import", str(tmp_path / "p.jsonl"), "--db", url, "--project", "suport"],
                           terminal_width=200)
    assert r.exit_code == 2 and "unknown prompt id 'q1' in this project (it is in project 'support'" in r.output
    with store_db.session_scope(engine, readonly=True) as s:
        assert ops.list_projects(s) == ["support"]


def test_store_round_takes_every_assignment_setting(tmp_path):
    from preflab.store import db as store_db
    from preflab.store import ops

    url = f"sqlite:///{tmp_path / 's.db'}"
    _pairs_file(tmp_path / "pairs.jsonl", 2)
    assert CliRunner().invoke(app, ["store", "import", str(tmp_path / "pairs.jsonl"), "--db", url]).exit_code == 0
    r = CliRunner().invoke(app, ["store", "round", "r", "--db", url, "--no-ties", "--min-rationale-chars", "30",
                                 "--routing", "any", "--fallback", "after", "--fallback-after-s", "3600",
                                 "--lease-s", "120"])
    assert r.exit_code == 0, r.output
    with store_db.session_scope(store_db.make_engine(url), readonly=True) as s:
        info = ops.round_by_name(s, project_id=ops.require_project(s, name="default"), name="r")
    assert (info.allow_ties, info.min_rationale_chars, info.routing, info.fallback, info.fallback_after_s,
            info.lease_s) == (False, 30, "any", "after", 3600.0, 120.0)
    r = CliRunner().invoke(app, ["store", "round", "bad", "--db", url, "--routing", "topic"])
    assert r.exit_code == 2 and "routing" in r.output
