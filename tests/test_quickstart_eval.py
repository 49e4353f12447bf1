"""benchmarks/quickstart_eval.py resumes a kept quickstart run and measures pi against rho on more samples: its
first samples are the notebook's own evaluation, so the two cannot drift apart (run on the tiny model)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import quickstart  # noqa: E402
import quickstart_eval  # noqa: E402


def test_refuses_a_folder_that_is_not_a_kept_run(tmp_path):
    with pytest.raises(SystemExit, match="not a kept quickstart lab folder"):
        quickstart_eval.main([str(tmp_path), "--model", "tiny"])


@pytest.mark.slow
def test_its_first_samples_are_the_notebooks_evaluation_and_more_samples_average(tmp_path):
    lab = tmp_path / "lab"
    run = quickstart.main(["--smoke", "--keep", str(lab)])
    effect = json.loads((lab / "effect.json").read_text())
    assert effect["samples"] == 2  # the smoke run's EVAL_SAMPLES
    (one,) = quickstart_eval.main([str(lab), "--model", "tiny", "--samples", str(effect["samples"]), "--max-prompts",
                                   str(run["n_eval"])])["results"]
    # seeds 0 and 1 on the notebook's prompts: the very samples its last cell scored
    assert one["judge"] == "VADER"
    for key, notebook_key in (("judge_rho", "vader_rho"), ("judge_pi", "vader_pi"), ("diff", "diff"), ("low", "low"),
                              ("high", "high"), ("score_diff", "score_diff")):
        assert math.isclose(one[key], effect[notebook_key], abs_tol=1e-9), key
    assert one["updates"] == effect["updates"] and math.isclose(one["kl"], effect["kl"])
    out = quickstart_eval.main([str(lab), "--model", "tiny", "--samples", "3", "--max-prompts", "6", "--name", "t"])
    (three,) = out["results"]
    assert out["name"] == "t" and three["samples"] == 3 and three["prompts"] == 6
    assert three["reads"] == {"pool": "mean", "layer": 1}  # the quickstart's reward model, as saved
    for key in ("judge_rho", "judge_pi", "diff", "low", "high", "score_diff", "kl"):
        assert math.isfinite(three[key]), key
    assert three["low"] <= three["diff"] <= three["high"]
    assert abs(three["diff"] - (three["judge_pi"] - three["judge_rho"])) < 1e-9
