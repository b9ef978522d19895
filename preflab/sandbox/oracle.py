"""The oracle frontier: the best any KL-regularised optimiser could do in the sandbox.

Sandbox responses are composed from a finite set of style parts, so for each prompt x we
can enumerate every well-formed answer Y(x) = {compose(x, s) : s in all_styles()} (144).
With pi_ref(y|x) the SFT model's own probability, renormalised over Y(x), the maximiser of
E_pi[r] - beta * KL(pi || pi_ref) is the tilted distribution (Korbak et al. 2022, "RL with KL
penalties is better viewed as Bayesian inference"; Rafailov et al. 2023, eq. (4)):

    pi*_beta(y|x) = pi_ref(y|x) exp(r(y) / beta) / Z_beta(x)

For a grid of beta we compute KL(pi* || pi_ref) and the expected gold utility under pi*,
averaged over prompts, for r = gold (the physical limit) and r = a proxy reward model (what
a perfect optimiser of the proxy would reach). Plotting gold against sqrt(KL) gives the
frontier that PPO and DPO runs are measured against (``gold_at_kl`` interpolates it).

Sandbox only: this module reads the hidden gold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from preflab.sandbox.domain import Query, all_styles, compose, format_prompt
from preflab.sandbox.gold import UNPARSEABLE, gold_utility

DEFAULT_BETAS = tuple(float(b) for b in np.geomspace(1e-3, 1e3, 49))


def enumerate_responses(query: Query) -> list[str]:
    """Every distinct composed answer to ``query`` (one per style; duplicates removed, order kept)."""
    return list(dict.fromkeys(compose(query, s) for s in all_styles()))


@torch.no_grad()
def reference_logprobs(model, tokenizer, query: Query, responses: Sequence[str], *,
                       renormalise: bool = True) -> np.ndarray:
    """log pi_ref(y | x) of each response, renormalised over ``responses`` (sums to 1 in prob)
    unless ``renormalise`` is False (then the model's own sequence log-probs).

    A response is scored as the sandbox dialogue: ``format_prompt(x)`` + ``" " + y + eos``.
    """
    from preflab.models.sampling import sequence_logprobs

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    p_ids = tokenizer(format_prompt(query.text), add_special_tokens=False)["input_ids"]
    r_ids = [tokenizer(" " + r, add_special_tokens=False)["input_ids"] + [eos] for r in responses]
    P, R = len(p_ids), max(len(r) for r in r_ids)
    ids = torch.full((len(r_ids), P + R), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(r_ids):
        ids[i, :P] = torch.tensor(p_ids)
        ids[i, P : P + len(r)] = torch.tensor(r)
        mask[i, : P + len(r)] = 1
    device = next(model.parameters()).device
    lp = sequence_logprobs(model, ids.to(device), mask.to(device), P).cpu()  # (N, R)
    seq = (lp * mask[:, P:]).sum(-1).double().numpy()
    return seq - np.logaddexp.reduce(seq) if renormalise else seq


def tilt(ref_logp: np.ndarray, reward: np.ndarray, beta: float) -> np.ndarray:
    """log pi*(y) = log pi_ref(y) + r(y)/beta - log Z  (beta = inf returns pi_ref)."""
    if np.isinf(beta):
        return ref_logp.copy()
    z = ref_logp + reward / beta
    return z - np.logaddexp.reduce(z)


def kl_divergence(logp: np.ndarray, ref_logp: np.ndarray) -> float:
    """KL(p || ref) = sum p (log p - log ref) for two log-distributions on the same support."""
    p = np.exp(logp)
    return float(np.sum(p * (logp - ref_logp)))


def kl_split(logp: np.ndarray, ref_logp: np.ndarray, reward: np.ndarray) -> tuple[float, float]:
    """Split KL(p || ref) on one prompt's support into (needed, excess).

    ``needed`` is KL(q || ref) for the tilt q = ref * exp(lam * r) / Z whose expected reward equals
    p's: the least KL at which any policy reaches p's expected reward (the I-projection; Csiszar
    1975). ``excess`` = KL(p || q) buys no reward at all. For a tilt q the identity
    KL(p || ref) = KL(q || ref) + KL(p || q) holds exactly when E_q[r] = E_p[r] (expand log q).
    lam is found by bisection (any sign: p may have less reward than ref) within +-1e3 / (the
    reward's range): beyond that the tilt puts all but e^-1000 of its mass on the best (worst)
    answers, so a p that does the same is split to float precision.
    """
    p = np.exp(logp)
    target = float(p @ reward)
    span = float(reward.max() - reward.min())
    total = kl_divergence(logp, ref_logp)
    if span <= 1e-12:
        return 0.0, total

    lo, hi = -1e3 / span, 1e3 / span
    for _ in range(200):
        mid = (lo + hi) / 2
        if float(np.exp(tilt(ref_logp, mid * reward, 1.0)) @ reward) < target:
            lo = mid
        else:
            hi = mid
    q = tilt(ref_logp, (lo + hi) / 2 * reward, 1.0)
    needed = kl_divergence(q, ref_logp)
    return needed, kl_divergence(logp, q)


@dataclass
class Frontier:
    """Oracle curve for one reward: per beta, mean KL(pi*||pi_ref) and mean expected gold / reward."""

    reward: str  # "gold" or "proxy"
    betas: np.ndarray  # (G,) descending: from the reference (inf) to the greediest
    kl: np.ndarray  # (G,) nats per response, mean over prompts
    gold: np.ndarray  # (G,) expected gold utility
    reward_value: np.ndarray  # (G,) expected value of the tilting reward

    @property
    def sqrt_kl(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.kl, 0.0))

    def gold_at_kl(self, kl: float) -> float:
        """The oracle's expected gold at KL ``kl`` (linear in KL between grid points; the top beyond)."""
        return self._at_kl(self.gold, kl)

    def reward_at_kl(self, kl: float) -> float:
        """The oracle's expected tilting reward at KL ``kl`` (as ``gold_at_kl``)."""
        return self._at_kl(self.reward_value, kl)

    def fraction_of_reward_gain(self, kl: float, reward: float) -> float:
        """The same for the tilting reward itself: a policy's expected score of the reward it was
        trained on, as a share of what the oracle tilted by that reward gets at ``kl``."""
        return self._share(self.reward_value, kl, reward)

    def fraction_of_gain(self, kl: float, gold: float) -> float:
        """(gold - gold_ref) / (oracle gold at ``kl`` - gold_ref): share of the oracle's gain achieved."""
        return self._share(self.gold, kl, gold)

    def _at_kl(self, values: np.ndarray, kl: float) -> float:
        order = np.argsort(self.kl)
        return float(np.interp(kl, self.kl[order], values[order]))

    def _share(self, values: np.ndarray, kl: float, value: float) -> float:
        """(value - at the reference) / (the oracle's at ``kl`` - at the reference)."""
        base = float(values[np.argmin(self.kl)])
        return (value - base) / max(self._at_kl(values, kl) - base, 1e-9)

    def to_dict(self) -> dict:
        return {"reward": self.reward, "betas": self.betas.tolist(), "kl": self.kl.tolist(),
                "sqrt_kl": self.sqrt_kl.tolist(), "gold": self.gold.tolist(),
                "reward_value": self.reward_value.tolist()}


def frontier_from_tables(reward_name: str, ref_logps: Sequence[np.ndarray], rewards: Sequence[np.ndarray],
                         golds: Sequence[np.ndarray], betas: Sequence[float] = DEFAULT_BETAS) -> Frontier:
    """The frontier from per-prompt tables (pure: log pi_ref, the tilting reward, gold utility)."""
    grid = np.array(sorted({float("inf"), *map(float, betas)}, reverse=True))
    kl, gold, rv = np.zeros(len(grid)), np.zeros(len(grid)), np.zeros(len(grid))
    for lp, r, g in zip(ref_logps, rewards, golds, strict=True):
        for i, b in enumerate(grid):
            ls = tilt(lp, r, b)
            p = np.exp(ls)
            kl[i] += kl_divergence(ls, lp)
            gold[i] += float(p @ g)
            rv[i] += float(p @ r)
    n = len(ref_logps)
    return Frontier(reward_name, grid, kl / n, gold / n, rv / n)


@dataclass
class _Table:
    """One query's oracle support under pi_ref: the enumerated answers, then (with ``other_samples``)
    one "other" outcome holding the rest of pi_ref's mass."""

    query: Query
    responses: list[str]
    ref_logp: np.ndarray  # (N,) or (N + 1,): normalised log pi_ref
    gold: np.ndarray  # same length
    other: list[str]  # the reference's samples that fell outside the enumerated answers


class OracleTables:
    """The oracle's support for ``queries`` under the reference model, built once.

    ``frontier(name, reward_fn)`` tilts it (``oracle_frontiers`` is this for gold and a proxy);
    ``point(model)`` places a trained policy on the same support: its exact mean
    KL(pi || pi_ref) and expected gold, its own mass outside the enumerated answers being the
    "other" outcome (gold from its own samples that land there). A PPO or DPO run is then
    compared with the frontier on the same queries and with the same accounting, and without
    sampling noise on the enumerated answers.

    With ``other_samples`` = n the "other" outcome's gold (and proxy score) is the mean over the
    reference's n samples per query that fall outside; where none did, the mean over every
    query's such samples.
    """

    def __init__(self, ref_model, tokenizer, queries: Sequence[Query], *, other_samples: int = 0,
                 max_new_tokens: int = 32, seed: int = 0):
        if not queries:
            raise ValueError("OracleTables: queries is empty")
        self.tokenizer, self.other_samples, self.max_new_tokens, self.seed = (
            tokenizer, other_samples, max_new_tokens, seed)
        self.tables: list[_Table] = []
        self._rewards: dict[Callable, list[np.ndarray]] = {}
        gen = torch.Generator().manual_seed(seed)
        for q in queries:
            responses = enumerate_responses(q)
            lp = reference_logprobs(ref_model, tokenizer, q, responses, renormalise=not other_samples)
            g = np.array([gold_utility(q, r) for r in responses])
            other: list[str] = []
            if other_samples:
                other = self._outside(ref_model, q, responses, gen)
                lp = np.append(lp, self._log_rest(lp))
                g = np.append(g, np.mean([gold_utility(q, t) for t in other]) if other else np.nan)
            self.tables.append(_Table(q, responses, lp - np.logaddexp.reduce(lp), g, other))
        pooled = [gold_utility(t.query, x) for t in self.tables for x in t.other]
        for t in self.tables:
            if np.isnan(t.gold[-1]):
                t.gold[-1] = np.mean(pooled) if pooled else UNPARSEABLE

    @staticmethod
    def _log_rest(lp: np.ndarray) -> float:
        """log(1 - sum exp(lp)): the mass outside the enumerated answers (floored at 1e-12)."""
        return float(np.log(max(1.0 - float(np.exp(np.logaddexp.reduce(lp))), 1e-12)))

    def _outside(self, model, q: Query, responses: list[str], gen: torch.Generator) -> list[str]:
        from preflab.models.sampling import sample

        texts = sample(model, self.tokenizer, [format_prompt(q.text)] * self.other_samples,
                       max_new_tokens=self.max_new_tokens, generator=gen).texts
        known = set(responses)
        return [t for t in texts if t.strip() not in known]

    @property
    def reference_gold(self) -> float:
        return float(np.mean([np.exp(t.ref_logp) @ t.gold for t in self.tables]))

    @staticmethod
    def _score(reward_fn: Callable, t: _Table, texts: list[str]) -> np.ndarray:
        out = reward_fn([format_prompt(t.query.text)] * len(texts), texts)
        return np.asarray(torch.as_tensor(out, dtype=torch.float64).cpu())

    def rewards(self, reward_fn: Callable[[list[str], list[str]], torch.Tensor]) -> list[np.ndarray]:
        """``reward_fn``'s score of every outcome of every query's support: the enumerated answers,
        then (with ``other_samples``) the mean over the reference's samples outside them (where a
        query has none, the mean over every query's; else the lowest score). Cached per function
        object: a reward model that is still changing needs a new function to be scored again."""
        if reward_fn in self._rewards:
            return self._rewards[reward_fn]
        rewards = [self._score(reward_fn, t, t.responses) for t in self.tables]
        if self.other_samples:
            other = [self._score(reward_fn, t, t.other) if t.other else None for t in self.tables]
            pooled = [x for o in other if o is not None for x in o]
            rewards = [np.append(r, o.mean() if o is not None else (np.mean(pooled) if pooled else r.min()))
                       for r, o in zip(rewards, other, strict=True)]
        self._rewards[reward_fn] = rewards
        return rewards

    def frontier(self, name: str, reward_fn: Callable[[list[str], list[str]], torch.Tensor] | None = None,
                 betas: Sequence[float] = DEFAULT_BETAS) -> Frontier:
        """Tilted by gold (``reward_fn`` None) or by ``reward_fn(prompts, texts) -> scores``."""
        rewards = [t.gold for t in self.tables] if reward_fn is None else self.rewards(reward_fn)
        return frontier_from_tables(name, [t.ref_logp for t in self.tables], rewards,
                                    [t.gold for t in self.tables], betas)

    def point(self, model, reward_fn: Callable[[list[str], list[str]], torch.Tensor] | None = None
              ) -> dict[str, float]:
        """{"kl", "gold", "other_mass"} of ``model`` on this support (means over the queries).

        With ``reward_fn`` (the reward the policy was trained on) also "reward" (its expected score)
        and ``kl_split``'s "kl_needed" / "kl_excess": the least KL at which that expected score is
        reachable, and the KL the policy spends beyond it (kl = kl_needed + kl_excess).
        """
        gen = torch.Generator().manual_seed(self.seed + 1)
        kl = gold = other_mass = reward = needed = excess = 0.0
        rewards = self.rewards(reward_fn) if reward_fn is not None else None
        for i, t in enumerate(self.tables):
            lp = reference_logprobs(model, self.tokenizer, t.query, t.responses, renormalise=not self.other_samples)
            g = t.gold
            r = rewards[i] if rewards is not None else None
            if self.other_samples:  # the policy's own mass outside the enumerated answers
                lp = np.append(lp, self._log_rest(lp))
                own = self._outside(model, t.query, t.responses, gen)
                g = np.append(t.gold[:-1], np.mean([gold_utility(t.query, x) for x in own]) if own else t.gold[-1])
                if r is not None and own:
                    r = np.append(r[:-1], self._score(reward_fn, t, own).mean())
                other_mass += float(np.exp(lp[-1]))
            lp = lp - np.logaddexp.reduce(lp)
            p = np.exp(lp)
            kl += float(np.sum(p * (lp - t.ref_logp)))
            gold += float(p @ g)
            if r is not None:
                reward += float(p @ r)
                a, b = kl_split(lp, t.ref_logp, r)
                needed, excess = needed + a, excess + b
        n = len(self.tables)
        out = {"kl": kl / n, "gold": gold / n, "other_mass": other_mass / n}
        if rewards is not None:
            out.update({"reward": reward / n, "kl_needed": needed / n, "kl_excess": excess / n})
        return out


def oracle_frontiers(
    model,
    tokenizer,
    queries: Sequence[Query],
    *,
    proxy_fn: Callable[[list[str], list[str]], torch.Tensor] | None = None,
    betas: Sequence[float] = DEFAULT_BETAS,
    other_samples: int = 0,
    max_new_tokens: int = 32,
    seed: int = 0,
) -> dict[str, Frontier]:
    """Frontiers tilted by gold and (if ``proxy_fn``: (prompts, texts) -> scores) by the proxy reward.

    ``model`` is the SFT/reference policy; its log-probs define pi_ref over the enumerated answers.
    With ``other_samples`` = n > 0 the model's probability mass outside the enumerated answers
    (malformed or off-topic text, ``1 - sum pi_ref(Y(x))``) is kept as one more outcome instead of
    being renormalised away; its gold and proxy reward are the means over those of n samples that
    fall outside Y(x). pi_ref's gold then matches the sampled SFT policy's, and leaving malformed
    text costs KL, as it does for a trained policy. (Within the outcome the tilt is uniform.)
    """
    if not queries:
        raise ValueError("oracle_frontiers: queries is empty")
    tables = OracleTables(model, tokenizer, queries, other_samples=other_samples, max_new_tokens=max_new_tokens,
                          seed=seed)
    out = {"gold": tables.frontier("gold", None, betas)}
    if proxy_fn is not None:
        out["proxy"] = tables.frontier("proxy", proxy_fn, betas)
    return out
