"""Drift-detection power and false-alarm rate over seeded trials (writes JSON).

Each trial: the default pool of 5 simulated raters, calibrated, collects SFT-style pairs with
overlap 3 under rubric v1; one rater's bias shifts by +2.0 on one style value after their
200th judgement (likes stilted formality / padding / hedging / a dismissive tone, in turn).
Every rater is checked every 25 judgements from 200 to 350 (quality.drift.first_alarm).
Detection = the drifting rater flagged within 150 judgements of the shift; false alarm =
any other rater flagged in the same horizon.

    .venv/bin/python bench/drift_detection.py --trials 50 --out bench/results/drift.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from preflab.quality.drift import DriftConfig, first_alarm, hits_vs_others
from preflab.sandbox.raters import DriftSchedule, default_pool, simulate_stream

PROFILES = (
    {"formality": {"stilted": 2.0}},
    {"padding": {"padded": 2.0}},
    {"directness": {"hedged": 2.0}},
    {"tone": {"dismissive": 2.0}},
)
BASELINE, HORIZON, EVERY = 200, 150, 25


def drift_trial(seed: int, *, profile: dict | None = None, cfg: DriftConfig | None = None) -> dict:
    """One trial; returns {rater: {"drifting": bool, "alarm_at": int | None, "reason": str}}."""
    pool = default_pool(seed)
    for r in pool:
        r.calibrate()
    target = pool[seed % len(pool)]
    target.drift = DriftSchedule(BASELINE, profile or PROFILES[seed % len(PROFILES)])
    # each rater judges ~overlap/len(pool) of the items; 15% slack so everyone reaches the horizon
    n_items = int((BASELINE + HORIZON) * len(pool) / 3 * 1.15)
    stream = simulate_stream(pool, n_items, rubric="v1", seed=seed, overlap=3)
    hits = hits_vs_others([(j["item"], j["rater"], j["label"]) for j in stream])
    out = {}
    for r in pool:
        rationales = [j["rationale"] for j in stream if j["rater"] == r.name]
        found = first_alarm(r.name, rationales, hits[r.name], baseline_n=BASELINE, every=EVERY,
                            stop=BASELINE + HORIZON, cfg=cfg)
        out[r.name] = {"drifting": r is target, "alarm_at": found[0] if found else None,
                       "reason": found[1].reason if found else ""}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("bench/results/drift_detection.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    det = fa = n_d = n_f = 0
    delays = []
    for seed in range(args.trials):
        for res in drift_trial(seed).values():
            if res["drifting"]:
                n_d += 1
                det += res["alarm_at"] is not None
                if res["alarm_at"] is not None:
                    delays.append(res["alarm_at"] - BASELINE)
            else:
                n_f += 1
                fa += res["alarm_at"] is not None
    from dataclasses import asdict

    from preflab.quality.consistency import wilson_interval

    out = {"settings": {"pool": "sandbox default_pool(seed), calibrated", "overlap": 3, "rubric": "v1",
                        "baseline": BASELINE, "horizon": HORIZON, "check_every": EVERY,
                        "drift": "+2.0 on one style value after the baseline", "profiles": list(PROFILES),
                        "embedder": "tfidf (the default)", "drift_config": asdict(DriftConfig())},
           "trials": args.trials, "detected": det, "drifting": n_d, "detection_rate": det / n_d,
           "detection_rate_ci": list(wilson_interval(det, n_d)),
           "false_alarms": fa, "non_drifting": n_f, "false_alarm_rate": fa / n_f,
           "false_alarm_rate_ci": list(wilson_interval(fa, n_f)),
           "median_delay": sorted(delays)[len(delays) // 2] if delays else None,
           "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
