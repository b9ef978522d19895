"""Load any Hugging Face causal LM (and a reward model built from one) from a local directory."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

# the directory a preflab run keeps its model in: rm train -> model/, ppo and dpo -> policy/
RUN_MODEL_DIRS = ("model", "policy")


def _check_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such {what} directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    if "model_type" not in json.loads((path / "config.json").read_text()):  # a training run's own config.json
        inner = [d for d in RUN_MODEL_DIRS if (path / d / "config.json").is_file()]
        hint = f"; did you mean {path / inner[0]}?" if inner else ""
        raise FileNotFoundError(f"{path}: a training run directory, not a model{hint}")
    return path


def architecture(path: str | Path) -> str:
    """The model class a Hugging Face directory was saved from (``config.architectures[0]``), or ""."""
    archs = json.loads((Path(path) / "config.json").read_text()).get("architectures") or [""]
    return str(archs[0])


def is_reward_model(path: str | Path) -> bool:
    """True for a sequence classifier (a reward model's scalar head), False for a causal LM."""
    return architecture(path).endswith("ForSequenceClassification")


MODEL_META = "preflab.json"  # in a reward model's directory: how it reads its input (travels with a copy)


def model_meta(model_dir: str | Path) -> dict:
    """``MODEL_META`` of a model directory: ``prompt_format`` and ``max_length`` a reward model was
    trained with ({} when absent or unreadable)."""
    p = Path(model_dir) / MODEL_META
    try:
        meta = json.loads(p.read_text()) if p.is_file() else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def write_model_meta(model_dir: str | Path, meta: dict) -> None:
    (Path(model_dir) / MODEL_META).write_text(json.dumps(meta, indent=2) + "\n")


def warn_low_precision(model: torch.nn.Module, where: str) -> None:
    """Warn when ``model`` would be trained with half-precision weights: an update smaller than the
    weight's rounding step (1/256 of it in bf16) is lost, so most of a run's updates vanish silently."""
    import warnings

    low = {str(p.dtype).removeprefix("torch.") for p in model.parameters()
           if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)}
    if low:
        warnings.warn(f"{where}: training weights held in {', '.join(sorted(low))}: small updates round away; "
                      "load them in float32 (preflab's loaders do) and set mixed_precision for speed",
                      stacklevel=3)


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # many causal LMs ship without one; never pad with a real word
        if tok.eos_token is None:
            raise ValueError(f"{path}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _set_pad(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id


CHAT = "chat"  # a prompt template value: use the tokenizer's own chat template


def chat_prompt(tokenizer: PreTrainedTokenizerBase, query: str) -> str:
    """``query`` as one user turn in the tokenizer's chat template, ending with the assistant's
    generation prompt (instruct models: the format they were tuned on)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt format 'chat': this tokenizer has no chat template (use 'dialogue' or 'raw', "
                         "or a template string with {query})")
    return tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                         add_generation_prompt=True)


def render_query(tokenizer: PreTrainedTokenizerBase, query: str, template: str) -> str:
    """The model input for ``query``: ``template`` with ``{query}`` replaced, or, when ``template``
    is ``"chat"``, the tokenizer's chat template (``chat_prompt``)."""
    return chat_prompt(tokenizer, query) if template == CHAT else template.format(query=query)


@contextlib.contextmanager
def _quiet_hf():
    """Silence 'some weights were newly initialized' (expected for a fresh reward head)."""
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def load_policy(path: str | Path, *, dtype: torch.dtype | None = torch.float32):
    """``(model, tokenizer)`` of a causal LM saved with ``save_pretrained`` (eval mode).

    The tokenizer always has a pad token (eos if the model ships none) and the model's
    config carries its id. Weights load in float32 (``dtype``; None = the dtype its config names):
    a model saved in bf16 would otherwise train in bf16, where most small updates round away (use
    ``mixed_precision = "bf16"`` for the speed).
    """
    path = _check_dir(path, "policy")
    if is_reward_model(path):
        raise ValueError(f"{path}: a reward model ({architecture(path)}), not a policy (a causal LM that generates)")
    tok = _load_tokenizer(path)
    kw = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    _set_pad(model, tok)
    return model.eval(), tok


def load_reward_model(path: str | Path, *, dtype: torch.dtype | None = torch.float32):
    """``(model, tokenizer)`` of a scalar reward model (sequence classifier, ``num_labels=1``)."""
    path = _check_dir(path, "reward model")
    if architecture(path) and not is_reward_model(path):  # its score head would be random numbers
        raise ValueError(f"{path}: a {architecture(path)}, not a trained reward model (no score head; "
                         f"`preflab rm train --policy {path}` trains one from it)")
    tok = _load_tokenizer(path)
    kw = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kw)
    _set_pad(model, tok)
    return model.eval(), tok


def reward_model_from_policy(policy_path: str | Path, *, seed: int = 0, dtype: torch.dtype | None = torch.float32):
    """A reward model initialised from a policy's weights: same body, a fresh scalar head.

    The head (``score`` on most architectures) is re-initialised from ``seed`` with
    N(0, initializer_range) so the result does not depend on the global RNG. Returns
    ``(model, tokenizer)``; the model reads the reward at the last non-pad token, the response's EOS
    (a tokenizer that pads with its eos gets a pad token of its own).
    """
    path = _check_dir(policy_path, "policy")
    tok = _load_tokenizer(path)
    kw = {"dtype": dtype} if dtype is not None else {}
    with _quiet_hf():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kw)
        if tok.pad_token_id == tok.eos_token_id:
            # Hugging Face's sequence classifiers read the last token that is not pad; with pad = eos that
            # is the token before the response's EOS, where preflab reads the reward at the EOS itself, so
            # the saved model would score differently in transformers, TRL or vLLM. A pad of its own
            # (a new embedding row; no text token changes id) makes both read the same token.
            tok.add_special_tokens({"pad_token": "<|pad|>"})
            model.resize_token_embeddings(len(tok))
    _set_pad(model, tok)
    head = getattr(model, "score", None)
    if isinstance(head, torch.nn.Linear):
        g = torch.Generator().manual_seed(seed)
        std = float(getattr(model.config, "initializer_range", 0.02))
        with torch.no_grad():
            w = torch.randn(head.weight.shape, generator=g) * std
            head.weight.copy_(w.to(head.weight.dtype))
            if head.bias is not None:
                head.bias.zero_()
    return model.eval(), tok


class FusedTanhGELU(torch.nn.Module):
    """``gelu(x, approximate="tanh")`` in PyTorch's one fused kernel: the function GPT-2's
    ``NewGELUActivation`` composes from five element-wise ops (the same values to float
    rounding, ~2e-7; Hugging Face ships the same swap as ``GELUTanh``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh")


def fuse_gelu(*models: torch.nn.Module | None) -> int:
    """Swap every composed tanh-GELU module (``NewGELUActivation``, ``FastGELUActivation``) of
    ``models`` for ``FusedTanhGELU``, in place; returns how many were swapped.

    The reward, PPO and DPO trainers call it on the models they train and score with: the
    activation's forward and backward passes, about a fifth of a small GPT-2's step on a CPU,
    take a third of the time. Weights and config are untouched, so a saved model is the same
    model. (SFT does not: its float rounding would change the sandbox's base model, and with it
    every seeded demo number.)
    """
    from transformers.activations import FastGELUActivation, NewGELUActivation

    swapped = 0
    for model in models:
        if model is None:
            continue
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) in (NewGELUActivation, FastGELUActivation):
                    setattr(parent, name, FusedTanhGELU())
                    swapped += 1
    return swapped


def weights_fingerprint(path: str | Path) -> str | None:
    """A cheap fingerprint of a model directory's weights (each ``*.safetensors`` / ``*.bin`` file's
    name, size, first and last MiB and 32 blocks of 64 KiB spread evenly between, hashed): the same
    model moved or copied keeps it; another checkpoint of a full fine-tune does not. (One that
    changed only weights between the sampled blocks would keep it too.) None when the directory
    holds no weight files."""
    import hashlib

    files = sorted(p for pat in ("*.safetensors", "*.bin") for p in Path(path).glob(pat) if p.is_file())
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}:".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                for k in range(1, 33):
                    fh.seek(size * k // 33)
                    h.update(fh.read(1 << 16))
                fh.seek(-(1 << 20), 2)
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]
