#!/usr/bin/env bash
# Install preflab into ./.venv on a fresh machine.
#   bash scripts/install.sh          # the product (runs `preflab demo`)
#   bash scripts/install.sh --test   # plus test dependencies and Debian's chromium
# The CPU build of torch goes in first: a looser requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# Pinned versions of everything else (constraints.txt says why); PIP_CONSTRAINT="" to lift them.
export PIP_CONSTRAINT="${PIP_CONSTRAINT-$PWD/constraints.txt}"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -e ".[test,embed]"
  if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; browser tests will be skipped" >&2
    fi
  fi
  # PostgreSQL for the store tests (started before the session on this machine kind).
  if command -v pg_ctlcluster >/dev/null 2>&1 && ! pg_isready -h 127.0.0.1 -q 2>/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
else
  .venv/bin/python -m pip install -q -e ".[embed]"
fi
