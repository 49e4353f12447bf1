"""How much preference a mock labeler's score carries on stored comparisons: the share of responses it scores exactly
0 and the share of comparisons whose best score is shared by two or more responses (a tie at the top, which a mock
with `skip_ties` skips and one without breaks at random: either way, no preference for the reward model).

The descriptiveness heuristic (labkit.labeling.labelers.descriptiveness) is measured twice on the same responses:
as it is, and without its concrete-things term (CONCRETE_WORDS emptied), which it lacked before; VADER once.
`repeats` counts what the heuristic's repeat term would count if function words ("they", "with") were not
excepted, and the share of those that are function words (_FUNCTION_WORDS), which it no longer counts.
Responses are scored as stored (truncated, as the mock labeler and the reward model see them). No model runs.

    python benchmarks/mock_ties.py runs/descriptiveness/labels.db      # a lab's comparisons; one JSON line
    python benchmarks/mock_ties.py runs/sentiment/labels.db --kind train
"""

from __future__ import annotations

import argparse
from pathlib import Path
from unittest import mock

from labkit.labeling import labelers
from labkit.labeling.store import LabelStore
from record import emit  # this script's folder is on sys.path


def tie_stats(responses: list[list[str]], score) -> dict:
    """{"zero": share of responses scored exactly 0, "top_tie": share of comparisons whose best score repeats}."""
    scores = [score(texts) for texts in responses]
    flat = [s for row in scores for s in row]
    return {"zero": round(sum(s == 0 for s in flat) / len(flat), 3),
            "top_tie": round(sum(row.count(max(row)) > 1 for row in scores) / len(scores), 3)}


def repeat_stats(texts: list[str]) -> dict:
    """{"repeats": occurrences of a 4+ letter word beyond its first in each text, summed; "function_share": the
    share of those that are function words}."""
    total = function = 0
    for text in texts:
        long_words = [w for w in labelers._WORD.findall(text.lower()) if len(w) >= 4]
        total += len(long_words) - len(set(long_words))
        kept = [w for w in long_words if w in labelers._FUNCTION_WORDS]
        function += len(kept) - len(set(kept))
    return {"repeats": total, "function_share": round(function / total, 3) if total else 0.0}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db", type=Path, help="a lab's labels.db")
    parser.add_argument("--kind", default="train", help="which comparisons: train (the labeling queue) or eval")
    args = parser.parse_args(argv)
    if not args.db.exists():
        raise SystemExit(f"{args.db}: no such file; pass a lab's labels.db, e.g. runs/descriptiveness/labels.db")
    comparisons = LabelStore(str(args.db)).comparisons(kind=args.kind)
    if not comparisons:
        raise SystemExit(f"{args.db} holds no {args.kind!r} comparisons")
    responses = [list(c.responses) for c in comparisons]
    describe = labelers.DescriptivenessLabeler().score
    now = tie_stats(responses, describe)
    with mock.patch.object(labelers, "CONCRETE_WORDS", frozenset()):
        without = tie_stats(responses, describe)
    vader = tie_stats(responses, labelers.VaderLabeler().score)
    repeats = repeat_stats([t for texts in responses for t in texts])
    line = {"benchmark": "mock_ties", "db": str(args.db), "kind": args.kind, "comparisons": len(comparisons),
            "responses": sum(map(len, responses)), "tasks": sorted({c.task for c in comparisons}),
            "descriptiveness": now, "descriptiveness_without_things": without, "vader": vader,
            "repeats": repeats}
    print(f"{len(comparisons)} comparisons: descriptiveness scores {now['zero']:.0%} of responses 0 and ties at the "
          f"top in {now['top_tie']:.0%} (without its concrete things: {without['zero']:.0%}, "
          f"{without['top_tie']:.0%}); VADER {vader['zero']:.0%}, {vader['top_tie']:.0%}; of "
          f"{repeats['repeats']} repeated words {repeats['function_share']:.0%} are function words, which the "
          "heuristic does not count")
    emit(line)
    return line


if __name__ == "__main__":
    main()
