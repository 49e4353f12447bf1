"""Click-to-next-comparison latency of the labeling widget, without a browser or a model.

Fills a fresh label store with 220 comparisons of fixed texts, then calls `ComparisonLabeler.choose()`
200 times. Each sample is the time from the call to the moment the view is fully updated: the
progress line is the last thing set after the next comparison's prompt and responses (an observer on it
fires then). That span holds everything a click costs
before the labeler sees the next comparison: the committed (fsync'ed) label, the queue read and the
HTML render. Preloading the comparison after it happens later in the same call and is not counted.

    python benchmarks/labeler_latency.py       # last line: one JSON record
"""

import statistics
import tempfile
import time
from pathlib import Path

from labkit.labeling.store import LabelStore
from labkit.tasks import SENTIMENT
from labkit.widgets.labeler import ComparisonLabeler
from record import emit  # this script's folder is on sys.path

N_COMPARISONS = 220
N_CLICKS = 200
K = 4

# Texts of about the paper's sentiment lengths: a 64-token query, 24-token responses with a cut tail.
QUERY = ("She pushed the door open and the smell of rain and old paper rolled out of the shop. The owner "
         "looked up from a ledger, pencil behind one ear, and said nothing for a long while.\n")
RESPONSE = "He smiled at last and handed her a small parcel tied with string, as if he had waited for her."
TAIL = " Outside, the street lamps came on one by one"


def main():
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as tmp:
        # A file on the real disk, not tmpfs: the commit's fsync is part of what a click costs.
        with LabelStore(Path(tmp) / "labels.db") as store:
            store.add_comparisons([
                dict(task=SENTIMENT.name, query=f"{i}. {QUERY}", responses=[f"({j}) {RESPONSE}" for j in range(K)],
                     extra={"full_responses": [f"({j}) {RESPONSE}{TAIL}" for j in range(K)],
                            "found": [j != K - 1 for j in range(K)]})
                for i in range(N_COMPARISONS)
            ])
            labeler = ComparisonLabeler(store, SENTIMENT, labeler="bench", seed=0)
            rendered = []
            labeler._progress.observe(lambda _: rendered.append(time.perf_counter()), names="value")
            latencies_ms, call_ms = [], []
            for n in range(N_CLICKS):
                before = labeler.current.id
                start = time.perf_counter()
                labeler.choose(n % K)
                end = time.perf_counter()
                assert labeler.current.id != before and len(rendered) == n + 1, "the next comparison was not shown"
                latencies_ms.append(1000 * (rendered[-1] - start))
                call_ms.append(1000 * (end - start))
            assert len(store.labels(labeler="bench")) == N_CLICKS

    p50 = statistics.median(latencies_ms)
    p95 = statistics.quantiles(latencies_ms, n=20)[-1]
    print(f"click -> next comparison rendered, {N_CLICKS} clicks: p50 {p50:.2f} ms, p95 {p95:.2f} ms, "
          f"max {max(latencies_ms):.2f} ms")
    print(f"whole choose() call (incl. preloading the comparison after): p50 {statistics.median(call_ms):.2f} ms")
    emit({"benchmark": "labeler_latency", "clicks": N_CLICKS, "p50_ms": round(p50, 3),
          "p95_ms": round(p95, 3)})


if __name__ == "__main__":
    main()
