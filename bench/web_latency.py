"""Latency of the rater API under 20 concurrent simulated raters, against a real ``preflab serve``.

For each database (SQLite with one worker, PostgreSQL with ``--pg-workers``) it starts the
server on a fresh database, imports pairs, adds raters, creates a round, then runs the raters
as threads that loop get-next-task -> submit until the round is exhausted (or ``--seconds``).
Two phases per database: *paced* (each rater pauses ``--think-s`` on average between seeing
a task and submitting it; real experts take ~30 s, so this is already ~30x their load) gives
the latency figure held against the target p99 < 50 ms; *saturated* (no pause: 20 clients
hammering) gives the throughput ceiling, where latency is queueing, not service time.

    .venv/bin/python bench/web_latency.py --out bench/results/web_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.web.harness import Server, pairs_jsonl, pg_available, pg_database  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of xs, in milliseconds."""
    s = sorted(xs)
    return round(1000 * s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))], 2)


def summary(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "p50_ms": pct(xs, 0.50), "p90_ms": pct(xs, 0.90), "p99_ms": pct(xs, 0.99),
            "max_ms": round(1000 * max(xs), 2), "mean_ms": round(1000 * statistics.fmean(xs), 2),
            # under 100 requests the 99th percentile is the largest one: read it as the maximum
            **({"p99_is_max": True} if len(xs) < 100 else {})}


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by every process in the server's process group."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: process group
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def crowd(server: Server, tokens: list[str], rid: int, *, seconds: float, think_s: float, seed: int) -> dict:
    """Each token is one rater thread looping next -> (think) -> submit until the round or time runs out."""
    lat_next: list[float] = []
    lat_submit: list[float] = []
    errors: list[str] = []
    start = threading.Barrier(len(tokens) + 1)
    deadline = [0.0]

    def rater(i: int, token: str) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            c.get("/api/v1/me")  # open the keep-alive connection before the clock starts
            start.wait()
            if think_s:
                time.sleep(rng.uniform(0, think_s))  # raters do not start in lockstep
            while time.perf_counter() < deadline[0]:
                t0 = time.perf_counter()
                r = c.get(f"/api/v1/rounds/{rid}/next")
                lat_next.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"next {r.status_code} {r.text[:200]}")
                    return
                task = r.json()["task"]
                if task is None:
                    return
                if think_s:
                    time.sleep(rng.uniform(0.5 * think_s, 1.5 * think_s))
                body = {"assignment_id": task["assignment_id"], "choice": "left", "strength": 1,
                        "rationale": "more direct", "time_on_task_s": 2.0, "idempotency_key": uuid.uuid4().hex}
                t0 = time.perf_counter()
                r = c.post(f"/api/v1/rounds/{rid}/judgements", json=body)
                lat_submit.append(time.perf_counter() - t0)
                if r.status_code not in (200, 201):
                    errors.append(f"submit {r.status_code} {r.text[:200]}")
                    return

    threads = [threading.Thread(target=rater, args=(i, t)) for i, t in enumerate(tokens)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    cpu0 = group_cpu_s(server.proc.pid)
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = group_cpu_s(server.proc.pid) - cpu0
    return {"think_s": think_s, "wall_s": round(wall, 2), "judgements": len(lat_submit),
            # load-independent cost: app CPU (all workers; PostgreSQL's own backends not included)
            "server_cpu_ms_per_judgement": round(1000 * cpu / max(1, len(lat_submit)), 1),
            "judgements_per_s": round(len(lat_submit) / wall, 1),
            "requests_per_s": round((len(lat_submit) + len(lat_next)) / wall, 1),
            "next_task": summary(lat_next), "submit": summary(lat_submit), "n_errors": len(errors),
            "errors": errors[:5]}


def run_one(db_url: str, *, workers: int, raters: int, pairs: int, overlap: int, seconds: float, think_s: float,
            log: Path) -> dict:
    """Paced raters (think time between calls: the latency target) then saturated ones (throughput)."""
    server = Server(db_url=db_url, workers=workers, log_path=log).start()
    try:
        admin = server.admin()
        r = admin.post("/api/v1/import/pairs", content=pairs_jsonl(pairs), headers={"Content-Type": "application/x-ndjson"})
        r.raise_for_status()
        tokens = []
        for i in range(raters):
            r = admin.post("/api/v1/raters", json={"name": f"bench{i}"})
            r.raise_for_status()
            tokens.append(r.json()["token"])
        out = {"workers": workers, "raters": raters, "pairs": pairs, "overlap": overlap}
        for phase, think in (("paced", think_s), ("saturated", 0.0)):
            r = admin.post("/api/v1/rounds", json={"name": phase, "overlap": overlap, "duplicate_rate": 0.1,
                                                  "min_rationale_chars": 5, "routing": "any"})
            r.raise_for_status()
            out[phase] = crowd(server, tokens, r.json()["id"], seconds=seconds, think_s=think, seed=len(out))
        return out
    finally:
        server.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--raters", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--overlap", type=int, default=3)
    ap.add_argument("--pg-workers", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    ap.add_argument("--think-s", type=float, default=1.0,
                    help="paced phase: mean pause between seeing a task and submitting it (real raters: ~30 s)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    tmp = Path(f"/tmp/preflab-bench-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    kw = {"raters": a.raters, "pairs": a.pairs, "overlap": a.overlap, "seconds": a.seconds, "think_s": a.think_s}
    results = {"bench": "web_latency", "target_p99_ms": 50, "host": platform.node(), "python": platform.python_version(),
               "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
               "settings": {**kw, "db": a.db, "pg_workers": a.pg_workers}, "runs": {}}
    if a.db in ("sqlite", "both"):
        results["runs"]["sqlite"] = run_one(f"sqlite:///{tmp / 'store.db'}", workers=1, log=tmp / "sqlite.log", **kw)
    if a.db in ("postgres", "both"):
        if pg_available():
            with pg_database() as url:
                results["runs"]["postgres"] = run_one(url, workers=a.pg_workers, log=tmp / "pg.log", **kw)
        else:
            results["runs"]["postgres"] = {"skipped": "PostgreSQL not reachable on 127.0.0.1:5432"}
    results["loadavg_after"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
