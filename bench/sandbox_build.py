"""The default sandbox base-model build: time on this machine and what the model writes (JSON).

Runs the real command ``preflab sandbox build --out DIR`` (default config) in a subprocess,
records wall and CPU time and the machine's load (other jobs share these 2 cores: the wall
time is only meaningful next to the load average), then samples the model at temperature 1
on 200 held-out queries and reports the parse rate, the right-fact rate and the share of
every style value. Acceptance: build <= 300 s on 2 cores, parse rate >= 95%, every value of
tone / directness / factuality / formality >= 3% of the samples.

    .venv/bin/python bench/sandbox_build.py --out bench/results/sandbox_build.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from preflab.models.hf import load_policy
from preflab.sandbox.build import style_census
from preflab.sandbox.domain import generate_queries

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/results/sandbox_build.json"))
    ap.add_argument("--model-dir", type=Path, default=None, help="build here (default: a temporary directory)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--query-seed", type=int, default=1)
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--extra", nargs="*", default=[], help="extra flags for `preflab sandbox build`")
    args = ap.parse_args()

    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="sandbox_build_")) / "base"
    load_before = os.getloadavg()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "preflab.cli", "sandbox", "build", "--out", str(model_dir),
                    "--no-progress", *args.extra], check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = os.getloadavg()
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)

    torch.set_num_threads(2)
    manifest = json.loads((model_dir / "build.json").read_text())
    model, tok = load_policy(model_dir)
    queries = generate_queries(args.queries, seed=args.query_seed, split="heldout")
    t1 = time.perf_counter()
    census = style_census(model, tok, queries, seed=args.sample_seed, temperature=1.0,
                          max_new_tokens=manifest["max_response_tokens"] + 8)
    sample_s = time.perf_counter() - t1
    texts = census.pop("texts")
    result = {
        "build": {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_avg_before": load_before,
                  "load_avg_after": load_after, "cpu_count": os.cpu_count(), "manifest": manifest,
                  "config": json.loads((model_dir / "build_config.json").read_text())},
        "census": {**census, "temperature": 1.0, "split": "heldout", "query_seed": args.query_seed,
                   "sample_seed": args.sample_seed, "seconds": round(sample_s, 1)},
        "acceptance": {"build_le_300s": wall <= 300, "parse_rate_ge_95": census["parse_rate"] >= 0.95,
                       "every_style_value_ge_3pct": census["min_style_share"] >= 0.03},
        "examples": texts[:10],
        "model_dir": str(model_dir),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"build": {k: result["build"][k] for k in ("wall_s", "cpu_s", "load_avg_before")},
                      "parse_rate": census["parse_rate"], "fact_match_rate": census["fact_match_rate"],
                      "min_style_share": census["min_style_share"], "acceptance": result["acceptance"]}, indent=2))


if __name__ == "__main__":
    main()
