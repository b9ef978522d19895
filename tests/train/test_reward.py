"""Reward-model trainer: shared-prompt scoring equals plain scoring, training learns, run-dir layout."""

from __future__ import annotations

import json

import pytest
import torch

from preflab.config import ConfigError, from_dict
from preflab.models.hf import load_reward_model, reward_model_from_policy
from preflab.train.data import (
    PreferenceExample,
    collate_pairs,
    encode_example,
    examples_from_rows,
    load_jsonl,
    split_by_prompt,
)
from preflab.train.reward import (
    PairScorer,
    RewardConfig,
    pair_rewards,
    score_pairs,
    score_responses,
    train_reward,
)
from tests.train.rm_fixtures import sandbox_pairs, tiny_reward_model, tiny_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _rewards_and_grads(model, batch, **scorer_kw):
    """(r_chosen, r_rejected, gradients) of one scorer variant on ``batch``."""
    model.zero_grad()
    c, r = pair_rewards(PairScorer(model, **scorer_kw), batch)
    (torch.nn.functional.logsigmoid(c - r).sum() + (c * r).sum()).backward()
    return c.detach(), r.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(model, a, b):
    (c1, r1, g1), (c0, r0, g0) = a, b
    assert torch.allclose(c1, c0, atol=1e-5) and torch.allclose(r1, r0, atol=1e-5)
    assert g1.keys() == g0.keys() and len(g1) == len(list(model.parameters()))
    for name in g1:
        assert torch.allclose(g1[name], g0[name], atol=1e-5, rtol=1e-4), name


def test_shared_prompt_gives_same_rewards_and_gradients_as_plain(tok):
    model = tiny_reward_model(tok, seed=1)
    enc = [encode_example(tok, e, max_length=256) for e in sandbox_pairs(6, seed=3)]
    assert len({len(e.prompt_ids) for e in enc}) > 1 and len({len(e.chosen_ids) for e in enc}) > 1  # real padding
    batch = collate_pairs(enc, pad_id=tok.pad_token_id)
    shared = _rewards_and_grads(model, batch, share_prompt=True)
    _assert_same(model, shared, _rewards_and_grads(model, batch, share_prompt=False))
    # both equal the HF model's own forward on each unpadded sequence
    c1, r1, _ = shared
    with torch.no_grad():
        for i, e in enumerate(enc[:3]):
            for ids, want in ((e.prompt_ids + e.chosen_ids, c1[i]), (e.prompt_ids + e.rejected_ids, r1[i])):
                got = model(input_ids=torch.tensor([ids])).logits.squeeze()
                assert got.item() == pytest.approx(want.item(), abs=1e-5)


@pytest.mark.parametrize("share", [True, False])
def test_last_block_at_the_pooled_token_only_gives_same_rewards_and_gradients(tok, share):
    """GPT-2: the last block run only where the reward is read equals the model's full forward."""
    model = tiny_reward_model(tok, seed=1)
    enc = [encode_example(tok, e, max_length=256) for e in sandbox_pairs(6, seed=3)]
    batch = collate_pairs(enc, pad_id=tok.pad_token_id)
    assert PairScorer(model).pooled_last_block and not PairScorer(model, pooled_last_block=False).pooled_last_block
    _assert_same(model, _rewards_and_grads(model, batch, share_prompt=share, pooled_last_block=True),
                 _rewards_and_grads(model, batch, share_prompt=share, pooled_last_block=False))
    assert len(model.transformer.h) == model.config.n_layer  # the blocks are back after the forward


def test_score_helpers_agree(tok):
    model = tiny_reward_model(tok, seed=2)
    ex = sandbox_pairs(5, seed=4)
    rc, rr = score_pairs(model, tok, ex, batch_size=2)
    single = score_responses(model, tok, [e.prompt for e in ex] * 2, [e.chosen for e in ex] + [e.rejected for e in ex],
                             batch_size=3)
    assert single == pytest.approx(rc + rr, abs=1e-5)
    with pytest.raises(ValueError, match="prompts"):
        score_responses(model, tok, ["a"], [])


def test_training_learns_and_writes_run_dir(tok, tmp_path):
    model = tiny_reward_model(tok, seed=0)
    train, val = split_by_prompt(sandbox_pairs(240, seed=0), val_fraction=0.25, seed=0)
    cfg = RewardConfig(lr=2e-3, batch_size=16, epochs=2, eval_every=10, checkpoint_every=10, seed=0)
    seen = []
    res = train_reward(cfg, model=model, tokenizer=tok, train=train, val=val, run_dir=tmp_path,
                       on_step=lambda s, row: seen.append(s), show_progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == seen == list(range(1, res.steps + 1))
    assert {"train/loss", "train/accuracy", "train/lr", "train/grad_norm"} <= rows[0].keys()
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert len(evals) == res.steps // 10 + (res.steps % 10 > 0)
    assert res.metrics["eval/accuracy"] >= 0.75, evals  # stale vs current fact is learnable
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 2e-3
    assert len(load_jsonl(tmp_path / "data" / "val.jsonl")) == len(val)
    # the final model dir is a plain HF dir that scores like the trained model
    loaded, tok2 = load_reward_model(res.model_dir)
    a = score_pairs(model, tok, val[:4])
    b = score_pairs(loaded, tok2, val[:4])
    assert a[0] == pytest.approx(b[0], abs=1e-5)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] and len(list((tmp_path / "ckpt").iterdir())) == 2


def test_reward_model_from_a_policy_dir(tok, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    policy = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_layer=1, n_head=2, n_embd=32))
    policy.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rm, tok2 = reward_model_from_policy(tmp_path)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    assert torch.equal(rm.transformer.h[0].mlp.c_fc.weight, policy.transformer.h[0].mlp.c_fc.weight)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="RewardConfig.grad_accum"):
        RewardConfig(batch_size=16, grad_accum=3)
    with pytest.raises(ConfigError, match="RewardConfig.margin"):
        RewardConfig(margin="huge")
    with pytest.raises(ConfigError, match="ties"):
        from_dict(RewardConfig, {"ties": "drop"})
    assert RewardConfig(margin="constant", margin_constant=0.5).margin_spec() == 0.5


def test_explicit_margin_column_overrides_strength(tok):
    from preflab.train.reward import _step_loss

    model = tiny_reward_model(tok, seed=0)
    e = sandbox_pairs(2, seed=0)
    e = [PreferenceExample(**{**x.__dict__, "strength": 3, "is_tie": False, "margin": m})
         for x, m in zip(e, (None, 0.0), strict=True)]
    b = collate_pairs([encode_example(tok, x, max_length=256) for x in e], pad_id=tok.pad_token_id)
    cfg = RewardConfig(margin="llama2_large")
    scorer = PairScorer(model)
    with torch.no_grad():
        loss, d = _step_loss(scorer, b, cfg, 1.0)
        want = -torch.nn.functional.logsigmoid(d - torch.tensor([3.0, 0.0])).sum()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


# ---- data -----------------------------------------------------------------------------


def test_split_by_prompt_never_leaks_a_prompt():
    ex = sandbox_pairs(200, seed=1)
    train, val = split_by_prompt(ex, val_fraction=0.2, seed=7)
    assert len(train) + len(val) == len(ex)
    assert not {e.prompt for e in train} & {e.prompt for e in val}
    n_prompts = len({e.prompt for e in ex})
    assert abs(len({e.prompt for e in val}) - 0.2 * n_prompts) <= 1
    assert split_by_prompt(ex, val_fraction=0.2, seed=7) == (train, val)
    assert split_by_prompt(ex, val_fraction=0.2, seed=8)[1] != val


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n\n{"prompt": "x", "chosen": 3}\n',
     r"pairs.jsonl:3: field 'chosen' must be a string"),
    ('{"prompt": "hi", "chosen": "a", "rejected": "b"}\nnot json\n', r"pairs.jsonl:2: not valid JSON"),
    ('{"chosen": [{"role": "user", "content": "hi"}], "rejected": []}\n',
     r"pairs.jsonl:1: TRL's conversational format .* is not read here"),
    ('{"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}\n',
     r"pairs.jsonl:1: no 'prompt' \(TRL's implicit-prompt format"),
    ('{"prompt": "hi", "chosen": "a", "rejected": "b", "strength": 7}\n',  # before training, not in it
     r"pairs.jsonl:1: field 'strength' must be 0-3 .* got 7"),
])
def test_load_jsonl_names_file_and_line(tmp_path, text, message):
    p = tmp_path / "pairs.jsonl"
    p.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_jsonl(p)


def test_load_jsonl_reads_trl_rows(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b", "margin": 1.5, "extra": 1}\n')
    (e,) = load_jsonl(p)
    assert (e.prompt, e.chosen, e.rejected, e.margin, e.pair_id) == ("hi", "a", "b", 1.5, "pairs.jsonl:1")


def test_store_rows_are_adapted():
    from types import SimpleNamespace

    row = SimpleNamespace(pair_id="p1", prompt_text="q", topic="billing", chosen_text="a", rejected_text="b",
                          chosen_id="r1", rejected_id="r2", strength=2, rater="ann", is_tie=False,
                          guideline_version="v2", round_id=3)
    (e,) = examples_from_rows([row])
    assert e == PreferenceExample("p1", "q", "a", "b", strength=2, rater="ann", topic="billing",
                                  chosen_id="r1", rejected_id="r2")


def test_encoding_layout_and_truncation(tok):
    e = sandbox_pairs(1, seed=0)[0]
    enc = encode_example(tok, e, max_length=256)
    assert tok.decode(enc.prompt_ids) == f"User: {e.prompt}\nAssistant:"
    assert enc.chosen_ids[-1] == tok.eos_token_id and tok.decode(enc.chosen_ids[:-1]) == " " + e.chosen
    short = encode_example(tok, e, max_length=24)
    assert short.truncated and len(short.prompt_ids) + max(len(short.chosen_ids), len(short.rejected_ids)) <= 24
    assert short.prompt_ids == enc.prompt_ids[-len(short.prompt_ids):]
    b = collate_pairs([enc, short], pad_id=tok.pad_token_id)
    assert b.prompt_ids.shape[0] == 2 and b.response_ids.shape[0] == 4
    assert b.prompt_mask[:, -1].all() and b.response_mask[:, 0].all()  # left / right padding
    s = b.slice(1, 2)
    assert s.prompt_ids.shape[1] == len(short.prompt_ids) and s.response_mask.sum(-1).tolist() == [
        len(short.chosen_ids), len(short.rejected_ids)]


# ---- CLI ------------------------------------------------------------------------------


def test_cli_rm_train_eval_score(tok, tmp_path):
    from typer.testing import CliRunner

    from preflab.cli import app
    from tests.train.rm_fixtures import tiny_policy_and_pairs

    policy, data = tiny_policy_and_pairs(tok, tmp_path, n_pairs=60)
    (tmp_path / "rm.toml").write_text("[rm]\nlr = 1e-3\nval_fraction = 0.25\ncheckpoint_every = 0\n"
                                      'prompt_format = "raw"\nmax_length = 96\n')
    run = tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(app, ["rm", "train", "--data", str(data), "--policy", str(policy), "--out", str(run),
                            "--config", str(tmp_path / "rm.toml"), "--batch-size", "8", "--margin", "none"])
    assert r.exit_code == 0, r.output
    assert "val accuracy" in r.output
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["lr"], cfg["batch_size"], cfg["margin"]) == (1e-3, 8, "none")
    r = runner.invoke(app, ["rm", "eval", str(run), "--ceiling", "0.8", "--n-boot", "100"])
    assert r.exit_code == 0, r.output
    assert "held-out accuracy" in r.output and (run / "eval" / "preference.json").is_file()
    inp = tmp_path / "score.jsonl"
    inp.write_text(json.dumps({"prompt": "How much is the Team plan?", "response": "Hello."}) + "\n")
    r = runner.invoke(app, ["rm", "score", "--model", str(run / "model"), "--input", str(inp), "--output",
                            str(tmp_path / "scored.jsonl")])
    assert r.exit_code == 0, r.output
    (row,) = [json.loads(x) for x in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert isinstance(row["score"], float) and row["response"] == "Hello."
    # the model's directory says how it reads its input, so a copy of it (or an export) scores the same
    assert json.loads((run / "model" / "preflab.json").read_text()) == {
        "kind": "reward_model", "prompt_format": "raw", "max_length": 96}
    import shutil

    shutil.copytree(run / "model", tmp_path / "copied")
    r = runner.invoke(app, ["rm", "score", "--model", str(tmp_path / "copied"), "--input", str(inp), "--threads", "1"])
    assert r.exit_code == 0 and json.loads(r.stdout.splitlines()[-1])["score"] == row["score"], r.output
    r = runner.invoke(app, ["checkpoints", str(run), "--export", "6", "--out", str(tmp_path / "exported")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "exported" / "preflab.json").read_text())["prompt_format"] == "raw"
    # bad input: named, exit code 2
    inp.write_text('{"prompt": "x"}\n')
    r = runner.invoke(app, ["rm", "score", "--model", str(run / "model"), "--input", str(inp)])
    assert r.exit_code == 2 and "score.jsonl:1" in r.output
    r = runner.invoke(app, ["rm", "train", "--data", str(data), "--policy", str(policy), "--out", str(run),
                            "--ties", "drop"])
    assert r.exit_code == 2 and "ties" in r.output
    # training again into a finished run's directory would overwrite it: refused, nothing changed
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = ["rm", "train", "--data", str(data), "--policy", str(policy), "--out", str(run), "--config",
             str(tmp_path / "rm.toml"), "--batch-size", "8", "--margin", "none"]
    r = runner.invoke(app, again)
    assert r.exit_code == 2 and "already holds a run (checkpoint step 6); continue it with --resume" in " ".join(
        r.output.split()), r.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    r = runner.invoke(app, [*again, "--resume"])  # the finished run continues: nothing left to train
    assert r.exit_code == 0, r.output
    assert json.loads((run / "inputs.json").read_text())["initialised_from"] == str(policy.resolve())
    # resuming on other data (or from another model) would not end where the run would have: refused by name
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = tmp_path / "other.jsonl"
    other.write_text("".join(reversed(data.read_text().splitlines(keepends=True))))
    r = runner.invoke(app, [*again, "--resume", "--data", str(other)], terminal_width=200)
    assert r.exit_code == 2 and "train_data:" in r.output and "a resumed run must train on the same inputs" in r.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files  # data/train.jsonl included
    r = runner.invoke(app, [*again[:-4], "--out", str(tmp_path / "typo"), "--resume"], terminal_width=200)
    assert r.exit_code == 2 and "--resume: nothing to resume in" in r.output and not (tmp_path / "typo").exists()
    # the wrong kind of model: a policy is no reward model (its score head would be random)
    inp.write_text(json.dumps({"prompt": "How much is the Team plan?", "response": "Hello."}) + "\n")
    r = runner.invoke(app, ["rm", "score", "--model", str(policy), "--input", str(inp)], terminal_width=200)
    assert r.exit_code == 2 and "not a trained reward model" in r.output
    r = runner.invoke(app, ["rm", "score", "--model", str(run), "--input", str(inp)], terminal_width=200)
    assert r.exit_code == 2 and "a training run directory, not a model; did you mean" in r.output


def test_examples_and_ceiling_from_the_store(sqlite_url):
    from preflab.evaluate.preference import store_ceiling
    from preflab.store import db, ops
    from preflab.train.data import load_store_examples
    from tests.conftest import seed_store

    engine = db.make_engine(sqlite_url)
    st = seed_store(engine, n_pairs=6)
    with db.session_scope(engine) as s:
        rid = ops.create_round(s, project_id=st.project_id, name="r1", kind="collection", pair_ids=st.pair_ids,
                               guideline_version_id=st.guideline_id, overlap=1, duplicate_rate=0.0)
    n = 0
    for rater in st.raters.values():
        while True:
            with db.session_scope(engine) as s:
                task = ops.next_task(s, round_id=rid, rater_id=rater)
                if task is None:
                    break
                winner = task.left_id if n % 3 else "tie"
                ops.submit_judgement(s, assignment_id=task.assignment_id, rater_id=rater, choice=winner,
                                     strength=0 if winner == "tie" else 2, rationale="clearer answer",
                                     time_on_task_s=5.0, idempotency_key=f"k{n}")
                n += 1
    ex = load_store_examples(sqlite_url, project="proj")
    assert len(ex) == 6 and {e.pair_id for e in ex} == set(st.pair_ids)
    assert sum(e.is_tie for e in ex) == 2 and all(e.chosen.startswith("Answer") for e in ex)
    assert all(e.rater in st.raters and e.strength in (0, 2) for e in ex)
    assert store_ceiling(sqlite_url, project="proj") is None  # no planted duplicates in this round
    # --rounds: only some round kinds (the demo leaves the calibration workshop's rounds out)
    assert len(load_store_examples(sqlite_url, project="proj", round_kinds=("collection", "rerate"))) == 6
    with pytest.raises(ValueError, match="no judged pairs in calibration rounds yet"):
        load_store_examples(sqlite_url, project="proj", round_kinds=("calibration",))
    with pytest.raises(ValueError, match="--rounds: workshop given; round kinds are calibration, collection"):
        load_store_examples(sqlite_url, project="proj", round_kinds=("collection", "workshop"))
    with pytest.raises(ValueError, match="no project named 'nope'"):
        load_store_examples(sqlite_url, project="nope")
    engine.dispose()
