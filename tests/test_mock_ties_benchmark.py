"""benchmarks/mock_ties.py: its counting against a hand count, and a run on a small real label store."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import mock_ties  # noqa: E402
from labkit.labeling.store import LabelStore  # noqa: E402


def test_tie_stats_counts_zero_scores_and_shared_best_scores():
    lengths = [["a", "bb", "cc"], ["", "a", "bbb"], ["aa", "bb", "c"]]  # scored by length: ties at the top in 1 and 3
    stats = mock_ties.tie_stats(lengths, lambda texts: [len(t) for t in texts])
    assert stats == {"zero": round(1 / 9, 3), "top_tie": round(2 / 3, 3)}


def test_repeat_stats_counts_function_words_apart():
    # "they" twice, "with" three times (3 function-word repeats), "door" twice (1 other); "a" is too short to count
    texts = ["they came with a door, they left with a door with a cat", "the door"]
    assert mock_ties.repeat_stats(texts) == {"repeats": 4, "function_share": 0.75}
    assert mock_ties.repeat_stats(["no repeats here"]) == {"repeats": 0, "function_share": 0.0}


def test_a_lab_shows_what_the_concrete_things_add(tmp_path):
    db = tmp_path / "labels.db"
    store = LabelStore(str(db))
    plain, things = "It was what it was, and then it was over.", "He put the cup on the table by the window."
    store.add_comparisons([dict(task="descriptiveness", query="q", responses=[plain, things, plain, plain]),
                           dict(task="descriptiveness", query="q", responses=[plain, plain, plain, plain])])
    line = mock_ties.main([str(db)])
    # without its concrete things the heuristic scores all 8 responses 0, so both comparisons tie at the top
    assert line["descriptiveness_without_things"] == {"zero": 1.0, "top_tie": 1.0}
    assert line["descriptiveness"] == {"zero": 0.875, "top_tie": 0.5}
    assert line["repeats"] == {"repeats": 0, "function_share": 0.0}   # each 4+ letter word once per response
    assert line["comparisons"] == 2 and line["responses"] == 8 and line["tasks"] == ["descriptiveness"]
    written = Path(os.environ["LABKIT_BENCH_RESULTS"]) / "mock_ties.jsonl"  # conftest: a temporary folder
    assert json.loads(written.read_text().splitlines()[-1])["descriptiveness"] == line["descriptiveness"]
    with pytest.raises(SystemExit, match="no such file"):
        mock_ties.main([str(tmp_path / "missing.db")])
