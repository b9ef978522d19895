"""PPO with a KL leash to the frozen reference (Ziegler et al. 2019; Ouyang et al. 2022), one visible loop.

Each step: sample responses for a batch of prompts with the KV-cache sampler (rollout);
score them with the reward callable at the end of the response and subtract a per-token
KL penalty beta * KL_t to the reference (score + KL); estimate advantages with GAE
(advantages); run a few epochs of clipped PPO on minibatches (updates); every
``checkpoint_every`` steps save everything needed to resume and run the evaluation hook
(checkpoint). beta comes from a controller in ``losses/kl.py`` (fixed, adaptive, alarm).

Metric keys (metrics.jsonl, one object per step): ``objective/scores`` (raw reward-model
score), ``objective/kl`` (sum over response tokens of k1, mean over samples),
``objective/rlhf_reward`` (score - beta * kl), ``objective/beta``, ``objective/entropy``
(mean per-token entropy), ``ppo/loss/policy``, ``ppo/loss/value``, ``ppo/clipfrac``,
``ppo/approx_kl``, with ``kl_estimator="full"`` also ``objective/kl_full`` (the same KL from the exact
per-state KLs: less noisy) and ``ppo/loss/kl``, ``val/explained_variance``, ``val/clipfrac``, ``objective/eos_rate``,
``objective/below_ref_floor`` (share of responses with a token below ``ref_floor``),
``objective/response_len``, ``time/rollout_s``, ``time/update_s``, ``train/lr``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from preflab.config import check, check_resume, field_doc, seed_everything, write_config
from preflab.losses.gae import gae
from preflab.losses.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    AlarmKLController,
    Detector,
    FixedKLController,
    kl_full,
)
from preflab.losses.ppo import (
    entropy_from_logits,
    explained_variance,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_sum_mean,
)
from preflab.models.hf import fuse_gelu, warn_low_precision
from preflab.models.sampling import logits_to_keep_kw


@dataclass
class PPOConfig:
    """PPO settings; defaults run the sandbox on a CPU."""

    seed: int = field_doc(0, "Seed for the sampler, the minibatch order and the prompt order.")
    steps: int = field_doc(100, "PPO iterations (one rollout batch + its updates each).")
    prompts_per_step: int = field_doc(16, "Prompts per rollout batch (global, over all processes).")
    samples_per_prompt: int = field_doc(1, "Responses sampled per prompt.")
    max_new_tokens: int = field_doc(64, "Longest response in tokens.")
    min_new_tokens: int = field_doc(0, "Shortest response in tokens (EOS suppressed before).")
    temperature: float = field_doc(1.0, "Sampling temperature of the rollout.")
    top_p: float = field_doc(1.0, "Nucleus sampling threshold of the rollout.")
    per_sample_seeds: bool = field_doc(
        False, "Seed each response's sampler from (seed, step, its index in the global batch), so the rollout "
               "does not depend on how many processes share it (DDP reproduces one process); slightly slower.")
    lr: float = field_doc(1e-5, "AdamW learning rate of the policy.")
    value_lr: float = field_doc(1e-4, "AdamW learning rate of the value head / model.")
    lr_schedule: Literal["constant", "linear"] = field_doc("linear", "Learning-rate schedule (linear decays to 0).")
    weight_decay: float = field_doc(0.0, "AdamW weight decay.")
    max_grad_norm: float = field_doc(1.0, "Gradient-norm clip (0: off).")
    ppo_epochs: int = field_doc(4, "Passes over each rollout batch.")
    fuse_single_update: bool = field_doc(
        True, "With one epoch and one minibatch (RLOO-like), take the old log-probs and values from the update's "
              "own forward instead of a separate one (same numbers, one policy forward fewer per step).")
    minibatch_size: int = field_doc(8, "Samples per optimiser step (per process).")
    clip_range: float = field_doc(0.2, "PPO ratio clip epsilon (Schulman et al. 2017).")
    value_clip_range: float = field_doc(0.2, "Value-prediction clip around the rollout values.")
    vf_coef: float = field_doc(0.1, "Weight of the value loss when policy and value share a backbone.")
    entropy_coef: float = field_doc(0.0, "Entropy bonus: minus this times the mean per-token entropy is added to the "
                                         "loss (CleanRL's ent_coef; in the whitened advantages' units).")
    gamma: float = field_doc(1.0, "Discount factor of GAE.")
    lam: float = field_doc(0.95, "lambda of GAE.")
    whiten_advantages: bool = field_doc(True, "Standardise advantages per rollout batch.")
    normalize_reward: bool = field_doc(True, "Standardise scores with a running mean/std before the KL penalty.")
    missing_eos_penalty: float = field_doc(1.0, "Subtracted from the score of a response that never emitted EOS (or its "
                                         "chat template's end-of-turn).")
    ref_floor: float | None = field_doc(
        None, "If set: each response token the frozen reference gives a log-prob below this (text the SFT model "
              "would hardly write, which the reward model has rarely seen) costs ref_floor_penalty, at that token.")
    ref_floor_penalty: float = field_doc(1.0, "Per-token reward of a token below ref_floor, negated (in the units of "
                                              "the score after normalisation).")
    kl_estimator: Literal["k1", "k3", "full"] = field_doc(
        "k1", "KL penalty: k1 or k3 (Schulman 2020) at each sampled token, in the reward; or 'full': the exact KL of "
              "every visited state over the whole vocabulary, its gradient taken in the loss and each next state's "
              "KL as the token's penalty (no sampling noise at the state; the reference's distribution costs "
              "B x R x V floats, so for small vocabularies).")
    kl_controller: Literal["fixed", "adaptive"] = field_doc("fixed", "How beta moves (the alarm is added on top).")
    kl_beta: float = field_doc(0.02, "Initial KL penalty coefficient beta.")
    kl_target: float = field_doc(6.0, "Adaptive controller: target KL (nats per response, summed over tokens).")
    kl_horizon: int = field_doc(0, "Adaptive controller: horizon in SAMPLES (0: a tenth of the run's rollout samples).")
    kl_beta_min: float = field_doc(0.0, "Adaptive controller: beta never falls below this (e.g. kl_beta: no slack "
                                        "builds up while KL is still rising toward the target).")
    alarm_thresholds: dict[str, float] = field_doc({}, "Alarm controller: detector name -> rate above which beta is raised.")
    alarm_factor: float = field_doc(2.0, "Alarm controller: beta multiplier on an alarm.")
    alarm_floor: float = field_doc(0.05, "Alarm controller: beta after an alarm is at least this (a leash from beta = 0).")
    alarm_cooldown: int = field_doc(1, "Alarm controller: steps between two raises.")
    alarm_window: int = field_doc(1, "Alarm controller: compare the mean of the last N steps' detector readings "
                                     "with the threshold (a rate read from 32 answers moves by about +-0.06 between "
                                     "rollouts); the window starts afresh after each alarm.")
    checkpoint_every: int = field_doc(500, "Save a checkpoint (and run the eval hook) every N steps.")
    keep_last: int = field_doc(2, "Checkpoints kept on disk (0: all).")
    mixed_precision: Literal["no", "fp16", "bf16"] = field_doc("no", "accelerate mixed precision.")
    cpu: bool = field_doc(False, "Force the CPU even when an accelerator is present.")
    progress: bool = field_doc(True, "Show a rich progress bar.")

    def validate(self) -> None:
        w = "PPOConfig"
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "ppo_epochs",
                     "minibatch_size", "checkpoint_every"):
            check(getattr(self, name) >= 1, f"{w}.{name}", "must be >= 1")
        for name in ("lr", "value_lr", "temperature"):
            check(getattr(self, name) > 0, f"{w}.{name}", "must be > 0")
        check(0 < self.top_p <= 1, f"{w}.top_p", "must be in (0, 1]")
        check(0 <= self.min_new_tokens <= self.max_new_tokens, f"{w}.min_new_tokens", "must be in [0, max_new_tokens]")
        check(0 < self.clip_range < 1, f"{w}.clip_range", "must be in (0, 1)")
        check(self.value_clip_range > 0, f"{w}.value_clip_range", "must be > 0")
        check(0 <= self.gamma <= 1, f"{w}.gamma", "must be in [0, 1]")
        check(0 <= self.lam <= 1, f"{w}.lam", "must be in [0, 1]")
        check(self.kl_beta >= 0, f"{w}.kl_beta", "must be >= 0")
        check(self.kl_target > 0, f"{w}.kl_target", "must be > 0")
        check(self.kl_horizon >= 0, f"{w}.kl_horizon", "must be >= 0")
        check(self.kl_beta_min >= 0, f"{w}.kl_beta_min", "must be >= 0")
        check(self.alarm_factor > 1, f"{w}.alarm_factor", "must be > 1")
        check(self.alarm_floor >= 0, f"{w}.alarm_floor", "must be >= 0")
        check(self.alarm_window >= 1, f"{w}.alarm_window", "must be >= 1")
        check(self.keep_last >= 0, f"{w}.keep_last", "must be >= 0")
        check(self.max_grad_norm >= 0, f"{w}.max_grad_norm", "must be >= 0")
        check(self.ref_floor is None or self.ref_floor < 0, f"{w}.ref_floor", "must be a log-prob < 0 (or unset)")
        check(self.ref_floor_penalty >= 0, f"{w}.ref_floor_penalty", "must be >= 0")
        check(self.vf_coef >= 0, f"{w}.vf_coef", "must be >= 0")
        check(self.entropy_coef >= 0, f"{w}.entropy_coef", "must be >= 0")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def rollout_batch(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    metrics: list[dict[str, Any]]  # one dict per step of this process's run (resumed steps included)
    events: list[dict[str, Any]]  # beta changes with their cause
    last_checkpoint: Path | None
    policy_dir: Path | None  # the final policy as a Hugging Face directory
    resumed_from: int = 0  # the checkpoint step this invocation continued from (0: a fresh run)


RewardFn = Callable[[list[str], list[str]], torch.Tensor]


class ActorCritic(torch.nn.Module):
    """The policy plus its critic: a ``ValueHead`` on the policy's last hidden states or a separate
    value model (any module ``(input_ids, attention_mask, position_ids) -> (B, T)``), as one module
    so that ``accelerate`` wraps (and DDP syncs) both at once."""

    def __init__(self, policy: torch.nn.Module, value_head: torch.nn.Module | None,
                 value_model: torch.nn.Module | None):
        super().__init__()
        assert (value_head is None) != (value_model is None)
        self.policy, self.value_head, self.value_model = policy, value_head, value_model

    def forward(self, input_ids, attention_mask, position_ids, keep: int):
        """Logits (B, keep, V) and values (B, keep) of the last ``keep`` positions only: the LM head
        and the value head skip the prompt's positions."""
        shared = self.value_head is not None
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=shared, use_cache=False, **logits_to_keep_kw(self.policy, keep))
        if shared:
            values = self.value_head(out.hidden_states[-1][:, -keep:])
        else:
            values = self.value_model(input_ids, attention_mask, position_ids)[:, -keep:]
        return out.logits[:, -keep:], values


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def response_logprobs(resp_logits: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_t | prefix) of each response token: logits (B, R, V) predicting ``response_ids`` (B, R)."""
    return torch.log_softmax(resp_logits.float(), -1).gather(-1, response_ids[..., None]).squeeze(-1)


class RunningMoments:
    """Running mean / std of all scores seen (Chan et al. parallel-variance merge)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        bm, bv = x.mean().item(), x.var(unbiased=False).item()
        tot = self.count + n
        delta = bm - self.mean
        m2 = self.var * self.count + bv * n + delta**2 * self.count * n / tot
        self.mean, self.var, self.count = self.mean + delta * n / tot, m2 / tot, tot

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / math.sqrt(self.var + 1e-8)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, s: dict) -> None:
        self.mean, self.var, self.count = float(s["mean"]), float(s["var"]), int(s["count"])


def make_kl_controller(cfg: PPOConfig, detector: Detector | None):
    """The controller the config asks for (fixed or adaptive), wrapped by the alarm if detectors are given."""
    if cfg.kl_controller == "adaptive":
        horizon = cfg.kl_horizon or max(1, cfg.steps * cfg.rollout_batch // 10)
        base = AdaptiveKLController(cfg.kl_beta, target=cfg.kl_target, horizon=horizon, min_beta=cfg.kl_beta_min)
    else:
        base = FixedKLController(cfg.kl_beta)
    if detector is None:
        return base
    if not cfg.alarm_thresholds:
        raise ValueError("PPOConfig.alarm_thresholds: detectors were given but no thresholds; set at least one")
    return AlarmKLController(base, detector=detector, thresholds=cfg.alarm_thresholds, factor=cfg.alarm_factor,
                             floor=cfg.alarm_floor, cooldown=cfg.alarm_cooldown, window=cfg.alarm_window)


def sample_generators(seed: int, step: int, first: int, n: int, device) -> list[torch.Generator]:
    """One generator per response ``first .. first + n - 1`` of the global batch of ``step``."""
    return [torch.Generator(device=device).manual_seed((seed << 40) + (step << 20) + first + i) for i in range(n)]


def prompt_order(n_prompts: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the prompts of ``step``: epochs of seeded permutations (stateless, so resume needs no state)."""
    out: list[int] = []
    start = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n_prompts)
        perm = list(range(n_prompts))
        random.Random(f"ppo-prompts:{seed}:{epoch}").shuffle(perm)
        out.extend(perm[offset : offset + per_step - len(out)])
    return out


def rewards_and_advantages(old_logprobs: torch.Tensor, old_values: torch.Tensor, *, ref_logprobs: torch.Tensor,
                           rmask: torch.Tensor, scores: torch.Tensor, beta: float, kl_fn, gamma: float, lam: float,
                           whiten: bool, total=None, token_rewards: torch.Tensor | None = None,
                           state_kl: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards (-beta * KL_t everywhere, plus ``token_rewards`` where given, the score added at
    the last response token) and GAE.

    ``state_kl`` (B, R): the exact KL of each visited state (``kl_full``). Then token t's penalty is
    the KL of the state it leads to, KL_{t+1} (0 after the last token), and ``kl_fn`` is not used: the
    gradient of E[sum_t KL_t] is E[sum_t grad KL_t(s_t)], which the caller adds as a loss, plus
    E[sum_t grad log pi(a_t|s_t) sum_{t' > t} KL_t'], which these rewards carry.

    Shapes (B, R) except ``scores`` (B,). Returns (kl_seq (B,): summed k1, the reported KL; masked
    old values; advantages, whitened if ``whiten`` (over all processes when ``total`` sums over
    them); returns; the std the advantages were divided by (1 without whitening), which puts a loss
    term in raw reward units on the advantages' scale).
    """
    with torch.no_grad():
        if state_kl is None:
            rewards = -beta * kl_fn(old_logprobs, ref_logprobs) * rmask
        else:
            rewards = torch.zeros_like(rmask)
            rewards[:, :-1] = -beta * (state_kl * rmask)[:, 1:]
        if token_rewards is not None:
            rewards = rewards + token_rewards * rmask
        last = (rmask.sum(-1).long() - 1).clamp_min(0)
        rewards[torch.arange(len(last)), last] += scores
        kl_seq = ((old_logprobs - ref_logprobs) * rmask).sum(-1)
        old_values = old_values * rmask
        advantages, returns = gae(rewards, old_values, rmask, gamma=gamma, lam=lam)
        scale = torch.ones((), device=advantages.device)
        if whiten:
            scale = (masked_var(advantages, rmask, total=total) + 1e-8).sqrt()  # masked_whiten's own eps
            advantages = masked_whiten(advantages, rmask, total=total)
    return kl_seq, old_values, advantages, returns, scale


class _SavedState:
    """A generator state taken on another process, saved as ``save_checkpoint`` saves a generator."""

    def __init__(self, state: torch.Tensor):
        self.state = state

    def get_state(self) -> torch.Tensor:
        return self.state


def _process_generators(world: int, rank: int, sampler_gen, shuffle_gen) -> dict:  # noqa: ANN001
    """Every other process's sampler, shuffle and global RNG states, gathered to all (a collective: every
    process calls it), as ``{"sampler_r1": ..., "shuffle_r1": ..., "rng_r1": ...}``; {} with one process."""
    if world == 1:
        return {}
    from accelerate.utils import gather_object

    mine = [(rank, sampler_gen.get_state().cpu(), shuffle_gen.get_state(), torch.get_rng_state())]
    return {f"{kind}_r{r}": _SavedState(st) for r, *states in gather_object(mine) if r
            for kind, st in zip(("sampler", "shuffle", "rng"), states, strict=True)}


def train_ppo(
    cfg: PPOConfig,
    *,
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    tokenizer,
    reward_fn: RewardFn,
    prompts: Sequence[str],
    run_dir: str | Path,
    value_model: torch.nn.Module | None = None,
    eval_hook: Callable[[int, torch.nn.Module], dict] | None = None,
    detectors: Detector | None = None,
    resume: bool = False,
    inputs: dict[str, Any] | None = None,
) -> RunResult:
    """Optimise ``policy`` against ``reward_fn(prompts, texts) -> (B,) scores`` with a KL leash to ``ref``.

    ``prompts`` are full prompt strings (e.g. ``domain.format_prompt(query)``). ``value_model``:
    a separate critic ``(input_ids, attention_mask, position_ids) -> (B, T)``; by default a
    ``ValueHead`` on the policy. ``detectors``: texts -> named rates for the alarm controller.
    ``resume``: continue from the newest checkpoint in ``run_dir``; it must train on the same prompts
    and ``inputs`` (what else it depends on, e.g. the policy and reward model paths; ``inputs.json``).
    """
    from rich.progress import Progress

    from preflab.models.heads import ValueHead
    from preflab.models.sampling import sample, sequence_log_softmax, sequence_logprobs
    from preflab.train.checkpoint import (
        check_inputs,
        fingerprint,
        latest_checkpoint,
        load_checkpoint,
        refuse_to_overwrite,
        save_checkpoint,
        truncate_jsonl,
        write_step_eval,
    )
    from preflab.train.launch import make_accelerator

    run_dir = Path(run_dir)
    refuse_to_overwrite(run_dir, resume=resume)
    if not prompts:
        raise ValueError("train_ppo: prompts is empty")
    acc = make_accelerator(cfg, "PPOConfig")
    world, rank = acc.num_processes, acc.process_index
    if cfg.prompts_per_step % world:
        raise ValueError(f"PPOConfig.prompts_per_step: {cfg.prompts_per_step} is not divisible by {world} processes")
    seed_everything(cfg.seed + rank)
    resuming = resume and latest_checkpoint(run_dir) is not None
    if resuming:
        # ``steps`` may grow to train on (the linear schedule is then recomputed for the new total)
        check_resume(cfg, run_dir, may_change=("steps", "checkpoint_every", "keep_last", "progress"))
    check_inputs(run_dir, {"prompts": fingerprint(prompts), **(inputs or {})}, resuming=resuming,
                 write=acc.is_main_process)
    if acc.is_main_process:
        write_config(cfg, run_dir)

    fuse_gelu(policy, ref, value_model)  # the same activation in one kernel (models.hf.fuse_gelu)
    warn_low_precision(policy, "train_ppo")
    value_head = ValueHead.for_model(policy, seed=cfg.seed) if value_model is None else None
    ac = ActorCritic(policy, value_head, value_model).to(acc.device)
    ac.eval()  # no dropout anywhere: log-probs must be the ones the sampler used
    ref = ref.to(acc.device).eval().requires_grad_(False)
    critic = value_head if value_head is not None else value_model
    optimizer = torch.optim.AdamW([
        {"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr},
        {"params": list(critic.parameters()), "lr": cfg.value_lr},
    ], weight_decay=cfg.weight_decay)
    local_batch = cfg.rollout_batch // world
    n_minibatches = max(1, math.ceil(local_batch / cfg.minibatch_size))
    total_updates = cfg.steps * cfg.ppo_epochs * n_minibatches
    decay = (lambda i: max(0.0, 1.0 - i / total_updates)) if cfg.lr_schedule == "linear" else (lambda i: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    ac, optimizer = acc.prepare(ac, optimizer)
    controller = make_kl_controller(cfg, detectors)
    moments = RunningMoments()
    sampler_gen = torch.Generator(device=acc.device).manual_seed(cfg.seed * 1000 + rank)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 1)
    full_kl = cfg.kl_estimator == "full"
    kl_fn = KL_ESTIMATORS.get(cfg.kl_estimator)
    # DDP: whiten and average losses over the global batch, so a split batch trains like one process
    total = (lambda t: acc.reduce(t, "sum")) if world > 1 else None

    metrics_path, events_path = run_dir / "metrics.jsonl", run_dir / "events.jsonl"
    start, history, events, last_ckpt = 0, [], [], None
    if resume and (last_ckpt := latest_checkpoint(run_dir)) is not None:
        # under DDP each process continues from its own generators (saved per process; a checkpoint from
        # before they were gives every process the first one's, as it always did)
        own = rank > 0 and (last_ckpt / f"sampler_r{rank}.gen.pt").is_file()
        gens = ({f"sampler_r{rank}": sampler_gen, f"shuffle_r{rank}": shuffle_gen} if own
                else {"sampler": sampler_gen, "shuffle": shuffle_gen})
        state = load_checkpoint(last_ckpt, modules={"actor_critic": acc.unwrap_model(ac)},
                                optimizers={"optimizer": optimizer}, schedulers={"scheduler": scheduler},
                                generators=gens)
        if own:
            torch.set_rng_state(torch.load(last_ckpt / f"rng_r{rank}.gen.pt", weights_only=True))
        start = state["step"]
        controller.load_state_dict(state["controller"])
        moments.load_state_dict(state["reward_moments"])
        history = truncate_jsonl(metrics_path, start) if acc.is_main_process else []
        events = truncate_jsonl(events_path, start) if acc.is_main_process else []
    elif acc.is_main_process:
        for p in (metrics_path, events_path):
            p.unlink(missing_ok=True)
    if acc.is_main_process:
        events_path.touch()  # there even when beta never changed (an empty file says so)

    def forward(model, ids, mask, prompt_len):
        """(B, R, V) logits predicting each response token and V(s_t) before it (B, R)."""
        with acc.autocast():
            logits, values = model(ids, mask, position_ids_of(mask), ids.shape[1] - prompt_len + 1)
        return logits[:, :-1], values[:, :-1].float()

    progress = Progress(disable=not (cfg.progress and acc.is_main_process))
    with progress:
        task = progress.add_task("ppo", total=cfg.steps, completed=start)
        for step in range(start, cfg.steps):
            # ---- rollout -------------------------------------------------------------------
            t0 = time.perf_counter()
            idx = prompt_order(len(prompts), step, cfg.prompts_per_step, cfg.seed)
            idx = idx[rank * (len(idx) // world) : (rank + 1) * (len(idx) // world)]
            batch_prompts = [prompts[i] for i in idx for _ in range(cfg.samples_per_prompt)]
            pol = acc.unwrap_model(ac).policy
            gen = (sample_generators(cfg.seed, step, rank * len(batch_prompts), len(batch_prompts), acc.device)
                   if cfg.per_sample_seeds else sampler_gen)
            with torch.no_grad():
                s = sample(pol, tokenizer, batch_prompts, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, top_p=cfg.top_p, generator=gen,
                           min_new_tokens=cfg.min_new_tokens)
                ids, attn, P = s.input_ids.to(acc.device), s.attention_mask.to(acc.device), s.prompt_len
                rmask = s.response_mask.to(acc.device).float()  # (B, R)
                B = ids.shape[0]
                # one epoch of one minibatch: the update's forward gives the old log-probs and values
                fused = cfg.fuse_single_update and cfg.ppo_epochs == 1 and cfg.minibatch_size >= B
                # under the policy's autocast too: with bf16, a reference in float32 would put a KL of its own
                # between two identical models (4.8e-4 nats at step 1 in a walkthrough)
                with acc.autocast():
                    if full_kl:  # the reference's whole next-token distribution (B, R, V)
                        ref_lsm = sequence_log_softmax(ref, ids, attn, P)
                        ref_logprobs = ref_lsm.gather(-1, ids[:, P:, None]).squeeze(-1)
                    else:
                        ref_lsm = None
                        ref_logprobs = sequence_logprobs(ref, ids, attn, P)  # (B, R), LM head on the response only
                old_state_kl = None
                if not fused:
                    logits, old_values = forward(ac, ids, attn, P)
                    old_logprobs = response_logprobs(logits, ids[:, P:])  # (B, R)
                    entropy = masked_mean(entropy_from_logits(logits.float()), rmask, total=total)
                    if full_kl:
                        old_state_kl = kl_full(logits, ref_lsm)
                    del logits
            t_rollout = time.perf_counter() - t0

            # ---- score + KL ----------------------------------------------------------------
            with torch.no_grad():
                scores = torch.as_tensor(reward_fn(batch_prompts, s.texts), dtype=torch.float32).to(acc.device)
                has_eos = s.ended.to(acc.device)  # stopped at the EOS or an instruct model's end-of-turn
                scores_pen = torch.where(has_eos, scores, scores - cfg.missing_eos_penalty)
                # tokens the reference would hardly write: a penalty at the token, not on the whole response
                # (a response-level one pushes down every token of it and raises the entropy instead)
                floor_hits = ((ref_logprobs < cfg.ref_floor) & (rmask > 0)).float() if cfg.ref_floor is not None \
                    else torch.zeros_like(rmask)  # (B, R)
                if cfg.normalize_reward:
                    moments.update(acc.gather(scores_pen))
                    scores_used = moments.normalize(scores_pen)
                else:
                    scores_used = scores_pen
                beta = controller.beta

            # ---- advantages and updates ----------------------------------------------------
            t1 = time.perf_counter()
            stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "clipfrac", "approx_kl", "vf_clipfrac",
                                                             "kl")}
            shape = dict(ref_logprobs=ref_logprobs, rmask=rmask, scores=scores_used, beta=beta, kl_fn=kl_fn,
                         gamma=cfg.gamma, lam=cfg.lam, whiten=cfg.whiten_advantages, total=total,
                         token_rewards=-cfg.ref_floor_penalty * floor_hits if cfg.ref_floor is not None else None)
            if not fused:
                kl_seq, old_values, advantages, returns, adv_scale = rewards_and_advantages(
                    old_logprobs, old_values, state_kl=old_state_kl, **shape)
            for _ in range(cfg.ppo_epochs):
                perm = torch.randperm(B, generator=shuffle_gen)
                for mb in [torch.arange(B)] if fused else perm.split(cfg.minibatch_size):
                    mb = mb.to(acc.device)
                    logits, values = forward(ac, ids[mb], attn[mb], P)
                    logprobs = response_logprobs(logits, ids[mb][:, P:])
                    n_tokens = None if total is None else total(rmask[mb].sum()) / world
                    state_kl = kl_full(logits, ref_lsm[mb]) if full_kl else None  # (mb, R), differentiable
                    if fused:  # the only update: its forward is the rollout's (policy unchanged so far)
                        old_logprobs, old_values = logprobs.detach(), values.detach()
                        with torch.no_grad():
                            entropy = masked_mean(entropy_from_logits(logits.detach().float()), rmask,
                                                  total=total)
                        old_state_kl = state_kl.detach() if full_kl else None
                        kl_seq, old_values, advantages, returns, adv_scale = rewards_and_advantages(
                            old_logprobs, old_values, state_kl=old_state_kl, **shape)
                    pg = ppo_policy_loss(logprobs, old_logprobs[mb], advantages[mb], rmask[mb],
                                         clip_range=cfg.clip_range, n_tokens=n_tokens)
                    vf = ppo_value_loss(values, old_values[mb], returns[mb], rmask[mb],
                                        clip_range=cfg.value_clip_range, n_tokens=n_tokens)
                    loss = pg.loss + cfg.vf_coef * vf.loss
                    if cfg.entropy_coef > 0:
                        loss = loss - cfg.entropy_coef * token_sum_mean(entropy_from_logits(logits.float()), rmask[mb],
                                                                        n_tokens)
                    if full_kl:  # grad of beta * sum_t KL_t(s_t) at the visited states, on the advantages' scale
                        kl_loss = token_sum_mean(state_kl, rmask[mb], n_tokens)
                        loss = loss + beta / adv_scale * kl_loss
                        stats["kl"].append(float(kl_loss.detach()))
                    optimizer.zero_grad(set_to_none=True)
                    acc.backward(loss)
                    if cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(ac.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    for k, v in (("pg", pg.loss), ("vf", vf.loss), ("clipfrac", pg.clipfrac),
                                 ("approx_kl", pg.approx_kl), ("vf_clipfrac", vf.clipfrac)):
                        stats[k].append(float(v.detach()))
            t_update = time.perf_counter() - t1

            # ---- metrics and the KL controller ----------------------------------------------
            def mean_all(x: torch.Tensor | float) -> float:
                return float(acc.reduce(torch.as_tensor(x, dtype=torch.float32, device=acc.device).mean(),
                                        "mean"))

            kl_mean = mean_all(kl_seq)
            row = {
                "step": step + 1,
                "objective/scores": mean_all(scores),
                "objective/kl": kl_mean,
                "objective/rlhf_reward": mean_all(scores - beta * kl_seq),
                "objective/beta": beta,
                "objective/entropy": mean_all(entropy),
                "objective/eos_rate": mean_all(has_eos.float()),
                "objective/below_ref_floor": mean_all(floor_hits.amax(-1)),
                "objective/response_len": mean_all(rmask.sum(-1)),
                "ppo/loss/policy": mean_all(sum(stats["pg"]) / len(stats["pg"])),
                "ppo/loss/value": mean_all(sum(stats["vf"]) / len(stats["vf"])),
                "ppo/clipfrac": mean_all(sum(stats["clipfrac"]) / len(stats["clipfrac"])),
                "ppo/approx_kl": mean_all(sum(stats["approx_kl"]) / len(stats["approx_kl"])),
                **({"objective/kl_full": mean_all((old_state_kl * rmask).sum(-1)),
                    "ppo/loss/kl": mean_all(sum(stats["kl"]) / len(stats["kl"]))} if full_kl else {}),
                "val/clipfrac": mean_all(sum(stats["vf_clipfrac"]) / len(stats["vf_clipfrac"])),
                "val/explained_variance": mean_all(explained_variance(old_values, returns, rmask, total=total)),
                "time/rollout_s": t_rollout,
                "time/update_s": t_update,
                "train/lr": scheduler.get_last_lr()[0],
            }
            all_texts = [t for part in _gather_texts(acc, s.texts) for t in part]
            new_events = controller.update(step=step + 1, kl=kl_mean, n_samples=cfg.rollout_batch, texts=all_texts)
            readings = getattr(controller, "last_readings", {})
            row.update({f"detect/{k}": v for k, v in readings.items()})
            history.append(row)
            events.extend(new_events)
            if acc.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                if new_events:
                    with events_path.open("a") as f:
                        f.writelines(json.dumps(e) + "\n" for e in new_events)
            progress.update(task, advance=1, description=f"ppo score {row['objective/scores']:.3f} "
                                                         f"kl {kl_mean:.2f} beta {beta:.3g}")  # this step's, as logged

            # ---- checkpoint ----------------------------------------------------------------
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                acc.wait_for_everyone()
                per_process = _process_generators(world, rank, sampler_gen, shuffle_gen)  # collective
                if acc.is_main_process:
                    # the evaluation first: a run stopped between the two resumes from the previous
                    # checkpoint and writes it again, where the other order would lose it for good
                    if eval_hook is not None:
                        write_step_eval(run_dir, step + 1, eval_hook(step + 1, acc.unwrap_model(ac).policy))
                    last_ckpt = save_checkpoint(
                        run_dir, step + 1, modules={"actor_critic": acc.unwrap_model(ac)},
                        optimizers={"optimizer": optimizer}, schedulers={"scheduler": scheduler},
                        generators={"sampler": sampler_gen, "shuffle": shuffle_gen, **per_process},
                        state={"controller": controller.state_dict(), "reward_moments": moments.state_dict()},
                        keep_last=cfg.keep_last or None)
                acc.wait_for_everyone()

    policy_dir = None
    if acc.is_main_process:
        policy_dir = run_dir / "policy"
        acc.unwrap_model(ac).policy.save_pretrained(policy_dir)
        tokenizer.save_pretrained(policy_dir)
    acc.wait_for_everyone()
    return RunResult(run_dir, cfg.steps, history, events, last_ckpt, policy_dir, resumed_from=start)


def _gather_texts(acc, texts: list[str]) -> list[list[str]]:
    """Every process's response texts (the alarm detectors judge the whole global batch)."""
    if acc.num_processes == 1:
        return [texts]
    from accelerate.utils import gather_object

    return [gather_object(texts)]
