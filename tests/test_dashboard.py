"""Dashboard: curves equal the history, redraws are throttled, layouts, sample table, .jsonl, threads, nbclient."""

import json
import math
import sys
import threading
from pathlib import Path

import ipywidgets as widgets
import pytest

from labkit.widgets import Dashboard
from labkit.widgets.dashboard import MARKERS_UP_TO, MAX_QUERY_CHARS, PPO_PANELS

REPO_ROOT = Path(__file__).resolve().parents[1]


def ppo_metrics(step: int) -> dict:
    return {
        "step": step,
        "objective/scores": 0.1 * step,
        "objective/rlhf_reward": 0.1 * step - 0.02 * step,
        "objective/kl": 0.2 * step,
        "objective/kl_coef": 0.15 * (1 + 0.01 * step),
        "objective/entropy": 30.0 - step,
        "loss/policy_avg": -0.01 * step,
        "loss/value_avg": 1.0 / (step + 1),
        "policy/clipfrac_avg": 0.05,
        "val/clipfrac_avg": 0.1,
        "time/step": 3.1,
    }


def trace(dash: Dashboard, name: str):
    (match,) = [t for t in dash.figure.data if t.name == name]
    return match


def test_ppo_curves_equal_history():
    dash = Dashboard(kl_target=6.0, max_fps=1e9)
    for step in range(30):
        dash.log(ppo_metrics(step))

    assert len(dash.history) == 30 and dash.n_redraws == 30
    titles = [a.text for a in dash.figure.layout.annotations]
    assert titles == [title for title, _ in PPO_PANELS]
    for _, traces in PPO_PANELS:
        for key, name in traces:
            if key == "objective/kl_target":
                continue
            t = trace(dash, name)
            assert list(t.x) == list(range(30))
            assert list(t.y) == [m[key] for m in dash.history], key
    assert list(trace(dash, "KL target").y) == [6.0] * 30
    assert trace(dash, "KL target").line.dash == "dash"
    status = dash._status.value
    assert "step 29" in status and "KL 5.8 / 6" in status and "3.1 s/update" in status


def test_a_change_of_reward_model_is_marked_in_the_score_panel():
    """The online loop's refits swap r between updates: each change of "reward/model" gets a dotted line in the
    Score panel, between the last update of the old r and the first of the new one; updates without a name do not
    count as a change."""
    dash = Dashboard(max_fps=1e9)
    names = ["r:aaaa", "r:aaaa", "r:bbbb", None, "r:bbbb", "r:cccc", "r:cccc"]
    for step, name in enumerate(names, start=1):
        dash.log({**ppo_metrics(step), **({"reward/model": name} if name else {})})
    assert dash.reward_changes() == [3, 6]
    shapes = dash.figure.layout.shapes
    assert [(sh.x0, sh.x1, sh.xref, sh.yref) for sh in shapes] == [(2.5, 2.5, "x", "y domain"),
                                                                  (5.5, 5.5, "x", "y domain")]
    assert {sh.label.text for sh in shapes} == {"new r"} and {sh.line.dash for sh in shapes} == {"dot"}
    titles = [a.text for a in dash.figure.layout.annotations]
    assert titles == [title for title, _ in PPO_PANELS]   # the panel titles stay
    # a saved run's history (e.g. metrics.jsonl after a restart) shows the same marks
    loaded = Dashboard(max_fps=1e9)
    loaded.load_history(dash.history)
    assert [sh.x0 for sh in loaded.figure.layout.shapes] == [2.5, 5.5]
    one = Dashboard(max_fps=1e9)
    for step in range(1, 4):
        one.log({**ppo_metrics(step), "reward/model": "fn:vader"})
    assert one.reward_changes() == [] and not one.figure.layout.shapes


def test_missing_keys_leave_traces_empty_and_x_falls_back_to_index():
    dash = Dashboard(max_fps=1e9)  # no kl_target: the target line stays empty too
    for i in range(3):
        dash.log({"objective/kl": float(i), "loss/policy_avg": math.nan})
    assert list(trace(dash, "KL").x) == [0, 1, 2]
    assert list(trace(dash, "policy loss").y) == [None] * 3  # NaN is drawn as a gap (JSON has no NaN)
    assert len(trace(dash, "score").y) == 0
    assert len(trace(dash, "KL target").y) == 0
    # a target logged by the trainer (e.g. an adaptive controller's) overrides the constructor's
    dash.log({"objective/kl": 3.0, "objective/kl_target": 4.0})
    assert list(trace(dash, "KL target").y) == [4.0]


def test_throttle_and_flush():
    dash = Dashboard(max_fps=1.0)
    for step in range(100):
        dash.log(ppo_metrics(step))
    assert 1 <= dash.n_redraws <= 3  # the first log draws at once; the rest fall inside one second
    assert len(trace(dash, "score").y) < 100

    dash.flush()
    assert list(trace(dash, "score").y) == [m["objective/scores"] for m in dash.history]
    assert "step 99" in dash._status.value


def test_reward_model_layout():
    dash = Dashboard(max_fps=1e9)
    for step in range(10):
        metrics = {"step": step, "rm/loss": 0.7 - 0.01 * step, "rm/lr": 1e-5, "rm/chance_loss": math.log(4)}
        if step % 5 == 4:  # held-out metrics every few steps, as a trainer logs them
            metrics |= {"rm/heldout_loss": 0.69, "rm/heldout_accuracy": 0.3 + 0.01 * step,
                        "rm/chance_accuracy": 0.25}
        dash.log(metrics)

    assert [a.text for a in dash.figure.layout.annotations] == ["Loss", "Held-out accuracy", "Learning rate"]
    assert list(trace(dash, "held-out accuracy").x) == [4, 9]
    assert list(trace(dash, "chance ln(k)").y) == [math.log(4)] * 10
    assert list(trace(dash, "chance").y) == [0.25, 0.25]
    assert not any(t.name == "KL" for t in dash.figure.data)
    assert "held-out acc 0.39" in dash._status.value


def test_a_single_point_is_drawn_as_a_marker_and_long_series_as_lines():
    dash = Dashboard(kl_target=6.0, max_fps=1e9)
    dash.log(ppo_metrics(1))  # a line through one point draws nothing: the first update must be visible
    assert "markers" in trace(dash, "score").mode and "markers" in trace(dash, "KL target").mode
    for step in range(2, MARKERS_UP_TO + 2):
        dash.log(ppo_metrics(step))
    assert trace(dash, "score").mode == "lines" and len(trace(dash, "score").y) == MARKERS_UP_TO + 1


def test_loaded_history_is_shown_and_an_empty_one_does_not_wait_forever():
    dash = Dashboard("reward model", max_fps=1e9)
    dash.load_history([{"step": 1, "rm/loss": 1.3, "rm/heldout_accuracy": 0.5, "rm/chance_accuracy": 0.25}])
    assert "step 1" in dash._status.value and list(trace(dash, "held-out accuracy").y) == [0.5]
    assert "markers" in trace(dash, "held-out accuracy").mode

    empty = Dashboard("reward model")  # e.g. a reward model saved before its metrics were kept
    empty.load_history([])
    assert "waiting" not in empty._status.value and "no saved metrics" in empty._status.value
    assert "waiting for the first update" in Dashboard()._status.value


def test_an_empty_response_is_marked_in_the_samples_table():
    dash = Dashboard(max_fps=1e9)
    dash.log(ppo_metrics(0), [{"query": "q", "response": "", "score": 0.1}, {"query": "", "response": "r"}])
    assert dash._table.value.count("(empty)") == 1  # only the response: an empty query is not a sample's fault


def test_samples_table_escapes_and_keeps_the_end_of_long_queries():
    dash = Dashboard(max_fps=1e9, max_samples=2)
    long_query = "start " + "x" * 500 + " the end"
    samples = [
        {"query": "old", "response": "dropped", "score": 0.0},
        {"query": "<b>bold</b> & co", "response": "fine", "score": 0.5, "kl": 1.25},
        {"query": long_query, "response": "ok", "score": -1.0},
    ]
    dash.log(ppo_metrics(0), samples)
    table = dash._table.value
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in table and "<b>bold" not in table
    assert "dropped" not in table  # only the most recent max_samples
    assert "<th>kl</th>" in table and "1.25" in table
    assert "…" in table and "the end" in table and "start" not in table
    assert len(table.split("…")[1].split("<")[0]) == MAX_QUERY_CHARS - 1


def test_from_jsonl_and_refresh(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(ppo_metrics(i)) + "\n" for i in range(3)))
    dash = Dashboard.from_jsonl(path, kl_target=6.0)
    assert [m["step"] for m in dash.history] == [0, 1, 2]
    assert len(trace(dash, "score").y) == 3
    assert dash.refresh_from_jsonl(path) == 0

    # a running job appends two lines and is halfway through a third
    with path.open("a") as f:
        f.write(json.dumps(ppo_metrics(3)) + "\n" + json.dumps(ppo_metrics(4)) + "\n" + '{"step": 5, "obj')
    assert dash.refresh_from_jsonl(path) == 2
    assert len(trace(dash, "score").y) == 5 and "step 4" in dash._status.value

    path.write_text(json.dumps(ppo_metrics(0)) + "\n")  # a new job started the file again
    assert dash.refresh_from_jsonl(path) == 1 and [m["step"] for m in dash.history] == [0]


def test_html_is_styled_by_the_one_stylesheet():
    dash = Dashboard(max_fps=1e9)
    dash.log(ppo_metrics(0), [{"query": "q", "response": "r", "score": 0.5}])
    shown = [w.value for w in dash.widget.children if isinstance(w, widgets.HTML)]
    (sheet,) = [v for v in shown if "<style" in v]  # one <style> element, injected once, not per redraw
    assert ".labkit-samples td" in sheet and "<table class='labkit-samples'>" in dash._table.value
    assert "step 0" in dash._status.value and not any("style=" in v for v in shown)


def test_log_from_thread_while_main_thread_logs():
    dash = Dashboard(max_fps=200.0)
    n = 300

    def train():
        for step in range(n):
            dash.log({"step": step, "objective/scores": 1.0}, [{"query": "q", "response": "r"}])

    worker = threading.Thread(target=train)
    worker.start()
    for step in range(n):
        dash.log({"step": step, "objective/kl": 2.0})
        if step % 50 == 0:
            dash.flush()
    worker.join()
    dash.flush()

    assert len(dash.history) == 2 * n
    assert len(trace(dash, "score").y) == n and len(trace(dash, "KL").y) == n


def test_notebook_executes_headless(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel must import this checkout's labkit, as this test process does.
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    cells = [
        # the "python3" kernelspec runs the Python that runs the client: check it is this venv's
        f"import sys\nassert sys.prefix == {sys.prefix!r}, sys.prefix",
        "from labkit.widgets import Dashboard\ndash = Dashboard(kl_target=6.0)\ndash",
        "for step in range(5):\n"
        "    dash.log({'step': step, 'objective/scores': 0.1 * step, 'objective/kl': float('nan')},\n"
        "             [{'query': '<i>q</i>', 'response': 'r', 'score': 0.1 * step}])\n"
        "dash.flush()\n"
        "print(len(dash.history), dash.n_redraws)",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}

    nbclient.NotebookClient(nb, kernel_name="python3", timeout=60,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    (display,) = nb.cells[1].outputs
    assert "application/vnd.jupyter.widget-view+json" in display["data"]
    (printed,) = nb.cells[2].outputs  # nothing on stderr: a NaN metric must not break serialization
    assert printed["name"] == "stdout" and printed["text"].startswith("5 ")
    # nbclient stores the widgets' final state: the status line saw the last update
    states = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    values = [s["state"].get("value", "") for s in states.values() if s["model_name"] == "HTMLModel"]
    assert any("step 4" in v for v in values)
    assert any("&lt;i&gt;q&lt;/i&gt;" in v for v in values)
