"""The KV-cache sampler: equals a no-cache reference, stops at EOS per row, ignores left padding."""

from __future__ import annotations

import pytest
import torch

from preflab.models.sampling import position_ids_from_mask, sample, sample_token, sequence_logprobs
from preflab.sandbox.domain import format_prompt

PROMPTS = [
    format_prompt("How much is the Team plan?"),
    format_prompt("Hi team, I'm the admin for our workspace. What is the API rate limit?"),
    format_prompt("Urgent: can I cancel online?"),
]


def reference_sample(model, tok, prompts, *, max_new_tokens, temperature, top_p, generator):
    """No KV cache, no batching tricks: re-run the whole (left-padded) sequence every step."""
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    seq = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    alive = torch.ones(len(ids), dtype=torch.bool)
    toks, lps = [], []
    for _ in range(max_new_tokens):
        logits = model(input_ids=seq, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
        t = sample_token(logits, temperature=temperature, top_p=top_p, generator=generator)
        lp = torch.log_softmax(logits, -1).gather(-1, t[:, None])[:, 0]
        t = torch.where(alive, t, tok.pad_token_id)
        toks.append(t)
        lps.append(torch.where(alive, lp, 0.0))
        alive &= t != tok.eos_token_id
        seq = torch.cat([seq, t[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(t)[:, None]], 1)
        if not alive.any():
            break
    return torch.stack(toks, 1), torch.stack(lps, 1)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
@torch.no_grad()
def test_kv_cache_equals_no_cache(tok, tiny_model, temperature, top_p):
    s = sample(tiny_model, tok, PROMPTS, max_new_tokens=12, temperature=temperature, top_p=top_p,
               generator=torch.Generator().manual_seed(7))
    ref_tokens, ref_lps = reference_sample(tiny_model, tok, PROMPTS, max_new_tokens=12, temperature=temperature,
                                           top_p=top_p, generator=torch.Generator().manual_seed(7))
    assert torch.equal(s.response_ids, ref_tokens)
    torch.testing.assert_close(s.logprobs, ref_lps, atol=1e-5, rtol=0)
    assert s.response_ids.shape == (3, 12) and s.prompt_len == s.input_ids.shape[1] - 12


def test_same_seed_same_samples_and_shapes(tok, tiny_model):
    a = sample(tiny_model, tok, PROMPTS, max_new_tokens=8, generator=torch.Generator().manual_seed(1))
    b = sample(tiny_model, tok, PROMPTS, max_new_tokens=8, generator=torch.Generator().manual_seed(1))
    c = sample(tiny_model, tok, PROMPTS, max_new_tokens=8, generator=torch.Generator().manual_seed(2))
    assert a.texts == b.texts and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert a.input_ids.shape == a.attention_mask.shape
    assert torch.equal(a.input_ids[:, a.prompt_len:], a.response_ids)
    assert torch.equal(a.attention_mask[:, a.prompt_len:], a.response_mask)
    assert (a.logprobs <= 0).all()
    assert not tiny_model.training


def test_left_padding_does_not_change_a_prompt(tok, tiny_model):
    short = PROMPTS[0]
    alone = sample(tiny_model, tok, [short], max_new_tokens=10, temperature=0)
    batch = sample(tiny_model, tok, [PROMPTS[1], short, PROMPTS[2]], max_new_tokens=10, temperature=0)
    assert batch.prompt_len > alone.prompt_len  # it really was padded
    assert batch.texts[1] == alone.texts[0]
    n = alone.response_ids.shape[1]
    torch.testing.assert_close(batch.logprobs[1, :n], alone.logprobs[0], atol=1e-5, rtol=0)


def test_per_row_generators_make_a_row_independent_of_its_batch(tok, tiny_model):
    # what DDP rollouts rely on: a prompt sampled with its own generator gives the same response
    # whether it shares the batch with others (one process) or not (its share on another rank)
    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    together = sample(tiny_model, tok, PROMPTS, max_new_tokens=10, generator=gens(11, 12, 13))
    apart = [sample(tiny_model, tok, [p], max_new_tokens=10, generator=gens(s))
             for p, s in zip(PROMPTS, (11, 12, 13), strict=True)]
    assert together.texts == [a.texts[0] for a in apart]
    assert len(set(together.texts)) > 1
    swapped = sample(tiny_model, tok, PROMPTS, max_new_tokens=10, generator=gens(13, 12, 11))
    assert swapped.texts != together.texts  # the seed, not the position, decides
    with pytest.raises(ValueError, match="2 per-row generators for 3 rows"):
        sample(tiny_model, tok, PROMPTS, max_new_tokens=4, generator=gens(1, 2))


def test_sequence_logprobs_match_sampler(tok, tiny_model):
    s = sample(tiny_model, tok, PROMPTS, max_new_tokens=10, generator=torch.Generator().manual_seed(3))
    lp = sequence_logprobs(tiny_model, s.input_ids, s.attention_mask, s.prompt_len)
    assert lp.shape == s.logprobs.shape
    torch.testing.assert_close(lp * s.response_mask, s.logprobs, atol=1e-5, rtol=0)
    lp.sum().backward()  # differentiable for PPO / DPO
    assert tiny_model.transformer.wte.weight.grad is not None
    tiny_model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="start"):
        sequence_logprobs(tiny_model, s.input_ids, s.attention_mask, 0)


class EosAt(torch.nn.Module):
    """Wraps a causal LM; forces EOS once a row's position reaches ``stop[row]``."""

    def __init__(self, inner, eos_id, stop):
        super().__init__()
        self.inner, self.eos_id, self.stop = inner, eos_id, torch.tensor(stop)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, cache=None,
                logits_to_keep=0):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, cache=cache, logits_to_keep=logits_to_keep)
        pos = position_ids[:, -out.logits.shape[1]:]  # (B, L)
        out.logits[..., self.eos_id] += 1e4 * (pos + 2 >= self.stop[:, None])  # pos p predicts token p + 1
        return out


def test_stops_at_eos_per_row(tok, tiny_model):
    lens = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    stop = [lens[0] + 3, lens[1] + 6, lens[2] + 1]  # EOS as token 3, 6 and 1 of the responses
    m = EosAt(tiny_model, tok.eos_token_id, stop)
    s = sample(m, tok, PROMPTS, max_new_tokens=20, generator=torch.Generator().manual_seed(0))
    assert s.response_ids.shape[1] == 6  # the loop ends when every row is done
    assert s.response_mask.sum(1).tolist() == [3, 6, 1]
    for row, n in enumerate([3, 6, 1]):
        assert s.response_ids[row, n - 1] == tok.eos_token_id
        assert (s.response_ids[row, n:] == tok.pad_token_id).all()
        assert (s.logprobs[row, n:] == 0).all()
        assert "<|" not in s.texts[row]
    assert s.texts[2] == ""
    # min_new_tokens=2: at least 2 tokens before EOS (as in HF), so row 2 ends with its 3rd token
    s = sample(m, tok, PROMPTS, max_new_tokens=20, min_new_tokens=2, generator=torch.Generator().manual_seed(0))
    assert s.response_mask.sum(1).tolist() == [3, 6, 3]
    # without stop_at_eos every row gets exactly max_new_tokens
    s = sample(m, tok, PROMPTS, max_new_tokens=9, stop_at_eos=False, generator=torch.Generator().manual_seed(0))
    assert s.response_ids.shape == (3, 9) and bool(s.response_mask.all())


def test_sample_token_distribution_and_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(20000, 3)
    freq = torch.bincount(sample_token(logits, generator=g), minlength=3) / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.015, rtol=0)
    freq = torch.bincount(sample_token(logits, top_p=0.6, generator=g), minlength=3) / 20000
    torch.testing.assert_close(freq, torch.tensor([5 / 8, 3 / 8, 0.0]), atol=0.015, rtol=0)
    assert (sample_token(logits, top_p=0.01, generator=g) == 0).all()
    assert (sample_token(logits, temperature=0) == 0).all()


def test_bad_arguments(tok, tiny_model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample(tiny_model, tok, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        sample(tiny_model, tok, PROMPTS, max_new_tokens=2, top_p=0)
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        sample(tiny_model, tok, PROMPTS, max_new_tokens=120)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        sample(tiny_model, tok, ["hi", ""], max_new_tokens=2)


def _bos_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "User:": 3, "hello": 4, "Assistant:": 5, "hi": 6}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])  # as Llama's
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
                                   pad_token="</s>")


def test_prompts_start_with_the_bos_a_llama_style_tokenizer_adds_once():
    """Llama, Mistral, Gemma and OPT expect their BOS first: the sampler's prompts and the trainers' pairs
    carry it once (a chat template that writes it keeps its own), as tokenizer(text) would."""
    from preflab.models.sampling import _encode_prompts, default_bos
    from preflab.train.data import encode_prompt_response

    tok = _bos_tokenizer()
    assert default_bos(tok) == 0 and tok("hello")["input_ids"] == [0, 4]
    ids, _ = _encode_prompts(tok, ["User: hello Assistant:", "<s> hello"], pad_id=1, device="cpu")
    assert ids.tolist() == [[0, 3, 4, 5], [1, 1, 0, 4]]  # left-padded; the second had its own BOS
    p, (r,), cut = encode_prompt_response(tok, "hello", ["hi"], max_length=20)
    assert (p, r, cut) == ([0, 3, 4, 5], [6, 1], False)
    p, (r,), cut = encode_prompt_response(tok, "hello " * 30, ["hi"], max_length=10)  # cut: BOS stays first
    assert p[0] == 0 and len(p) + len(r) == 10 and cut
