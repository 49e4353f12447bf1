"""Live training curves for PPO and reward-model training: a status line, a plotly figure, a sample table.

A trainer calls `dash.log(metrics, samples)` once per update. The dashboard keeps every metrics dict it is
given in `history` and redraws in place at most `max_fps` times a second, so logging costs almost nothing.

    dash = Dashboard(kl_target=6.0)
    dash                      # display it in its own cell, before the training cell
    trainer.train(100)        # the trainer calls dash.log(...) per update and dash.flush() at the end

A job started from the command line writes the same dicts to a .jsonl file; watch it with
`Dashboard.from_jsonl(path)` and `dash.refresh_from_jsonl(path)`.
"""

import html
import json
import math
import threading
import time
from pathlib import Path

import ipywidgets as widgets
import plotly.graph_objects as go

# A panel is (title, ((metric key, legend name), ...)). TRL's metric names, which RLHF users already read.
PPO_PANELS = (
    ("Score", (("objective/scores", "score"), ("objective/rlhf_reward", "rlhf_reward"))),
    ("KL (nats, summed over tokens)", (("objective/kl", "KL"), ("objective/kl_target", "KL target"))),
    ("beta", (("objective/kl_coef", "beta"),)),
    ("Entropy", (("objective/entropy", "entropy"),)),
    ("Losses", (("loss/policy_avg", "policy loss"), ("loss/value_avg", "value loss"))),
    ("Clip fraction", (("policy/clipfrac_avg", "policy clipfrac"), ("val/clipfrac_avg", "value clipfrac"))),
)
RM_PANELS = (
    ("Loss", (("rm/loss", "loss"), ("rm/heldout_loss", "held-out loss"), ("rm/chance_loss", "chance ln(k)"))),
    ("Held-out accuracy", (("rm/heldout_accuracy", "held-out accuracy"), ("rm/chance_accuracy", "chance"))),
    ("Learning rate", (("rm/lr", "lr"),)),
)
# Reference levels, not measurements: drawn as dashed grey lines.
REFERENCE_KEYS = {"objective/kl_target", "rm/chance_loss", "rm/chance_accuracy"}
# Which reward scored each PPO update (labkit.rl.trainer.reward_name). Where it changes (the online loop's refits)
# the Score panel gets a dotted line: scores of two reward models are on two scales, and a jump there is r's doing.
REWARD_KEY = "reward/model"

MAX_QUERY_CHARS = 160  # longer queries are cut from the front: the response continues the query's end
ROW_HEIGHT_PX = 260
# A trace with at most this many points also draws a marker at each: a line through one point draws nothing
# (the first update, a held-out metric logged once), and isolated points between NaN gaps would vanish too.
# Longer series are lines only, where markers would merge into a thick band.
MARKERS_UP_TO = 40
EMPTY = "(empty)"  # shown for an empty response: an empty cell looks like a rendering bug

# The dashboard's one stylesheet; its HTML only names these classes.
_CSS = """
.labkit-samples td, .labkit-samples th { padding: 2px 8px; text-align: left; vertical-align: top;
    white-space: pre-wrap; }
"""


class Dashboard:
    """Live curves of the metrics a trainer logs; `widget` (or the Dashboard itself) is what a notebook shows.

    The layout (PPO: 2x3 panels, reward model: 1x3) is chosen from the first history that is drawn:
    reward-model training if any key starts with "rm/", else PPO. Metrics missing from the history leave
    their trace empty. Safe to log from a background training thread while the notebook displays it.
    """

    def __init__(self, title: str = "labkit", kl_target: float | None = None, max_fps: float = 4.0,
                 max_samples: int = 8):
        if max_fps <= 0:
            raise ValueError(f"max_fps must be > 0, got {max_fps}")
        self.title = title
        self.kl_target = kl_target  # dashed line in the KL panel unless metrics carry "objective/kl_target"
        self.max_fps = max_fps
        self.max_samples = max_samples
        # Its own list of the logged dicts (not copies): trainers hand over one dict per update, not their history.
        self.history: list[dict] = []
        self.n_redraws = 0  # counts redraws, so that tests (and curious users) can see the throttle work

        # One lock around history and redraws: a training thread logs while the kernel's main thread
        # displays, flushes or reloads.
        self._lock = threading.Lock()
        self._samples: list[dict] = []
        self._last_redraw = -math.inf
        self._trace_keys: list[str] = []  # metric key of each trace in figure.data, in order
        self._reward_marks: list = []  # x of each reward-model change drawn in the Score panel
        self._loaded = False  # history came from `load_history` (a saved run), not from a trainer's `log`

        self._stylesheet = widgets.HTML(f"<style>{_CSS}</style>", layout=widgets.Layout(display="none"))
        self._status = widgets.HTML()
        # The figure exists (empty) from the start and gets its subplots in place on the first redraw:
        # a widget created while a long cell runs can stay blank in JupyterLab until the cell ends, but
        # updates to an already displayed one show live.
        self.figure = go.FigureWidget(layout=dict(
            height=ROW_HEIGHT_PX, template="plotly_white", margin=dict(l=50, r=20, t=40, b=40),
            xaxis=dict(visible=False), yaxis=dict(visible=False),
        ))
        self._table = widgets.HTML()
        self.widget = widgets.VBox([self._stylesheet, self._status, self.figure, self._table])
        self.widget.add_class("labkit-dashboard")
        self._status.value = self._status_html()

    # ---------------------------------------------------------------- public API

    def log(self, metrics: dict, samples: list[dict] | None = None) -> None:
        """Append one update's metrics (and optionally its samples); redraw if the last redraw is old enough."""
        with self._lock:
            self.history.append(metrics)
            if samples is not None:
                self._samples = list(samples)[-self.max_samples:]
            if time.monotonic() - self._last_redraw >= 1.0 / self.max_fps:
                self._redraw()

    def flush(self) -> None:
        """Redraw now, whatever the throttle says (call at the end of training, or after an interrupt)."""
        with self._lock:
            self._redraw()

    def load_history(self, history: list[dict]) -> None:
        """Replace the history (e.g. a resumed trainer's `history`, a loaded reward model's, or a metrics .jsonl
        file's) and redraw. Logging continues after it."""
        with self._lock:
            self.history = list(history)
            self._loaded = True
            self._redraw()

    @classmethod
    def from_jsonl(cls, path, **kw) -> "Dashboard":
        """A dashboard of the metrics file `path` (one JSON dict per line); `kw` go to the constructor."""
        dash = cls(**kw)
        dash.refresh_from_jsonl(path)
        return dash

    def refresh_from_jsonl(self, path) -> int:
        """Re-read the metrics file; redraw and return the number of new lines (0: nothing new).

        Only complete lines count: a running job may be halfway through writing the last one. A file
        shorter than last time was rewritten by a new job: its lines replace the history.
        """
        text = Path(path).read_text()
        complete = text[: text.rfind("\n") + 1]
        rows = []
        for number, line in enumerate(complete.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: not a JSON metrics dict ({e})") from None
        seen = len(self.history)
        if len(rows) == seen:
            return 0
        self.load_history(rows)
        return len(rows) - seen if len(rows) > seen else len(rows)

    def _repr_mimebundle_(self, **kwargs):
        # Lets `dash` alone at the end of a cell display the widget; library code never calls display().
        return self.widget._repr_mimebundle_(**kwargs)

    # ---------------------------------------------------------------- drawing (caller holds the lock)

    def _redraw(self) -> None:
        self._last_redraw = time.monotonic()
        self.n_redraws += 1
        if self.history and not self._trace_keys:
            self._build_panels()
        if self._trace_keys:
            with self.figure.batch_update():  # one message to the browser per redraw, not one per trace
                for trace, key in zip(self.figure.data, self._trace_keys):
                    xs, ys = self._series(key)
                    trace.x, trace.y = xs, ys
                    mode = "lines+markers" if len(xs) <= MARKERS_UP_TO else "lines"
                    if trace.mode != mode:  # only a change is sent to the browser
                        trace.mode = mode
                marks = self.reward_changes()
                if marks != self._reward_marks and not self._trace_keys[0].startswith("rm/"):  # PPO panels only
                    self._reward_marks = marks
                    self.figure.layout.shapes = [
                        dict(type="line", xref="x", yref="y domain", x0=x - 0.5, x1=x - 0.5, y0=0, y1=1,
                             line=dict(dash="dot", color="grey", width=1),
                             label=dict(text="new r", textposition="end", font=dict(size=10, color="grey")))
                        for x in marks]
        self._status.value = self._status_html()
        self._table.value = samples_table_html(self._samples)

    def _build_panels(self) -> None:
        """Give the (already displayed) empty figure its subplots and one empty trace per metric."""
        is_rm = any(key.startswith("rm/") for m in self.history for key in m)
        panels = RM_PANELS if is_rm else PPO_PANELS
        rows, cols = (1, 3) if is_rm else (2, 3)
        traces, positions = [], []
        for i, (_, panel_traces) in enumerate(panels):
            for key, name in panel_traces:
                if key in REFERENCE_KEYS:
                    line, marker = dict(dash="dash", color="grey", width=1), dict(color="grey", size=4)
                else:
                    line, marker = dict(width=2), dict(size=6)
                traces.append(go.Scatter(x=[], y=[], name=name, mode="lines+markers", line=line, marker=marker))
                positions.append((i // cols + 1, i % cols + 1))
                self._trace_keys.append(key)
        with self.figure.batch_update():  # layout edits as one message
            self.figure.set_subplots(rows, cols, subplot_titles=[title for title, _ in panels],
                                     horizontal_spacing=0.08, vertical_spacing=0.15)
            self.figure.update_layout(height=ROW_HEIGHT_PX * rows)
            self.figure.update_xaxes(visible=True)
            self.figure.update_yaxes(visible=True)
        self.figure.add_traces(traces, rows=[r for r, _ in positions], cols=[c for _, c in positions])

    def reward_changes(self) -> list:
        """Steps of the updates scored by another reward than the update before ("reward/model" differs: the online
        loop refit r in between). Updates that do not name their reward neither count nor break the comparison."""
        steps, last = [], None
        for i, m in enumerate(self.history):
            name = m.get(REWARD_KEY)
            if name is None:
                continue
            if last is not None and name != last:
                steps.append(m.get("step", i))
            last = name
        return steps

    def _series(self, key: str) -> tuple[list, list]:
        """(x, y) of one metric over the history: x is "step" if logged, else the entry's index.

        Entries without the metric are skipped, so metrics logged every few updates (held-out loss)
        draw as connected lines. NaN and inf become None, a gap in the line: they are not valid JSON,
        and the kernel would warn on every redraw after a loss blew up.
        """
        xs, ys = [], []
        for i, m in enumerate(self.history):
            value = self._value(m, key)
            if value is not None:
                xs.append(m.get("step", i))
                ys.append(None if isinstance(value, float) and not math.isfinite(value) else value)
        return xs, ys

    def _value(self, m: dict, key: str):
        if key == "objective/kl_target":
            return m.get(key, self.kl_target)
        return m.get(key)

    def _latest(self, key: str):
        """The most recent logged value of `key`, or None (metrics logged every few updates stay shown)."""
        for m in reversed(self.history):
            value = self._value(m, key)
            if value is not None:
                return value
        return None

    def _status_html(self) -> str:
        head = f"<b>{html.escape(self.title)}</b>"
        if not self.history:
            # a saved run with no metrics (a reward model saved before labkit kept them) never gets an update
            return f"{head} · " + ("no saved metrics to show" if self._loaded else "waiting for the first update")
        parts = [head, f"step {self.history[-1].get('step', len(self.history) - 1)}"]
        if self._trace_keys and self._trace_keys[0].startswith("rm/"):
            named = (("loss", "rm/loss"), ("held-out loss", "rm/heldout_loss"),
                     ("held-out acc", "rm/heldout_accuracy"), ("lr", "rm/lr"))
        else:
            named = (("score", "objective/scores"), ("KL", "objective/kl"), ("beta", "objective/kl_coef"))
        for label, key in named:
            value = self._latest(key)
            if value is None:
                continue
            text = f"{label} {_fmt(value)}"
            if key == "objective/kl" and self._latest("objective/kl_target") is not None:
                text += f" / {_fmt(self._latest('objective/kl_target'))}"
            parts.append(text)
        seconds = self.history[-1].get("time/step")
        if seconds is not None:
            parts.append(f"{_fmt(seconds)} s/update")
        return " · ".join(parts)


def samples_table_html(samples: list[dict]) -> str:
    """An HTML table of samples (dicts like query/response/score/kl), every key that appears, text escaped."""
    if not samples:
        return ""
    columns = list(dict.fromkeys(key for s in samples for key in s))
    header = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    rows = "".join("<tr>" + "".join(f"<td>{_cell_text(c, s.get(c, ''))}</td>" for c in columns) + "</tr>"
                   for s in samples)
    return f"<table class='labkit-samples'><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>"


def _cell_text(column: str, value) -> str:
    if isinstance(value, float):
        return _fmt(value)
    text = str(value)
    if column == "response" and not text.strip():
        return EMPTY
    if column == "query" and len(text) > MAX_QUERY_CHARS:
        text = "…" + text[-(MAX_QUERY_CHARS - 1):]
    return html.escape(text)


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
