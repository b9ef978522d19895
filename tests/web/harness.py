"""Start the real ``preflab serve`` as a subprocess on a free port, against a temp database.

Shared by the web acceptance tests, the browser test and ``bench/web_latency.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("PREFLAB_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2):
            return True
    except Exception:
        return False


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards); yields its SQLAlchemy URL."""
    import psycopg

    name = "preflab_web_" + uuid.uuid4().hex[:10]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Server:
    """A running ``preflab serve``; ``admin_password``/``admin_token`` come from its first start."""

    db_url: str
    workers: int = 1
    project: str = "default"
    port: int = field(default_factory=free_port)
    secret: str = field(default_factory=lambda: uuid.uuid4().hex * 2)
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    admin_password: str | None = None
    admin_token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        env = dict(os.environ, PREFLAB_SECRET_KEY=self.secret, PYTHONUNBUFFERED="1")
        # one log per server (a port is reused across runs and tests; an old log's first admin token is stale)
        self.log_path = self.log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"preflab-serve-{self.port}-{uuid.uuid4().hex[:8]}.log"
        start = self.log_path.stat().st_size if self.log_path.exists() else 0  # a restart appends: read what it wrote
        log = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", "preflab.cli", "serve", "--db", self.db_url, "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(self.workers), "--project", self.project]
        # own process group, so kill() reaches the uvicorn worker processes too
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"preflab serve exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"preflab serve did not come up:\n{self.log_path.read_text()[-3000:]}")
        text = self.log_path.read_bytes()[start:].decode(errors="replace")
        pw = re.search(r"admin password: (\S+)", text)
        tok = re.search(r"admin API token: (\S+)", text)
        if pw and tok and self.admin_password is None:
            self.admin_password, self.admin_token = pw.group(1), tok.group(1)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=15)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=30)


def pairs_jsonl(n: int, *, domains: tuple[str, ...] = ("pricing", "billing"), prefix: str = "p") -> str:
    """``n`` import-ready pair records (prompt + two responses inline), one JSON per line."""
    import json

    lines = []
    for i in range(n):
        d = domains[i % len(domains)]
        lines.append(json.dumps({
            "id": f"{prefix}{i}",
            "prompt": {"id": f"{prefix}q{i}", "text": f"Query {i}: how much does the {d} plan cost?", "topic": d},
            "response_a": {"id": f"{prefix}{i}a", "text": f"Answer A{i}: it costs ${10 + i} per month.", "source": "sft"},
            "response_b": {"id": f"{prefix}{i}b", "text": f"Answer B{i}: I think it is maybe ${12 + i}.",
                           "source": "ppo-step500"},
        }))
    return "\n".join(lines) + "\n"


def sandbox_pairs_jsonl(n: int, *, seed: int = 0, prefix: str = "s") -> tuple[str, dict[str, dict[str, str]]]:
    """``n`` realistic pairs from the sandbox support domain; also returns {pair_id: {response_id: text}}."""
    import json
    import random

    from preflab.sandbox import domain

    rng = random.Random(seed)
    queries = domain.all_queries()
    rng.shuffle(queries)
    lines, texts = [], {}
    for i, q in enumerate(queries[:n]):
        a = domain.compose(q, domain.sample_style(rng))
        b = a
        while b == a:
            b = domain.compose(q, domain.sample_style(rng))
        pid = f"{prefix}{i}"
        texts[pid] = {f"{pid}a": a, f"{pid}b": b}
        lines.append(json.dumps({"id": pid, "prompt": {"id": f"{pid}q", "text": q.text, "topic": q.topic},
                                 "response_a": {"id": f"{pid}a", "text": a, "source": "sft-v1"},
                                 "response_b": {"id": f"{pid}b", "text": b, "source": "ppo-step500"}}))
    return "\n".join(lines) + "\n", texts
