"""The README and docs stay true: every command they name exists, every stage has a page."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
STAGE_PAGES = ("models", "store", "collect", "web", "quality", "calibration", "reward_model", "ppo", "dpo",
               "evaluation", "gates", "report", "outcomes", "cost", "demo")


GROUPS = ("sandbox", "quality", "rm", "guidelines", "outcomes", "factual", "ab", "store")


def readme_commands() -> list[list[str]]:
    """``preflab X [Y]`` invocations named in the README (``rm train / eval`` = rm train, rm eval)."""
    out: set[tuple[str, ...]] = set()
    for cell in re.findall(r"`preflab ([^`]+)`", README):
        group = None
        for part in cell.split(" / "):
            words = [w for w in part.split() if re.fullmatch(r"[a-z][a-z-]*", w)]
            if not words:
                continue
            if words[0] in GROUPS:
                group, words = words[0], words[1:2]
                out.add((group, *words) if words else (group,))
            elif group is not None:
                out.add((group, words[0]))
            else:
                out.add((words[0],))
    return [list(c) for c in out]


def test_readme_names_the_two_setup_commands_and_ci_runs_the_test_one():
    assert "bash scripts/install.sh && .venv/bin/preflab demo" in README
    test_cmd = "bash scripts/install.sh --test && .venv/bin/python -m pytest -n 2"
    assert test_cmd in README
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("words", sorted(readme_commands()))
def test_every_readme_command_exists(words):
    res = subprocess.run([sys.executable, "-m", "preflab.cli", *words, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, f"preflab {' '.join(words)} --help failed: {res.stderr[-500:]}"


@pytest.mark.parametrize("page", STAGE_PAGES)
def test_every_stage_has_a_page_with_defaults_and_failure_signs(page):
    text = (ROOT / "docs" / f"{page}.md").read_text().lower()
    assert len(text) > 800, f"docs/{page}.md is too thin"
    assert "default" in text, f"docs/{page}.md does not state its defaults"
    assert any(w in text for w in ("bad value", "warning", "failure", "fails", "wrong", "red flag")), \
        f"docs/{page}.md does not say what a bad value looks like"
