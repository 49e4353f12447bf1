"""Every number the READMEs quote as a result (written in bold, e.g. **2.41x**, **1.45 s**, **47%**) is in a
record under benchmarks/results/, as written there or rounded to the digits shown: numbers come from the
benchmark scripts, not from memory."""

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READMES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
NUMBER = re.compile(r"(?<![\w.])(-?\d[\d,]*(?:\.\d+)?)(\s*%)?")  # a leading minus is the number's sign


def _leaves(x):
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield float(x)
    elif isinstance(x, str):
        try:
            yield float(x)  # e.g. "1.730e+09"
        except ValueError:
            pass
    elif isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, list):
        for v in x:
            yield from _leaves(v)


def _recorded() -> list[float]:
    values = []
    for path in (ROOT / "benchmarks" / "results").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                values.extend(_leaves(json.loads(line)))
    return values


def quoted_numbers(text: str) -> list[tuple[str, bool]]:
    """(number as written, is a percentage) for each number inside **bold** text."""
    out = []
    for bold in re.findall(r"\*\*(.+?)\*\*", text):
        for num, pct in NUMBER.findall(bold):
            out.append((num, bool(pct)))
    return out


def found(num: str, pct: bool, values: list[float]) -> bool:
    x = float(num.replace(",", ""))
    decimals = len(num.split(".")[1]) if "." in num else 0
    for v in values:
        v = 100 * v if pct else v
        if math.isclose(round(v, decimals), x, rel_tol=0, abs_tol=0.5 * 10**-(decimals + 2)):
            return True
    return False


def test_the_matcher_rounds_as_written():
    assert quoted_numbers("a **2.41x** b **1,450 GFLOP/s** c 3.5 **47%**") == [("2.41", False), ("1,450", False), ("47", True)]
    assert found("2.4", False, [2.413]) and found("2.41", False, [2.413]) and not found("2.42", False, [2.413])
    assert found("47", True, [0.468]) and not found("47", False, [0.468]) and found("1,450", False, [1450.2])
    # a sign is part of the number: -0.09 is not 0.09, and a range's dash is not a sign
    assert quoted_numbers("**-0.092** **0.45-0.55**") == [("-0.092", False), ("0.45", False), ("0.55", False)]
    assert found("-0.092", False, [-0.0921]) and not found("0.092", False, [-0.0921])


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_quoted_result_is_in_a_results_file(readme):
    values = _recorded()
    missing = [num + ("%" if pct else "") for num, pct in quoted_numbers(readme.read_text()) if not found(num, pct, values)]
    assert not missing, (f"{readme.name} quotes numbers that no file in benchmarks/results/ holds: {missing}. Run the "
                         "benchmark script that measures them (its line lands in benchmarks/results/), or drop them.")
