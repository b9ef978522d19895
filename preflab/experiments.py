"""What-if experiments in the sandbox: ``preflab sandbox experiment NAME``.

Each experiment trains real reward models / PPO policies from the sandbox base model on labels
from simulated raters (in memory, no store), measures them against the hidden gold (through
``preflab.sandbox.truth`` / ``oracle``, the only readers of gold) and writes one plot file
``RUN/experiments/<name>.json`` in the report's shape (docs/report.md, "experiments/*.json"):

- ``consistency-vs-volume``: a reward model from the 5 calibrated senior raters x N pairs
  against one from ``crowd_raters`` uncalibrated raters x ``volume_ratio`` * N pairs (the story:
  6,000 vs 60,000; scaled down by default, ratio kept), on gold accuracy over held-out pairs;
  optionally a short PPO pass on each (``...-ppo.json``: gold utility of its samples).
- ``kl-sweep``: short PPO runs with fixed betas and the adaptive controller; each run's
  trajectory of exact (sqrt(KL to the base), expected gold) points on the oracle's queries and
  support (``sandbox.oracle.OracleTables.point``, as the demo's PPO passes) against the oracle
  frontier (gold-tilted base model) on the same support, plus sampled gold with CIs per row.
- ``margin``: the same labels, reward models with margin presets on and off; gold accuracy and
  held-out accuracy (on the raters' own labels) with Wilson 95% intervals.

Work (reward models, PPO runs) is cached under ``RUN/experiments/work/`` by a hash
of everything that determines it, so a re-run resumes and two experiments share a reward model
trained on the same labels. See docs/experiments.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from preflab.config import check, field_doc, to_dict
from preflab.pipeline import format_prompt, write_json
from preflab.quality.paired import mean_ci, paired_diff

EXPERIMENTS = ("consistency-vs-volume", "kl-sweep", "margin", "learning-curve")


@dataclass
class ExperimentConfig:
    """Sandbox what-if experiments; defaults run each in minutes on 2 CPU cores."""

    run: str = field_doc("runs/experiments", "Run directory; plots go to RUN/experiments/<name>.json.")
    base: str = field_doc("", "Base model dir (a built sandbox model); empty: RUN/base, built there if missing.")
    seed: int = field_doc(0, "Seed of raters, pairs, training and sampling.")
    rubric: str = field_doc("v2", "Rubric the simulated raters judge under (v1: prices judged from memory of the old list).")
    pairs: int = field_doc(200, "N: pairs labelled by the 5 calibrated raters (the story: 6,000; --full).")
    volume_ratio: int = field_doc(10, "The crowd labels volume_ratio x N pairs (the story: 10).")
    crowd_raters: int = field_doc(50, "Uncalibrated raters in the crowd (the story: 50).")
    lapse: float = field_doc(0.12, "Added to every rater's lapse rate at collection volume (as in the demo).")
    eval_pairs: int = field_doc(400, "Held-out pairs (held-out queries) for gold / held-out RM accuracy.")
    rm_epochs: int = field_doc(1, "Reward-model epochs.")
    rm_lr: float = field_doc(1e-4, "Reward-model learning rate.")
    rm_batch: int = field_doc(16, "Reward-model pairs per step.")
    margin: str = field_doc("llama2_small", "Margin preset of the reward models in consistency-vs-volume and kl-sweep.")
    margins: list[str] = field_doc(["none", "llama2_small"], "margin experiment: presets compared.")
    curve_sizes: list[int] = field_doc([250, 500, 1000, 2000], "learning-curve: calibrated pairs per reward model, "
                                                               "ascending (each set contains the smaller ones).")
    ppo_steps: int = field_doc(12, "PPO iterations per run.")
    ppo_prompts: int = field_doc(16, "Prompts per PPO rollout batch.")
    ppo_lr: float = field_doc(1e-4, "PPO policy learning rate (the demo's).")
    ppo_eval_every: int = field_doc(4, "Gold + KL measured on held-out queries every N PPO steps.")
    cv_ppo: bool = field_doc(True, "consistency-vs-volume: also run a short PPO pass on each reward model.")
    cv_beta: float = field_doc(0.02, "consistency-vs-volume PPO: initial beta (adaptive controller, as the demo).")
    betas: list[float] = field_doc([0.005, 0.02, 0.1, 0.5], "kl-sweep: fixed KL penalties.")
    adaptive_beta: float = field_doc(0.02, "kl-sweep: initial beta of the adaptive run.")
    kl_target: float = field_doc(4.0, "Adaptive controller's KL target (nats per response).")
    eval_queries: int = field_doc(64, "Held-out queries sampled to measure gold utility and KL.")
    oracle_queries: int = field_doc(32, "Held-out queries the oracle frontier enumerates (144 answers each).")
    oracle_other_samples: int = field_doc(16, "Samples per oracle query that estimate the gold of text outside the "
                                              "enumerated answers (kept as one more outcome, as in the demo).")
    max_new_tokens: int = field_doc(0, "Longest sampled response (0: the base build's longest response + 8, else 96).")
    threads: int = field_doc(1, "torch CPU threads (1 wastes least on a busy machine; 0: torch's default).")
    progress: bool = field_doc(True, "Show the trainers' progress bars.")

    def validate(self) -> None:
        w = "ExperimentConfig"
        for name in ("pairs", "volume_ratio", "crowd_raters", "eval_pairs", "rm_epochs", "rm_batch", "ppo_steps",
                     "ppo_prompts", "ppo_eval_every", "eval_queries", "oracle_queries", "oracle_other_samples"):
            check(getattr(self, name) >= 1, f"{w}.{name}", "must be >= 1")
        check(self.rubric in ("v1", "v2"), f"{w}.rubric", f"must be v1 or v2, got {self.rubric!r}")
        check(0 <= self.lapse < 0.45, f"{w}.lapse", "must be in [0, 0.45)")
        check(self.rm_lr > 0 and self.ppo_lr > 0, f"{w}.rm_lr/ppo_lr", "must be > 0")
        check(self.cv_beta >= 0 and self.adaptive_beta >= 0, f"{w}.cv_beta/adaptive_beta", "must be >= 0")
        check(self.kl_target > 0, f"{w}.kl_target", "must be > 0")
        check(self.threads >= 0 and self.max_new_tokens >= 0, f"{w}.threads/max_new_tokens", "must be >= 0")
        check(all(b >= 0 for b in self.betas), f"{w}.betas", f"must all be >= 0, got {self.betas}")
        from preflab.losses.bradley_terry import MARGIN_PRESETS

        for m in (self.margin, *self.margins):
            check(m in MARGIN_PRESETS, f"{w}.margin(s)", f"unknown preset {m!r} (known: {', '.join(MARGIN_PRESETS)})")
        check(len(self.margins) >= 1, f"{w}.margins", "must name at least one preset")
        check(len(self.curve_sizes) >= 1 and all(n >= 1 for n in self.curve_sizes)
              and list(self.curve_sizes) == sorted(set(self.curve_sizes)), f"{w}.curve_sizes",
              f"must be ascending pair counts >= 1, got {self.curve_sizes}")

    def __post_init__(self) -> None:
        self.validate()

    def full(self) -> ExperimentConfig:
        """The story's scale: 6,000 calibrated pairs against 60,000 crowd pairs (hours on a CPU)."""
        return replace(self, pairs=6000, volume_ratio=10, crowd_raters=50, eval_pairs=1000, ppo_steps=60,
                       ppo_prompts=32, ppo_eval_every=20, eval_queries=200,
                       curve_sizes=[750, 1500, 3000, 6000, 12000, 24000])


# ---- small pure helpers -----------------------------------------------------------------------


def wilson(successes: int, n: int) -> list[float]:
    """Wilson 95% interval of a share (evaluate.ab.wilson_interval)."""
    from preflab.evaluate.ab import wilson_interval

    return list(wilson_interval(float(successes), n)) if n else [math.nan, math.nan]


def _pts(p: dict) -> str:
    """A paired difference of two shares in percentage points, with its interval: "+0.8 points [-3.5, +5.1]"."""
    return f"{100 * p['diff']:+.1f} points [{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}]"


def _verdict(p: dict) -> str:
    lo, hi = p["ci"]
    return "this scale cannot tell them apart" if lo <= 0 <= hi else "the difference is clear at this scale"


def _key(label: str, params: dict) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{label}-{h}"


def label_pairs(pool, pairs, *, rubric: str, seed: int, tag: str):
    """Each pair judged once by a random rater of ``pool`` on random screen sides.

    Returns ``PreferenceExample`` rows (prompt = the raw query; ties kept with ``is_tie``) in
    the order of ``pairs``; the chosen side of a tie is the pair's first text.
    """
    from preflab.train.data import PreferenceExample

    rng = random.Random(f"experiment-labels:{tag}:{seed}")
    out = []
    for i, (q, first, second) in enumerate(pairs):
        rater = pool[rng.randrange(len(pool))]
        swap = rng.random() < 0.5
        a, b = (second, first) if swap else (first, second)
        j = rater.judge(q, a, b, rubric=rubric, rng=rng)
        tie = j.choice == "tie"
        chosen = first if tie else (a if j.choice == "a" else b)
        rejected = second if chosen == first else first
        out.append(PreferenceExample(pair_id=f"{tag}-{i:06d}", prompt=q.text, chosen=chosen, rejected=rejected,
                                     strength=j.strength, rater=rater.name, topic=q.topic, is_tie=tie))
    return out


# ---- the shared context: base model, pools, held-out material ---------------------------------


class Lab:
    """One experiment run: where things go, the base model, cached reward models and PPO runs."""

    def __init__(self, cfg: ExperimentConfig, console: Console) -> None:
        self.cfg, self.console = cfg, console
        self.run = Path(cfg.run)
        self.work = self.run / "experiments" / "work"
        self._tables = None  # the oracle's support, built on first use (oracle_tables)
        self.base = Path(cfg.base) if cfg.base else self.run / "base"
        if cfg.base and not (self.base / "config.json").is_file():
            from preflab.config import ConfigError

            raise ConfigError(f"--base {cfg.base}: not a model directory (no config.json)")
        if not cfg.base:
            from preflab.sandbox.build import BuildConfig, build_sandbox_model
            from preflab.train.sft import train_sft

            build_sandbox_model(BuildConfig(seed=cfg.seed, progress=cfg.progress), self.base, train_sft=train_sft)
        # reward models read prompt + response up to the demo's 160 tokens, within the model's positions
        n_pos = json.loads((self.base / "config.json").read_text()).get("n_positions", 160)
        self.max_length = min(160, int(n_pos))
        if not cfg.max_new_tokens:
            build = self.base / "build.json"
            longest = json.loads(build.read_text()).get("max_response_tokens") if build.is_file() else None
            self.cfg = cfg = replace(cfg, max_new_tokens=longest + 8 if longest else 96)

    # ---- raters and pairs
    def pool(self, kind: str):
        """'calibrated': the demo's five senior agents after the workshop; 'crowd': uncalibrated."""
        from preflab.demo import DemoConfig, _pool
        from preflab.sandbox.raters import uncalibrated_pool

        pool = (_pool(DemoConfig(seed=self.cfg.seed), calibrated=True) if kind == "calibrated"
                else uncalibrated_pool(self.cfg.crowd_raters, self.cfg.seed + 1))
        for r in pool:  # at volume raters lapse more often than in the careful workshop (demo.stage_collection)
            r.flip_rate = min(0.45, r.flip_rate + self.cfg.lapse)
        return pool

    def labels(self, kind: str, n: int):
        from preflab.sandbox.raters import sft_style_pairs

        salt = 0 if kind == "calibrated" else 1
        pairs = sft_style_pairs(n, seed=self.cfg.seed * 1000 + salt, split="train")
        return pairs, label_pairs(self.pool(kind), pairs, rubric=self.cfg.rubric, seed=self.cfg.seed, tag=kind)

    def heldout(self, kind: str):
        """Held-out pairs (held-out queries) and the ``kind`` pool's labels on them."""
        from preflab.sandbox.raters import sft_style_pairs

        pairs = sft_style_pairs(self.cfg.eval_pairs, seed=self.cfg.seed * 1000 + 7, split="heldout")
        return pairs, label_pairs(self.pool(kind), pairs, rubric=self.cfg.rubric, seed=self.cfg.seed + 99,
                                  tag=f"heldout-{kind}")

    def eval_queries(self):
        from preflab.sandbox.domain import generate_queries

        qs = generate_queries(self.cfg.eval_queries * 2, seed=self.cfg.seed * 7919 + 23, split="heldout")
        return list({q.id: q for q in qs}.values())[: self.cfg.eval_queries]

    def oracle_tables(self):
        """The oracle's support (every answer to the first ``oracle_queries`` held-out queries under the
        base, plus the base's mass outside them), built once: PPO runs' exact points and the frontier."""
        if self._tables is None:
            from preflab.models.hf import load_policy
            from preflab.sandbox.oracle import OracleTables

            c = self.cfg
            model, tok = load_policy(self.base)
            self._tables = OracleTables(model, tok, self.eval_queries()[: c.oracle_queries],
                                        other_samples=c.oracle_other_samples, max_new_tokens=c.max_new_tokens,
                                        seed=c.seed)
        return self._tables

    # ---- reward models
    def reward_model(self, label: str, examples, *, margin: str) -> Path:
        """Train (or reuse) a reward model from the base model's weights; returns its HF dir."""
        from preflab.train.reward import RewardConfig, initial_reward_model, train_reward

        c = self.cfg
        params = {"base": str(self.base.resolve()), "margin": margin, "epochs": c.rm_epochs, "lr": c.rm_lr,
                  "batch": c.rm_batch, "seed": c.seed,
                  "data": hashlib.sha256("\n".join(f"{e.prompt}|{e.chosen}|{e.rejected}|{e.strength}|{e.is_tie}"
                                                   for e in examples).encode()).hexdigest()}
        d = self.work / "rm" / _key(label, params)
        if (d / "done.json").is_file():
            self.console.print(f"  [dim]reward model {label}: cached ({d})[/dim]")
            return d / "model"
        self.console.print(f"  reward model {label}: {len(examples):,} pairs, margin {margin}")
        rc = RewardConfig(lr=c.rm_lr, batch_size=c.rm_batch, epochs=c.rm_epochs, margin=margin, seed=c.seed,
                          eval_every=0, checkpoint_every=100, max_length=self.max_length)
        model, tok = initial_reward_model(self.base, seed=c.seed)
        t0 = time.perf_counter()
        train_reward(rc, model=model, tokenizer=tok, train=examples, val=[], run_dir=d, resume=True,
                     show_progress=c.progress)
        write_json(d / "done.json", {**params, "pairs": len(examples), "seconds": time.perf_counter() - t0})
        return d / "model"

    def rm_accuracy(self, model_dir: Path, pairs, labels) -> dict[str, Any]:
        """Gold accuracy (truth.reward_model_truth) and accuracy on the raters' held-out labels.

        ``gold_hits`` / ``heldout_hits``: per pair 1/0 (None: no gold difference / a tie label),
        for paired comparisons of two reward models on the same pairs (``paired_diff``)."""
        from preflab.models.hf import load_reward_model
        from preflab.sandbox.truth import reward_model_truth
        from preflab.train.data import PreferenceExample
        from preflab.train.reward import score_pairs

        model, tok = load_reward_model(model_dir)
        ex = [PreferenceExample(pair_id=str(i), prompt=q.text, chosen=a, rejected=b) for i, (q, a, b) in enumerate(pairs)]
        rc, rr = score_pairs(model, tok, ex, max_length=self.max_length)
        gold_hits: list[float | None] = []
        for (q, a, b), x, y in zip(pairs, rc, rr, strict=True):
            try:
                gold_hits.append(reward_model_truth("rm", [(q, a, b, x - y)])["gold_accuracy"])
            except ValueError:  # no gold difference between the two texts
                gold_hits.append(None)
        score = {(q.id, a): x for (q, a, _), x in zip(pairs, rc, strict=True)}
        score.update({(q.id, b): y for (q, _, b), y in zip(pairs, rr, strict=True)})
        heldout_hits = [None if e.is_tie else float(score[(q.id, e.chosen)] > score[(q.id, e.rejected)])
                        for (q, _, _), e in zip(pairs, labels, strict=True)]
        g = [h for h in gold_hits if h is not None]
        m = [h for h in heldout_hits if h is not None]
        return {"gold_accuracy": sum(g) / len(g) if g else math.nan, "gold_ci": wilson(int(sum(g)), len(g)),
                "n_gold": len(g), "heldout_accuracy": sum(m) / len(m) if m else math.nan,
                "heldout_ci": wilson(int(sum(m)), len(m)), "n_heldout": len(m),
                "gold_hits": gold_hits, "heldout_hits": heldout_hits}

    # ---- policies
    def measure_policy(self, model, ref, tok, queries, *, name: str) -> dict[str, Any]:
        """Gold utility of samples on held-out queries and KL(policy || base) per response, with 95% CIs.

        KL is estimated from the samples themselves: mean over responses of
        sum_t [log pi(y_t | .) - log pi_ref(y_t | .)] (an unbiased estimate of KL(pi || pi_ref))."""
        import torch

        from preflab.models.sampling import sample, sequence_logprobs
        from preflab.sandbox.truth import policy_truth

        gen = torch.Generator().manual_seed(self.cfg.seed + 4242)
        texts, kls = [], []
        prompts = [format_prompt(q.text) for q in queries]
        with torch.no_grad():
            for i in range(0, len(prompts), 32):
                s = sample(model, tok, prompts[i: i + 32], max_new_tokens=self.cfg.max_new_tokens, generator=gen)
                if model is ref:  # exactly 0 (cached vs full forward differ by float noise only)
                    kls += [0.0] * len(s.texts)
                else:
                    ref_lp = sequence_logprobs(ref, s.input_ids, s.attention_mask, s.prompt_len)  # (B, R)
                    kls += ((s.logprobs - ref_lp) * s.response_mask.float()).sum(-1).tolist()
                texts += [t.strip() for t in s.texts]
        t = policy_truth(name, queries, texts)
        kl, kl_ci = mean_ci(kls)
        return {"gold": t["gold_utility"], "gold_ci": t["gold_utility_ci"], "kl": kl, "kl_ci": kl_ci,
                "sqrt_kl": math.sqrt(max(kl, 0.0)), "correct_rate": t["correct_rate"],
                "confident_wrong_rate": t["confident_wrong_rate"], "unparseable_rate": t["unparseable_rate"],
                "n": len(texts)}

    def base_point(self) -> dict[str, Any]:
        p = self.work / "base_point.json"
        key = {"base": str(self.base.resolve()), "seed": self.cfg.seed, "n": self.cfg.eval_queries,
               "max_new_tokens": self.cfg.max_new_tokens}
        if p.is_file() and json.loads(p.read_text()).get("key") == key:
            return json.loads(p.read_text())["point"]
        from preflab.models.hf import load_policy

        model, tok = load_policy(self.base)
        pt = {"step": 0, **self.measure_policy(model, model, tok, self.eval_queries(), name="base")}
        write_json(p, {"key": key, "point": pt})
        return pt

    def ppo(self, label: str, rm_dir: Path, *, controller: str, beta: float, oracle: bool = False) -> dict[str, Any]:
        """A short PPO run from the base model against ``rm_dir``; gold + KL at every eval step, and with
        ``oracle`` the exact point on the oracle's support (``oracle_kl``, ``oracle_gold``, ``oracle_other_mass``)."""
        from preflab.models.hf import load_policy
        from preflab.sandbox.domain import generate_queries
        from preflab.train.ppo import PPOConfig, train_ppo

        c = self.cfg
        pc = PPOConfig(seed=c.seed, steps=c.ppo_steps, prompts_per_step=c.ppo_prompts, max_new_tokens=c.max_new_tokens,
                       lr=c.ppo_lr, kl_beta=beta, kl_controller=controller, kl_target=c.kl_target,
                       checkpoint_every=c.ppo_eval_every, minibatch_size=16, ppo_epochs=2, cpu=True,
                       progress=c.progress, keep_last=1)
        params = {"rm": str(Path(rm_dir).resolve()), "ppo": to_dict(pc), "base": str(self.base.resolve()),
                  "eval_queries": c.eval_queries, **({"oracle": [c.oracle_queries, c.oracle_other_samples]} if oracle else {})}
        d = self.work / "ppo" / _key(label, params)
        if (d / "result.json").is_file():
            self.console.print(f"  [dim]PPO {label}: cached ({d})[/dim]")
            return json.loads((d / "result.json").read_text())
        again = " (resuming from its last checkpoint)" if (d / "ckpt").is_dir() else ""
        self.console.print(f"  PPO {label}: {c.ppo_steps} steps x {c.ppo_prompts} prompts, {controller} beta {beta:g}"
                           + again)
        from preflab.pipeline import reward_fn_from

        policy, tok = load_policy(self.base)
        ref, _ = load_policy(self.base)
        queries = self.eval_queries()

        tables = self.oracle_tables() if oracle else None

        def eval_hook(step: int, model) -> dict:
            pt = self.measure_policy(model, ref, tok, queries, name=label)
            if tables is not None:  # exact, on the oracle frontier's queries and support
                pt.update({f"oracle_{k}": v for k, v in tables.point(model).items()})
            return pt

        train_q = generate_queries(c.ppo_steps * c.ppo_prompts, seed=c.seed + 101, split="train")
        t0 = time.perf_counter()
        res = train_ppo(pc, policy=policy, ref=ref, tokenizer=tok, reward_fn=reward_fn_from(rm_dir, max_length=self.max_length),
                        prompts=[format_prompt(q.text) for q in train_q], run_dir=d, eval_hook=eval_hook, resume=True)
        expected = sorted({*range(pc.checkpoint_every, pc.steps + 1, pc.checkpoint_every), pc.steps})
        missing = [n for n in expected if not (d / "eval" / f"step_{n:06d}.json").is_file()]
        if missing:  # a run interrupted by an older preflab, between a checkpoint and its evaluation
            raise ValueError(f"PPO {label}: no evaluation at step(s) {', '.join(map(str, missing))} in {d / 'eval'} "
                             f"(an interrupted run); delete {d} and run the experiment again")
        points = [json.loads((d / "eval" / f"step_{n:06d}.json").read_text()) for n in expected]
        last = res.metrics[-1] if res.metrics else {}
        out = {"label": label, "controller": controller, "beta_start": beta, "beta_final": last.get("objective/beta"),
               "train_kl_final": last.get("objective/kl"), "rm_score_final": last.get("objective/scores"),
               "points": [self.base_point(), *points], "seconds": time.perf_counter() - t0}
        write_json(d / "result.json", out)
        return out


# ---- the experiments --------------------------------------------------------------------------


def _bar(label: str, value: float, ci: Sequence[float], n: int) -> dict:
    return {"label": label, "value": value, "ci": list(ci), "n": n}


def _scale(cfg: ExperimentConfig, lab: Lab) -> dict:
    build = lab.base / "build.json"
    return {"pairs": cfg.pairs, "volume_ratio": cfg.volume_ratio, "eval_pairs": cfg.eval_pairs,
            "ppo_steps": cfg.ppo_steps, "ppo_prompts": cfg.ppo_prompts, "eval_queries": cfg.eval_queries,
            "rm_epochs": cfg.rm_epochs, "rubric": cfg.rubric, "seed": cfg.seed, "base": str(lab.base),
            "base_parameters": json.loads(build.read_text()).get("parameters") if build.is_file() else None}


def consistency_vs_volume(lab: Lab) -> list[Path]:
    from preflab.sandbox.truth import reward_model_truth

    c = lab.cfg
    n_crowd = c.pairs * c.volume_ratio
    arms = [("calibrated", f"5 calibrated x {c.pairs:,}", c.pairs),
            ("crowd", f"{c.crowd_raters} uncalibrated x {n_crowd:,}", n_crowd)]
    rows = []
    for kind, label, n in arms:
        pairs, ex = lab.labels(kind, n)
        # how good the labels were: share of strict labels that agree with gold (margin +1 = "chosen wins")
        lt = reward_model_truth(kind, [(q, e.chosen, e.rejected, 1.0) for (q, _, _), e in zip(pairs, ex, strict=True)
                                       if not e.is_tie])
        rm = lab.reward_model(f"cv-{kind}-{n}", ex, margin=c.margin)
        hp, hl = lab.heldout(kind)
        acc = lab.rm_accuracy(rm, hp, hl)
        row = {"arm": kind, "label": label, "pairs": n, "ties": sum(e.is_tie for e in ex),
               "label_gold_agreement": lt["gold_accuracy"], "label_gold_ci": wilson(round(lt["gold_accuracy"] * lt["n"]), lt["n"]), "n_label": lt["n"],
               **acc, "rm_dir": str(rm)}
        if c.cv_ppo:
            r = lab.ppo(f"cv-{kind}", rm, controller="adaptive", beta=c.cv_beta)
            row["ppo"] = {k: r["points"][-1][k] for k in ("gold", "gold_ci", "kl", "kl_ci", "sqrt_kl", "correct_rate")}
            row["ppo_base"] = {k: r["points"][0][k] for k in ("gold", "gold_ci")}
        rows.append(row)
        lab.console.print(f"  {label}: labels agree with gold {row['label_gold_agreement']:.3f}, RM gold accuracy "
                          f"{row['gold_accuracy']:.3f} [{row['gold_ci'][0]:.3f}, {row['gold_ci'][1]:.3f}]")
    cal, crowd = rows
    pd = paired_diff(crowd.pop("gold_hits"), cal.pop("gold_hits"))
    for r in rows:
        r.pop("heldout_hits")
    notes = (f"Scale: {c.pairs:,} calibrated pairs vs {n_crowd:,} crowd pairs (the story: 6,000 vs 60,000; "
             f"ratio kept), one label per pair, rubric {c.rubric}, reward models {c.rm_epochs} epoch(s) from the "
             f"base model (so the crowd's RM also takes {c.volume_ratio}x the optimiser steps). Gold accuracy on {cal['n_gold']} held-out pairs: calibrated {cal['gold_accuracy']:.1%}, "
             f"crowd {crowd['gold_accuracy']:.1%}; paired difference crowd - calibrated {_pts(pd)}: "
             f"{_verdict(pd)}. Labels agreeing "
             f"with gold: calibrated {cal['label_gold_agreement']:.1%}, crowd {crowd['label_gold_agreement']:.1%}.")
    bars = [_bar(f"RM gold acc\n{r['label']}", r["gold_accuracy"], r["gold_ci"], r["n_gold"]) for r in rows]
    bars += [_bar(f"labels = gold\n{r['label']}", r["label_gold_agreement"], r["label_gold_ci"], r["n_label"])
             for r in rows]
    out_dir = lab.run / "experiments"
    headline = (f"rater consistency vs volume: crowd - calibrated reward-model gold accuracy {_pts(pd)} "
                f"({_verdict(pd)})")
    paths = [write_json(out_dir / "consistency-vs-volume.json", {
        "title": "Rater consistency vs volume: reward-model gold accuracy", "kind": "bars", "y_label": "share",
        "headline": headline, "notes": notes, "bars": bars, "rows": rows, "gold_accuracy_diff": pd, "scale": _scale(c, lab),
        "simulated": True})]
    if c.cv_ppo:
        base = cal["ppo_base"]
        pb = [_bar("SFT (base)", base["gold"], base["gold_ci"], c.eval_queries)]
        pb += [_bar(f"PPO on RM of\n{r['label']}\nKL {r['ppo']['kl']:.2f}", r["ppo"]["gold"], r["ppo"]["gold_ci"],
                    c.eval_queries) for r in rows]

        def kl(r: dict) -> str:
            lo, hi = r["ppo"].get("kl_ci") or (math.nan, math.nan)
            return f"KL {r['ppo']['kl']:.2f} [{lo:.2f}, {hi:.2f}]"

        pnotes = (f"Gold utility of samples on {c.eval_queries} held-out queries after {c.ppo_steps} PPO steps x "
                  f"{c.ppo_prompts} prompts (adaptive KL, beta from {c.cv_beta:g}) on each reward model: base "
                  f"{base['gold']:.3f}, calibrated {cal['ppo']['gold']:.3f} ({kl(cal)}), crowd "
                  f"{crowd['ppo']['gold']:.3f} ({kl(crowd)}; nats per response, sampled, with 95% intervals).")
        if max(cal["ppo"]["kl"], crowd["ppo"]["kl"]) < 0.5:
            pnotes += " Both policies stayed within 0.5 nats of the base: too short a pass to separate the reward models."
        paths.append(write_json(out_dir / "consistency-vs-volume_ppo.json", {
            "title": "Rater consistency vs volume: gold utility after a short PPO pass", "kind": "bars",
            "y_label": "gold utility", "headline": f"after a short PPO pass, gold utility: base {base['gold']:.3f}, "
            f"calibrated {cal['ppo']['gold']:.3f} ({kl(cal)}), crowd {crowd['ppo']['gold']:.3f} ({kl(crowd)})",
            "notes": pnotes, "bars": pb, "simulated": True}))
    return paths


def kl_sweep(lab: Lab) -> list[Path]:
    import numpy as np

    c = lab.cfg
    pairs, ex = lab.labels("calibrated", c.pairs)
    rm = lab.reward_model(f"cv-calibrated-{c.pairs}", ex, margin=c.margin)
    runs = [lab.ppo(f"beta-{b:g}", rm, controller="fixed", beta=b, oracle=True) for b in c.betas]
    runs.append(lab.ppo("adaptive", rm, controller="adaptive", beta=c.adaptive_beta, oracle=True))

    # the oracle: the base model tilted by gold over the same support the runs' points are measured on
    tables = lab.oracle_tables()
    fr = tables.frontier("gold")
    start = float(fr.gold[int(fr.kl.argmin())])  # the frontier's origin: the base's own expected gold

    series, rows = [], []
    # the base point as measured now (shared by every run); on the oracle's support it is the origin
    base_pt = {**lab.base_point(), "oracle_kl": 0.0, "oracle_gold": tables.reference_gold}
    for r in runs:
        pts = [base_pt, *r["points"][1:]]
        name = f"beta={r['beta_start']:g}" if r["controller"] == "fixed" else (
            f"adaptive (target {c.kl_target:g}, beta {r['beta_start']:g}->{r['beta_final']:.3g})")
        series.append({"label": name, "x": [math.sqrt(max(p["oracle_kl"], 0.0)) for p in pts],
                       "y": [p["oracle_gold"] for p in pts]})
        last = pts[-1]
        okl = max(last["oracle_kl"], 0.0)
        rows.append({"run": name, "controller": r["controller"], "beta_start": r["beta_start"],
                     "beta_final": r["beta_final"], "oracle_kl": last["oracle_kl"], "sqrt_oracle_kl": math.sqrt(okl),
                     "oracle_gold": last["oracle_gold"], "oracle_other_mass": last["oracle_other_mass"],
                     "oracle_gold_at_kl": float(fr.gold_at_kl(okl)),
                     "fraction_of_oracle_gain": (float(fr.fraction_of_gain(okl, last["oracle_gold"])) if fr.gold_at_kl(okl) - start >= 0.01
                                                 else None),
                     "kl": last["kl"], "kl_ci": last["kl_ci"], "sqrt_kl": last["sqrt_kl"],
                     "gold": last["gold"], "gold_ci": last["gold_ci"], "rm_score_final": r["rm_score_final"]})
    xmax = max([*(max(s["x"]) for s in series), 0.1]) * 1.25
    keep = [i for i in np.argsort(fr.sqrt_kl) if fr.sqrt_kl[i] <= xmax]
    series.append({"label": "oracle frontier (gold-tilted base)", "reference": True,
                   "x": [float(fr.sqrt_kl[i]) for i in keep], "y": [float(fr.gold[i]) for i in keep]})
    # the run nearest the frontier: the largest share of the oracle's gain at its own KL (raw gold would
    # favour whichever run drifted furthest); runs within a point of it are named as indistinguishable
    ranked = sorted(rows, key=lambda r: -(r["fraction_of_oracle_gain"] if r["fraction_of_oracle_gain"] is not None
                                          else -math.inf))
    best = ranked[0]
    ties = [r["run"] for r in ranked[1:] if best["fraction_of_oracle_gain"] is not None
            and r["fraction_of_oracle_gain"] is not None
            and best["fraction_of_oracle_gain"] - r["fraction_of_oracle_gain"] < 0.01]
    notes = (f"Scale: {c.ppo_steps} PPO steps x {c.ppo_prompts} prompts per run, reward model from {c.pairs:,} "
             f"calibrated pairs. Each point is exact on the oracle's {c.oracle_queries} held-out queries: the "
             f"policy's KL to the base and expected gold over every enumerated answer, its mass outside them "
             f"({c.oracle_other_samples} samples per query) one more outcome, the frontier on the same support "
             f"(start: gold {start:.3f}). Closest to the oracle (the largest share of its gain at the run's own "
             f"KL): {best['run']} at sqrt(KL) {best['sqrt_oracle_kl']:.2f}, gold {best['oracle_gold']:.3f} against "
             f"the oracle's {best['oracle_gold_at_kl']:.3f} at that KL"
             + (f" ({best['fraction_of_oracle_gain']:.0%} of its gain)" if best["fraction_of_oracle_gain"] is not None
                else " (the oracle gains nothing at that KL)")
             + (f"; within a point of it, indistinguishable: {', '.join(ties)}. " if ties else ". ")
             + "; ".join(f"{r['run']}: sqrt(KL) {r['sqrt_oracle_kl']:.2f}, gold {r['oracle_gold']:.3f} "
                         f"(sampled on {c.eval_queries} queries: {r['gold']:.3f} "
                         f"[{r['gold_ci'][0]:.3f}, {r['gold_ci'][1]:.3f}]), last RM score {r['rm_score_final']:.2f}"
                         for r in rows)
             + ". RM score up while gold falls below the base is reward hacking: the proxy, not the policy, improved.")
    headline = (f"KL sweep: closest to the oracle frontier {best['run']}"
                + (f", {best['fraction_of_oracle_gain']:.0%} of its gain at sqrt(KL) {best['sqrt_oracle_kl']:.2f}"
                   if best["fraction_of_oracle_gain"] is not None else "")
                + (f" (indistinguishable: {', '.join(ties)})" if ties else ""))
    return [write_json(lab.run / "experiments" / "kl-sweep.json", {
        "title": "KL penalty sweep: gold utility vs sqrt(KL) against the oracle frontier", "kind": "lines",
        "headline": headline,
        "x_label": "sqrt(KL to the base model), nats^0.5 per response (oracle queries, exact)",
        "y_label": "expected gold utility (oracle queries, exact)",
        "notes": notes, "series": series, "rows": rows, "scale": _scale(c, lab), "simulated": True})]


def margin(lab: Lab) -> list[Path]:
    c = lab.cfg
    pairs, ex = lab.labels("calibrated", c.pairs)
    hp, hl = lab.heldout("calibrated")
    rows = []
    for m in c.margins:
        name = f"cv-calibrated-{c.pairs}" if m == c.margin else f"margin-{m}-{c.pairs}"
        rm = lab.reward_model(name, ex, margin=m)
        rows.append({"margin": m, **lab.rm_accuracy(rm, hp, hl), "rm_dir": str(rm)})
        lab.console.print(f"  margin {m}: gold accuracy {rows[-1]['gold_accuracy']:.3f}, held-out accuracy "
                          f"{rows[-1]['heldout_accuracy']:.3f}")
    first = rows[0]
    paired = []
    for r in rows[1:]:  # each preset against the first, on the same pairs
        r["paired_vs"] = first["margin"]
        r["gold_diff"] = g = paired_diff(r["gold_hits"], first["gold_hits"])
        r["heldout_diff"] = h = paired_diff(r["heldout_hits"], first["heldout_hits"])
        paired.append(f"Paired, margin {r['margin']} - {first['margin']}: gold {_pts(g)} ({_verdict(g)}), "
                      f"held-out {_pts(h)}.")
    for r in rows:
        r.pop("gold_hits"), r.pop("heldout_hits")
    bars = [_bar(f"gold acc\nmargin {r['margin']}", r["gold_accuracy"], r["gold_ci"], r["n_gold"]) for r in rows]
    bars += [_bar(f"held-out acc\nmargin {r['margin']}", r["heldout_accuracy"], r["heldout_ci"], r["n_heldout"])
             for r in rows]
    notes = (f"Scale: the same {c.pairs:,} pairs labelled by the 5 calibrated raters (with their stated strength), "
             f"one reward model per margin preset, {c.rm_epochs} epoch(s). Gold accuracy on {first['n_gold']} "
             f"held-out pairs; held-out accuracy on the raters' own labels of the same pairs "
             f"({first['n_heldout']} non-tie). "
             + "; ".join(f"margin {r['margin']}: gold {r['gold_accuracy']:.1%} [{r['gold_ci'][0]:.1%}, "
                         f"{r['gold_ci'][1]:.1%}], held-out {r['heldout_accuracy']:.1%}" for r in rows)
             + ". " + " ".join(paired))
    headline = "margin on/off: " + ("; ".join(
        f"{r['margin']} - {first['margin']} gold accuracy {_pts(r['gold_diff'])} ({_verdict(r['gold_diff'])})"
        for r in rows[1:]) or f"{first['margin']} alone, gold accuracy {first['gold_accuracy']:.1%}")
    return [write_json(lab.run / "experiments" / "margin.json", {
        "title": "Margin on/off: reward-model accuracy", "kind": "bars", "y_label": "accuracy", "headline": headline,
        "notes": notes, "bars": bars, "rows": rows, "scale": _scale(c, lab), "simulated": True})]


def learning_curve(lab: Lab) -> list[Path]:
    """Reward models on nested sets of 250 ... 2,000 calibrated pairs (the story's scale: 750 ... 24,000), each
    scored on the same held-out labels beside the duplicate ceiling of those raters, and against gold."""
    from preflab.evaluate.curve import CurveConfig, describe
    from preflab.evaluate.curve import learning_curve as run_curve
    from preflab.quality.consistency import self_consistency
    from preflab.sandbox.truth import label_ceiling
    from preflab.train.reward import RewardConfig

    c = lab.cfg
    pairs, ex = lab.labels("calibrated", c.curve_sizes[-1])
    hp, hl = lab.heldout("calibrated")
    # planted duplicates: each held-out pair judged again by the same rater, sides swapped, later
    pool = {r.name: r for r in lab.pool("calibrated")}
    rng = random.Random(f"experiment-duplicates:{c.seed}")
    answers = []
    for (q, first, second), e in zip(hp, hl, strict=True):
        j = pool[e.rater].judge(q, second, first, rubric=c.rubric, rng=rng)
        again = "tie" if j.choice == "tie" else (second if j.choice == "a" else first)
        answers.append(("tie" if e.is_tie else e.chosen, again))
    dup = self_consistency(answers)
    best = label_ceiling([(q, e.chosen, e.rejected, pool[e.rater], c.rubric)
                          for (q, _, _), e in zip(hp, hl, strict=True) if not e.is_tie])
    rc = RewardConfig(lr=c.rm_lr, batch_size=c.rm_batch, epochs=c.rm_epochs, margin=c.margin, seed=c.seed,
                      eval_every=0, checkpoint_every=100, keep_checkpoints=1, max_length=lab.max_length)

    def gold(model_dir: Path) -> dict:
        acc = lab.rm_accuracy(model_dir, hp, hl)
        return {k: acc[k] for k in ("gold_accuracy", "gold_ci", "n_gold")}

    curve = run_curve(CurveConfig(sizes=[float(n) for n in c.curve_sizes], seed=c.seed), rc, start_from=lab.base,
                      train=ex, val=hl, run_dir=lab.work / "curve" / _key("calibrated", {
                          "sizes": c.curve_sizes, "rm": to_dict(rc), "base": str(lab.base.resolve()), "seed": c.seed,
                          "rubric": c.rubric, "lapse": c.lapse, "eval_pairs": c.eval_pairs}),
                      ceiling=dup.ceiling, show_progress=c.progress, log=lab.console.print, extra=gold)
    last = curve["points"][-1]
    sizes = ", ".join(f"{p['pairs']:,}" for p in curve["points"])  # as trained (the split can round a size)
    notes = (f"Reward models ({c.rm_epochs} epoch(s), lr {c.rm_lr:g}, margin {c.margin}) on nested sets of "
             f"{sizes} pairs labelled once each by the 5 calibrated raters "
             f"(rubric {c.rubric}, lapse +{c.lapse:g} at volume), scored on the same {curve['n_val']} held-out labels. "
             + " ".join(f"{s}." for s in describe(curve))
             + f" The duplicate ceiling comes from the same raters judging each held-out pair again ({dup.n} "
             f"duplicates, consistency {dup.consistency:.3f}); the best possible model, knowing each rater's "
             f"noise-free taste, would score {best['expected']:.3f} (expected) / {best['observed']:.3f} (on these "
             f"labels). Against gold: {last['gold_accuracy']:.1%} [{last['gold_ci'][0]:.1%}, "
             f"{last['gold_ci'][1]:.1%}] at {last['pairs']:,} pairs.")
    return [write_json(lab.run / "experiments" / "learning-curve.json", {
        "title": "Would more judgements help? Reward-model accuracy against the pairs trained on", "kind": "curve",
        "headline": f"learning curve to {last['pairs']:,} pairs: {describe(curve)[-1]}",
        "notes": notes, **{k: v for k, v in curve.items() if k != "config"}, "duplicates": dup.n,
        "best_possible": best, "scale": _scale(c, lab), "simulated": True})]


RUNNERS = {"consistency-vs-volume": consistency_vs_volume, "kl-sweep": kl_sweep, "margin": margin,
           "learning-curve": learning_curve}


def run_experiment(name: str, cfg: ExperimentConfig, *, console: Console | None = None) -> list[Path]:
    """Run (or resume) one what-if experiment; returns the plot files it wrote."""
    import torch

    from preflab.config import ConfigError

    if name not in RUNNERS:
        raise ConfigError(f"experiment: unknown name {name!r} (known: {', '.join(EXPERIMENTS)})")
    console = console or Console()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    lab = Lab(cfg, console)
    console.rule(f"[bold]experiment {name}")
    paths = RUNNERS[name](lab)
    write_json(lab.work / f"{name}.config.json", {**to_dict(lab.cfg), "seconds": round(time.perf_counter() - t0, 1)})
    return paths
