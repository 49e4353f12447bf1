"""benchmarks/quickstart.py runs the quickstart notebook headless and reports its time and effect: run here in smoke
mode (the tiny model), so that the script and the notebook's evaluation cell cannot drift apart."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import nbformat
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import quickstart  # noqa: E402


def test_set_accepts_only_the_first_cells_constants_as_literals():
    nb = nbformat.read(quickstart.NOTEBOOK, as_version=4)
    assert quickstart._overrides(["PPO_UPDATES=3", "RM_HEAD_L2=None"], nb) == {"PPO_UPDATES": 3,
                                                                                "RM_HEAD_L2": None}
    with pytest.raises(SystemExit, match="PPO_UPDATE"):  # a typo would silently run the default
        quickstart._overrides(["PPO_UPDATE=3"], nb)
    with pytest.raises(SystemExit, match="not a Python literal"):
        quickstart._overrides(["PPO_LR=three"], nb)


@pytest.mark.slow
def test_smoke_run_prints_time_sections_and_effect_then_a_reused_lab_trains_ppo_again(tmp_path, capsys):
    results = Path(os.environ["LABKIT_BENCH_RESULTS"])  # conftest: a temporary folder
    line = quickstart.main(["--smoke", "--name", "test", "--keep", str(tmp_path / "lab")])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == line and printed["name"] == "test" and printed["reused"] is None
    assert set(line["sections_s"]) == {"setup", "Label by hand", "Mock labels for the rest", "Train the reward model",
                                       "PPO with a KL penalty to rho", "Before and after, on prompts PPO never saw"}
    assert 0 < sum(line["sections_s"].values()) <= line["total_s"]
    assert line["sections_s"]["PPO with a KL penalty to rho"] > 0
    assert line["n_eval"] == 4 and line["updates"] == 2 and line["kl_target"] > 0
    for key in ("vader_rho", "vader_pi", "diff", "low", "high", "kl", "beta"):
        assert math.isfinite(line[key]), key
    assert line["low"] <= line["diff"] <= line["high"]
    assert abs(line["diff"] - (line["vader_pi"] - line["vader_rho"])) < 1e-9
    for key in ("score_rho", "score_pi", "score_diff", "score_low", "score_high"):  # the reward model's view
        assert math.isfinite(line[key]), key
    assert line["score_low"] <= line["score_diff"] <= line["score_high"]
    assert line["constants"]["SMOKE"] is True and line["constants"]["N_EVAL"] == 4
    assert any(json.loads(r)["name"] == "test" for r in (results / "quickstart.jsonl").read_text().splitlines())
    assert (tmp_path / "lab" / "labels.db").exists() and (tmp_path / "lab" / "reward_model").is_dir()

    # --reuse: the labels and reward model are loaded, PPO runs again from update 0 with the new settings; --ppo
    # reaches the PPOConfig the notebook builds, over what its cell passes
    again = quickstart.main(["--smoke", "--reuse", str(tmp_path / "lab"), "--set", "PPO_UPDATES=1",
                             "--ppo", "seed=3", "--ppo", "total_updates=1", "--keep", str(tmp_path / "lab2")])
    assert again["reused"] == str(tmp_path / "lab") and again["settings"] == {"PPO_UPDATES": 1}
    assert again["ppo_settings"] == {"seed": 3, "total_updates": 1} and again["updates"] == 1
    saved = json.loads(next((tmp_path / "lab2" / "ppo" / "checkpoints").glob("step-*/trainer.json")).read_text())
    assert saved["config"]["seed"] == 3 and saved["config"]["total_updates"] == 1

    # --continue-ppo: that lab's PPO run goes on from its update 1 to PPO_UPDATES, its first update's metrics kept
    # (with a larger total_updates: at 1 its learning rate is 0 from update 1 on, and further updates are refused)
    first = json.loads((tmp_path / "lab2" / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    more = quickstart.main(["--smoke", "--reuse", str(tmp_path / "lab2"), "--continue-ppo", "--set", "PPO_UPDATES=2",
                            "--ppo", "seed=3", "--ppo", "total_updates=2", "--keep", str(tmp_path / "lab3")])
    assert more["continued_ppo"] is True and more["updates"] == 2
    rows = [json.loads(r) for r in (tmp_path / "lab3" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0] == first
    with pytest.raises(SystemExit, match="continue-ppo needs --reuse"):
        quickstart.main(["--smoke", "--continue-ppo"])


def test_ppo_accepts_only_ppo_config_fields_with_valid_values():
    assert quickstart._ppo_overrides(["seed=2", "lr=1e-4"]) == {"seed": 2, "lr": 1e-4}
    with pytest.raises(SystemExit, match="PPOConfig field"):  # a typo would silently run the default
        quickstart._ppo_overrides(["sed=2"])
    with pytest.raises(SystemExit, match="not a Python literal"):
        quickstart._ppo_overrides(["lr=fast"])
    with pytest.raises(SystemExit, match="total_updates"):  # PPOConfig's own check, before any notebook runs
        quickstart._ppo_overrides(["total_updates=0"])


def test_each_line_records_the_constants_the_run_saw():
    nb = nbformat.read(quickstart.NOTEBOOK, as_version=4)
    full = quickstart._constants(nb, {"PPO_UPDATES": 3}, smoke=False)
    smoke = quickstart._constants(nb, {}, smoke=True)
    assert full["PPO_UPDATES"] == 3 and full["MODEL"] != "tiny" and full["SMOKE"] is False
    assert smoke["MODEL"] == "tiny" and smoke["SMOKE"] is True
    assert set(full) == set(smoke) >= {"N_PROMPTS", "PPO_LR", "LORA_R", "PPO_MINIBATCH", "N_EVAL"}


@pytest.mark.slow
def test_notebook_times_runs_any_notebook_and_records_its_sections(capsys):
    sys.path.insert(0, str(BENCH))
    import notebook_times

    hello = quickstart.NOTEBOOK.parent / "00_hello.ipynb"
    (line,) = notebook_times.main(["--smoke", str(hello)])
    assert line["notebook"] == "00_hello.ipynb" and line["smoke"] is True
    assert 0 < sum(line["sections_s"].values()) <= line["total_s"] and "effect" not in line
    with pytest.raises(SystemExit, match="no such notebook"):
        notebook_times.main(["notebooks/nope.ipynb"])


@pytest.mark.slow
def test_notebook_times_overrides_ppo_settings_where_the_notebook_builds_them(tmp_path):
    sys.path.insert(0, str(BENCH))
    import notebook_times

    with pytest.raises(SystemExit, match="--ppo"):   # refused before any notebook runs
        notebook_times.main(["--smoke", "--ppo", "not_a_field=1", "notebooks/02_descriptiveness.ipynb"])
    nb = quickstart.NOTEBOOK.parent / "02_descriptiveness.ipynb"
    (line,) = notebook_times.main(["--smoke", "--ppo", "seed=2", "--keep", str(tmp_path / "lab"), str(nb)])
    assert line["ppo_settings"] == {"seed": 2} and line["effect"]["updates"] >= 1
    (last,) = sorted((tmp_path / "lab/ppo/checkpoints").glob("step-*"))[-1:]
    assert json.loads((last / "trainer.json").read_text())["config"]["seed"] == 2   # the run the notebook trained

    # --reuse: the kept labels (one more added by hand here, which a fresh sampling could not have) and reward model
    # are loaded; PPO starts afresh with the new seed
    from labkit.labeling.store import LabelStore

    store = LabelStore(tmp_path / "lab/labels.db")
    mine = store.comparisons(task="descriptiveness", kind="train")[0]
    store.record_label(mine.id, 1, "reuse-test")
    store.close()
    (again,) = notebook_times.main(["--smoke", "--reuse", str(tmp_path / "lab"), "--ppo", "seed=3",
                                    "--keep", str(tmp_path / "lab2"), str(nb)])
    assert again["reused"] == str(tmp_path / "lab") and again["effect"]["updates"] == line["effect"]["updates"]
    kept = LabelStore(tmp_path / "lab2/labels.db")
    assert [(lab.comparison_id, lab.best) for lab in kept.labels(labeler="reuse-test")] == [(mine.id, 1)]
    policies = {c.sources[1] for c in kept.comparisons(task="descriptiveness", kind="eval")}
    assert len(policies) == 2   # the blind evaluation judged this run's policy, not the kept run's again
    kept.close()
    steps = [json.loads(r)["step"] for r in (tmp_path / "lab2/ppo/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, again["effect"]["updates"] + 1))   # a new run, not the kept one continued
    (last,) = sorted((tmp_path / "lab2/ppo/checkpoints").glob("step-*"))[-1:]
    assert json.loads((last / "trainer.json").read_text())["config"]["seed"] == 3
    with pytest.raises(SystemExit, match="no labels.db there"):
        notebook_times.main(["--reuse", str(tmp_path / "nothing"), str(nb)])


def test_notebook_times_keeps_the_one_lab_folder_a_notebook_wrote(tmp_path):
    sys.path.insert(0, str(BENCH))
    import notebook_times

    work, keep = tmp_path / "work", tmp_path / "kept"
    with pytest.raises(SystemExit, match="00_hello.ipynb wrote 0 lab folders under runs/, not one"):
        notebook_times.keep_lab(work, keep, "00_hello.ipynb")
    (work / "runs/sentiment/ppo").mkdir(parents=True)
    (work / "runs/sentiment/labels.db").write_text("labels")
    keep.mkdir()
    (keep / "stale.txt").write_text("from an earlier run")
    notebook_times.keep_lab(work, keep, "01_sentiment.ipynb")
    assert (keep / "labels.db").read_text() == "labels" and (keep / "ppo").is_dir() and not (keep / "stale.txt").exists()
    (work / "runs/other").mkdir()
    with pytest.raises(SystemExit, match="wrote 2 lab folders"):
        notebook_times.keep_lab(work, keep, "x.ipynb")
    with pytest.raises(SystemExit, match="pass one notebook"):
        notebook_times.main(["--keep", str(keep), "notebooks/00_hello.ipynb", "notebooks/00_hello.ipynb"])
