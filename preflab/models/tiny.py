"""The tiny-model factory: a GPT-2 config, a seeded GPT-2 model, and a byte-level BPE tokenizer.

The sandbox's base model and every test use these; real projects load any Hugging Face
causal LM with ``models.hf.load_policy`` instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def tiny_gpt2_config(
    *,
    vocab_size: int,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 256,
    n_positions: int = 256,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    dropout: float = 0.0,
) -> GPT2Config:
    """A GPT-2 architecture config (dropout 0 by default: RLHF wants deterministic log-probs)."""
    if n_embd % n_head:
        raise ValueError(f"n_embd: must be divisible by n_head ({n_head}), got {n_embd}")
    for name, v in (("vocab_size", vocab_size), ("n_layer", n_layer), ("n_head", n_head),
                    ("n_embd", n_embd), ("n_positions", n_positions)):
        if v < 1:
            raise ValueError(f"{name}: must be >= 1, got {v}")
    return GPT2Config(
        vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )


def tiny_gpt2(config: GPT2Config, *, seed: int = 0) -> GPT2LMHeadModel:
    """A GPT-2 model with weights initialised from ``seed`` (independent of the global RNG)."""
    devices = [torch.device("cuda", torch.cuda.current_device())] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()


# A new piece starts after sentence or clause punctuation followed by a space, and at a newline.
PHRASE_SPLIT = r"(?<=[.!?,:]) |\n"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, *, granularity: Literal["words", "phrases"] = "words"
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (eos ``<|endoftext|>``, pad ``<|pad|>``).

    Byte-level means every string round-trips exactly; ids 0 and 1 are eos and pad. The
    vocabulary may come out smaller than ``vocab_size`` on a small corpus.

    ``granularity`` is what BPE may merge: ``"words"`` (GPT-2's pre-tokenizer: merges never
    cross a space) or ``"phrases"`` (merges never cross ``PHRASE_SPLIT``: a clause such as
    " I might be wrong about this," can become one token). Phrases suit a templated domain
    like the sandbox: a response is a handful of tokens, so a tiny model learns it in minutes
    and RLHF acts on whole style choices.
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size: must be >= 258 (256 bytes + eos + pad), got {vocab_size}")
    if granularity not in ("words", "phrases"):
        raise ValueError(f"granularity: must be 'words' or 'phrases', got {granularity!r}")
    tok = Tokenizer(models.BPE())
    if granularity == "words":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PHRASE_SPLIT), behavior="merged_with_next"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        unk_token=None, model_max_length=1 << 30, clean_up_tokenization_spaces=False,
    )
