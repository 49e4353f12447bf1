"""The quickstart notebook in a real JupyterLab: label by clicks and keys, train, see the curves grow.

Runs notebooks/00_quickstart.ipynb in smoke mode (tiny model): the cells up to the labeling widget, then
labels two comparisons in the page (a click and a key), then runs the rest (mock labels, reward model,
PPO) and checks that the PPO dashboard's score curve has gained points and the labels reached the file.
"""

import shutil
import sqlite3
from pathlib import Path

import pytest

from browser import chromium_or_skip, jupyterlab, launch_chromium, open_notebook, wait_for
from labkit.rl.checkpoint import latest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"


def run_menu(page, command: str):
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator(f'.lm-Menu-item[data-command="{command}"]').click()


def kernel_idle(page, timeout_s=300):
    page.wait_for_function("""() => document.querySelector('.jp-NotebookPanel .jp-Notebook-ExecutionIndicator')
        ?.getAttribute('data-status') === 'idle'""", timeout=timeout_s * 1000)


def select_cell(page, index: int):
    cell = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell").nth(index)
    cell.scroll_into_view_if_needed()
    cell.locator(".jp-InputPrompt").first.click()


def score_points(page) -> int:
    """Points on the dashboard's first (score) line, read from plotly's SVG path."""
    return page.evaluate("""() => {
        const dash = [...document.querySelectorAll('.labkit-dashboard')].pop();
        if (!dash) return 0;
        const line = dash.querySelector('.scatterlayer .trace path.js-line');
        if (!line) return 0;
        const d = line.getAttribute('d') || '';
        return (d.match(/[ML]/g) || []).length;
    }""")


def test_quickstart_labels_trains_and_plots_in_jupyterlab(tmp_path, monkeypatch):
    chromium = chromium_or_skip()
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    monkeypatch.setenv("LABKIT_SMOKE", "1")  # JupyterLab passes it on to the kernel
    shutil.copy(ROOT / "notebooks" / "00_quickstart.ipynb", tmp_path / "00_quickstart.ipynb")
    import nbformat

    cells = nbformat.read(tmp_path / "00_quickstart.ipynb", 4).cells
    after_labeler = next(i for i, c in enumerate(cells) if "ComparisonLabeler(" in c.source) + 1

    with jupyterlab(tmp_path) as (url, token), sync_playwright() as pw:
        browser = launch_chromium(pw, chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            open_notebook(page, url, token, "00_quickstart.ipynb")
            # 1. everything up to and including the labeling widget
            select_cell(page, after_labeler)
            run_menu(page, "notebook:run-all-above")
            wait_for(page, ".labkit-labeler", 300)
            kernel_idle(page)
            # 2. label: a click on A, then key "3" in the key area
            prompt = page.locator(".labkit-prompt").first.inner_text()
            page.locator(".labkit-choice-0").first.click()
            page.wait_for_function("p => document.querySelector('.labkit-prompt').innerText !== p", arg=prompt, timeout=20_000)
            page.locator(".labkit-keys .labkit-keys-area").first.click()
            page.keyboard.press("3")
            page.locator(".labkit-progress", has_text="labeled 2").first.wait_for(timeout=20_000)
            # 3. the rest: mock labels, reward model, PPO with the live dashboard
            select_cell(page, after_labeler)
            run_menu(page, "notebook:run-all-below")
            page.locator(".labkit-dashboard").nth(1).wait_for(timeout=300_000)
            kernel_idle(page, 600)
            page.wait_for_function("() => document.querySelectorAll('.labkit-dashboard').length >= 2", timeout=60_000)
            page.locator(".labkit-dashboard").nth(1).scroll_into_view_if_needed()
            page.wait_for_timeout(1000)
            points = score_points(page)
            ARTIFACTS.mkdir(exist_ok=True)
            page.locator(".labkit-dashboard").nth(1).screenshot(path=str(ARTIFACTS / "quickstart-dashboard.png"))
            assert points >= 2, f"the PPO score curve has {points} points"
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']", has_text="Traceback")
            assert errors.count() == 0
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "quickstart-failure.png"), full_page=True)
            raise
        finally:
            browser.close()

    db = sqlite3.connect(tmp_path / "runs/quickstart-smoke/labels.db")
    mine = db.execute("SELECT COUNT(*) FROM labels WHERE labeler = 'me'").fetchone()[0]
    assert mine == 2
    assert (latest(tmp_path / "runs/quickstart-smoke/ppo") / "trainer.json").exists()
