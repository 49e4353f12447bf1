"""Helpers for tests that drive a real JupyterLab in headless Chromium (no tests here).

    chromium = chromium_or_skip()
    with jupyterlab(tmp_path) as (url, token), sync_playwright() as pw:
        browser = launch_chromium(pw, chromium)
        page = browser.new_page()
        open_notebook(page, url, token, "lab.ipynb")
        run_all_cells(page)
        wait_for(page, ".labkit-labeler")

What was checked on this machine is in shared/reference/environment.md: the Chromium flags, that a
notebook without metadata.kernelspec opens a kernel picker that swallows clicks (use `write_notebook`),
and that widget buttons render as `.widget-button`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
START_TIMEOUT_S = 60
KERNEL_NAME = "python3"


def chromium_or_skip() -> str:
    """The chromium executable, or skip the calling test with what to do about it."""
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium not installed: run `make test` as root or apt-get install chromium")
    return path


def launch_chromium(playwright, executable: str):
    """Headless Chromium with the flags that work in this container (no sandbox, no GPU, no network chatter)."""
    return playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)


def write_notebook(path: Path, cells: list[str]) -> Path:
    """A notebook of code cells. metadata.kernelspec names the kernel; without it JupyterLab opens a
    kernel picker dialog that swallows every click."""
    nb = {
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"cell{i}", "metadata": {},
                   "outputs": [], "source": source} for i, source in enumerate(cells)],
        "metadata": {"kernelspec": {"name": KERNEL_NAME, "display_name": "Python 3 (ipykernel)",
                                    "language": "python"},
                     "language_info": {"name": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb, indent=1))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def jupyterlab(root_dir):
    """Run JupyterLab serving `root_dir` on a free port with a random token; yield (url, token).

    It runs with this interpreter (sys.executable) and in a private Jupyter environment: its own config,
    runtime, settings and workspace folders (so nothing from the user's setup, e.g. a restored workspace,
    interferes), and a `python3` kernelspec whose argv is this interpreter, put first on JUPYTER_PATH so
    the notebook's kernel is the venv's python whatever other kernelspecs exist.
    """
    port, token = _free_port(), secrets.token_hex(16)
    private = Path(tempfile.mkdtemp(prefix="labkit-jupyter-"))
    spec_dir = private / "data" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python",
    }))
    env = dict(
        os.environ,
        JUPYTER_PATH=str(private / "data"),
        JUPYTER_CONFIG_DIR=str(private / "config"),
        JUPYTER_RUNTIME_DIR=str(private / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(private / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(private / "workspaces"),
    )
    log_path = private / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", f"--ServerApp.token={token}",
           "--allow-root", f"--ServerApp.root_dir={Path(root_dir).resolve()}", "--ServerApp.ip=127.0.0.1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(proc, url, token, log_path)
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(private, ignore_errors=True)


def _wait_until_up(proc, url, token, log_path):
    deadline = time.monotonic() + START_TIMEOUT_S
    request = urllib.request.Request(f"{url}/api/status", headers={"Authorization": f"token {token}"})
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode} before answering; its log:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"JupyterLab did not answer {url}/api/status within {START_TIMEOUT_S} s; its log:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.25)


# The toolbar's execution indicator reads "idle" from the start, before any kernel is connected, and
# running cells then opens the kernel picker dialog (which swallows every click). It turns "busy" when
# the connected kernel answers its first request; record its changes from the first script on the page.
_RECORD_KERNEL_STATUS = """
window.__labkitKernelStatuses = [];
new MutationObserver((records) => {
  for (const r of records) {
    if (r.target.classList.contains('jp-Notebook-ExecutionIndicator')) {
      window.__labkitKernelStatuses.push(r.target.getAttribute('data-status'));
    }
  }
}).observe(document, { subtree: true, attributes: true, attributeFilter: ['data-status'] });
"""
_KERNEL_READY = """() => window.__labkitKernelStatuses.includes('busy') &&
    document.querySelector('.jp-NotebookPanel .jp-Notebook-ExecutionIndicator')
        ?.getAttribute('data-status') === 'idle'"""


def open_notebook(page, url: str, token: str, name: str, timeout_s: float = 60):
    """Open notebook `name` (relative to the root dir) and wait until its kernel is connected and idle.

    The kernel session is created through the REST API first, so the kernel starts while the page loads
    and JupyterLab connects to it instead of choosing one itself.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    start_kernel(url, token, name)
    page.add_init_script(_RECORD_KERNEL_STATUS)
    page.goto(f"{url}/lab/tree/{name}?token={token}")
    wait_for(page, ".jp-NotebookPanel .jp-Cell", timeout_s)
    try:
        page.wait_for_function(_KERNEL_READY, timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        # Once in a full suite run the kernel's first busy -> idle went unrecorded (the recorder watches the
        # execution indicator, which may not exist yet when the reply to JupyterLab's kernel_info request comes).
        # A reload connects again, and the same condition must then hold: still a connected, idle kernel.
        page.reload()
        wait_for(page, ".jp-NotebookPanel .jp-Cell", timeout_s)
        page.wait_for_function(_KERNEL_READY, timeout=timeout_s * 1000)


def start_kernel(url: str, token: str, name: str) -> str:
    """Start (or find) the kernel session of notebook `name`; returns the kernel id."""
    body = json.dumps({"path": name, "name": name, "type": "notebook", "kernel": {"name": KERNEL_NAME}}).encode()
    request = urllib.request.Request(f"{url}/api/sessions", data=body, method="POST",
                                     headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["kernel"]["id"]


def run_all_cells(page):
    """Run every cell through the Run menu, as a user would."""
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()


def cell_count(page) -> int:
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell").count()


def wait_for(page, selector: str, timeout_s: float = 30):
    """The first element matching `selector`, once it is visible."""
    locator = page.locator(selector).first
    locator.wait_for(state="visible", timeout=timeout_s * 1000)
    return locator
