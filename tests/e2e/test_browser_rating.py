"""A real browser (Debian chromium, headless, Playwright) against a real ``preflab serve``.

An admin imports pairs and creates a round through the admin pages and adds a rater; the
rater signs in and rates 3 items with the keyboard only (1 / 2 / T, A/S/D, typing, Enter),
sees the progress advance, and the store holds the judgements against canonical ids.
Set PREFLAB_SCREENSHOTS=<dir> to keep screenshots of the rater and admin pages.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from preflab.store import db, schema
from tests.web.harness import Server, sandbox_pairs_jsonl

pytestmark = [pytest.mark.browser, pytest.mark.slow]
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect


def keep(path: Path) -> None:
    out = os.environ.get("PREFLAB_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / path.name)


def test_admin_creates_round_and_rater_rates_three_items_by_keyboard(browser, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    server = Server(db_url=url, log_path=tmp_path / "serve.log").start()
    try:
        jsonl, texts = sandbox_pairs_jsonl(8)
        (tmp_path / "pairs.jsonl").write_text(jsonl)

        # ---- admin: sign in, import pairs, create a round from them, add a rater
        admin = browser.new_page(viewport={"width": 1280, "height": 900})
        admin.goto(server.url + "/login")
        admin.fill("input[name=name]", "admin")
        admin.fill("input[name=password]", server.admin_password)
        admin.click("button[type=submit]")
        admin.wait_for_url(re.compile(r".*/admin$"))
        admin.set_input_files("form[action='/admin/import'] input[type=file]", str(tmp_path / "pairs.jsonl"))
        admin.click("form[action='/admin/import'] button[type=submit]")
        assert "Imported 8 new prompts" in admin.text_content(".notice")
        form = "form[action='/admin/rounds']"
        admin.fill(f"{form} input[name=name]", "week 1")
        admin.fill(f"{form} input[name=overlap]", "1")
        admin.fill(f"{form} input[name=duplicate_rate]", "0")
        admin.fill(f"{form} input[name=min_rationale_chars]", "10")
        admin.click(f"{form} button[type=submit]")
        assert "with 8 items" in admin.text_content(".notice")
        form = "form[action='/admin/raters']"
        admin.fill(f"{form} input[name=name]", "dana")
        admin.fill(f"{form} input[name=specialties]", "pricing, billing")
        admin.click(f"{form} button[type=submit]")
        password = admin.locator("code.secret").first.text_content()
        admin.screenshot(path=str(tmp_path / "admin.png"), full_page=True)
        keep(tmp_path / "admin.png")
        round_id = int(re.search(r"/admin/rounds/(\d+)", admin.content()).group(1))

        # ---- rater: sign in and rate with the keyboard only
        page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
        page.goto(server.url + f"/login?next=/rate/{round_id}")
        # the name field is autofocused; a keystroke typed before focus lands is lost
        expect(page.locator("input[name=name]")).to_be_focused()
        page.keyboard.type("dana")
        page.keyboard.press("Tab")
        page.keyboard.type(password)
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(rf".*/rate/{round_id}$"))
        page.wait_for_selector("#task:not([hidden])")
        assert page.text_content("#progress-text") == "0 of 8 done"

        chosen: list[tuple[str, str]] = []  # (text on the chosen side, key pressed)
        for i, (key, strength) in enumerate([("1", "a"), ("2", "d"), ("t", None)]):
            left, right = page.text_content("#left-text"), page.text_content("#right-text")
            if strength:
                page.keyboard.press(strength)
            page.keyboard.press(key)  # choosing moves the focus to the rationale box
            page.keyboard.type(f"item {i}: the chosen answer quotes the current fact directly")
            if i == 0:
                page.screenshot(path=str(tmp_path / "rater.png"))
                keep(tmp_path / "rater.png")
            chosen.append(({"1": left, "2": right, "t": None}[key], key))
            page.keyboard.press("Enter")
            # (the page's CSP forbids eval, so wait with a locator assertion, not wait_for_function)
            expect(page.locator("#progress-text")).to_have_text(f"{i + 1} of 8 done")
        assert page.locator(".response.selected").count() == 0  # the next item starts clean
    finally:
        server.kill()

    engine = db.make_engine(url)
    with db.session_scope(engine, readonly=True) as s:
        rows = s.execute(select(schema.Judgement, schema.Rater.name).join(schema.Rater)
                         .order_by(schema.Judgement.id)).all()
    engine.dispose()
    assert [name for _, name in rows] == ["dana"] * 3
    for (j, _), (text, key) in zip(rows, chosen, strict=True):
        if key == "t":
            assert j.winner_id is None and j.strength == 0
        else:
            # the stored winner is the canonical response id whose text was on the chosen side
            assert texts[j.pair_id][j.winner_id] == text
        assert j.rationale.startswith("item ") and j.time_on_task_s > 0
    assert [j.strength for j, _ in rows[:2]] == [1, 3]
