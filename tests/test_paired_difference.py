"""The before/after effect's interval (labkit.evaluate.paired_difference) against a naive computation with
tabulated Student-t quantiles, and the held-out evaluation built on it (before_after) on a fake trainer."""

import math
import random
import statistics

import pytest
import torch

from labkit.evaluate import _t_quantile, before_after, paired_difference, per_prompt_means

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


def test_per_prompt_means_average_each_prompts_samples():
    values = [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]  # 3 prompts x 2 samples, sample-major
    assert per_prompt_means(values, 3, 2) == [3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="6 values for 4 prompts x 2 samples"):
        per_prompt_means(values, 4, 2)


class _Roll:
    """What before_after reads of a Rollout: texts, the truncation flags, a length."""

    def __init__(self, texts, found):
        self.response_texts, self._found = texts, found

    @property
    def found(self):
        return torch.tensor(self._found)

    def __len__(self):
        return len(self.response_texts)


class _FakeTrainer:
    """rho says "a<prompt><seed>", pi "b<prompt><seed>"; the reward model scores a text by its length, and every
    third sample has no truncation point. Records the seeds it was asked for."""

    def __init__(self):
        self.calls = []

    def _roll(self, who, prompts, seed):
        self.calls.append((who, seed))
        texts = [f"{who}{p}{'!' * seed}" for p in prompts]
        return _Roll(texts, [(i + seed) % 3 != 0 for i in range(len(prompts))])

    def sample_rho(self, prompts, seed):
        return self._roll("a", prompts, seed)

    def sample_policy(self, prompts, seed):
        return self._roll("b", prompts, seed)

    def score(self, roll):
        return torch.tensor([float(len(t)) for t in roll.response_texts])


def test_before_after_pairs_seeds_and_averages_each_prompts_samples():
    prompts = ["x", "yy", "zzz", "w"]
    judge = {"a": 0.0, "b": 1.0}

    def score(texts):  # pi's texts judged 1 + (number of "!") / 10 higher; rho's per-prompt offsets differ
        return [judge[t[0]] * (1 + t.count("!") / 10) + len(t.rstrip("!")) / 7 for t in texts]

    trainer = _FakeTrainer()
    got = before_after(trainer, prompts, score, samples=3)
    assert sorted(trainer.calls) == sorted([(w, s) for w in "ab" for s in range(3)])
    assert [r.response_texts for r in got["before"]] == [[f"a{p}{'!' * s}" for p in prompts] for s in range(3)]
    # naive: per prompt, the mean over seeds of pi - rho
    diffs = [statistics.fmean(score([f"b{p}{'!' * s}"])[0] - score([f"a{p}{'!' * s}"])[0] for s in range(3))
             for p in prompts]
    assert math.isclose(got["effect"]["diff"], statistics.fmean(diffs))
    assert got["effect"] == paired_difference(per_prompt_means(got["score_rho"], 4, 3),
                                              per_prompt_means(got["score_pi"], 4, 3))
    assert got["learned"]["diff"] == 0.0  # "a..." and "b..." have the same length
    assert got["found_rho"] == got["found_pi"] == 8 / 12
    found = [(i + s) % 3 != 0 for s in range(3) for i in range(4)]
    pairs = [(r, v) for rm, sc in (("rm_rho", "score_rho"), ("rm_pi", "score_pi"))
             for r, v, ok in zip(got[rm], got[sc], found) if ok]
    assert math.isclose(got["agreement"], statistics.correlation(*zip(*pairs)))


def test_before_after_refuses_a_score_of_the_wrong_length_and_no_samples():
    with pytest.raises(ValueError, match="score returned 1 values for 2 texts"):
        before_after(_FakeTrainer(), ["x", "y"], lambda texts: [0.0])
    with pytest.raises(ValueError, match="samples must be at least 1"):
        before_after(_FakeTrainer(), ["x", "y"], lambda texts: [0.0] * len(texts), samples=0)
    one = before_after(_FakeTrainer(), ["x", "y"], lambda texts: [0.0] * len(texts))
    assert math.isnan(one["agreement"])  # the judge is constant
