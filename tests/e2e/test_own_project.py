"""A team's own project from start to finish, the way docs/own_project.md walks it: the real CLI,
real raters' HTTP calls against `preflab serve`, no sandbox raters, no demo, no gold.

prompts -> sampled pairs -> a round -> judgements over HTTP -> reward model -> PPO -> a blind A/B
round judged over HTTP -> gates -> promotion decision -> the report from the store.
"""

from __future__ import annotations

import json
import re

import torch
from typer.testing import CliRunner

from preflab.cli import app
from tests.train.policy_fixtures import cached_sft, queries
from tests.web.harness import Server

torch.set_num_threads(1)


def preflab(*args: str, ok: tuple[int, ...] = (0,)) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    text = " ".join(r.output.split())
    assert r.exit_code in ok, f"preflab {' '.join(map(str, args))} -> {r.exit_code}:\n{r.output}"
    return text


def rate_everything(server: Server, token: str, round_id: int, key: str) -> int:
    """A rater who prefers the shorter answer (a taste a reward model can learn), over the JSON API."""
    import httpx

    n = 0
    with httpx.Client(base_url=server.url + "/api/v1", headers={"Authorization": f"Bearer {token}"},
                      timeout=30) as c:
        while (task := c.get(f"/rounds/{round_id}/next").json()["task"]) is not None:
            left, right = (len(task[side]["text"].split()) for side in ("left", "right"))
            choice = "tie" if left == right else ("left" if left < right else "right")
            r = c.post(f"/rounds/{round_id}/judgements", json={
                "assignment_id": task["assignment_id"], "choice": choice, "strength": 0 if choice == "tie" else 2,
                "rationale": "shorter and to the point", "time_on_task_s": 30.0,
                "idempotency_key": f"{key}-{task['assignment_id']:06d}"})
            assert r.status_code == 201, r.text
            n += 1
    return n


def test_own_project_end_to_end(request, tmp_path):
    sft = cached_sft(request)
    db = f"sqlite:///{tmp_path / 'store.db'}"
    run = tmp_path / "runs"
    proj = ["--db", db, "--project", "acme"]

    # the team's prompts, in the store's prompts.jsonl format
    prompts = tmp_path / "prompts.jsonl"
    seen = {}
    for q in queries(200, seed=3):
        seen.setdefault(q.text, {"id": f"q{len(seen):03d}", "text": q.text, "topic": q.topic})
    prompts.write_text("".join(json.dumps(p) + "\n" for p in list(seen.values())[:32]))
    preflab("store", "migrate", "--db", db)
    assert "imported 32 prompts" in preflab("store", "import", prompts, "--kind", "prompts", *proj)
    preflab("guidelines", "add-rubric", "--label", "v1", "--item", "Answers the question asked", *proj)

    server = Server(db_url=db, project="acme").start()
    try:
        admin = server.admin()
        tokens = []
        for name in ("ana", "ben"):
            r = admin.post("/api/v1/raters", json={"name": name, "specialties": ["pricing"]})
            assert r.status_code == 201, r.text
            tokens.append(r.json()["token"])
        admin.close()

        # calibration: two rounds every rater judges, then kappa before/after
        calibration = 0
        for k in (1, 2):
            preflab("store", "sample", tmp_path / f"calib{k}.jsonl", "--policy", f"sft={sft}", "--limit", "8",
                    "--seed", str(k), "--max-new-tokens", "48", *proj)
            out = preflab("store", "round", f"calibration {k}", "--kind", "calibration", "--overlap", "2",
                          "--duplicate-rate", "0", "--pairs", tmp_path / f"calib{k}.jsonl", *proj)
            rid = int(re.search(r"\(id (\d+)\)", out).group(1))
            calibration += sum(rate_everything(server, t, rid, f"cal{k}-{i}") for i, t in enumerate(tokens))
            if k == 1:  # the most split items for the discussion, then what it agreed as the next version
                out = preflab("quality", "review", "calibration 1", "--out", run / "review.md", *proj)
                assert "calibration 1: the 8 most split of 8 items" in out and "a / b / tie" in out, out
                review = (run / "review.md").read_text()
                assert review.startswith("# Disagreement review") and review.count("\n## ") == 8
                out = preflab("quality", "review", str(rid), *proj)  # by id too
                assert "calibration 1:" in out, out
                out = preflab("quality", "review", "calibration 9", *proj, ok=(2,))
                assert "ROUND: no round named or numbered 'calibration 9' in project 'acme'" in out, out
                out = preflab("guidelines", "add-rubric", "--label", "v1.1", "--item",
                              "Says it in fewer words when nothing is lost", *proj)
                assert "v1.1: 2 rubric items" in out  # v1's item and the new one
        preflab("quality", "report", "--out", run / "workshop", *proj)

        # pairs from the SFT model's own answers, and a round over exactly those
        out = preflab("store", "sample", tmp_path / "week1.jsonl", "--policy", f"sft={sft}", "--n-per-policy", "2",
                      "--max-new-tokens", "48", *proj)
        n_pairs = int(re.search(r"(\d+) pairs \(\d+ new\)", out).group(1))
        assert n_pairs >= 24, out
        out = preflab("store", "round", "week 1", "--pairs", tmp_path / "week1.jsonl", "--duplicate-rate", "0.2",
                      *proj)
        week1 = int(re.search(r"\(id (\d+)\)", out).group(1))
        judged = rate_everything(server, tokens[0], week1, "ana-w1")
        assert judged > n_pairs  # every pair, plus the planted duplicates

        # reward model on the store's judgements, evaluated against the raters' own consistency
        (tmp_path / "rm.toml").write_text("[rm]\nlr = 1e-3\nepochs = 3\nbatch_size = 8\nval_fraction = 0.25\n")
        out = preflab("rm", "train", *proj, "--policy", sft, "--out", run / "rm1", "--config", tmp_path / "rm.toml")
        n_train, n_val = map(int, re.search(r"on (\d+) judgements of \d+ pairs(?:, \d+ of them ties \(left out of "
                                            r"the loss\))? \((\d+) judgements of \d+ pairs held out\)",
                                            out).groups())  # the calibration rounds overlap
        assert "next: preflab rm eval " in out and " --project " in out  # the hint keeps the store (the ceiling)
        out = preflab("rm", "eval", run / "rm1", *proj)
        assert "accuracy" in out and (run / "rm1" / "eval" / "preference.json").is_file()
        n_dup = judged - n_pairs  # the ceiling's source is named; a few duplicates are called too few
        assert f"from {n_dup} planted duplicates" in " ".join(out.split()), out
        assert ("too few to judge" in out) == (n_dup < 30)
        # would more judgements help? on the collection round alone (the workshop's rounds left out)
        out = preflab("rm", "curve", *proj, "--policy", sft, "--out", run / "curve", "--config", tmp_path / "rm.toml",
                      "--rounds", "collection", "--sizes", "0.5,1", "--no-progress")
        c_train, c_val = (int(x.replace(",", "")) for x in
                          re.search(r"([\d,]+) training pairs, ([\d,]+) validation pairs", out).groups())
        assert c_train + c_val == n_pairs < n_train + n_val, out  # rm train's default also read calibration
        assert "under the duplicate ceiling" in out and (run / "curve" / "curve.png").is_file()

        # PPO on the same prompts file
        (tmp_path / "ppo.toml").write_text("[ppo]\nprompts_per_step = 8\nmax_new_tokens = 48\nminibatch_size = 8\n"
                                           "ppo_epochs = 1\nlr = 1e-4\n")
        held = tmp_path / "heldout.jsonl"
        held.write_text("".join(json.dumps({"text": q.text}) + "\n" for q in queries(8, seed=4, split="heldout")))
        out = preflab("ppo", "--policy", sft, "--reward", run / "rm1" / "model", "--out", run / "ppo1",
                      "--prompts", prompts, "--eval-prompts", held, "--config", tmp_path / "ppo.toml", "--steps", "3",
                      "--checkpoint-every", "3", *proj)
        assert "ppo: 3 steps" in out and "note:" not in out, out
        cand = run / "ppo1" / "policy"

        # a blind A/B round, judged by the other rater over HTTP, then scored
        out = preflab("ab", "create", "--candidate", cand, "--baseline", sft, "--name", "blind 1", "--queries",
                      prompts, "--n", "24", *proj)
        blind = int(re.search(r"round (\d+) 'blind 1': 24 blind pairs", out).group(1))
        assert rate_everything(server, tokens[1], blind, "ben-ab") == 24
        # a taken round name fails before any model is loaded or sampled (the paths below do not exist)
        out = preflab("ab", "create", "--candidate", tmp_path / "nope", "--baseline", sft, "--name", "blind 1",
                      "--queries", prompts, *proj, ok=(2,))
        assert "--name: round 'blind 1' already exists" in out, out
        bad = tmp_path / "bad_queries.jsonl"  # a bad line is named before any model is loaded
        bad.write_text('{"id": "a", "text": "How much is Team?"}\n{"text": "no id"}\n')
        out = preflab("ab", "create", "--candidate", tmp_path / "nope", "--baseline", sft, "--name", "blind 2",
                      "--queries", bad, *proj, ok=(2,))
        assert "bad_queries.jsonl:2: expected an object with 'id' and a non-empty 'text'" in out, out
    finally:
        server.stop()
    out = preflab("ab", "result", blind, "--db", db)
    assert "A/B round" in out and (cand / "eval" / "ab.json").is_file()

    # the team's factual spot checks, the gates on the evidence, and the promotion decision
    suite = tmp_path / "suite.jsonl"
    suite.write_text("".join(json.dumps({"id": f"team-{i}", "topic": "pricing", "query": q,
                                         "required": [r"\$30 per user per month"], "forbidden": [r"\$25 per user"]})
                             + "\n" for i, q in enumerate(["How much is the Team plan?", "What does Team cost?"])))
    preflab("gates", cand, "--baseline", sft, "--suite", suite, "--reference", sft, ok=(0, 1))
    gate = json.loads((cand / "eval" / "gate.json").read_text())
    out = preflab("promote", cand, "--to", "staging", *proj, ok=(0, 1))
    verdict = f"promoted {cand} to staging" if gate["passed"] else f"refused: {cand} not promoted to staging"
    assert verdict in out, out

    # which judgements, guideline, reward model and policy each run came from
    assert "judgements=" in preflab("lineage", *proj)
    from preflab.collect.rerate import lineage
    from preflab.store import db as store_db
    from preflab.store import ops

    engine = store_db.make_engine(db)
    with store_db.session_scope(engine, readonly=True) as s:
        rows = {r["run"]: r for r in lineage(s, project_id=ops.project_id(s, name="acme"))}
    engine.dispose()
    rm1, ppo1 = rows[str(run / "rm1")], rows[str(run / "ppo1")]
    assert rm1["judgements"] == n_train + n_val and rm1["initialised_from"] == str(sft)  # what it trained on
    assert set(rm1["guidelines"]) == {"v1", "v1.1"}  # calibration 1 was judged under v1, the rest under v1.1
    assert (ppo1["reward_model"], ppo1["parent"], ppo1["steps"]) == (str(run / "rm1" / "model"), str(sft), 3)

    # the report, with the store's side written first
    out = preflab("report", run, *proj)
    assert "sections: workshop, quality, reward, ppo, checkpoints, ab, factual, cost" in out, out
    quality = json.loads((run / "collection" / "quality.json").read_text())
    assert quality["n_duplicates"] == judged - n_pairs and quality["raters"][0]["rater"] == "ana"
    assert quality["n_judgements"] == calibration + judged
    cost = json.loads((run / "cost.json").read_text())
    assert cost["totals"]["judgements"] == calibration + judged + 24  # every round's time on task
    md = (run / "report.md").read_text()
    assert "Real project" in md and "Ground truth" not in md
    row = json.loads((run / "checkpoints.json").read_text())["rows"][0]
    assert row["run"] == "ppo1/policy" and row["step"] == 3 and row["promoted"] == gate["passed"]
