"""benchmarks/comparison_sampling.py runs end to end on the tiny model (so that it cannot rot) and writes its line."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import comparison_sampling  # noqa: E402


def test_the_smoke_run_times_both_kinds_of_chunk():
    line = comparison_sampling.main(["--smoke"])
    assert line["smoke"] and line["rows"] == 64 and line["k"] == 4 and line["repeats"] == 1
    for key in ("s_per_chunk_shared", "s_per_chunk_distinct", "prefill_s_shared", "prefill_s_every_row", "speedup"):
        assert line[key] > 0, (key, line)
    written = Path(os.environ["LABKIT_BENCH_RESULTS"]) / "comparison_sampling.jsonl"  # conftest: a temporary folder
    assert json.loads(written.read_text().splitlines()[-1])["speedup"] == line["speedup"]
