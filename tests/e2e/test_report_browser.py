"""The report opened in headless Chromium: every plot loads, every section is there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.report.fixture_run import make_run_dir

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = ["setup", "workshop", "quality", "reward", "ppo", "checkpoints", "pricing", "ab", "factual",
            "outcomes", "cost", "experiments", "truth"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    run = make_run_dir(tmp_path_factory.mktemp("run") / "demo", conversations_per_week=200)
    # through the real CLI, as a user would run it
    out = subprocess.run([sys.executable, "-m", "preflab.cli", "report", str(run)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return run


def test_report_renders_in_chromium(rendered, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto((rendered / "report.html").as_uri())
    page.wait_for_load_state("load")
    sections = page.eval_on_selector_all("section[id]", "els => els.map(e => e.id)")
    for sid in EXPECTED:
        assert sid in sections, f"section {sid!r} missing (have {sections})"
    imgs = page.eval_on_selector_all(
        "img.plot", "els => els.map(e => ({alt: e.alt, ok: e.complete && e.naturalWidth > 0, w: e.naturalWidth}))")
    assert len(imgs) >= 13, imgs
    bad = [i["alt"] for i in imgs if not i["ok"]]
    assert not bad, f"plots that did not load: {bad}"
    assert "Ground truth (sandbox only)" in page.inner_text("#truth h2")
    # JSON text is escaped, never interpreted: the planted <b> in a rationale stays literal
    assert page.locator("#quality blockquote b").count() == 0
    assert "<b>too casual</b>" in page.inner_text("#quality")
    page.screenshot(path=str(rendered / "report.png"), full_page=True)
    assert (rendered / "report.png").stat().st_size > 10_000
