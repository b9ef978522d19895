"""Generalised advantage estimation over variable-length responses (a pure function).

Source: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
Advantage Estimation", eqs. (11)-(16):

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lambda * A_{t+1}
    G_t     = A_t + V_t      (the value target, "returns")

Tokens past the end of a response (mask 0) are outside the episode: V and A there are 0,
so the last real token bootstraps from V = 0 (the episode ends with the response).
"""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, both (B, R), for per-token ``rewards`` and ``values`` (B, R).

    ``mask`` (B, R) is 1 on real response tokens (a prefix of each row). Masked entries of the
    outputs are 0.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(f"gae: shapes differ: rewards {tuple(rewards.shape)}, values {tuple(values.shape)}, "
                         f"mask {tuple(mask.shape)}")
    m = mask.to(values.dtype)
    r = rewards * m
    v = values * m
    B, R = r.shape
    adv = torch.zeros_like(v)
    last = torch.zeros(B, dtype=v.dtype, device=v.device)
    for t in reversed(range(R)):
        next_v = v[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    returns = (adv + v) * m
    return adv, returns
