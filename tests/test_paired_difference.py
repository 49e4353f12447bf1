"""The before/after effect's interval (labkit.evaluate.paired_difference) against a naive computation with
tabulated Student-t quantiles."""

import math
import random

import pytest

from labkit.evaluate import _t_quantile, paired_difference

# Student's t quantiles from a printed table (p, df) -> t
T_TABLE = {(0.975, 3): 3.182446, (0.975, 5): 2.570582, (0.975, 10): 2.228139, (0.975, 31): 2.039513,
           (0.975, 63): 1.998341, (0.995, 40): 2.704459, (0.95, 20): 1.724718}


@pytest.mark.parametrize("p, df", [k for k in T_TABLE if k[1] >= 5])
def test_t_quantile_matches_the_table(p, df):
    assert abs(_t_quantile(p, df) - T_TABLE[(p, df)]) < 1e-3


def test_paired_difference_equals_the_textbook_computation():
    rng = random.Random(0)
    before = [rng.uniform(-1, 1) for _ in range(32)]
    after = [b + 0.3 + rng.gauss(0, 0.2) for b in before]
    got = paired_difference(before, after)
    d = [a - b for a, b in zip(after, before)]
    mean = sum(d) / 32
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 31) / math.sqrt(32)
    assert got["n"] == 32 and got["diff"] == pytest.approx(mean)
    assert got["low"] == pytest.approx(mean - T_TABLE[(0.975, 31)] * se, abs=1e-5)
    assert got["high"] == pytest.approx(mean + T_TABLE[(0.975, 31)] * se, abs=1e-5)
    assert got["before"] == pytest.approx(sum(before) / 32) and got["after"] == pytest.approx(sum(after) / 32)
    # the pairing matters: the prompts' own spread (uniform on [-1, 1]) is far wider than the differences'
    assert got["high"] - got["low"] < 0.25


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="must pair up"):
        paired_difference([0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_difference([0.1], [0.3])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([0.1, 0.2], [0.3, 0.4], confidence=1.0)
