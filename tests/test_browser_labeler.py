"""The labeling widget in a real JupyterLab and headless Chromium: clicks and keys reach the label file.

Label with a button, with keys in the key area, skip and undo, then read the SQLite file from this process:
the stored labels must match what the page showed, and JupyterLab's own command-mode keys ('a'/'b'
insert cells) must not have fired. Leaves a screenshot in artifacts/labeler.png.
"""

import json
import re
import sqlite3
import sys
from pathlib import Path

import pytest

from browser import (cell_count, chromium_or_skip, jupyterlab, launch_chromium, open_notebook, run_all_cells,
                     wait_for, write_notebook)
from labkit.labeling.store import LabelStore

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
LABELER = "browser"

# Comparison i has responses "[i:j] ..." (stored index j), so the page's text says which one is where.
LONG_QUERY = "\n".join(f"Line {n} of a long <b>story</b> & its 'quotes'." for n in range(1, 31))


def queries():
    return ["query 0: The morning was grey.", "query 1: She opened the letter.", f"query 2:\n{LONG_QUERY}",
            "query 3: The train was late."]


def add_comparisons(store):
    return [
        store.add_comparison(
            "sentiment", q, [f"[{i}:{j}] It was a fine day." for j in range(4)],
            # Responses 0-2 were cut after their first sentence; response 3 had no truncation point.
            extra={"full_responses": [f"[{i}:{j}] It was a fine day." + (" Then it rained" if j < 3 else "")
                                      for j in range(4)],
                   "found": [True, True, True, False]},
        )
        for i, q in enumerate(queries())
    ]


def wait_for_comparison(page, i: int) -> list[int]:
    """Wait until comparison i is on the page (prompt and every response: each arrives as its own widget
    update) and return the stored index shown at each display position."""
    page.locator(".labkit-prompt", has_text=f"query {i}:").wait_for(state="visible", timeout=20_000)
    order = []
    for j in range(4):
        response = page.locator(f".labkit-response-{j}", has_text=f"[{i}:")
        response.wait_for(state="visible", timeout=20_000)
        order.append(int(re.search(rf"\[{i}:(\d)\]", response.inner_text()).group(1)))
    return order


def test_label_with_clicks_and_keys_in_jupyterlab(tmp_path):
    chromium = chromium_or_skip()
    playwright = pytest.importorskip("playwright.sync_api", reason="install the test extra: pip install -e '.[test]'")
    sync_playwright = playwright.sync_playwright
    with LabelStore(tmp_path / "labels.db") as store:
        ids = add_comparisons(store)
    write_notebook(tmp_path / "lab.ipynb", [
        "import sys\n"
        "from labkit.labeling.store import LabelStore\n"
        "from labkit.widgets import ComparisonLabeler\n"
        "print('kernel python:', sys.executable)\n"
        f"labeler = ComparisonLabeler(LabelStore('labels.db'), 'sentiment', labeler={LABELER!r}, seed=0)\n"
        "labeler",
    ])

    orders = {}
    with jupyterlab(tmp_path) as (url, token), sync_playwright() as pw:
        browser = launch_chromium(pw, chromium)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            open_notebook(page, url, token, "lab.ipynb")
            run_all_cells(page)
            wait_for(page, ".labkit-labeler")
            assert f"kernel python: {sys.executable}" in page.locator(".jp-OutputArea-output").first.inner_text()
            cells = cell_count(page)
            keys = wait_for(page, ".labkit-keys .labkit-keys-area")
            assert "click here, then press 1-4 / a-d, s = skip, u = undo" in keys.inner_text()

            # 1. Button A on comparison 0.
            orders[0] = wait_for_comparison(page, 0)
            page.locator(".labkit-choice-0").click()
            # 2. Key "2" (response B) on comparison 1, typed into the key area.
            orders[1] = wait_for_comparison(page, 1)
            keys.click()
            page.keyboard.press("2")
            # 3. Skip comparison 2 with the button.
            orders[2] = wait_for_comparison(page, 2)
            page.locator(".labkit-skip").click()
            # 4. Key "u" undoes the skip: comparison 2 comes back, in the order it had.
            wait_for_comparison(page, 3)
            keys.click()
            page.keyboard.press("u")
            assert wait_for_comparison(page, 2) == orders[2]
            page.locator(".labkit-status", has_text="undid your skip").wait_for(timeout=10_000)
            # The labeler's stylesheet reached the page: the long prompt scrolls from its end, cut text is
            # struck through, and the note box spans the widget instead of ipywidgets' default 300px.
            styles = page.evaluate("""() => {
                const q = (selector) => document.querySelector('.labkit-labeler ' + selector);
                const prompt = q('.labkit-prompt-scroll');
                return {prompt_scrolls: prompt.scrollHeight > prompt.clientHeight,
                        prompt_direction: getComputedStyle(prompt).flexDirection,
                        cut: getComputedStyle(q('.labkit-cut')).textDecorationLine,
                        note_px: q('.labkit-note').getBoundingClientRect().width};
            }""")
            assert styles["prompt_scrolls"] and styles["prompt_direction"] == "column-reverse", styles
            assert styles["cut"] == "line-through" and styles["note_px"] > 500, styles
            ARTIFACTS.mkdir(exist_ok=True)
            page.locator(".labkit-labeler").screenshot(path=str(ARTIFACTS / "labeler.png"))
            # 5. Keys "b" and "a" label comparisons 2 and 3; in command mode they would insert cells.
            page.keyboard.press("b")
            orders[3] = wait_for_comparison(page, 3)
            page.keyboard.press("a")
            page.locator(".labkit-empty", has_text="Queue empty").wait_for(timeout=20_000)
            assert cell_count(page) == cells
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "labeler-failure.png"))  # what the page showed, for debugging
            raise
        finally:
            browser.close()

    # What the file holds, read from this process.
    with LabelStore(tmp_path / "labels.db") as store:
        labels = store.labels(labeler=LABELER)
        assert [(lb.comparison_id, lb.best, lb.permutation) for lb in labels] == [
            (ids[0], orders[0][0], orders[0]),  # A
            (ids[1], orders[1][1], orders[1]),  # key 2 = B
            (ids[2], orders[2][1], orders[2]),  # key b = B, after the undone skip
            (ids[3], orders[3][0], orders[3]),  # key a = A
        ]
        assert all(lb.shown_at is not None and lb.note is None for lb in labels)
        assert store.counts() == [dict(task="sentiment", labeler=LABELER, labels=4, skips=0, retracted=1)]
        assert store.pending(LABELER) == []
    db = sqlite3.connect(f"{(tmp_path / 'labels.db').as_uri()}?mode=ro", uri=True)
    try:
        skips = db.execute("SELECT id, comparison_id, permutation FROM skips").fetchall()
        retractions = db.execute("SELECT label_id, skip_id, labeler FROM retractions").fetchall()
    finally:
        db.close()
    assert [(c, json.loads(p)) for _, c, p in skips] == [(ids[2], orders[2])]
    assert retractions == [(None, skips[0][0], LABELER)]
