"""Direct preference losses on sequence log-probabilities: DPO (sigmoid) and IPO (pure functions).

Inputs are summed log-probabilities of the chosen / rejected responses given the prompt,
shape (B,), under the policy (pi_*) and the frozen reference (ref_*). With the implicit
reward  r(y) = beta * (log pi(y|x) - log ref(y|x)):

- DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. (7)):
      L = -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)])
  with optional conservative label smoothing eps (Mitchell 2023, "cDPO"):
      L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
- IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", eq. (17)):
      L = (h - 1 / (2 tau))^2,   h = (pi_c - ref_c) - (pi_r - ref_r)
  (TRL uses length-averaged log-probs for IPO; pass averages if you want that.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PreferenceLoss(NamedTuple):
    losses: torch.Tensor  # (B,) per pair
    chosen_rewards: torch.Tensor  # (B,) beta * (pi_c - ref_c), detached
    rejected_rewards: torch.Tensor  # (B,) beta * (pi_r - ref_r), detached


def _margin(pi_c, pi_r, ref_c, ref_r) -> torch.Tensor:
    return (pi_c - ref_c) - (pi_r - ref_r)


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """Per-pair DPO sigmoid loss (Rafailov et al. 2023 eq. 7; cDPO smoothing)."""
    h = _margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return PreferenceLoss(losses, (beta * (pi_chosen - ref_chosen)).detach(),
                          (beta * (pi_rejected - ref_rejected)).detach())


def ipo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceLoss:
    """Per-pair IPO loss (h - 1/(2 beta))^2 (Azar et al. 2023 eq. 17, tau = beta)."""
    h = _margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLoss(losses, (beta * (pi_chosen - ref_chosen)).detach(),
                          (beta * (pi_rejected - ref_rejected)).detach())
