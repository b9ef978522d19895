"""Per-token KL estimators and the KL-penalty controllers (fixed, adaptive, alarm-driven).

Estimators (Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html):
with tokens sampled from the policy q and the reference p, and log r = log p(x) - log q(x),

    k1 = -log r = log q - log p                  unbiased for KL(q||p), can be negative
    k3 = (r - 1) - log r                         unbiased, always >= 0, lower variance

and, where the whole next-token distribution of both models is at hand (a small vocabulary),
the exact KL of each visited state, ``kl_full``: no sampling noise at all at that state.

Controllers decide the penalty coefficient beta in  R_t = score * [t = last] - beta * KL_t.
Each keeps its own state (``state_dict`` / ``load_state_dict`` for checkpoints) and returns
the beta changes it made as events ``{"step", "beta_old", "beta_new", "cause"}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log q(x) - log p(x) per token (Schulman 2020); (B, R) -> (B, R)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log p - log q) - 1 - (log p - log q) per token (Schulman 2020); >= 0."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


def kl_full(logits: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact KL(q(.|s) || p(.|s)) = sum_v q_v (log q_v - log p_v) at each position, over the whole
    vocabulary: policy ``logits`` and reference log-probs ``ref_logprobs`` (..., V) -> (...).
    Differentiable in ``logits``."""
    logq = torch.log_softmax(logits.float(), -1)
    return (logq.exp() * (logq - ref_logprobs)).sum(-1)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k3": kl_k3}


def _event(step: int, old: float, new: float, cause: str) -> dict:
    return {"step": step, "beta_old": old, "beta_new": new, "cause": cause}


class FixedKLController:
    """beta stays where it was set."""

    def __init__(self, beta: float):
        self.beta = float(beta)

    def update(self, *, step: int, kl: float, n_samples: int, texts: list[str] | None = None) -> list[dict]:
        return []

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])


def adaptive_beta(beta: float, kl: float, target: float, n_samples: int, horizon: float) -> float:
    """One adaptive update (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2):

        e = clip(KL / target - 1, -0.2, 0.2),   beta <- beta * (1 + e * n / horizon)

    ``n`` and ``horizon`` are in the same unit; here (as in the paper's code) SAMPLES: ``n`` is
    the number of rollout samples since the last update, ``horizon`` the number of samples over
    which beta may move by at most a factor of about e^{+-0.2}.
    """
    e = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + e * n_samples / horizon)


class AdaptiveKLController:
    """Ziegler et al. 2019 proportional controller; ``horizon`` counts rollout samples.

    ``min_beta``: beta never falls below it. While KL is still rising toward the target the
    plain controller keeps lowering beta (by ~20x over a 180-step sandbox run), and then needs
    as long again to raise it when KL overshoots (integral wind-up); a floor, e.g. the initial
    beta, stops the slack from building up.
    """

    def __init__(self, beta: float, *, target: float, horizon: float, min_beta: float = 0.0):
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController: target and horizon must be > 0")
        if min_beta < 0:
            raise ValueError("AdaptiveKLController: min_beta must be >= 0")
        self.beta, self.target, self.horizon, self.min_beta = float(beta), float(target), float(horizon), float(min_beta)

    def update(self, *, step: int, kl: float, n_samples: int, texts: list[str] | None = None) -> list[dict]:
        old = self.beta
        self.beta = max(adaptive_beta(old, kl, self.target, n_samples, self.horizon), self.min_beta)
        if self.beta == old:
            return []
        return [_event(step, old, self.beta, f"adaptive: kl {kl:.4g} vs target {self.target:.4g}")]

    def state_dict(self) -> dict:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon, "min_beta": self.min_beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.target, self.horizon = float(state["beta"]), float(state["target"]), float(state["horizon"])
        self.min_beta = float(state.get("min_beta", 0.0))


Detector = Callable[[list[str]], dict[str, float]]


class AlarmKLController:
    """Raise beta when a drift detector fires, as practitioners do by hand ("the language turned stilted").

    Wraps a base controller (fixed or adaptive). After the base update, ``detector(texts)``
    returns named rates; for every name with a threshold, a value strictly above it is an alarm.
    On an alarm (at most once per ``cooldown`` steps) beta <- max(beta * factor, floor), so a
    run started at beta = 0 still gets a leash. The cause names the detector and its value.

    ``window``: the value compared is the mean of the last ``window`` steps' readings, as one reads a
    smoothed curve rather than a single rollout (a rate read from 32 answers moves by about +-0.06
    between rollouts of the same policy, so a threshold a few points above the policy's own rate
    fires on noise). An alarm needs ``window`` readings since the start or since the last alarm:
    after beta is raised the window starts afresh, so the next alarm is about the policy at the
    new beta.
    """

    def __init__(self, base, *, detector: Detector, thresholds: dict[str, float], factor: float = 2.0,
                 floor: float = 0.05, cooldown: int = 1, window: int = 1):
        if factor <= 1.0:
            raise ValueError("AlarmKLController: factor must be > 1")
        if not thresholds:
            raise ValueError("AlarmKLController: thresholds is empty; nothing could ever fire")
        if window < 1:
            raise ValueError("AlarmKLController: window must be >= 1")
        self.base, self.detector, self.thresholds = base, detector, dict(thresholds)
        self.factor, self.floor, self.cooldown, self.window = float(factor), float(floor), int(cooldown), int(window)
        self.last_alarm_step: int | None = None
        self.last_readings: dict[str, float] = {}
        self.recent: dict[str, list[float]] = {}  # per watched detector: readings since the last alarm (<= window)

    @property
    def beta(self) -> float:
        return self.base.beta

    def update(self, *, step: int, kl: float, n_samples: int, texts: list[str] | None = None) -> list[dict]:
        events = self.base.update(step=step, kl=kl, n_samples=n_samples, texts=texts)
        if texts is None:
            return events
        readings = self.detector(texts)
        self.last_readings = {k: float(v) for k, v in readings.items()}
        for k in self.thresholds:
            if k in readings and math.isfinite(readings[k]):
                self.recent[k] = (self.recent.get(k, []) + [float(readings[k])])[-self.window:]
        means = {k: sum(v) / len(v) for k, v in self.recent.items() if len(v) == self.window}
        fired = [(k, means[k]) for k in sorted(self.thresholds) if k in means and means[k] > self.thresholds[k]]
        cooling = self.last_alarm_step is not None and step - self.last_alarm_step < self.cooldown
        if fired and not cooling:
            old = self.base.beta
            self.base.beta = max(old * self.factor, self.floor)
            self.last_alarm_step = step
            over = f" (mean of {self.window} steps)" if self.window > 1 else ""
            cause = "alarm: " + ", ".join(f"{k} {v:.3g} > {self.thresholds[k]:.3g}" for k, v in fired) + over
            events.append(_event(step, old, self.base.beta, cause))
            self.recent = {}
        return events

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "last_alarm_step": self.last_alarm_step,
                "recent": {k: list(v) for k, v in self.recent.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state["base"])
        self.last_alarm_step = state["last_alarm_step"]
        self.recent = {k: [float(x) for x in v] for k, v in state.get("recent", {}).items()}
