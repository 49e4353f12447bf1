"""Evaluation helpers against hand-computed values: ROUGE, lead-3, copy statistics, Wilson intervals."""

import math
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from labkit.evaluate import (
    best_of_n,
    comparison_table,
    copies_opening,
    copy_stats,
    frontier_figure,
    lead_k,
    rouge,
    skip_preamble,
    split_sentences,
    win_rate,
    win_rate_from_store,
)

SOURCE = (
    "The council approved the budget on Monday. Taxes will rise by two percent.\n"
    "Residents protested outside city hall. The mayor declined to comment."
)


def test_module_does_not_import_torch_or_plotly():
    code = "import sys, labkit.evaluate; print('torch' in sys.modules, 'plotly' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --- ROUGE and lead-3 ---


def test_rouge_identical_is_100_and_disjoint_is_0():
    same = rouge([SOURCE, "a cat sat"], [SOURCE, "a cat sat"])
    assert same == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rouge_avg": 100.0})
    disjoint = rouge(["alpha beta gamma."], ["delta epsilon zeta."])
    assert disjoint == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rouge_avg": 0.0}


def test_rouge_hand_example_and_average():
    # 3 predicted unigrams all in the 6-token reference: P = 1, R = 1/2, F1 = 2/3.
    # Bigrams: 2 predicted, 5 in the reference, 2 shared: P = 1, R = 2/5, F1 = 4/7.
    r = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(200 / 3)
    assert r["rouge2"] == pytest.approx(400 / 7)
    assert r["rougeL"] == pytest.approx(200 / 3)
    assert r["rouge_avg"] == pytest.approx((r["rouge1"] + r["rouge2"] + r["rougeL"]) / 3)


def test_rouge_l_is_summary_level_over_sentences():
    # Same two sentences in the other order: a single LCS over the whole text would give 50.
    r = rouge(["Dogs bark loudly. Cats sleep all day."], ["Cats sleep all day. Dogs bark loudly."])
    assert r["rougeL"] == pytest.approx(100.0)
    assert r["rouge1"] == pytest.approx(100.0)


def test_rouge_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        rouge([], [])


def test_split_sentences():
    text = "First one. Second one!  Third one?\nFourth line\n\nFifth. 3.5 stays"
    expected = ["First one.", "Second one!", "Third one?", "Fourth line", "Fifth.", "3.5 stays"]
    assert split_sentences(text) == expected
    assert split_sentences("  \n ") == []


def test_lead_k():
    assert lead_k(SOURCE) == (
        "The council approved the budget on Monday.\nTaxes will rise by two percent.\n"
        "Residents protested outside city hall."
    )
    assert lead_k("Only one sentence here.", k=3) == "Only one sentence here."
    assert lead_k(SOURCE, k=1) == "The council approved the budget on Monday."
    with pytest.raises(ValueError, match="k must be at least 1"):
        lead_k(SOURCE, k=0)


# --- copy statistics ---


def test_copy_stats_novel_sentences():
    copied = "Taxes will rise by two percent.\nresidents   PROTESTED outside city hall."  # case and spaces
    half = "The council approved the budget on Monday. People were furious about it."
    assert copy_stats([copied], [SOURCE])["novel_sentence_pct"] == 0.0
    assert copy_stats([half], [SOURCE])["novel_sentence_pct"] == 50.0
    # Pooled over sentences: 0 of 2 novel + 1 of 2 novel = 1 of 4.
    both = copy_stats([copied, half], [SOURCE, SOURCE])
    assert both["novel_sentence_pct"] == 25.0
    assert (both["n_summaries"], both["n_sentences"]) == (2, 4)


def test_copy_stats_opening():
    # Starts at sentence 1 (copies), starts at sentence 2 (the opening is sentences 1-2: copies),
    # starts at sentence 3 (does not), paraphrase (does not).
    summaries = [
        "The council approved the budget on Monday.",
        "Taxes will rise by two percent.",
        "Residents protested outside city hall.",
        "A budget was passed.",
    ]
    stats = copy_stats(summaries, [SOURCE] * 4)
    assert stats["copies_opening_pct"] == 50.0
    assert stats["novel_sentence_pct"] == 25.0


def test_copies_opening_skips_preamble():
    post = (
        "Hi everyone. So: here it is. My landlord kept my deposit after I moved out. "
        "He says the walls were dirty."
    )
    assert copies_opening("My landlord kept my deposit after I moved out.", post)
    assert copies_opening("He says the walls were dirty. I want it back.", post)
    assert copies_opening("Hi everyone.", post)  # copying the very start also counts
    assert not copies_opening("The landlord kept the deposit.", post)
    assert not copies_opening("", post)
    # Without the preamble rule, the first informative sentence is outside the first two sentences.
    stats = copy_stats(["My landlord kept my deposit after I moved out."], [post])
    assert stats["copies_opening_pct"] == 100.0


def test_skip_preamble_rules():
    informative = "My landlord kept my deposit after I moved out."
    assert skip_preamble(["Hi everyone.", informative]) == [informative]  # short greeting
    assert skip_preamble(["So: here it is", informative]) == [informative]  # colon in first 3 words
    assert skip_preamble(["Background: I am 25 and live alone.", informative]) == [informative]
    assert skip_preamble(["Hello reddit, long time lurker here.", informative]) == [informative]  # greeting
    assert skip_preamble(["Long time lurker.", informative]) == [informative]  # fewer than 4 words
    assert skip_preamble([informative, "Hi everyone."]) == [informative, "Hi everyone."]  # only leading ones
    colon_later = "The deposit was $500: too much."  # colon in word 4: informative
    assert skip_preamble([colon_later, "Ok."]) == [colon_later, "Ok."]
    assert skip_preamble(["Hi.", "So."]) == []
    assert skip_preamble([]) == []


def test_copy_stats_errors_and_empty_summaries():
    with pytest.raises(ValueError, match="2 summaries but 1 sources"):
        copy_stats(["a", "b"], [SOURCE])
    with pytest.raises(ValueError, match="at least one"):
        copy_stats([], [])
    stats = copy_stats([""], [SOURCE])
    assert math.isnan(stats["novel_sentence_pct"])
    assert stats["copies_opening_pct"] == 0.0


# --- win rates ---


def naive_wilson(wins, n, z):
    p = wins / n
    centre = (2 * n * p + z * z) / (2 * (n + z * z))
    spread = z * math.sqrt(z * z + 4 * n * p * (1 - p)) / (2 * (n + z * z))
    return centre - spread, centre + spread


def test_wilson_interval_hand_value():
    r = win_rate(8, 10)
    assert r["rate"] == 0.8 and r["n"] == 10
    assert r["low"] == pytest.approx(0.4902, abs=1e-4)
    assert r["high"] == pytest.approx(0.9433, abs=1e-4)


@pytest.mark.parametrize(
    "wins, n, confidence, z", [(44, 50, 0.95, 1.959964), (7.5, 12, 0.9, 1.644854), (0, 5, 0.95, 1.959964)]
)
def test_wilson_interval_matches_naive_formula(wins, n, confidence, z):
    r = win_rate(wins, n, confidence)
    assert (r["low"], r["high"]) == pytest.approx(naive_wilson(wins, n, z), abs=1e-6)
    assert 0.0 <= r["low"] <= r["rate"] <= r["high"] <= 1.0


def test_win_rate_errors():
    with pytest.raises(ValueError, match="at least one comparison"):
        win_rate(0, 0)
    with pytest.raises(ValueError, match="between 0 and n"):
        win_rate(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        win_rate(5, 10, confidence=95)


@dataclass
class FakeComparison:
    responses: list[str]
    sources: list[str]


@dataclass
class FakeLabel:
    best: int
    labeler: str


class FakeStore:
    """Stands in for labkit.labeling.store.LabelStore: only training_set, filtered by task and kind."""

    def __init__(self, rows):
        self.rows = rows  # (task, kind, comparison, label)
        self.calls = []

    def training_set(self, task=None, kind=None):
        self.calls.append((task, kind))
        return [(c, lab) for t, k, c, lab in self.rows if t == task and k == kind]


def test_win_rate_from_store():
    pol_ref = FakeComparison(["p", "r"], ["policy@step12", "rho"])
    ref_pol = FakeComparison(["r", "p"], ["reference", "policy@step12"])
    rows = [
        ("tldr", "eval", pol_ref, FakeLabel(0, "ann")),  # policy wins
        ("tldr", "eval", pol_ref, FakeLabel(1, "bob")),  # rho wins
        ("tldr", "eval", ref_pol, FakeLabel(1, "ann")),  # policy wins (stored order differs)
        ("tldr", "eval", ref_pol, FakeLabel(1, "bob")),  # policy wins
        ("tldr", "eval", FakeComparison(["a", "b"], ["rho", "rho"]), FakeLabel(0, "ann")),  # no policy
        ("tldr", "eval", FakeComparison(["a", "b"], ["policy@1", "policy@2"]), FakeLabel(0, "ann")),  # no ref
        ("tldr", "train", pol_ref, FakeLabel(0, "ann")),  # other kind
        ("sentiment", "eval", pol_ref, FakeLabel(0, "ann")),  # other task
    ]
    store = FakeStore(rows)
    r = win_rate_from_store(store, "tldr")
    assert store.calls == [("tldr", "eval")]
    assert (r["rate"], r["n"], r["chance"]) == (0.75, 4, 0.5)
    assert r["low"] == pytest.approx(naive_wilson(3, 4, 1.959964)[0], abs=1e-6)
    assert r["by_labeler"]["ann"]["rate"] == 1.0 and r["by_labeler"]["ann"]["n"] == 2
    assert r["by_labeler"]["bob"]["rate"] == 0.5


def test_win_rate_from_store_k_way_chance_and_empty():
    four_way = FakeComparison(["p", "a", "b", "c"], ["policy@step3", "rho", "rho", "rho"])
    store = FakeStore([("tldr", "eval", four_way, FakeLabel(2, "ann"))])
    r = win_rate_from_store(store, "tldr")
    assert (r["rate"], r["chance"]) == (0.0, 0.25)
    with pytest.raises(ValueError, match="no labeled 'eval' comparisons for task 'cnndm'"):
        win_rate_from_store(store, "cnndm")


# --- best-of-N, frontier, table ---


def test_best_of_n():
    texts = [["a", "b", "c"], ["x"], ["tie1", "tie2"]]
    scores = [[0.1, 2.0, -1.0], [-5.0], [1.0, 1.0]]
    assert best_of_n(texts, scores) == ["b", "x", "tie1"]
    with pytest.raises(ValueError, match="prompt 1"):
        best_of_n([["a"], ["b", "c"]], [[1.0], [1.0]])
    with pytest.raises(ValueError, match="texts for 1 prompts but scores for 2"):
        best_of_n([["a"]], [[1.0], [2.0]])


def test_frontier_figure_sorts_points_by_kl():
    points = [
        {"name": "step 200", "kl": 4.0, "score": 1.5},
        {"name": "rho", "kl": 0.0, "score": 0.0},
        {"name": "step 400", "kl": 6.1, "score": 1.85},
    ]
    fig = frontier_figure(points)
    (trace,) = fig.data
    assert list(trace.x) == [0.0, 4.0, 6.1]
    assert list(trace.y) == [0.0, 1.5, 1.85]
    assert list(trace.hovertext) == ["rho", "step 200", "step 400"]
    assert fig.layout.xaxis.title.text == "kl"
    with pytest.raises(ValueError, match=r"points \[0\] lack"):
        frontier_figure([{"kl": 1.0}])


def test_comparison_table_escapes_html():
    table = comparison_table([{"query": "<b>hi</b>", "before": "a & b"}, {"query": "q2", "after": '"x"'}])
    assert "<b>hi</b>" not in table
    assert "&lt;b&gt;hi&lt;/b&gt;" in table and "a &amp; b" in table and "&quot;x&quot;" in table
    assert table.count("<th ") == 3 and table.count("<tr>") == 3
    assert table.index(">query</th>") < table.index(">before</th>") < table.index(">after</th>")
    with pytest.raises(ValueError, match="at least one row"):
        comparison_table([])


def test_comparison_table_aligns_headers_left_and_marks_empty_values():
    table = comparison_table([{"query": "q", "response": "", "score": 0.5}, {"query": "q2", "response": "  \n"},
                              {"query": "q3"}])
    headers = re.findall(r"<th(?:\s[^>]*)?>", table)  # not <thead>
    assert len(headers) == 3 and all("text-align: left" in h for h in headers)  # over left-aligned cells
    assert table.count("(empty)") == 2  # an empty or blank response, not a missing one: that stays blank
    assert table.count("></td>") == 3  # the missing scores of q2 and q3, and q3's missing response


def test_rouge_progress_is_quiet_for_a_quick_scoring(capsys):
    assert rouge([SOURCE] * 3, [SOURCE] * 3) == rouge([SOURCE] * 3, [SOURCE] * 3, progress=False)
    assert capsys.readouterr().err == ""  # the bar appears only after 2 s of scoring
