"""A scalar value head on a policy's hidden states (the critic of PPO)."""

from __future__ import annotations

import torch


class ValueHead(torch.nn.Module):
    """``V(s_t) = w . h_t + b`` on the last hidden states ``h`` (B, T, H) -> values (B, T).

    Initialised from ``seed`` with N(0, init_std) weights and zero bias, so a fresh critic
    predicts values near 0 (the PPO reward scale) and does not depend on the global RNG.
    """

    def __init__(self, hidden_size: int, *, init_std: float = 0.0, seed: int = 0, dropout: float = 0.0):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size: must be >= 1, got {hidden_size}")
        self.dropout = torch.nn.Dropout(dropout)
        self.summary = torch.nn.Linear(hidden_size, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.summary.weight.copy_(torch.randn(self.summary.weight.shape, generator=g) * init_std)
            self.summary.bias.zero_()

    @classmethod
    def for_model(cls, model: torch.nn.Module, **kw) -> ValueHead:
        """A head sized for ``model``'s last hidden states: the input width of its LM head (OPT-350m
        projects 1024 down to 512 before it), else ``config.hidden_size``."""
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        width = getattr(out, "in_features", None) or int(model.config.hidden_size)
        return cls(int(width), **kw)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.dropout(hidden_states.to(self.summary.weight.dtype))  # (B, T, H)
        return self.summary(h).squeeze(-1)  # (B, T)
