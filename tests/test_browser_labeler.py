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
    update) and return the stored index shown at each display position. `page` may also be a locator, e.g.
    one labeler widget of several."""
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


# A refill that waits for the test to create the file `go` (as sampling takes a while), then adds "query n"
# (n = the next id) with responses "[n:j] ...".
REFILL = """
import os, time
def refill():
    for _ in range(1200):
        if os.path.exists('go'):
            os.remove('go')
            break
        time.sleep(0.05)
    else:
        return
    n = len(store.comparisons()) + 1  # the queries are numbered from 1
    store.add_comparison('sentiment', f'query {n}: More.', [f'[{n}:{j}] It was a fine day.' for j in range(4)])
"""

FOCUSED = """() => {
    const a = document.activeElement;
    return a === null ? 'none' : a.classList.contains('labkit-keys-area') ? 'keys'
        : a.closest('.jp-Cell') && a.closest('.jp-Editor') ? 'editor of cell ' + [...document.querySelectorAll(
              '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell')].indexOf(a.closest('.jp-Cell'))
        : a.tagName + '.' + a.className;
}"""


def keys_have_focus(page, timeout_s=10):
    page.wait_for_function(f"() => ({FOCUSED})() === 'keys'", timeout=timeout_s * 1000)


def run_in_jupyterlab(tmp_path, cells, steps, screenshot):
    """Write `cells` as lab.ipynb next to tmp_path/labels.db, run them all in JupyterLab and call steps(page)."""
    chromium = chromium_or_skip()
    playwright = pytest.importorskip("playwright.sync_api", reason="install the test extra: pip install -e '.[test]'")
    write_notebook(tmp_path / "lab.ipynb", cells)
    with jupyterlab(tmp_path) as (url, token), playwright.sync_playwright() as pw:
        browser = launch_chromium(pw, chromium)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            open_notebook(page, url, token, "lab.ipynb")
            run_all_cells(page)
            wait_for(page, ".labkit-labeler")
            steps(page)
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / screenshot))  # what the page showed, for debugging
            raise
        finally:
            browser.close()


def test_keys_work_after_mouse_clicks_and_focus_is_not_stolen(tmp_path):
    """Clicks on the labeler's buttons give the focus back to the key area, so keys go on labeling (and 'a' does
    not insert a cell); a new comparison brings it back after an empty queue; a cell the person moved to keeps it."""
    with LabelStore(tmp_path / "labels.db") as store:
        ids = [store.add_comparison("sentiment", f"query {i}: Once.", [f"[{i}:{j}] It was a fine day." for j in range(4)])
               for i in range(1, 5)]
    orders = {}

    def steps(page):
        cells = cell_count(page)
        orders[1] = wait_for_comparison(page, 1)
        page.locator(".labkit-choice-0").click()  # A, with the mouse
        orders[2] = wait_for_comparison(page, 2)
        keys_have_focus(page)
        page.keyboard.press("2")  # B
        orders[3] = wait_for_comparison(page, 3)
        page.keyboard.press("a")  # A: a label, not a new cell
        wait_for_comparison(page, 4)
        assert cell_count(page) == cells
        page.locator(".labkit-undo").click()  # undoes the "a": comparison 3 again
        assert wait_for_comparison(page, 3) == orders[3]
        keys_have_focus(page)
        page.keyboard.press("c")  # C
        orders[4] = wait_for_comparison(page, 4)
        page.locator(".labkit-skip").click()  # the queue is empty now; a refill waits for `go`
        page.locator(".labkit-empty", has_text="being sampled").wait_for(timeout=20_000)
        (tmp_path / "go").touch()
        orders[5] = wait_for_comparison(page, 5)
        keys_have_focus(page)  # back on the key area, which was hidden while the queue was empty
        page.keyboard.press("4")  # D; empties the queue again and starts the next refill
        page.locator(".labkit-empty", has_text="being sampled").wait_for(timeout=20_000)

        # The person moves on to the next cell's editor; the next comparison must not take the focus from it.
        page.locator(".jp-Cell").nth(1).locator(".cm-content").click()
        assert page.evaluate(FOCUSED) == "editor of cell 1"
        (tmp_path / "go").touch()
        wait_for_comparison(page, 6)
        page.wait_for_timeout(1500)  # the key area retries for up to 1 s while a comparison arrives
        assert page.evaluate(FOCUSED) == "editor of cell 1"
        assert cell_count(page) == cells

    cells = [
        "from labkit.labeling.store import LabelStore\n"
        "from labkit.widgets import ComparisonLabeler\n"
        "store = LabelStore('labels.db')\n" + REFILL +
        f"labeler = ComparisonLabeler(store, 'sentiment', labeler={LABELER!r}, seed=0, refill=refill)\n"
        "labeler",
        "x = 1",
    ]
    run_in_jupyterlab(tmp_path, cells, steps, "labeler-focus-failure.png")
    with LabelStore(tmp_path / "labels.db") as store:
        live = [(lb.comparison_id, lb.best) for lb in store.labels(labeler=LABELER)]
        assert live == [(ids[0], orders[1][0]), (ids[1], orders[2][1]), (ids[2], orders[3][2]), (ids[3] + 1, orders[5][3])]
        assert store.counts() == [dict(task="sentiment", labeler=LABELER, labels=4, skips=1, retracted=1)]


def test_a_stale_second_widget_does_not_label_twice(tmp_path):
    """Two widgets for one labeler (a cell run twice): comparison 1 labeled in the second, then clicked in the
    first, which still shows it: one live label, and the first says so and moves on."""
    with LabelStore(tmp_path / "labels.db") as store:
        ids = [store.add_comparison("sentiment", f"query {i}: Once.", [f"[{i}:{j}] It was a fine day." for j in range(4)])
               for i in range(1, 4)]
    orders = {}

    def steps(page):
        page.locator(".labkit-labeler").nth(1).wait_for(state="visible", timeout=30_000)
        first, second = page.locator(".labkit-labeler").nth(0), page.locator(".labkit-labeler").nth(1)
        orders[1] = wait_for_comparison(first, 1)
        assert wait_for_comparison(second, 1) == orders[1]  # the same order: the same seed and comparison
        second.locator(".labkit-choice-1").click()
        wait_for_comparison(second, 2)
        first.locator(".labkit-choice-3").click()  # the stale view
        first.locator(".labkit-status", has_text="already labeled in another view").wait_for(timeout=20_000)
        wait_for_comparison(first, 2)

    view = (f"ComparisonLabeler(LabelStore('labels.db'), 'sentiment', labeler={LABELER!r}, seed=0)")
    cells = ["from labkit.labeling.store import LabelStore\nfrom labkit.widgets import ComparisonLabeler", view, view]
    run_in_jupyterlab(tmp_path, cells, steps, "labeler-two-views-failure.png")
    with LabelStore(tmp_path / "labels.db") as store:
        labels = store.labels(labeler=LABELER, include_retracted=True)
        assert [(lb.comparison_id, lb.best) for lb in labels] == [(ids[0], orders[1][1])]
        assert store.pending(LABELER) == ids[1:]
