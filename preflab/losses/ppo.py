"""PPO surrogate losses: the clipped policy loss and the clipped value loss (pure functions).

Source: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. (7); the value
clipping follows the OpenAI baselines / Ziegler et al. 2019 (lm-human-preferences) PPO2 code.
All tensors are per response token, shape (B, R), with a 0/1 ``mask`` marking real tokens
(1 up to and including EOS); means are taken over masked tokens of the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

Sum = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes (DDP); identity for one


def masked_mean(x: torch.Tensor, mask: torch.Tensor, *, total: Sum | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask) (0 when the mask is empty); with ``total``, both sums over all processes."""
    mask = mask.to(x.dtype)
    num, den = (x * mask).sum(), mask.sum()
    if total is not None:
        num, den = total(num), total(den)
    return num / den.clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, total: Sum | None = None) -> torch.Tensor:
    """Population variance of the masked entries of ``x`` (over all processes with ``total``)."""
    mean = masked_mean(x, mask, total=total)
    return masked_mean((x - mean) ** 2, mask, total=total)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
                  total: Sum | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over masked entries; masked-out entries are returned as 0.

    Advantage whitening as in the PPO2 baselines code. ``total`` sums over processes, so that a
    batch split over DDP ranks is whitened with the statistics of the whole batch.
    """
    mean, var = masked_mean(x, mask, total=total), masked_var(x, mask, total=total)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar
    clipfrac: torch.Tensor  # share of tokens where the clipped branch was taken
    approx_kl: torch.Tensor  # mean of 0.5 * (log ratio)^2, Schulman's k2 of old||new


def token_sum_mean(x: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor | float | None) -> torch.Tensor:
    """The loss reduction: masked mean, or sum(x * mask) / ``n_tokens`` when that is given.

    Under DDP (gradients averaged over W processes) pass n_tokens = global token count / W: the
    averaged gradient is then that of the mean over every token of the global batch, whatever
    the split, instead of a mean of per-process means.
    """
    if n_tokens is None:
        return masked_mean(x, mask)
    return (x * mask.to(x.dtype)).sum() / torch.as_tensor(n_tokens, dtype=x.dtype).clamp_min(1.0)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    n_tokens: torch.Tensor | float | None = None,
) -> PolicyLoss:
    """Clipped surrogate: L = mean_t max(-A_t r_t, -A_t clip(r_t, 1-eps, 1+eps)), r_t = exp(logp - logp_old).

    Schulman et al. 2017 eq. (7) (negated, to be minimised). ``clipfrac`` is the share of
    tokens where the clipped term is the larger loss; ``approx_kl`` = mean 0.5 (log r)^2.
    ``n_tokens``: the loss's denominator (see ``token_sum_mean``); the masked token count by default.
    """
    log_ratio = logprobs - old_logprobs  # (B, R)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = token_sum_mean(torch.maximum(unclipped, clipped), mask, n_tokens)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return PolicyLoss(loss, clipfrac, approx_kl)


class ValueLoss(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    n_tokens: torch.Tensor | float | None = None,
) -> ValueLoss:
    """Clipped value loss: 0.5 * mean_t max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2).

    PPO2 (OpenAI baselines ``ppo2/model.py``), also used by Ziegler et al. 2019. ``n_tokens`` as in
    ``ppo_policy_loss``.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = 0.5 * token_sum_mean(torch.maximum(l1, l2), mask, n_tokens)
    with torch.no_grad():
        clipfrac = masked_mean((l2 > l1).to(values.dtype), mask)
    return ValueLoss(loss, clipfrac)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy H = logsumexp(z) - sum softmax(z) z, shape (..., V) -> (...)."""
    logz = torch.logsumexp(logits, dim=-1)
    p = torch.softmax(logits, dim=-1)
    return logz - (p * logits).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
                       total: Sum | None = None) -> torch.Tensor:
    """1 - Var[G - V] / Var[G] over masked tokens (1: perfect critic, <= 0: no better than a constant)."""
    var_g = masked_var(returns, mask, total=total)
    return 1.0 - masked_var(returns - values, mask, total=total) / var_g.clamp_min(1e-8)
