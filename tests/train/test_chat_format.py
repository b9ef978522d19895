"""prompt_format "chat": instruct models see their own chat template, in the reward model, DPO, PPO,
the pair sampler and the evaluators; a model without one is a named error before any work."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from preflab.cli import app
from preflab.models.hf import render_query
from preflab.train.data import dialogue_prompt, encode_prompt_response
from tests.train.rm_fixtures import sandbox_pairs, tiny_tokenizer

torch.set_num_threads(1)
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def cli(args):
    return CliRunner().invoke(app, [str(a) for a in args])


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_chat_prompt_is_the_template_and_the_answer_follows_it_directly():
    tok = chat_tokenizer()
    assert dialogue_prompt("How much is Team?", "chat", tok) == "<|user|>\nHow much is Team?\n<|assistant|>\n"
    assert render_query(tok, "How much is Team?", "chat") == dialogue_prompt("How much is Team?", "chat", tok)
    assert render_query(tok, "Hi", "Q: {query} A:") == "Q: Hi A:"
    p_ids, (r_ids,), _ = encode_prompt_response(tok, "How much is Team?", ["$30."], max_length=128,
                                                prompt_format="chat")
    assert tok.decode(p_ids) == "<|user|>\nHow much is Team?\n<|assistant|>\n"
    assert tok.decode(r_ids[:-1]) == "$30." and r_ids[-1] == tok.eos_token_id  # no leading space, then EOS
    with pytest.raises(ValueError, match="prompt format 'chat': this tokenizer has no chat template"):
        dialogue_prompt("Hi", "chat", tiny_tokenizer())


# Gemma's shape: the answer ends with <end_of_turn>, a special token that is not the EOS
TURN_TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                 "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def turn_tokenizer():
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = TURN_TEMPLATE
    return tok


def test_an_instruct_model_answers_until_its_end_of_turn_not_until_eos():
    from transformers import GPT2Config, GPT2LMHeadModel

    from preflab.models.sampling import end_of_turn, sample, stop_token_ids

    tok = turn_tokenizer()
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn(tok) == eot != tok.eos_token_id
    assert end_of_turn(chat_tokenizer()) is None and end_of_turn(tiny_tokenizer()) is None  # "\n" / no template
    p_ids, (r_ids,), _ = encode_prompt_response(tok, "How much is Team?", ["$30."], max_length=128,
                                                prompt_format="chat")
    assert tok.decode(r_ids[:-1]) == "$30." and r_ids[-1] == eot  # trained to end as the template ends
    _, (r_plain,), _ = encode_prompt_response(tok, "How much is Team?", ["$30."], max_length=128)
    assert r_plain[-1] == tok.eos_token_id  # the dialogue format keeps the EOS

    # a model that always writes <end_of_turn> (then, were it not stopped, a new user turn)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_layer=1, n_head=2, n_embd=16,
                                       tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[eot] = 1.0
    assert stop_token_ids(model, tok) == sorted([tok.eos_token_id, eot])
    prompt = dialogue_prompt("How much is Team?", "chat", tok)
    s = sample(model, tok, [prompt, prompt], max_new_tokens=5, temperature=0)
    assert s.response_ids.shape[1] == 1 and s.response_mask.tolist() == [[1], [1]]
    assert s.texts == ["", ""] and s.ended.tolist() == [True, True]
    s = sample(model, tok, [prompt], max_new_tokens=5, temperature=0, min_new_tokens=2)
    assert s.response_ids[0, :2].tolist() != [eot, eot] and bool(s.ended[0])  # stop tokens held back, then eot
    model.generation_config.eos_token_id = [tok.eos_token_id, 7]  # generate's list of stop ids counts too
    assert stop_token_ids(model, tok) == sorted([tok.eos_token_id, 7, eot])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("chat")
    for name, template in (("chat", TEMPLATE), ("plain", None)):
        tok = tiny_tokenizer()
        tok.chat_template = template
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_layer=1, n_head=2, n_embd=32, bos_token_id=tok.eos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                        ).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_reward_model_trained_on_chat_scores_with_chat_in_ppo(dirs, tmp_path):
    from preflab.models.hf import load_reward_model
    from preflab.pipeline import reward_fn_from
    from preflab.train.reward import score_responses

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}) + "\n"
                            for e in sandbox_pairs(24, seed=1)))
    (tmp_path / "rm.toml").write_text('[rm]\nprompt_format = "chat"\nbatch_size = 8\n')
    r = cli(["rm", "train", "--data", data, "--policy", dirs / "chat", "--out", tmp_path / "rm",
                                 "--config", tmp_path / "rm.toml"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["prompt_format"] == "chat"
    model, tok = load_reward_model(tmp_path / "rm" / "model")
    prompts, texts = ["How much is Team?", "Can I get a refund?"], ["$30 a seat.", "Yes, within 30 days."]
    want = score_responses(model, tok, prompts, texts, prompt_format="chat")
    assert want != score_responses(model, tok, prompts, texts, prompt_format="dialogue")
    got = reward_fn_from(tmp_path / "rm" / "model", to_query=lambda p: p)(prompts, texts)
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)  # the run's own format, read from its config.json

    # DPO and PPO on the chat policy
    r = cli(["dpo", "--policy", dirs / "chat", "--data", data, "--out", tmp_path / "dpo",
                                 "--batch-size", "8", "--val-fraction", "0.25"])
    assert r.exit_code == 0, r.output  # (the default dialogue format still works on a chat model)
    (tmp_path / "dpo.toml").write_text('[dpo]\nprompt_format = "chat"\nbatch_size = 8\n')
    r = cli(["dpo", "--policy", dirs / "chat", "--data", data, "--out", tmp_path / "dpo2",
                                 "--config", tmp_path / "dpo.toml"])
    assert r.exit_code == 0 and json.loads((tmp_path / "dpo2" / "config.json").read_text())["prompt_format"] == "chat"
    (tmp_path / "ppo.toml").write_text("[ppo]\nprompts_per_step = 4\nmax_new_tokens = 6\nminibatch_size = 4\n"
                                       "ppo_epochs = 1\n")
    args = ["ppo", "--reward", tmp_path / "rm" / "model", "--config", tmp_path / "ppo.toml", "--n-prompts", "8",
            "--steps", "1", "--prompt-format", "chat"]
    r = cli([*args, "--policy", dirs / "chat", "--out", tmp_path / "ppo"])
    assert r.exit_code == 0 and "ppo: 1 steps" in r.output, r.output
    r = cli([*args, "--policy", dirs / "plain", "--out", tmp_path / "ppo-plain"])
    assert r.exit_code == 2 and "no chat template" in r.output and not (tmp_path / "ppo-plain").exists()


def test_store_sample_and_evaluators_take_chat(dirs, tmp_path):
    db = f"sqlite:///{tmp_path / 's.db'}"
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"id": "q1", "text": "How much is Team?", "topic": "pricing"})
                                            + "\n")
    assert cli(["store", "import", tmp_path / "prompts.jsonl", "--kind", "prompts", "--db", db,
                               "--project", "p"]).exit_code == 0
    base = ["store", "sample", tmp_path / "out.jsonl", "--prompt-format", "chat", "--max-new-tokens", "6",
            "--db", db, "--project", "p"]
    r = cli([*base, "--policy", f"a={dirs / 'chat'}", "--policy", f"b={dirs / 'plain'}"])
    assert r.exit_code == 2 and "--policy b: prompt format 'chat'" in " ".join(r.output.split()), r.output
    r = cli([*base, "--policy", f"a={dirs / 'chat'}"])
    assert r.exit_code == 0 and "1 pairs (1 new)" in r.output, r.output

    (tmp_path / "suite.jsonl").write_text(json.dumps({"id": "t1", "topic": "pricing", "query": "How much is Team?",
                                                      "required": [r"\$30"]}) + "\n")
    r = cli(["factual", "run", dirs / "chat", "--suite", tmp_path / "suite.jsonl", "--prompt-format",
                            "chat", "--max-new-tokens", "6", "--out", tmp_path / "f.json"])
    assert r.exit_code == 0, r.output
    r = cli(["factual", "run", dirs / "plain", "--suite", tmp_path / "suite.jsonl", "--prompt-format",
                            "chat", "--out", tmp_path / "g.json"])
    assert r.exit_code == 2 and "no chat template" in r.output
    r = cli(["factual", "run", dirs / "chat", "--suite", tmp_path / "suite.jsonl", "--prompt-format",
                            "yaml", "--out", tmp_path / "h.json"])
    assert r.exit_code == 2 and "--prompt-format: must be dialogue, raw or chat" in r.output
