"""`preflab ppo` and `preflab dpo`: config file + flags -> a run directory; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from preflab.cli import app
from tests.train.rm_fixtures import sandbox_pairs, tiny_reward_model, tiny_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    root = tmp_path_factory.mktemp("policy_cli")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_layer=1, n_head=2, n_embd=32,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    tiny_reward_model(tok, n_layer=1, n_embd=32).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return root


def test_ppo_cli_config_flags_resume_and_bad_input(dirs, tmp_path):
    runner = CliRunner()
    (tmp_path / "ppo.toml").write_text("[ppo]\nprompts_per_step = 4\nmax_new_tokens = 8\nminibatch_size = 4\n"
                                       "ppo_epochs = 1\nlr = 1e-3\n")
    out = tmp_path / "run"
    args = ["ppo", "--policy", str(dirs / "policy"), "--reward", str(dirs / "rm"), "--out", str(out),
            "--config", str(tmp_path / "ppo.toml"), "--n-prompts", "16", "--checkpoint-every", "1",
            "--kl-controller", "adaptive", "--kl-target", "2", "--kl-horizon", "8", "--kl-beta-min", "0.02",
            "--alarm", "formality=0.9", "--alarm-window", "3", "--threads", "1"]
    r = runner.invoke(app, [*args, "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert "ppo: 2 steps" in r.output and "events.jsonl" in r.output and (out / "events.jsonl").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["prompts_per_step"], cfg["steps"], cfg["kl_controller"], cfg["alarm_thresholds"],
            cfg["alarm_window"], cfg["kl_horizon"], cfg["kl_beta_min"]) == (4, 2, "adaptive", {"formality": 0.9}, 3,
                                                                            8, 0.02)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and "detect/formality" in rows[0]
    assert json.loads((out / "eval" / "step_000002.json").read_text())["step"] == 2
    assert (out / "policy" / "model.safetensors").is_file()

    r = runner.invoke(app, [*args, "--steps", "3", "--resume"])  # continues from step 2
    assert r.exit_code == 0, r.output
    assert "ppo: 3 steps (resumed at step 2)" in r.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    inputs = json.loads((out / "inputs.json").read_text())  # what the run trained on, for a reader and a resume
    assert inputs["policy"] == str((dirs / "policy").resolve()) and inputs["prompt_format"] == "dialogue"
    for extra, words in ((["--prompt-format", "raw"], "prompts:"), (["--n-prompts", "12"], "prompts:"),
                         (["--reward", str(dirs / "policy")], "not a trained reward model"),
                         (["--policy", str(dirs / "rm")], "a reward model (GPT2ForSequenceClassification), not a policy")):
        r = runner.invoke(app, [*args, "--steps", "4", "--resume", *extra], terminal_width=200)
        assert r.exit_code == 2 and words in r.output, (extra, r.output)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    bad = tmp_path / "bad"
    for extra, words in ((["--alarm", "formality"], "--alarm: 'formality' is not name=number"),
                         (["--kl-controller", "sometimes"], "kl_controller"),
                         (["--steps", "0"], "PPOConfig.steps")):
        r = runner.invoke(app, ["ppo", "--policy", str(dirs / "policy"), "--reward", str(dirs / "rm"),
                                "--out", str(bad), *extra])
        assert r.exit_code == 2 and words in r.output, r.output
    assert not bad.exists()


def test_dpo_cli_from_a_jsonl_file(dirs, tmp_path):
    runner = CliRunner()
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}) + "\n"
                            for e in sandbox_pairs(40, seed=4)))
    out = tmp_path / "run"
    r = runner.invoke(app, ["dpo", "--policy", str(dirs / "policy"), "--data", str(data), "--out", str(out),
                            "--batch-size", "8", "--lr", "1e-3", "--loss", "ipo", "--val-fraction", "0.2",
                            "--reward", str(dirs / "rm"), "--eval-max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    assert "dpo:" in r.output and "held out" in r.output
    evals = sorted((out / "eval").glob("step_*.json"))  # each checkpoint evaluated, as PPO's are
    last = json.loads(evals[-1].read_text())
    assert {"eval/kl", "eval/reward", "eval/formality", "eval/length"} <= set(last), last
    assert last["eval/kl"] > 0.0  # 5 steps at lr 1e-3 moved the policy away from its reference
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["loss"], cfg["batch_size"], cfg["lr"]) == ("ipo", 8, 1e-3)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("dpo/loss" in row for row in rows)
    assert (out / "policy" / "model.safetensors").is_file()
    # resuming with chosen and rejected swapped (same rows), or another split: refused, not trained on stale
    # reference log-probs
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("".join(json.dumps({"prompt": e.prompt, "chosen": e.rejected, "rejected": e.chosen}) + "\n"
                               for e in sandbox_pairs(40, seed=4)))
    base = ["dpo", "--policy", str(dirs / "policy"), "--out", str(out), "--batch-size", "8", "--lr", "1e-3",
            "--loss", "ipo", "--resume"]
    for extra in (["--data", str(swapped), "--val-fraction", "0.2"], ["--data", str(data), "--val-fraction", "0.5"]):
        r = runner.invoke(app, [*base, *extra], terminal_width=200)
        assert r.exit_code == 2 and "a resumed run must train on the same inputs" in r.output, r.output

    data.write_text('{"prompt": "x", "chosen": "y"}\n')
    r = runner.invoke(app, ["dpo", "--policy", str(dirs / "policy"), "--data", str(data), "--out",
                            str(tmp_path / "bad")])
    assert r.exit_code == 2 and "pairs.jsonl:1" in r.output, r.output
    r = runner.invoke(app, ["dpo", "--policy", str(dirs / "policy"), "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "either --db" in r.output
    assert not (tmp_path / "bad").exists()


def test_sample_eval_hook_measures_kl_reward_and_text(dirs):
    from preflab.models.hf import load_policy
    from preflab.pipeline import sample_eval_hook

    pol, tok = load_policy(dirs / "policy")
    prompts = ["User: How much is Team?\nAssistant:", "User: Can I get a refund?\nAssistant:"]
    hook = sample_eval_hook(tok, prompts, max_new_tokens=6, ref=pol, reward_fn=lambda p, t: torch.ones(len(t)))
    out = hook(0, pol)
    assert out["eval/kl"] == pytest.approx(0.0, abs=1e-5)  # the policy against itself
    assert out["eval/reward"] == 1.0 and 0.0 <= out["eval/formality"] <= 1.0
    assert hook(0, pol) == out  # the same samples at every checkpoint (fixed seed)
    other, _ = load_policy(dirs / "policy")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert sample_eval_hook(tok, prompts, max_new_tokens=6, ref=pol)(0, other)["eval/kl"] > 0.0


def test_ppo_prompts_file_takes_trl_and_store_formats(tmp_path):
    from preflab.cli import _load_prompts

    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "How much is Team?"}\n\n{"id": "q2", "text": "Can I get a refund?", "topic": "billing"}\n')
    assert _load_prompts(str(p), 0, 0) == ["How much is Team?", "Can I get a refund?"]  # TRL, then the store's
    p.write_text('{"id": "q3", "query": "hm"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: expected an object with a string 'prompt' .* or 'text'"):
        _load_prompts(str(p), 0, 0)
    t = tmp_path / "prompts.txt"
    t.write_text('{"prompt": "How much is Team?"}\n')  # JSON lines under another name: still read as JSONL
    assert _load_prompts(str(t), 0, 0) == ["How much is Team?"]
    t.write_text("How much is Team?\nCan I get a refund?\n")  # plain text: one prompt per line
    assert _load_prompts(str(t), 0, 0) == ["How much is Team?", "Can I get a refund?"]


def test_ppo_alarm_relative_to_the_reference(dirs, tmp_path):
    from preflab.evaluate.detectors import text_rates
    from preflab.models.hf import load_policy
    from preflab.models.sampling import sample
    from preflab.sandbox.domain import format_prompt, generate_queries

    runner = CliRunner()
    (tmp_path / "ppo.toml").write_text("[ppo]\nprompts_per_step = 4\nmax_new_tokens = 8\nminibatch_size = 4\n"
                                       "ppo_epochs = 1\n")
    base = ["ppo", "--policy", str(dirs / "policy"), "--reward", str(dirs / "rm"), "--config",
            str(tmp_path / "ppo.toml"), "--n-prompts", "8", "--steps", "1"]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "run"), "--alarm", "formality=+0.1,length=30"])
    assert r.exit_code == 0, r.output
    # the reference's own formality on 4 samples of each of the 64 held-out prompts, plus 0.1
    pol, tok = load_policy(dirs / "policy")
    held = [format_prompt(q.text) for q in generate_queries(64, seed=0, split="heldout")]
    ref_rate = text_rates(sample(pol, tok, held * 4, max_new_tokens=8,
                                 generator=torch.Generator().manual_seed(0)).texts)["formality"]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["alarm_thresholds"] == pytest.approx({"formality": ref_rate + 0.1, "length": 30.0})
    assert "the reference's" in r.output
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--alarm", "formalty=+0.1"])
    assert r.exit_code == 2 and "--alarm: unknown detector 'formalty' (known: confidence, formality" in r.output
    assert not (tmp_path / "bad").exists()


def test_ctrl_c_says_how_to_continue():
    from preflab.cli import _interrupted_hint

    assert "with --resume continues" in _interrupted_hint(["preflab", "ppo", "--policy", "p"])
    assert "with --resume continues" in _interrupted_hint(["preflab", "rm", "train", "--out", "r"])
    assert "same command again" in _interrupted_hint(["preflab", "demo", "--quick"])
    assert _interrupted_hint(["preflab", "store", "export", "pairs"]) == ""
