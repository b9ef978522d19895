"""A realistic run directory for report tests: every file of docs/report.md, story-shaped numbers.

Outcomes, cost and truth are produced by the real functions (simulator, comparison, ledger,
truth) at small scale; the stage files that other stages write are hand-made in their
documented shapes.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from preflab.report.cost import CostConfig, build_ledger, write_ledger
from preflab.report.outcomes import compare_versions, import_outcomes, write_comparison
from preflab.sandbox.domain import SFT_STYLE_MIX, generate_queries
from preflab.sandbox.outcomes import (
    GOOD_STYLE_MIX,
    ProductionConfig,
    simulate_production,
    style_policy,
    write_production_log,
)
from preflab.sandbox.truth import policy_truth, reward_model_truth, win_rate_truth, write_truth

RATERS = ["ana", "ben", "chloe", "dev", "eli"]
TOPICS = ["pricing", "billing", "account", "technical", "cancellation"]


def _w(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _ppo_metrics(path: Path, *, seed: int, final_gold: float, beta0: float) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    beta = beta0
    with path.open("w") as f:
        for step in range(0, 2001, 100):
            t = step / 2000
            kl = 6.0 * t + rng.gauss(0, 0.1)
            if kl > 4.0:
                beta *= 1.05
            row = {"step": step, "objective/rlhf_reward": 1.6 * (1 - math.exp(-3 * t)) + rng.gauss(0, 0.05),
                   "objective/kl": max(kl, 0.0), "objective/beta": beta,
                   "gold/utility": 0.2 + (final_gold - 0.2) * (1 - math.exp(-3 * t)) + rng.gauss(0, 0.03)}
            f.write(json.dumps(row) + "\n")


def make_run_dir(run: Path, *, sandbox: bool = True, conversations_per_week: int = 400) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    pool = [{"id": r, "specialty": t, "temperature": 0.8 + 0.1 * i, "flip_rate": 0.08 + 0.02 * i,
             "bias": {"confidence": 0.6 - 0.1 * i, "formality": 0.1 * i}, "hourly_rate": 60,
             "drift_after": 1500 if r == "dev" else None} for i, (r, t) in enumerate(zip(RATERS, TOPICS, strict=True))]
    cfg = {"seed": 0, "store": {"url": "sqlite:///runs/demo/preflab.db"}, "rm": {"seed": 1, "margin": "llama2_small"},
           "ppo": {"seed": 2, "beta": 0.02}, "collection": {"pairs": 6000, "duplicate_rate": 0.1, "seed": 3}}
    if sandbox:
        cfg["simulated"] = ["the support domain (knowledge base, queries, response styles)",
                            "5 raters (gold utility + personal biases, Bradley-Terry noise, time on task, rationales)",
                            "production traffic: escalation, CSAT and handle time from gold utility"]
        cfg["rater_pool"] = pool
    cfg["numerics"] = [{"torch": "2.13.0", "numpy": "2.4.6", "python": "3.11.7", "cpu": "Test CPU",
                        "cpu_kernels": "AVX2", "threads": 2},
                       {"torch": "2.13.0", "numpy": "2.4.6", "python": "3.11.7", "cpu": "Test CPU",
                        "cpu_kernels": "AVX512", "threads": 2}]
    _w(run / "config.json", cfg)

    _w(run / "workshop" / "report.json", {
        "n_pairs": 50, "raters": RATERS,
        "before": {"mean_kappa": {"value": 0.54, "ci": [0.45, 0.62]}, "fleiss": {"value": 0.53, "ci": [0.44, 0.61]},
                   "alpha": {"value": 0.53, "ci": [0.44, 0.62]}},
        "after": {"mean_kappa": {"value": 0.71, "ci": [0.63, 0.78]}, "fleiss": {"value": 0.70, "ci": [0.62, 0.77]},
                  "alpha": {"value": 0.70, "ci": [0.62, 0.78]}},
        "per_rater": [{"rater": r, "before": 0.62 + 0.04 * i, "after": 0.80 + 0.02 * i} for i, r in enumerate(RATERS)],
        "moved": [{"rater": "ana", "before": 0.62, "after": 0.80, "note": "stopped rewarding confident tone"}],
    })

    rng = random.Random(1)
    _w(run / "collection" / "quality.json", {
        "n_pairs": 6000, "n_judgements": 8400, "n_duplicates": 600, "ceiling": 0.77,
        "raters": [{"rater": r, "n_duplicates": 120, "consistency": c, "ci": [c - 0.06, min(1, c + 0.05)],
                    "flip_rate": (1 - math.sqrt(2 * c - 1)) / 2, "ceiling": 1 - (1 - math.sqrt(2 * c - 1)) / 2}
                   for r, c in zip(RATERS, [0.70, 0.66, 0.74, 0.62, 0.68], strict=True)],
        "drift_alerts": [{"rater": "dev", "x": 4, "at": "week 4 (judgement 1,520)",
                          "signal": "rationales moved away from the agreed standard (permutation p=0.003); "
                                    "agreement with majority 0.78 -> 0.61",
                          "examples": ["B sounds more professional and formal.", "A is <b>too casual</b> for a customer."]}],
        "agreement_over_time": {"x_label": "week", "series": {
            r: {"x": list(range(1, 7)), "y": [0.78 + rng.gauss(0, 0.02) - (0.15 if r == "dev" and w >= 4 else 0)
                                              for w in range(1, 7)]} for r in RATERS}},
    })

    for name, acc, ceil in (("rm_v1", 0.74, 0.77), ("rm_v2", 0.76, 0.78)):
        _w(run / name / "eval.json", {
            "n": 600, "accuracy": acc, "ci": [acc - 0.035, acc + 0.034], "ceiling": ceil, "ece": 0.041,
            "by_strength": [{"strength": s, "accuracy": a, "ci": [a - 0.06, min(1, a + 0.06)], "n": 150}
                            for s, a in ((1, acc - 0.12), (2, acc), (3, acc + 0.1))],
            "by_topic": {t: {"accuracy": acc + 0.02 * (i - 2), "ci": [acc - 0.1, acc + 0.1], "n": 120}
                         for i, t in enumerate(TOPICS)},
            "warnings": [] if acc < 0.85 else ["accuracy above 85%: fitting rater quirks?"],
        })

    _ppo_metrics(run / "ppo_v1" / "metrics.jsonl", seed=1, final_gold=1.1, beta0=0.02)
    _ppo_metrics(run / "ppo_v2" / "metrics.jsonl", seed=2, final_gold=2.4, beta0=0.02)
    if sandbox:
        _w(run / "oracle.json", {"label": "best-of-n oracle frontier",
                                 "points": [{"sqrt_kl": math.sqrt(math.log(n) - (n - 1) / n), "gold": 0.2 + 0.9 * math.log(n)}
                                            for n in (1, 2, 4, 8, 16, 32)]})

    gate = {"name": "win_rate_lower_ci", "value": 0.55, "threshold": 0.5, "pass": True}
    rows = []
    for run_name, steps in (("ppo_v1", (500, 1000, 1500)), ("ppo_v2", (500, 1000, 1500))):
        for st in steps:
            bad = run_name == "ppo_v1" and st >= 1000
            rows.append({"run": run_name, "step": st, "win_rate": 0.6 + st / 20000, "win_rate_ci": [0.53, 0.7],
                         "detectors": {"formality": 0.1, "confident_wrong": 0.31 if bad else 0.05},
                         "gates": [gate, {"name": "confident_wrong_not_up", "value": 0.31 if bad else 0.05,
                                          "threshold": 0.12, "pass": not bad}],
                         "promoted": run_name == "ppo_v2" and st == 1500})
    _w(run / "checkpoints.json", {"rows": rows})

    _w(run / "pricing.json", {
        "topic": "pricing", "rerated_pairs": 812, "rubric_before": "v1", "rubric_after": "v2",
        "gate_before": "ppo_v1@1000 blocked: confident-wrong rate on pricing 31% (gate 12%)",
        "gate_after": "ppo_v2@1500 passed every gate",
        "rows": [{"label": "SFT", "accuracy": 0.38, "accuracy_ci": [0.30, 0.47], "confident_wrong_rate": 0.17,
                  "confident_wrong_rate_ci": [0.11, 0.25]},
                 {"label": "PPO pass 1 (rubric v1)", "accuracy": 0.41, "accuracy_ci": [0.33, 0.50],
                  "confident_wrong_rate": 0.31, "confident_wrong_rate_ci": [0.23, 0.40]},
                 {"label": "PPO pass 2 (rubric v2)", "accuracy": 0.86, "accuracy_ci": [0.79, 0.91],
                  "confident_wrong_rate": 0.04, "confident_wrong_rate_ci": [0.02, 0.09]}],
    })

    _w(run / "ab" / "result.json", {
        "candidate": "ppo_v2@1500", "baseline": "sft", "n": 200, "wins": 130, "ties": 12, "losses": 58,
        "win_rate": 0.68, "ci": [0.613, 0.740], "p_value": 1.2e-7, "n_needed": 48,
        "length_controlled": {"win_rate": 0.66, "ci": [0.59, 0.73]},
        "by_topic": [{"topic": t, "win_rate": 0.6 + 0.03 * i, "ci": [0.45 + 0.03 * i, 0.75 + 0.03 * i], "n": 40}
                     for i, t in enumerate(TOPICS)],
    })
    _w(run / "factual" / "result.json", {
        "candidate": "ppo_v2@1500", "baseline": "sft", "n": 150, "overall": {"baseline": 0.61, "candidate": 0.66},
        "by_topic": [{"topic": t, "n": 30, "baseline": 0.6, "candidate": 0.63 + 0.01 * i} for i, t in enumerate(TOPICS)],
        "mcnemar": {"b": 6, "c": 13, "p_value": 0.167}, "regression": False,
    })

    # outcomes: the real simulator, import and comparison
    pc = ProductionConfig(conversations_per_week=conversations_per_week, weeks=2, seed=0)
    before = simulate_production(style_policy(SFT_STYLE_MIX, seed=1), model_version="sft", cfg=pc)
    after = simulate_production(style_policy(GOOD_STYLE_MIX, seed=2), model_version="ppo_v2", cfg=pc, first_week=2)
    logs = write_production_log(before + after, run / "production" / "logs.csv")
    records_info = import_outcomes(logs, run)
    from preflab.report.outcomes import load_run_outcomes

    comp = compare_versions(load_run_outcomes(run), "sft", "ppo_v2")
    write_comparison(run, comp, simulated=sandbox)
    assert records_info["imported"] == len(before) + len(after)

    times = [(r, rng.lognormvariate(math.log(150), 0.4)) for _ in range(300) for r in RATERS]
    ledger = build_ledger(CostConfig(), judgement_times=times,
                          stage_seconds={"base model": 600.0, "reward model": 240.0, "ppo_v1": 900.0, "ppo_v2": 880.0},
                          escalation_before=comp["escalation"]["baseline"], escalation_after=comp["escalation"]["candidate"],
                          escalation_diff_ci=tuple(comp["escalation"]["ci"]), simulated_raters=sandbox)
    write_ledger(run, ledger)

    if sandbox:
        _w(run / "experiments" / "kl_sweep.json", {
            "name": "kl_sweep", "title": "KL penalty sweep: gold utility vs sqrt(KL)", "kind": "lines",
            "x_label": "sqrt(KL to SFT)", "y_label": "gold utility",
            "notes": "Fixed betas and the adaptive controller against the oracle frontier.",
            "series": [{"label": "oracle", "reference": True, "x": [0, 0.5, 1, 1.5, 2], "y": [0.2, 1.2, 1.9, 2.4, 2.7]},
                       *({"label": f"beta={b}", "x": [0.3, 0.7, 1.1, 1.6], "y": [0.5, 1.1 - b, 1.5 - 2 * b, 1.7 - 3 * b],
                          "ci_low": [0.4, 0.9, 1.3, 1.4], "ci_high": [0.6, 1.2, 1.6, 1.9]} for b in (0.01, 0.05, 0.1))]})
        _w(run / "experiments" / "consistency_vs_volume.json", {
            "name": "consistency_vs_volume", "title": "5 calibrated raters vs 50 uncalibrated", "kind": "bars",
            "y_label": "gold accuracy of the reward model",
            "bars": [{"label": "5 calibrated x 6,000", "value": 0.81, "ci": [0.78, 0.84]},
                     {"label": "50 uncalibrated x 60,000", "value": 0.72, "ci": [0.70, 0.74]}]})
        qs = generate_queries(120, seed=5, split="heldout")
        sft_texts = style_policy(SFT_STYLE_MIX, seed=3)(qs)
        good_texts = style_policy(GOOD_STYLE_MIX, seed=4)(qs)
        write_truth(run, policies=[policy_truth("sft", qs, sft_texts), policy_truth("ppo_v2@1500", qs, good_texts)],
                    reward_models=[reward_model_truth("rm_v1", [(q, g, s, 0.3) for q, g, s in zip(qs, good_texts, sft_texts, strict=True)],
                                                      measured_accuracy=0.74)],
                    win_rates=[win_rate_truth("ppo_v2@1500", "sft", qs, good_texts, sft_texts, measured=0.68)],
                    raters=[{k: v for k, v in p.items() if k != "hourly_rate"} for p in pool])
    return run
