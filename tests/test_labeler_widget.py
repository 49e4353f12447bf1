"""ComparisonLabeler over a real LabelStore: clicks, keys, skip, undo, notes, labeler names, refill, styling; and
make_comparisons with the tiny model. The browser test (test_browser_labeler.py) checks rendering and keys."""

import re
import threading

import ipywidgets as widgets
import pytest
import torch

from labkit.labeling.comparisons import make_comparisons
from labkit.data import Prompt
from labkit.labeling.store import LabelStore
from labkit.tasks import SENTIMENT, TruncationRule
from labkit.widgets import ComparisonLabeler
from labkit.widgets.labeler import response_html

TASK = SENTIMENT.name


def add_fixed(store, n, k=4, start=0):
    """n comparisons with recognisable texts: query i, responses 'i:j' (stored index j)."""
    return [
        store.add_comparison(
            TASK, f"query {i}", [f"{i}:{j}" for j in range(k)],
            extra={"full_responses": [f"{i}:{j} and the rest" for j in range(k)], "found": [True] * k},
        )
        for i in range(start, start + n)
    ]


@pytest.fixture
def store(tmp_path):
    with LabelStore(tmp_path / "labels.db") as s:
        yield s


def press(labeler, key):
    """What the browser does on a key press in the key area: set the key and bump the counter."""
    labeler.keys.key = key
    labeler.keys.presses += 1


def test_click_stores_best_as_the_stored_index_of_the_display_position(store):
    ids = add_fixed(store, 3)
    lab = ComparisonLabeler(store, SENTIMENT, labeler="alice", seed=1)
    first, perm = lab.current, list(lab.permutation)
    assert first.id == ids[0] and sorted(perm) == [0, 1, 2, 3]
    # The rendered order is the permutation: display position j shows stored response perm[j].
    assert [f"{first.id - ids[0]}:{perm[j]}" in lab._response_pool[j].value for j in range(4)] == [True] * 4
    lab.buttons[0].click()
    (label,) = store.labels()
    assert label.comparison_id == first.id and label.best == perm[0] and label.permutation == perm
    assert label.labeler == "alice" and label.shown_at is not None and label.shown_at <= label.submitted_at
    assert lab.current.id == ids[1]
    perm = list(lab.permutation)
    lab.buttons[3].click()
    assert store.labels()[-1].best == perm[3]
    assert "labeled 2 (2 this session)" in lab._progress.value and "queued 1" in lab._progress.value


def test_orders_are_shuffled_and_seeded(store):
    add_fixed(store, 12)
    orders = []
    for _ in range(2):
        lab = ComparisonLabeler(store, SENTIMENT, labeler="bob", seed=7)
        seen = []
        while lab.current is not None:
            seen.append(list(lab.permutation))
            lab.choose(0)
        for _ in range(12):
            store.undo("bob")
        orders.append(seen)
    assert orders[0] == orders[1]  # same seed, same orders
    assert len({tuple(p) for p in orders[0]}) > 3  # and not one fixed order


def test_skip_stores_a_skip_and_advances(store):
    ids = add_fixed(store, 2)
    lab = ComparisonLabeler(store, SENTIMENT, seed=0)
    perm = list(lab.permutation)
    lab.skip_button.click()
    assert store.labels() == [] and lab.current.id == ids[1]
    assert store.pending("me", task=TASK) == [ids[1]]
    assert store.counts() == [dict(task=TASK, labeler="me", labels=0, skips=1, retracted=0)]
    lab.undo()
    assert lab.current.id == ids[0] and lab.permutation == perm


def test_undo_shows_the_comparison_again_in_the_same_order(store):
    ids = add_fixed(store, 3)
    lab = ComparisonLabeler(store, SENTIMENT, seed=3)
    perm = list(lab.permutation)
    lab.choose(2)
    assert lab.current.id == ids[1]
    lab.undo_button.click()
    assert lab.current.id == ids[0] and lab.permutation == perm
    assert store.labels() == [] and len(store.labels(include_retracted=True)) == 1
    assert store.pending("me", task=TASK) == ids
    lab.choose(1)  # labeling it again after the undo
    assert [lb.best for lb in store.labels()] == [perm[1]]
    lab.undo()
    lab.undo()  # nothing left: says so, changes nothing
    assert "nothing to undo" in lab._status.value and lab.current.id == ids[0]


def test_note_is_stored_cleared_and_typing_never_chooses(store):
    add_fixed(store, 3)
    lab = ComparisonLabeler(store, SENTIMENT, seed=0)
    for text in ("a", "ab", "ab12su", "ab12su 3"):  # keystrokes in the note box only change its value
        lab.note.value = text
    assert store.labels() == [] and store.counts() == []
    lab.choose(0)
    assert store.labels()[0].note == "ab12su 3" and lab.note.value == ""
    lab.note.value = "all bad"
    lab.skip()
    lab.choose(1)
    assert store.labels()[-1].note is None  # the note went with the skip, not the next label


def test_labeler_name_change_applies_to_new_labels_and_queue(store):
    ids = add_fixed(store, 3)
    lab = ComparisonLabeler(store, SENTIMENT, labeler="alice", seed=0)
    lab.choose(0)
    lab.labeler_name.value = "  carol "
    # The comparison on screen is pending for carol too, so it stays; her queue holds all three.
    assert lab.labeler == "carol" and lab.current.id == ids[1] and "queued 3" in lab._progress.value
    lab.choose(0)
    assert [(lb.labeler, lb.comparison_id) for lb in store.labels()] == [("alice", ids[0]), ("carol", ids[1])]
    assert lab.current.id == ids[0]  # carol's oldest pending
    lab.labeler_name.value = ""  # refused: an empty name cannot label
    assert lab.labeler == "carol" and lab.labeler_name.value == "carol"


def test_key_presses_drive_choose_skip_undo(store):
    ids = add_fixed(store, 4)
    lab = ComparisonLabeler(store, SENTIMENT, seed=5)
    perms = []
    for key in ("2", "b", "s"):
        perms.append(list(lab.permutation))
        press(lab, key)
    labels = store.labels()
    assert [(lb.comparison_id, lb.best) for lb in labels] == [(ids[0], perms[0][1]), (ids[1], perms[1][1])]
    assert lab.current.id == ids[3] and store.counts()[0]["skips"] == 1
    press(lab, "u")  # undoes the skip
    assert lab.current.id == ids[2] and lab.permutation == perms[2] and store.counts()[0]["skips"] == 0
    press(lab, "u")
    press(lab, "u")  # same key twice in a row: the counter makes both count
    assert lab.current.id == ids[0] and store.labels() == []
    press(lab, "x")  # not a labeling key: ignored
    assert store.labels() == []


def test_key_beyond_k_is_refused_and_choose_checks_position(store):
    add_fixed(store, 1, k=3)
    lab = ComparisonLabeler(store, SENTIMENT, seed=0)
    assert len(lab.buttons) == 3 and "1-3 / a-c" in lab.keys.hint
    press(lab, "4")
    assert store.labels() == [] and "only 3 responses" in lab._status.value
    with pytest.raises(ValueError, match="position must be 0..2"):
        lab.choose(3)


def test_empty_queue_message_and_actions(store):
    lab = ComparisonLabeler(store, SENTIMENT, seed=0)
    assert lab.current is None and "Queue empty" in lab._empty.value
    assert lab._empty_box.layout.display is None and lab._comparison_box.layout.display == "none"
    with pytest.raises(RuntimeError, match="queue .* is empty"):
        lab.choose(0)
    press(lab, "1")  # a key on an empty queue only says so
    assert "empty" in lab._status.value
    ids = add_fixed(store, 1)
    lab.refill_button.click()  # without refill: "Check again" re-reads the queue
    assert lab.refill_button.description == "Check again" and lab.current.id == ids[0]


def test_refill_runs_in_a_background_thread_when_low(store):
    add_fixed(store, 3)
    gate, threads = threading.Event(), []

    def refill():
        threads.append(threading.current_thread())
        gate.wait(10)  # a slow sampler: the click must not wait for it
        add_fixed(store, 4, start=100)

    lab = ComparisonLabeler(store, SENTIMENT, refill=refill, low_water=2, seed=0)
    assert lab._refill_thread is None  # 3 pending >= low_water
    lab.choose(0)
    lab.choose(0)  # 1 pending < 2: starts the refill, returns at once
    assert lab._refilling and "refilling" in lab._progress.value
    lab.choose(0)  # queue now empty; a second refill is not started while one runs
    assert lab.current is None and "being sampled" in lab._empty.value
    gate.set()
    lab._refill_thread.join(10)
    assert threads and threads[0] is not threading.main_thread() and len(threads) == 1
    assert lab.current is not None and lab.current.query == "query 100" and "queued 4" in lab._progress.value


def test_refill_error_is_shown(store):
    def refill():
        raise OSError("disk full")

    lab = ComparisonLabeler(store, SENTIMENT, refill=refill, seed=0)
    lab._refill_thread.join(10)
    assert "refill failed: OSError: disk full" in lab._status.value and lab.refill_button.description == "Refill"


def test_make_comparisons_with_tiny_model(store, tiny):
    model, tok = tiny
    # The random tiny model almost never samples '.'; cutting after any token ending in "e" makes both
    # cut and uncut responses occur (with this seed: 5 cut, 1 not; seeds 0-2 happen to give 6 cut). "contains":
    # the broad rule (any token with "e" not followed by a letter or digit); no token is exactly "e" often enough.
    task = SENTIMENT.with_(response_length=20, truncation=TruncationRule(text="e", after=2, tokens="contains"))
    prompts = [Prompt("First. A calm morning by the lake. The end."), "Intro. Rain fell on the roofs all day."]
    ids = make_comparisons(store, model, tok, task, prompts, k=3, source=["rho", "rho", "pi"],
                           generator=torch.Generator().manual_seed(3), batch_size=4,
                           require_truncation=False, progress=False)  # the raw samples, failures included
    assert len(ids) == 2 and ids.left_out == []
    comparisons = [store.comparison(i) for i in ids]
    c = comparisons[0]
    assert c.task == task.name and c.k == 3 and c.sources == ["rho", "rho", "pi"] and c.reference is None
    assert c.query.strip().startswith("A calm morning") and c.query_tokens
    assert comparisons[1].query.strip().startswith("Rain fell")
    found_all, cut = [], []
    for c in comparisons:
        full, found = c.extra["full_responses"], c.extra["found"]
        assert len(full) == 3 and all(isinstance(f, bool) for f in found)
        for text, tokens, whole, was_found in zip(c.responses, c.response_tokens, full, found):
            assert tok.decode(tokens, skip_special_tokens=True) == text and whole.startswith(text)
            assert was_found or (len(tokens) == 20 and whole == text)  # uncut: all 20 tokens kept
            found_all.append(was_found)
            cut.append(len(tokens) < 20)
    assert any(cut) and not all(found_all)
    with pytest.raises(ValueError, match="list of k=3"):
        make_comparisons(store, model, tok, task, prompts, k=3, source=["rho"])


def test_make_policy_vs_rho_stores_blind_pairs(tmp_path):
    from labkit.evaluate import win_rate_from_store
    from labkit.labeling.comparisons import make_policy_vs_rho, policy_source
    from labkit.labeling.store import LabelStore
    from labkit.models import load_lm
    from labkit.rl import PPOConfig, PPOTrainer
    from labkit.tasks import SENTIMENT

    model, tok = load_lm("tiny", device="cpu")
    task = SENTIMENT.with_(response_length=4, truncation=None)
    trainer = PPOTrainer(model, tok, task, lambda q, r: [0.0] * len(r), ["A prompt. Here it is."],
                         PPOConfig(batch_size=2), verbose=False)
    store = LabelStore(tmp_path / "labels.db")
    prompts = ["First. Prompt one.", "Second. Prompt two."]
    ids = make_policy_vs_rho(store, trainer, prompts, seed=3)
    comps = [store.comparison(i) for i in ids]
    before = policy_source(trainer)
    assert re.fullmatch(r"policy@0:[0-9a-f]{8}", before)
    assert [c.sources for c in comps] == [["rho", before]] * 2 and {c.kind for c in comps} == {"eval"}
    assert all(len(c.responses) == 2 and len(c.response_tokens[0]) == 4 for c in comps)

    # another policy at the same update count (a new PPO run, say) is another source, and the win rate can count
    # only its comparisons: here rho won the first policy's, the second's won both
    with torch.no_grad():
        next(trainer.policy.parameters()).add_(0.5)
    after = policy_source(trainer)
    assert after != before and after.startswith("policy@0:")
    again = make_policy_vs_rho(store, trainer, prompts, seed=3)
    store.record_labels([dict(comparison_id=i, best=0, labeler="ann") for i in ids]
                        + [dict(comparison_id=i, best=1, labeler="ann") for i in again])
    assert win_rate_from_store(store, task.name)["n"] == 4   # every policy's comparisons
    now = win_rate_from_store(store, task.name, policy_source_prefix=after)
    assert (now["n"], now["rate"]) == (2, 1.0)


def test_a_source_filtered_queue_shows_one_policy_only(store):
    """The blind evaluation of the policy as it is now: an older policy's pending comparisons are not shown, and the
    progress line and undo keep to the same queue. pending/count_labels(source=) against a reference in Python."""
    def add(query, sources, kind="eval"):
        return store.add_comparison(TASK, query, [f"{query} {s}" for s in sources], sources=sources, kind=kind)

    old = [add(f"old {i}", ["rho", "policy@40:aaaaaaaa"]) for i in range(2)]
    new = [add(f"new {i}", ["policy@40:bbbbbbbb", "rho"]) for i in range(3)]
    add("train", ["policy@40:bbbbbbbb"] * 2, kind="train")
    add("prefix", ["rho", "policy@40:bbbbbbbb0"])       # only an exact source matches, not a prefix of it
    comparisons = store.comparisons(task=TASK)
    for source in ("policy@40:bbbbbbbb", "policy@40:aaaaaaaa", "rho", "nobody"):
        expected = [c.id for c in comparisons if source in c.sources and c.kind == "eval"]
        assert store.pending("ann", task=TASK, kind="eval", source=source) == expected

    lab = ComparisonLabeler(store, SENTIMENT, labeler="ann", kind="eval", source="policy@40:bbbbbbbb", seed=0)
    assert lab.current.id == new[0] and "queued 3" in lab._progress.value
    lab.choose(0)
    lab.choose(1)
    assert [label.comparison_id for label in store.labels()] == new[:2]
    assert "labeled 2 (2 this session)" in lab._progress.value and "queued 1" in lab._progress.value
    assert store.count_labels(task=TASK, source="policy@40:aaaaaaaa") == 0
    assert store.count_labels(task=TASK, source="policy@40:bbbbbbbb") == store.count_labels(task=TASK) == 2
    lab.skip()
    assert lab.current is None and "source &#x27;policy@40:bbbbbbbb&#x27;" in lab._empty.value
    # the older policy's comparisons are still in the store, for a queue that asks for them
    other = ComparisonLabeler(store, SENTIMENT, labeler="ann", kind="eval", source="policy@40:aaaaaaaa")
    assert other.current.id == old[0]
    other.choose(0)
    lab.undo()   # ann's last action was in the other queue: retracted, and this queue stays empty
    assert "not in this queue" in lab._status.value and lab.current is None
    lab.undo()   # the skip of new[2]: shown again
    assert lab.current.id == new[2]
    with pytest.raises(ValueError, match="source must be"):
        ComparisonLabeler(store, SENTIMENT, source="")


def test_leading_line_breaks_are_marks_not_blank_lines():
    shown = response_html("\n\nHello <b>", "\n\nHello <b> and more", True)
    assert "↵↵ </span><span>Hello &lt;b&gt;</span>" in shown and "\n" not in shown.split("↵↵")[1].split("[cut]")[0]
    assert "and more" in shown  # the cut remainder still follows
    assert "↵" not in response_html("Hello\n\nthere", None, True)  # only leading breaks become marks


def test_view_state_is_read_from_the_store(store):
    ids = add_fixed(store, 3)
    lab = ComparisonLabeler(store, SENTIMENT, labeler="alice", seed=4)
    lab.choose(1)
    lab.choose(2)
    lab.undo()
    assert lab.current.id == ids[1] and "labeled 1 (1 this session)" in lab._progress.value  # undone: not counted
    # A second view of the same store and name (another notebook, or this one after a kernel restart) shows
    # the same comparison in the same order; a label made there counts here at the next render.
    other = ComparisonLabeler(store, SENTIMENT, labeler="alice", seed=4)
    assert other.current.id == ids[1] and other.permutation == lab.permutation
    other.choose(0)
    lab.refill_button.click()  # "Check again" re-reads the queue
    assert lab.current.id == ids[2] and "labeled 2 (2 this session) · queued 1 " in lab._progress.value
    lab.undo()  # the store knows alice's last action, although another view made it
    assert lab.current.id == ids[1] and "labeled 1 (1 this session) · queued 2 " in lab._progress.value


def test_counter_shows_the_stores_total_after_a_restart(store):
    ids = add_fixed(store, 5)
    for i in ids[:3]:
        store.record_label(i, 0, "alice")
    store.record_label(ids[3], 0, "bob")
    store.add_comparison("other", "q", ["a", "b"])
    store.record_label(store.comparisons(task="other")[0].id, 0, "alice")  # another task: not this queue's
    # A new kernel: a new widget over a store that already holds alice's labels.
    lab = ComparisonLabeler(store, SENTIMENT, labeler="alice", seed=0)
    assert lab._progress.value.startswith("labeled 3 (0 this session) · queued 2 · – labels/min")
    lab.choose(0)
    assert lab._progress.value.startswith("labeled 4 (1 this session) · queued 1 · ")
    lab.labeler_name.value = "bob"  # another person: their total, a new session
    assert lab._progress.value.startswith("labeled 1 (0 this session) · queued 4 · ")


def test_a_stale_second_view_refuses_a_second_label(store):
    """Two widgets for one labeler (a cell run twice): a pick in the older one, on a comparison already labeled
    in the newer one, writes nothing and moves on."""
    ids = add_fixed(store, 3)
    old = ComparisonLabeler(store, SENTIMENT, labeler="alice", seed=0)
    new = ComparisonLabeler(store, SENTIMENT, labeler="alice", seed=0)
    assert old.current.id == new.current.id == ids[0]
    new.choose(1)
    old.note.value = "my note"
    old.buttons[2].click()
    assert [(lb.comparison_id, lb.labeler) for lb in store.labels(include_retracted=True)] == [(ids[0], "alice")]
    assert "already labeled in another view" in old._status.value and "labkit-error" in old._status.value
    assert old.current.id == ids[1] and old.note.value == "my note"  # the note waits for the next label
    new.skip()  # skips ids[1] in the newer view: the older one's skip is refused too
    old.skip()
    assert "#%d was already skipped in another view" % ids[1] in old._status.value
    assert store.counts() == [dict(task=TASK, labeler="alice", labels=1, skips=1, retracted=0)]
    assert old.current.id == ids[2]
    # Undo still works (from either view): the comparison is pending again and can be labeled once.
    old.undo()
    assert old.current.id == ids[1]
    old.choose(0)
    assert "saved" in old._status.value and store.labels()[-1].comparison_id == ids[1]
    assert store.labels()[-1].note == "my note"


def test_each_action_asks_the_key_area_for_the_focus(store):
    add_fixed(store, 3)
    lab = ComparisonLabeler(store, SENTIMENT, seed=0)
    before = lab.keys.focus_requests
    lab.buttons[0].click()
    lab.skip_button.click()
    lab.undo_button.click()
    assert lab.keys.focus_requests >= before + 3  # the page decides whether the focus is free to take


def test_instructions_say_how_to_treat_responses_without_a_cut_point(store):
    from labkit.widgets.labeler import NO_CUT_POINT_INSTRUCTION

    assert "scores the fixed penalty in PPO whatever you pick" in NO_CUT_POINT_INSTRUCTION
    shown = lambda lab: lab.widget.children[1].value  # noqa: E731 - the header
    assert NO_CUT_POINT_INSTRUCTION in shown(ComparisonLabeler(store, SENTIMENT, seed=0))
    untruncated = SENTIMENT.with_(truncation=None)  # never penalised: nothing to say
    assert NO_CUT_POINT_INSTRUCTION not in shown(ComparisonLabeler(store, untruncated, seed=0))


def html_widgets(widget):
    """Every HTML widget in a widget tree."""
    if isinstance(widget, widgets.HTML):
        yield widget
    for child in getattr(widget, "children", ()):
        yield from html_widgets(child)


def assert_styled_by_classes_only(root, stylesheet):
    """No style attribute and no <style> element outside `stylesheet`; every class is a labkit- class it defines."""
    css = re.fullmatch(r"<style>(.*)</style>", stylesheet.value, re.S).group(1)
    shown = [w.value for w in html_widgets(root) if w is not stylesheet]
    assert stylesheet in html_widgets(root) and any(shown)
    for value in shown:
        assert "style=" not in value and "<style" not in value, value
        for names in re.findall(r"class=['\"]([^'\"]*)['\"]", value):
            for name in names.split():
                assert name.startswith("labkit-") and re.search(rf"\.{name}(?![\w-])", css), name


def test_rendered_html_is_styled_by_the_one_stylesheet(store):
    store.add_comparison(TASK, "a <query>", ["\n\nA", "B", "C", "D"],
                         extra={"full_responses": ["\n\nA cut", "B", "C", "Dx"], "found": [True, True, True, False]})
    lab = ComparisonLabeler(store, SENTIMENT, seed=0)
    press(lab, "9")  # an error in the status line
    html = "".join(w.value for w in html_widgets(lab.widget))
    assert all(name in html for name in ("labkit-breaks", "labkit-cut", "labkit-no-cut-point", "labkit-error"))
    assert_styled_by_classes_only(lab.widget, lab._stylesheet)
    lab.choose(0)
    assert "labkit-empty-message" in lab._empty.value
    assert_styled_by_classes_only(lab.widget, lab._stylesheet)
