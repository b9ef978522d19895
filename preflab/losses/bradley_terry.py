"""Bradley-Terry reward-model loss with an optional margin and tie handling.

    loss_i = -log sigmoid(r_chosen_i - r_rejected_i - m_i)            (strict preference)
    loss_i = -0.5 log sigmoid(d_i) - 0.5 log sigmoid(-d_i)           (tie, ``ties="half"``)
    loss_i = -log(e + (1 - 2e) sigmoid(d_i - m_i))                    (strict, lapse rate e > 0)

Bradley & Terry (1952); the reward-model form is Ouyang et al. 2022 (InstructGPT, eq. 1),
the margin term m(r) from the rater's stated preference strength is Touvron et al. 2023
(Llama 2, Sec. 3.2.2, eq. 2; their Table 28 gives a "small" and a "large" margin map).
A tie is a target probability of 0.5 for "chosen beats rejected": the cross-entropy
against that target is the ``"half"`` form above (no margin on ties: there is no stated
direction to push apart). ``"exclude"`` drops ties from the loss and from its mean.

The lapse form is the Bradley-Terry likelihood when a rater answers at random-opposite with
probability e regardless of the pair (a lapse, the psychometric lapse rate of Wichmann & Hill
2001): P(label) = e + (1 - 2e) sigmoid(d - m). A lapsed label then costs at most -log e
instead of growing without bound as the model grows sure of the right answer, so the model is
not pulled toward fitting the lapses. e is what planted duplicates measure
(``quality.consistency.flip_rate_from_consistency``); e = 0 is the plain loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

# strength -> margin. Strength 0 = "negligibly better / unsure", 3 = "significantly better".
# Llama 2 Table 28 (significantly better / better / slightly better / negligibly better or
# unsure): margin small 1, 2/3, 1/3, 0; margin large 3, 2, 1, 0. "none" disables the margin.
MARGIN_PRESETS: dict[str, dict[int, float]] = {
    "none": {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0},
    "llama2_small": {0: 0.0, 1: 1 / 3, 2: 2 / 3, 3: 1.0},
    "llama2_large": {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0},
}


def margins_from_strength(
    strength: Sequence[int | None] | torch.Tensor,
    margin: str | float | Mapping[int, float] | None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Per-pair margins: a preset name from ``MARGIN_PRESETS``, a mapping strength -> margin,
    a constant (same margin for every pair) or ``None`` (no margin). Unknown strength (None)
    gets margin 0."""
    if margin is None:
        return None
    if isinstance(strength, torch.Tensor):
        strength = strength.tolist()
    if isinstance(margin, (int, float)) and not isinstance(margin, bool):
        return torch.full((len(strength),), float(margin), dtype=dtype, device=device)
    if isinstance(margin, str):
        if margin not in MARGIN_PRESETS:
            raise ValueError(f"margin: unknown preset {margin!r} (known: {', '.join(MARGIN_PRESETS)})")
        margin = MARGIN_PRESETS[margin]
    out = []
    for i, s in enumerate(strength):
        if s is None:
            out.append(0.0)
        elif int(s) not in margin:
            raise ValueError(f"strength[{i}]: {s!r} has no margin in the map (keys: {sorted(margin)})")
        else:
            out.append(float(margin[int(s)]))
    return torch.tensor(out, dtype=dtype, device=device)


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    *,
    tie_mask: torch.Tensor | None = None,
    ties: str = "exclude",
    reduction: str = "mean",
    lapse: float = 0.0,
) -> torch.Tensor:
    """Bradley-Terry loss per pair (see the module docstring for the formula and sources).

    r_chosen, r_rejected: (B,) scalar rewards. margin: (B,) or a constant, applied to strict
    pairs only. tie_mask: (B,) bool, True where the rater marked a tie. ties: ``"exclude"``
    (ties contribute nothing) or ``"half"`` (trained toward P(chosen > rejected) = 0.5).
    reduction: ``"mean"`` over counted pairs (0 if none), ``"sum"``, or ``"none"`` (per pair,
    0 for excluded ties). lapse: the rater lapse rate e in [0, 0.5) of the strict-pair likelihood.
    """
    if ties not in ("exclude", "half"):
        raise ValueError(f"ties: must be 'exclude' or 'half', got {ties!r}")
    if not 0.0 <= lapse < 0.5:
        raise ValueError(f"lapse: must be in [0, 0.5), got {lapse}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: must be 'mean', 'sum' or 'none', got {reduction!r}")
    if r_chosen.shape != r_rejected.shape or r_chosen.dim() != 1:
        raise ValueError(f"r_chosen/r_rejected: expected equal (B,) shapes, got "
                         f"{tuple(r_chosen.shape)} and {tuple(r_rejected.shape)}")
    d = r_chosen - r_rejected  # (B,)
    m = torch.zeros_like(d) if margin is None else torch.as_tensor(margin, dtype=d.dtype, device=d.device)
    if lapse == 0.0:
        strict = -F.logsigmoid(d - m)  # (B,)
    else:  # -log(e + (1 - 2e) sigmoid(x)), as a log-sum-exp for stability
        x = F.logsigmoid(d - m) + math.log1p(-2.0 * lapse)
        strict = -torch.logaddexp(x, torch.full_like(x, math.log(lapse)))
    if tie_mask is None:
        per_pair, counted = strict, torch.ones_like(d)
    else:
        tie = tie_mask.to(device=d.device, dtype=torch.bool)
        if ties == "half":
            tie_loss = -0.5 * F.logsigmoid(d) - 0.5 * F.logsigmoid(-d)
            per_pair, counted = torch.where(tie, tie_loss, strict), torch.ones_like(d)
        else:
            per_pair = torch.where(tie, torch.zeros_like(d), strict)
            counted = (~tie).to(d.dtype)
    if reduction == "none":
        return per_pair
    if reduction == "sum":
        return per_pair.sum()
    return per_pair.sum() / counted.sum().clamp(min=1.0)


def counted_pairs(tie_mask: torch.Tensor | None, n: int, *, ties: str) -> int:
    """How many pairs a ``reduction="mean"`` loss averages over (for exact gradient accumulation)."""
    if tie_mask is None or ties == "half":
        return n
    return int((~tie_mask.bool()).sum())
