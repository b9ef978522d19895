"""Loading policies and reward models from plain Hugging Face directories."""

from __future__ import annotations

import json

import pytest
import torch

from preflab.models.hf import load_policy, load_reward_model, reward_model_from_policy


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tok, tiny_model):
    d = tmp_path_factory.mktemp("policy")
    tiny_model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_load_policy_round_trip(policy_dir, tok, tiny_model):
    model, t = load_policy(policy_dir)
    assert not model.training
    assert (t.eos_token, t.pad_token) == (tok.eos_token, tok.pad_token)
    assert model.config.pad_token_id == t.pad_token_id
    ids = torch.tensor([tok("Hello. The Team plan")["input_ids"]])
    torch.testing.assert_close(model(input_ids=ids).logits, tiny_model(input_ids=ids).logits)
    m16, _ = load_policy(policy_dir, dtype=torch.bfloat16)
    assert next(m16.parameters()).dtype == torch.bfloat16


def test_reward_model_from_policy(policy_dir, tmp_path, tiny_model):
    rm, tok = reward_model_from_policy(policy_dir, seed=1)
    body = rm.transformer.state_dict()
    for k, v in tiny_model.transformer.state_dict().items():
        assert torch.equal(body[k], v), k
    assert rm.config.pad_token_id == tok.pad_token_id
    again, _ = reward_model_from_policy(policy_dir, seed=1)
    assert torch.equal(rm.score.weight, again.score.weight)
    # reward is read at the last real token: right padding does not change it
    ids = tok("Hello. The Team plan costs", add_special_tokens=False)["input_ids"]
    padded = torch.tensor([ids + [tok.pad_token_id] * 3])
    r1 = rm(input_ids=torch.tensor([ids])).logits
    r2 = rm(input_ids=padded, attention_mask=(padded != tok.pad_token_id).long()).logits
    assert r1.shape == (1, 1)
    torch.testing.assert_close(r1, r2)
    rm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = load_reward_model(tmp_path)
    torch.testing.assert_close(loaded(input_ids=torch.tensor([ids])).logits, r1)


def test_missing_dir_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_policy(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_reward_model(tmp_path)


def test_the_wrong_kind_of_model_or_a_run_directory_is_refused_by_name(policy_dir, tmp_path):
    rm, tok = reward_model_from_policy(policy_dir, seed=1)
    rm_dir = tmp_path / "rm1" / "model"
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    with pytest.raises(ValueError, match=r"rm1/model: a reward model \(GPT2ForSequenceClassification\), not a policy"):
        load_policy(rm_dir)
    with pytest.raises(ValueError, match=r"a GPT2LMHeadModel, not a trained reward model \(no score head"):
        load_reward_model(policy_dir)  # a policy's "scores" would come from a random head
    (tmp_path / "rm1" / "config.json").write_text(json.dumps({"lr": 1e-5, "epochs": 1}))  # rm train's run config
    with pytest.raises(FileNotFoundError, match=r"rm1: a training run directory, not a model; did you mean .*rm1/model\?"):
        load_reward_model(tmp_path / "rm1")


def test_fuse_gelu_keeps_outputs_gradients_and_saved_model(policy_dir, tmp_path, tok):
    from preflab.models.hf import FusedTanhGELU, fuse_gelu

    plain, _ = load_policy(policy_dir)
    fused, _ = load_policy(policy_dir)
    assert fuse_gelu(fused, None) == fused.config.n_layer  # one activation per block
    assert fuse_gelu(fused) == 0 and isinstance(fused.transformer.h[0].mlp.act, FusedTanhGELU)
    ids = torch.tensor([tok("Hello. The Team plan costs")["input_ids"]])
    outs = []
    for m in (plain, fused):
        m.zero_grad()
        logits = m(input_ids=ids).logits
        logits.logsumexp(-1).sum().backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for name, g in outs[0][1].items():
        torch.testing.assert_close(g, outs[1][1][name], atol=1e-5, rtol=1e-4)
    fused.save_pretrained(tmp_path)  # the saved config still names GPT-2's own activation
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["activation_function"] == plain.config.activation_function
    assert set(fused.state_dict()) == set(plain.state_dict())


def test_a_bf16_checkpoint_loads_in_float32_for_training(tmp_path):
    """A config saying bf16 must not make training run in bf16 (most small updates would round away)."""
    import warnings

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from preflab.models.hf import load_policy, reward_model_from_policy, warn_low_precision

    t = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="[UNK]")
    m = GPT2LMHeadModel(GPT2Config(vocab_size=4, n_positions=16, n_layer=1, n_head=2, n_embd=8)).to(torch.bfloat16)
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    pol, _ = load_policy(tmp_path)
    rm, _ = reward_model_from_policy(tmp_path)
    assert {p.dtype for p in pol.parameters()} == {p.dtype for p in rm.parameters()} == {torch.float32}
    assert {p.dtype for p in load_policy(tmp_path, dtype=None)[0].parameters()} == {torch.bfloat16}  # asked for
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        warn_low_precision(m, "train_x")
    assert any("train_x: training weights held in bfloat16" in str(x.message) for x in w)


def test_a_reward_model_from_a_pad_less_policy_scores_the_same_in_plain_transformers(tmp_path):
    """Llama-style tokenizers have no pad; padding with eos would make Hugging Face's classifier read the token
    before the response's EOS. The reward model gets a pad of its own, so transformers reads preflab's token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        AutoModelForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
    )

    from preflab.models.hf import reward_model_from_policy
    from preflab.train.data import encode_prompt_response
    from preflab.train.reward import score_responses

    vocab = {"<eos>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("user assistant : how much is it five six".split())}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="[UNK]")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path / "p")
    tok.save_pretrained(tmp_path / "p")
    rm, rtok = reward_model_from_policy(tmp_path / "p", seed=1)
    assert rtok.pad_token_id not in (None, rtok.eos_token_id) and rm.config.pad_token_id == rtok.pad_token_id
    rm.save_pretrained(tmp_path / "rm")
    rtok.save_pretrained(tmp_path / "rm")
    prompts, responses = ["how much is it", "how much"], ["five", "six six six"]
    ours = score_responses(rm, rtok, prompts, responses)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    for p, r, score in zip(prompts, responses, ours, strict=True):
        ids, (resp,), _ = encode_prompt_response(rtok, p, [r], max_length=64)
        with torch.no_grad():
            theirs = hf(input_ids=torch.tensor([ids + resp])).logits[0, 0].item()
        assert theirs == pytest.approx(score, abs=1e-5)
    # longer than the model's 64 positions: truncated to fit, not an IndexError inside the model
    (long,) = score_responses(rm, rtok, ["how much is it"], [" ".join(["five"] * 200)], max_length=256)
    assert torch.isfinite(torch.tensor(long))  # a score, not an IndexError or NaN
