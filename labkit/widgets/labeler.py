"""The labeling widget: a human picks the best of k responses, one comparison at a time, into a LabelStore.

    labeler = ComparisonLabeler(store, SENTIMENT, labeler="alice", refill=lambda: make_comparisons(
                                    store, model, tok, SENTIMENT, prompts[:8], progress=False))
    labeler                   # show it; click a response's button, or click the key area and press 1-4

A thin view over the store: the queue is `store.pending(labeler, task, kind, source=)`, every click is one
`record_label(..., if_pending=True)` (which returns only after the label is committed to disk, and refuses a
comparison this labeler already labeled or skipped in another view) and only then does the view move on.
Each render reads what it shows from the store (the queue, and the labeler's labels for the progress line),
and the labeler's name is the one in the name box; the view itself holds only what the store cannot know
(which comparison is on screen, since when, whether a refill runs). Restart the kernel and the queue resumes
where it was.

Keys and mouse mix: after a click on one of the widget's buttons the key area takes the focus back (a
button keeps it otherwise, and JupyterLab then reads '1'-'4' and 'a'/'b' as its own shortcuts), and it keeps
it as comparisons change, unless the person moved to another cell, widget or text box.

The responses are shown in a random order per comparison, drawn from (seed, comparison id), so that position
bias does not favour one source and a comparison shows the same way again (after an undo, or after a restart
with the same seed). The order is stored with the label (`permutation[j]` = stored index shown at position
j), and a click on position j stores `best = permutation[j]`.
"""

from __future__ import annotations

import html
import random
import string
import threading
import time

import anywidget
import ipywidgets as widgets
import traitlets

from labkit.labeling.store import AlreadyLabeledError, Comparison, LabelStore
from labkit.tasks import Task, get_task

LETTERS = string.ascii_uppercase
# Key -> display position. Digits 1-9 and letters a-i: enough for any k the paper uses (4), and 's'/'u'
# (skip, undo) stay free.
POSITION_KEYS = {**{str(j + 1): j for j in range(9)}, **{chr(ord("a") + j): j for j in range(9)}}
SKIP_KEY, UNDO_KEY = "s", "u"
# Added to the instructions of a task that truncates: make_comparisons stores only responses with a truncation
# point, but older stores (or require_truncation=False) hold tagged ones, and the labeler must know what to do.
NO_CUT_POINT_INSTRUCTION = ("A response tagged “no truncation point” scores the fixed penalty in PPO whatever you "
                            "pick, so judge the others (skip if all are tagged).")

# The labeler's one stylesheet: the view's HTML and widgets only name these classes. Scoping every rule by
# .labkit-labeler also makes it more specific than ipywidgets' defaults (e.g. the note box's fixed width).
_CSS = """
.labkit-labeler .labkit-title { font-weight: bold; font-size: 1.1em; }
.labkit-labeler .labkit-instructions-text { margin: 2px 0 6px; line-height: 1.4; }
.labkit-labeler .labkit-meta { color: #777; font-size: 0.9em; }
/* A long prompt scrolls. column-reverse opens it scrolled to its end, which the responses continue. */
.labkit-labeler .labkit-prompt-scroll { max-height: 14em; overflow-y: auto; display: flex;
    flex-direction: column-reverse; border-left: 3px solid #90a4ae; padding: 4px 8px; background: #f5f7f8;
    margin: 4px 0; }
.labkit-labeler .labkit-prompt-text { white-space: pre-wrap; line-height: 1.4; }
.labkit-labeler .labkit-row { align-items: flex-start; }
.labkit-labeler .labkit-choice { width: 3.5em; flex: 0 0 auto; }
.labkit-labeler .labkit-response { flex: 1 1 auto; }
.labkit-labeler .labkit-response-text { white-space: pre-wrap; line-height: 1.4; padding: 4px 8px;
    border: 1px solid #ddd; border-radius: 4px; margin: 2px 0 4px 6px; }
.labkit-labeler .labkit-breaks, .labkit-labeler .labkit-cut { color: #999; }
.labkit-labeler .labkit-cut { text-decoration: line-through; }
.labkit-labeler .labkit-cut-label { color: #999; font-size: 0.85em; }
.labkit-labeler .labkit-no-cut-point { color: #e65100; font-size: 0.85em; }
.labkit-labeler .labkit-note { width: 100%; height: 3.2em; }
.labkit-labeler .labkit-empty-message { padding: 8px; background: #fff8e1; border: 1px solid #ffb300;
    border-radius: 4px; }
.labkit-labeler .labkit-status { color: #555; }
.labkit-labeler .labkit-error { color: #c62828; }
.labkit-labeler .labkit-labeler-name { width: 16em; }
.labkit-labeler .labkit-progress { margin-left: 1em; }
"""

_KEYS_ESM = """
function render({ model, el }) {
  const box = document.createElement("div");
  box.className = "labkit-keys-area";
  // Focusable, and excluded from JupyterLab's shortcuts: without this, 'a'/'b' in command mode insert cells.
  box.tabIndex = 0;
  box.setAttribute("data-lm-suppress-shortcuts", "true");
  const hint = () => { box.textContent = model.get("hint"); };
  hint();
  model.on("change:hint", hint);

  // Focus. A clicked button keeps the focus, so the next key would go to JupyterLab ('a' inserts a cell):
  // a click on a button of this labeler gives the focus back to this area. Python bumps `focus_requests`
  // after each action and new comparison; the area takes the focus then only if the person was using it
  // (this area or one of the labeler's buttons had the focus last) and nothing else has it now, so
  // focus is never taken from another cell, widget or text box the person moved to.
  const root = () => el.closest(".labkit-labeler") || el;
  const isOurButton = (t) => t instanceof Element && t.closest("button") !== null && root().contains(t);
  let wanted = false;
  const free = () => {
    const a = document.activeElement;
    return a === box || a === null || a === document.body || isOurButton(a);
  };
  let tries = 0;
  const take = () => {
    if (!wanted || !free() || document.activeElement === box) return;
    // A new comparison (or the area itself, after an empty queue) may reach the page a little after the
    // request: an area that is not displayed cannot take the focus, so try again for a while.
    if (box.getClientRects().length === 0) {
      if (tries++ < 50) setTimeout(take, 20);
      return;
    }
    box.focus({ preventScroll: true });
  };
  const request = () => { tries = 0; take(); };
  const onFocusIn = (e) => { wanted = e.target === box || isOurButton(e.target); };
  const onClick = (e) => {
    if (!isOurButton(e.target)) return;
    wanted = true;
    setTimeout(request, 0);  // after the button's own click handler has sent the click to Python
  };
  document.addEventListener("focusin", onFocusIn, true);
  document.addEventListener("click", onClick, true);
  model.on("change:focus_requests", request);
  box.addEventListener("keydown", (e) => {
    // Leave browser shortcuts (Ctrl/Cmd+...), Tab (moving focus away) and Escape alone.
    if (e.ctrlKey || e.metaKey || e.altKey || e.key === "Tab" || e.key === "Escape") return;
    e.stopPropagation();
    e.preventDefault();
    // A held-down key auto-repeats; one press must make at most one label.
    if (e.repeat || e.key.length !== 1) return;
    model.set("key", e.key.toLowerCase());
    // The counter makes pressing the same key twice a change Python sees.
    model.set("presses", model.get("presses") + 1);
    model.save_changes();
  });
  el.appendChild(box);
  return () => {
    document.removeEventListener("focusin", onFocusIn, true);
    document.removeEventListener("click", onClick, true);
  };
}
export default { render };
"""

_KEYS_CSS = """
.labkit-keys-area { padding: 6px 10px; border: 1px dashed #999; border-radius: 4px; color: #555;
                    cursor: pointer; user-select: none; }
.labkit-keys-area:focus { outline: 2px solid #1976d2; border-color: transparent; color: #1976d2;
                          background: #e3f2fd; }
"""


class KeyCapture(anywidget.AnyWidget):
    """A focusable area that forwards single key presses to Python as (`key`, `presses`).

    Core ipywidgets have no key events. Only presses made while this area has focus arrive, so typing in
    any other widget (e.g. the note box) never reaches it. `request_focus()` asks the page to focus the area
    again, which it does only if the person was using it or a button of the same `.labkit-labeler`.
    """

    _esm = _KEYS_ESM
    _css = _KEYS_CSS
    hint = traitlets.Unicode("").tag(sync=True)
    key = traitlets.Unicode("").tag(sync=True)
    presses = traitlets.Int(0).tag(sync=True)
    # A counter, like `presses`: each bump is a change the page sees, however often it is asked.
    focus_requests = traitlets.Int(0).tag(sync=True)

    def request_focus(self):
        self.focus_requests += 1


class ComparisonLabeler:
    """Label the comparisons of one task (and kind) that `labeler` has not labeled or skipped yet.

    source: only comparisons with a response from this source, e.g. the blind evaluation of the policy as it is
    now (`ComparisonLabeler(store, task, kind="eval", source=policy_source(trainer))`): an older policy's
    comparisons, which its win rate no longer counts, are then not shown.

    refill: called with no arguments, in a background thread (one at a time), when fewer than `low_water`
    comparisons are left; it should add comparisons to the store (e.g. a lambda around make_comparisons).
    seed: seeds the order in which each comparison's responses are shown.
    """

    def __init__(self, store: LabelStore, task: Task | str, labeler: str = "me", kind: str | None = None,
                 refill=None, low_water: int = 5, seed: int | None = None, source: str | None = None):
        if not isinstance(labeler, str) or not labeler.strip():
            raise ValueError(f"labeler must be a non-empty name such as 'alice', got {labeler!r}")
        if source is not None and (not isinstance(source, str) or not source):
            raise ValueError(f"source must be a model's name as stored with comparisons (e.g. 'rho', or "
                             f"labeling.comparisons.policy_source(trainer)), or None for every source; got {source!r}")
        if refill is not None and not callable(refill):
            raise TypeError(f"refill must be a function taking no arguments (or None), got {type(refill).__name__}")
        self.store = store
        self.task = get_task(task)
        self.kind = kind
        self.source = source
        self.refill = refill
        self.low_water = low_water
        self._seed = random.randrange(2**63) if seed is None else seed

        # What the store cannot know: the comparison on screen, since when, and when this labeler's session began.
        self.current: Comparison | None = None
        self._shown_at: float | None = None
        self._session_start: float | None = None
        self._next: Comparison | None = None  # preloaded: the comparison after `current`
        self._refill_thread: threading.Thread | None = None
        self._refilling = False
        # Clicks run on the kernel's main thread, a finished refill on its own thread: one lock for the view.
        self._lock = threading.RLock()

        self._build(labeler.strip())
        with self._lock:
            self._refresh(keep_current=False)

    @property
    def labeler(self) -> str:
        """Who is labeling: the name in the labeler box."""
        return self.labeler_name.value.strip()

    @property
    def permutation(self) -> list[int]:
        """The order the current comparison is shown in: display position -> stored index ([] if none)."""
        if self.current is None:
            return []
        order = list(range(self.current.k))
        random.Random(f"{self._seed}:{self.current.id}").shuffle(order)
        return order

    # ---- the view ----

    def _build(self, labeler: str):
        self._stylesheet = widgets.HTML(f"<style>{_CSS}</style>", layout=widgets.Layout(display="none"))
        instructions = self.task.instructions
        if self.task.truncation is not None:
            instructions = f"{instructions} {NO_CUT_POINT_INSTRUCTION}"
        header = widgets.HTML(
            f"<div class='labkit-title'>{html.escape(self.task.title)}</div>"
            f"<div class='labkit-instructions-text'>{html.escape(instructions)}</div>"
        )
        header.add_class("labkit-instructions")
        self._meta = widgets.HTML()
        self._meta.add_class("labkit-meta")
        self._prompt = widgets.HTML()
        self._prompt.add_class("labkit-prompt")
        self._rows: list[widgets.HBox] = []  # one per display position, grown as needed for larger k
        self._button_pool: list[widgets.Button] = []
        self._response_pool: list[widgets.HTML] = []
        self.buttons: list[widgets.Button] = []
        self._responses = widgets.VBox()

        self.skip_button = widgets.Button(description="Skip", tooltip="none is better (key s)", icon="forward")
        self.skip_button.add_class("labkit-skip")
        self.skip_button.on_click(lambda _: self.skip())
        self.undo_button = widgets.Button(description="Undo", tooltip="retract your last label or skip (key u)",
                                          icon="undo")
        self.undo_button.add_class("labkit-undo")
        self.undo_button.on_click(lambda _: self.undo())
        self.note = widgets.Textarea(placeholder="optional note, stored with your next label or skip")
        self.note.add_class("labkit-note")

        self.keys = KeyCapture()
        self.keys.add_class("labkit-keys")
        self.keys.observe(self._on_key, names="presses")

        self.labeler_name = widgets.Text(value=labeler, description="labeler",
                                         continuous_update=False)  # apply the name on Enter or blur, not per keystroke
        self.labeler_name.add_class("labkit-labeler-name")
        self.labeler_name.observe(self._on_labeler_name, names="value")
        self._progress = widgets.HTML()
        self._progress.add_class("labkit-progress")
        self._status = widgets.HTML()
        self._status.add_class("labkit-status")

        self._empty = widgets.HTML()
        self._empty.add_class("labkit-empty")
        self.refill_button = widgets.Button(
            description="Refill" if self.refill is not None else "Check again",
            tooltip="sample new comparisons" if self.refill is not None else "look for new comparisons in the store",
        )
        self.refill_button.add_class("labkit-refill")
        self.refill_button.on_click(lambda _: self._on_refill_button())

        self._comparison_box = widgets.VBox([
            self._meta, self._prompt, self._responses,
            widgets.HBox([self.skip_button, self.undo_button]), self.note, self.keys,
        ])
        self._empty_box = widgets.VBox([self._empty, self.refill_button])
        self.widget = widgets.VBox([
            self._stylesheet, header, self._comparison_box, self._empty_box, self._status,
            widgets.HBox([self.labeler_name, self._progress]),
        ])
        self.widget.add_class("labkit-labeler")

    def _repr_mimebundle_(self, **kwargs):
        # Lets a cell that ends in `labeler` show the widget.
        return self.widget._repr_mimebundle_(**kwargs)

    def _ensure_rows(self, k: int):
        """Show k response rows (button + text), creating rows the first time a larger k appears."""
        while len(self._rows) < k:
            j = len(self._rows)
            button = widgets.Button(description=LETTERS[j], tooltip=f"{LETTERS[j]} is best (key {j + 1})")
            button.add_class("labkit-choice")
            button.add_class(f"labkit-choice-{j}")
            button.on_click(lambda _, j=j: self.choose(j))
            text = widgets.HTML()
            text.add_class("labkit-response")
            text.add_class(f"labkit-response-{j}")
            row = widgets.HBox([button, text])
            row.add_class("labkit-row")
            self._button_pool.append(button)
            self._response_pool.append(text)
            self._rows.append(row)
        if len(self._responses.children) != k:  # resend children only when k changes
            self._responses.children = self._rows[:k]
        self.buttons = self._button_pool[:k]

    def _show(self, c: Comparison):
        """Render comparison `c` in its order and start its clock."""
        self.current, self._shown_at = c, time.time()
        self._ensure_rows(c.k)
        self._meta.value = f"comparison #{c.id} · task {html.escape(c.task)} · kind {html.escape(c.kind)}"
        self._prompt.value = prompt_html(c.query)
        full = c.extra.get("full_responses")
        found = c.extra.get("found")
        for j, i in enumerate(self.permutation):
            self._response_pool[j].value = response_html(
                c.responses[i], None if full is None else full[i], None if found is None else found[i])
        letters = f"a-{chr(ord('a') + min(c.k, 9) - 1)}"
        self.keys.hint = f"click here, then press 1-{min(c.k, 9)} / {letters}, s = skip, u = undo"
        self._comparison_box.layout.display = None
        self._empty_box.layout.display = "none"

    def _show_empty(self):
        self.current, self._shown_at = None, None
        kind = "" if self.kind is None else f", kind {self.kind!r}"
        kind += "" if self.source is None else f", source {self.source!r}"
        if self._refilling:
            what_next = "new comparisons are being sampled and appear here when ready"
        elif self.refill is not None:
            what_next = "press Refill to sample more"
        else:
            what_next = "add comparisons to the store (labkit.labeling.comparisons.make_comparisons), then press Check again"
        self._empty.value = (
            f"<div class='labkit-empty-message'><b>Queue empty: refill.</b> {html.escape(self.labeler)} has labeled "
            f"or skipped every comparison of task {html.escape(self.task.name)!r}{html.escape(kind)}; "
            f"{html.escape(what_next)}.</div>"
        )
        self._comparison_box.layout.display = "none"
        self._empty_box.layout.display = None

    def _render_progress(self, queued: int):
        # The store's total, so that a restarted kernel does not read "labeled 0" over labels that are all there;
        # this session's count beside it, and the rate from it.
        total = self.store.count_labels(task=self.task.name, kind=self.kind, labeler=self.labeler, source=self.source)
        labeled = self._labeled_this_session()
        rate = "–"
        if labeled:
            minutes = max(time.time() - self._session_start, 1e-9) / 60
            rate = f"{labeled / minutes:.1f}"
        refilling = " · refilling…" if self._refilling else ""
        self._progress.value = (f"labeled {total} ({labeled} this session) · queued {queued} · {rate} labels/min"
                                f"{refilling}")

    def _labeled_this_session(self) -> int:
        """This labeler's live labels in this queue since the session began: undone ones no longer count."""
        if self._session_start is None:
            return 0
        return self.store.count_labels(task=self.task.name, kind=self.kind, labeler=self.labeler,
                                       since=self._session_start, source=self.source)

    def _say(self, text: str, error: bool = False):
        text = html.escape(text)
        self._status.value = f"<span class='labkit-error'>{text}</span>" if error and text else text

    # ---- the queue ----

    def _refresh(self, keep_current: bool, may_refill: bool = True):
        """Re-read the queue; show its head unless the current comparison is kept; preload the next one."""
        pending = self.store.pending(self.labeler, task=self.task.name, kind=self.kind, source=self.source)
        if may_refill and self.refill is not None and len(pending) < self.low_water:
            self._start_refill()
        if not (keep_current and self.current is not None and self.current.id in pending):
            if pending:
                head = pending[0]
                cached = self._next is not None and self._next.id == head
                self._show(self._next if cached else self.store.comparison(head))
            else:
                self._show_empty()
        if self._session_start is None and self.current is not None:
            self._session_start = time.time()  # the session (and its rate) begins with the first comparison shown
        self._render_progress(len(pending))
        # Keys go on working after a click or a change of comparison (the page decides whether focus is free).
        self.keys.request_focus()
        # Preload after rendering: the next click then only does a quick queue read and renders.
        after = [i for i in pending[:2] if self.current is None or i != self.current.id]
        if not after:
            self._next = None
        elif self._next is None or self._next.id != after[0]:
            self._next = self.store.comparison(after[0])

    def _start_refill(self):
        # Sampling takes seconds to minutes: never on the click path, and at most one at a time.
        if self._refilling:
            return
        self._refilling = True
        self._refill_thread = threading.Thread(target=self._run_refill, name="labkit-refill", daemon=True)
        self._refill_thread.start()

    def _run_refill(self):
        try:
            self.refill()
            error = None
        except Exception as e:  # noqa: BLE001 - shown to the labeler; the thread must not die silently
            error = e
        with self._lock:
            self._refilling = False
            if error is not None:
                self._say(f"refill failed: {type(error).__name__}: {error}", error=True)
            # Updates the count (and shows a comparison if the queue was empty). A refill that added too
            # little does not start another one by itself: the next click or the Refill button does.
            self._refresh(keep_current=True, may_refill=False)

    def _on_refill_button(self):
        with self._lock:
            self._say("")
            if self.refill is not None:
                self._start_refill()
            self._refresh(keep_current=True, may_refill=False)

    # ---- actions ----

    def choose(self, position: int):
        """Store that the response at display `position` (0 = A) is the best; same as clicking its button."""
        with self._lock:
            c = self._require_current("choose")
            if not 0 <= position < c.k:
                raise ValueError(f"position must be 0..{c.k - 1} (A..{LETTERS[c.k - 1]}) for comparison #{c.id}, "
                                 f"got {position}")
            order = self.permutation
            if self._act(lambda note: self.store.record_label(
                    c.id, order[position], self.labeler, permutation=order, shown_at=self._shown_at, note=note,
                    if_pending=True)):
                self._say(f"saved: {LETTERS[position]} is best in #{c.id}")
            self._refresh(keep_current=False)

    def skip(self):
        """Store that the labeler declined to pick (e.g. all responses equally bad); same as the Skip button."""
        with self._lock:
            c = self._require_current("skip")
            if self._act(lambda note: self.store.record_skip(
                    c.id, self.labeler, permutation=self.permutation, shown_at=self._shown_at, note=note,
                    if_pending=True)):
                self._say(f"skipped #{c.id}")
            self._refresh(keep_current=False)

    def undo(self):
        """Retract the labeler's most recent label or skip and show that comparison again."""
        with self._lock:
            try:
                undone = self.store.undo(self.labeler)
            except Exception as e:
                self._say(f"undo failed, nothing changed: {type(e).__name__}: {e}", error=True)
                raise
            if undone is None:
                self._say(f"nothing to undo: {self.labeler} has no label or skip left")
                return
            c = self.store.comparison(undone["comparison_id"])
            if (c.task != self.task.name or (self.kind is not None and c.kind != self.kind)
                    or (self.source is not None and self.source not in c.sources)):
                # The labeler's last action was made elsewhere (another task, kind or source): it is retracted,
                # but this view keeps its own queue.
                self._say(f"undid your {undone['type']} of comparison #{c.id} (task {c.task!r}, kind {c.kind!r}), "
                          "which is not in this queue")
                self._refresh(keep_current=True)
                return
            self._say(f"undid your {undone['type']} of #{c.id}: choose again")
            self._show(c)
            self._refresh(keep_current=True)

    def _require_current(self, action: str) -> Comparison:
        if self.current is None:
            self._say(f"cannot {action}: the queue is empty", error=True)
            raise RuntimeError(f"cannot {action}: no comparison is shown (the queue of {self.labeler!r} for task "
                               f"{self.task.name!r} is empty); add comparisons or call refill")
        return self.current

    def _act(self, write) -> bool:
        """Run one store write with the note; the view advances only after it returned (= committed). False:
        the store refused it because the comparison is no longer pending for this labeler."""
        try:
            write(self.note.value.strip() or None)
        except AlreadyLabeledError as e:
            # Another view of this store (a second widget for this labeler, e.g. a cell run twice, another
            # notebook or kernel) labeled or skipped it since it was shown here. A second pick would give one
            # person two live labels on one comparison, so nothing is written; the note stays for the next one.
            done = "labeled" if e.existing["type"] == "label" else "skipped"
            self._say(f"not saved: #{e.comparison_id} was already {done} in another view (that {e.existing['type']} "
                      f"is kept; Undo retracts your latest label or skip, wherever it was made). Showing your next "
                      "pending comparison.", error=True)
            return False
        except Exception as e:
            # Shown in the widget: an exception in a button callback only reaches JupyterLab's log console.
            self._say(f"NOT saved: {type(e).__name__}: {e}", error=True)
            raise
        self.note.value = ""
        return True

    # ---- inputs ----

    def _on_key(self, _change):
        key = self.keys.key
        if key == SKIP_KEY:
            if self.current is None:
                self._say("the queue is empty: nothing to skip")
            else:
                self.skip()
        elif key == UNDO_KEY:
            self.undo()
        elif key in POSITION_KEYS:
            position = POSITION_KEYS[key]
            if self.current is None:
                self._say("the queue is empty: nothing to choose")
            elif position >= self.current.k:
                self._say(f"key {key!r} means response {LETTERS[position]}, but this comparison has only "
                          f"{self.current.k} responses", error=True)
            else:
                self.choose(position)

    def _on_labeler_name(self, change):
        old, name = change["old"].strip(), change["new"].strip()
        if not name:
            self._say(f"the labeler name cannot be empty; keeping {old!r}", error=True)
            self.labeler_name.value = old  # comes back here with old == "", which was never applied
            return
        if not old or name == old:
            return
        with self._lock:
            # A new person: their own queue, and a new session.
            self._session_start = None
            self._say(f"labeling as {name}")
            self._refresh(keep_current=True)


def prompt_html(query: str) -> str:
    """The query, escaped, newlines kept; a long one scrolls and opens scrolled to its end."""
    return f"<div class='labkit-prompt-scroll'><div class='labkit-prompt-text'>{html.escape(query)}</div></div>"


def response_html(kept: str, full: str | None, found: bool | None) -> str:
    """One response: the kept (truncated) text, then what truncation cut away in grey, struck through.

    Leading line breaks are shown as grey marks: rendered as blank lines they push the text out of view,
    yet the labeler should still see that the response starts with them.
    """
    body = kept.lstrip("\n")
    breaks = len(kept) - len(body)
    marks = f"<span class='labkit-breaks' title='starts with {breaks} line break(s)'>{'↵' * breaks} </span>"
    parts = [marks] if breaks else []
    parts.append(f"<span>{html.escape(body)}</span>")
    if full is not None and full != kept:
        # Decoding the kept tokens alone can differ from the full text's prefix at a token boundary;
        # then show the whole untruncated text instead of a wrong remainder.
        cut = full[len(kept):] if full.startswith(kept) else full
        label = "[cut]" if full.startswith(kept) else "[cut; untruncated text:]"
        parts.append(f" <span class='labkit-cut-label'>{label}</span>"
                     f"<span class='labkit-cut'>{html.escape(cut)}</span>")
    if found is False:
        parts.append("<div class='labkit-no-cut-point'>(no truncation point: scored as penalty)</div>")
    return f"<div class='labkit-response-text'>{''.join(parts)}</div>"
