"""Jobs with a task of your own (a `task:` mapping of Task fields) and a reward function of your own
("module:function"), run by `labkit ppo` / `labkit train-reward`; and the prompts' references handed to a reward
function that asks for them, in a notebook's PPOTrainer and under the CLI on one and two processes.

Fast: job files, the errors of a bad task mapping or import path (before any model loads), PPOTrainer's
references on the tiny model. Slow (subprocesses): `python -m labkit.scale.cli ppo` on a tldr-like task with a
prompt file of {post, summary} rows, resumed with the `labkit` console script; the same under `accelerate launch`
on 2 CPU processes; `train-reward` on a label store holding the task's comparisons.
"""

import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from labkit.data import Prompt
from labkit.recipes import recipe_for
from labkit.rl import PPOConfig, PPOTrainer
from labkit.rl.checkpoint import latest
from labkit.scale import cli
from labkit.scale.jobs import PPOJob, RewardJob
from labkit.tasks import SENTIMENT, TLDR, Task, TruncationRule, format_query

# a TL;DR-like task of one's own: short posts, a "Reply:" suffix, no truncation (every response is scored)
POLITE = {"name": "polite-reply", "title": "Polite replies", "instructions": "Which reply is the most polite?",
          "prompt_source": "tldr", "query_length": 24, "response_length": 4, "temperature": 0.7,
          "truncation": None, "query_suffix": "\n\nReply:", "init_beta": 0.05, "kl_target": None}
POSTS = [("My neighbour plays drums at night.", "Loud neighbour."),
         ("The bus was late again today.", "Late bus."),
         ("I found a wallet on the street.", None),  # no summary: its reference is None
         ("Our cat learned to open doors.", "Clever cat.")]
# what the reward function received, one JSON line per call: this process's rank, queries and references
REWARDS_PY = '''
import json, os

def score(queries, responses, references):
    with open("received.jsonl", "a") as f:
        f.write(json.dumps({"rank": int(os.environ.get("RANK", 0)), "queries": queries,
                            "references": references}) + "\\n")
    return [float(len(r)) / 10 for r in responses]


def plain(queries, responses):
    return [0.0] * len(responses)


NOT_A_FUNCTION = 3


def one_argument(responses):
    return [0.0] * len(responses)
'''


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    """tmp_path as the working directory, holding myrewards.py and prompts.jsonl; sys.path and sys.modules are
    put back afterwards (cli.main adds the working directory to sys.path)."""
    (tmp_path / "myrewards.py").write_text(REWARDS_PY)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"post": p, "summary": s}) + "\n" for p, s in POSTS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    for name in ("myrewards", "broken_rewards"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path
    for name in ("myrewards", "broken_rewards"):
        sys.modules.pop(name, None)


@pytest.fixture
def no_models(monkeypatch):
    """Loading a model fails the test: the checks must come first."""
    import labkit.models

    def load_lm(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(labkit.models, "load_lm", load_lm)


def _ppo_job(root: Path, n_updates: int = 1, **changes) -> PPOJob:
    base = dict(run_dir=str(root / "run"), n_updates=n_updates, model="tiny", task=POLITE, reward="myrewards:score",
                prompt_source=str(root / "prompts.jsonl"),
                ppo=PPOConfig(batch_size=4, ppo_epochs=1, lr=1e-3, total_updates=10))
    return PPOJob(**{**base, **changes})


# --------------------------------------------------------------------------------------------------
# job files


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_custom_task_job_round_trips_and_saves_the_whole_mapping(rewards_module, suffix):
    job = _ppo_job(rewards_module, task_overrides={"response_length": 6})
    assert job.task == dataclasses.asdict(Task(**POLITE))  # every field, defaults filled in
    path = job.save(rewards_module / f"ppo{suffix}")
    assert PPOJob.load(path) == job
    task = PPOJob.load(path).task_spec()
    assert (task.name, task.query_suffix, task.response_length, task.truncation) == ("polite-reply", "\n\nReply:", 6, None)

    # a Task object is kept as its mapping; a paper task as defined, as its name
    mine = TLDR.with_(name="tldr-short", truncation=TruncationRule("\n", 2))
    assert PPOJob(run_dir="run", n_updates=1, task=mine).task_spec() == mine
    assert PPOJob(run_dir="run", n_updates=1, task=SENTIMENT).task == "sentiment"
    rjob = RewardJob(labels="labels.db", output_dir="rm", task=mine)
    assert RewardJob.load(rjob.save(rewards_module / f"rm{suffix}")) == rjob and rjob.task_spec() == mine


@pytest.mark.parametrize("source, paper", [("passages", "sentiment"), ("tldr", "tldr"), ("cnndm", "cnndm")])
def test_a_custom_task_takes_the_recipe_of_the_paper_task_reading_the_same_prompts(tmp_path, source, paper):
    task = {**POLITE, "prompt_source": source}
    assert PPOJob(run_dir="run", n_updates=3, task=task).ppo == recipe_for(paper).ppo_config(total_updates=3)
    assert RewardJob(labels="l.db", output_dir="rm", task=task).reward == recipe_for(paper).reward_config()
    path = tmp_path / "ppo.yaml"  # a partial section takes the rest from that recipe too
    path.write_text(yaml.safe_dump({"job": "ppo", "run_dir": "run", "n_updates": 3, "task": task, "ppo": {"seed": 4}}))
    assert PPOJob.load(path).ppo == recipe_for(paper).ppo_config(total_updates=3, seed=4)


def test_a_custom_task_run_resumes_and_refuses_a_changed_task(rewards_module, no_models):
    _ppo_job(rewards_module).save(rewards_module / "run" / "job.yaml")
    cli.check_resume(_ppo_job(rewards_module, n_updates=5, task={**POLITE, "title": "Kind replies"}))  # may change
    cli.check_resume(_ppo_job(rewards_module, task={**POLITE, "penalty": -1.0}))  # a default written out: the same
    changed = _ppo_job(rewards_module, task={**POLITE, "response_length": 8}, reward="myrewards:plain")
    with pytest.raises(ValueError, match=r"differs in: reward: 'myrewards:score' -> 'myrewards:plain'; "
                                         r"task\.response_length: 4 -> 8\."):
        cli.run_ppo(changed, torch.device("cpu"))


TASK_ERRORS = [
    ({**POLITE, "colour": "red"}, r"Unknown task keys \['colour'\]; known keys: \[.*'response_length'"),
    ({k: v for k, v in POLITE.items() if k != "truncation"}, r"task lacks the required keys \['truncation'\]"),
    ({**POLITE, "query_length": 0}, r"task: Task\.query_length = 0: must be a whole number >= 1"),
    ({**POLITE, "temperature": "hot"}, r"task: Task\.temperature = 'hot' \(str\): must be a number"),
    ({**POLITE, "prompt_source": "reddit"}, r"task: Task\.prompt_source = 'reddit': must be one of 'passages', 'tldr'"),
    ({**POLITE, "truncation": "."}, r"task\.truncation = '\.': must be null \(no truncation\) or a mapping"),
    ({**POLITE, "truncation": {"text": ".", "afterr": 2}}, r"Unknown task\.truncation keys \['afterr'\]"),
    ({**POLITE, "truncation": {"text": ".", "after": -1}}, r"task: TruncationRule\.after = -1"),
    (["polite"], r"Job\.task = \['polite'\] \(list\): must be a paper task's name \(sentiment, .*\) or a mapping"),
]


@pytest.mark.parametrize("task, message", TASK_ERRORS, ids=[str(i) for i in range(len(TASK_ERRORS))])
def test_a_bad_task_mapping_is_refused_at_load_before_any_model(rewards_module, no_models, task, message):
    path = rewards_module / "ppo.yaml"
    data = yaml.safe_load(_ppo_job(rewards_module).save(path).read_text())
    path.write_text(yaml.safe_dump({**data, "task": task}))
    with pytest.raises(ValueError, match=rf"ppo\.yaml: (PPO)?{message}"):
        cli.main(["ppo", str(path)])
    with pytest.raises(ValueError, match=message):
        RewardJob(labels="l.db", output_dir="rm", task=task)
    assert not (rewards_module / "run").exists()


REWARD_ERRORS = [
    ("nomodule:score", r"there is no module 'nomodule' to import\. Put nomodule\.py in the folder you run"),
    ("myrewards:scroe", r"myrewards \(.*myrewards\.py\) has no attribute 'scroe'; the functions it defines: "
                        r"\['one_argument', 'plain', 'score'\]"),
    ("myrewards:NOT_A_FUNCTION", r"names 3 \(int\), which is not callable"),
    ("myrewards:one_argument", r"one_argument\(responses\) cannot be called as reward\(queries, responses\)"),
    ("broken_rewards:score", r"importing 'broken_rewards' raised ZeroDivisionError: division by zero "
                             r"\(.*broken_rewards\.py, line 2\)"),
]


@pytest.mark.parametrize("reward, message", REWARD_ERRORS, ids=[r[0] for r in REWARD_ERRORS])
def test_a_bad_reward_import_path_is_refused_at_load_before_any_model(rewards_module, no_models, reward, message):
    (rewards_module / "broken_rewards.py").write_text("import json\n1 / 0\n")
    path = rewards_module / "ppo.yaml"
    data = yaml.safe_load(_ppo_job(rewards_module).save(path).read_text())
    path.write_text(yaml.safe_dump({**data, "reward": reward}))
    with pytest.raises(ValueError, match=rf"ppo\.yaml: PPOJob\.reward = '{reward}'.*{message}"):
        cli.main(["ppo", str(path)])
    assert not (rewards_module / "run").exists()


def test_vader_and_reward_model_folders_are_not_import_paths(rewards_module):
    from labkit.scale.jobs import reward_function

    (rewards_module / "rm:v2").mkdir()  # a folder whose name looks like one stays a reward model folder
    assert reward_function("vader") is None and reward_function("rm:v2") is None and reward_function("runs/rm") is None
    assert reward_function("myrewards:plain").__name__ == "plain"


# --------------------------------------------------------------------------------------------------
# PPOTrainer hands references to a reward function that asks for them (a notebook's use)


def test_ppo_trainer_passes_each_rows_prompt_reference_to_a_reward_function(tiny):
    model, tok = tiny
    task = Task(**POLITE)
    prompts = [Prompt(p, s) for p, s in POSTS] + ["A plain string prompt here."]
    reference_of = {tok.decode(format_query(task, getattr(p, "text", p), tok), skip_special_tokens=True):
                    getattr(p, "reference", None) for p in prompts}
    calls = []

    def with_references(queries, responses, references):
        calls.append(("references", queries, references))
        return [1.0] * len(responses)

    def with_kwargs(queries, responses, **kwargs):
        calls.append(("kwargs", queries, kwargs["references"]))
        return [1.0] * len(responses)

    def plain(queries, responses):
        calls.append(("plain", queries, None))
        return [1.0] * len(responses)

    trainer = PPOTrainer(copy.deepcopy(model), tok, task, with_references, prompts,
                         PPOConfig(batch_size=8, ppo_epochs=1, lr=1e-4), verbose=False)
    assert trainer.references == [s for _, s in POSTS] + [None]
    for reward in (with_references, with_kwargs, plain):
        trainer.reward = reward  # swapped between updates, as the online loop does
        assert math.isfinite(trainer.step()["objective/scores"])
    assert [c[0] for c in calls] == ["references", "kwargs", "plain"]
    for _, queries, references in calls[:2]:
        assert len(references) == len(queries) == 8
        assert references == [reference_of[q] for q in queries]  # each row's own prompt's reference
    assert len({q for _, queries, _ in calls for q in queries}) > 1  # several prompts were drawn

    def one(queries):
        return [0.0] * len(queries)

    with pytest.raises(TypeError, match=r"one\(queries\) cannot be called as reward\(queries, responses\)"):
        trainer.reward = one  # refused when set, not mid-update
    with pytest.raises(TypeError, match="reward is a str: it must be a RewardModel, a function"):
        trainer.reward = "vader"
    assert trainer.reward is plain


# --------------------------------------------------------------------------------------------------
# the commands, as subprocesses


def _env() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _received(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "received.jsonl").read_text().splitlines()]


def _assert_references_match(calls: list[dict], batch_size: int) -> None:
    """Each row's reference is the summary of the post its query was made from (None for the post without one)."""
    summary_of = dict(POSTS)
    for call in calls:
        assert len(call["queries"]) == len(call["references"]) == batch_size
        for query, reference in zip(call["queries"], call["references"]):
            (post,) = [p for p in summary_of if p in query]
            assert reference == summary_of[post], (query, reference)


def _labkit_script() -> list[str]:
    """The `labkit` console script beside this Python (its sys.path starts at its own folder), else python -m."""
    script = Path(sys.executable).with_name("labkit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "labkit.scale.cli"]


@pytest.mark.slow
def test_ppo_cli_runs_a_custom_task_with_a_reward_function_and_resumes(rewards_module):
    root = rewards_module
    _ppo_job(root, n_updates=1).save(root / "ppo1.yaml")
    _ppo_job(root, n_updates=2).save(root / "ppo2.yaml")
    _run([sys.executable, "-m", "labkit.scale.cli", "ppo", "ppo1.yaml"], cwd=root)
    first = _received(root)
    assert len(first) == 1
    _assert_references_match(first, 4)

    stdout = _run([*_labkit_script(), "ppo", "ppo2.yaml"], cwd=root)  # resumed by the console script
    assert "1 of 2 updates to go" in stdout
    calls = _received(root)
    assert len(calls) == 2
    _assert_references_match(calls, 4)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2]
    assert all(math.isfinite(v) for m in rows for v in m.values() if isinstance(v, float))
    assert json.loads((latest(root / "run") / "trainer.json").read_text())["step"] == 2
    assert PPOJob.load(root / "run" / "job.yaml") == _ppo_job(root, n_updates=2)


@pytest.mark.slow
def test_ppo_cli_on_two_processes_gives_each_process_its_own_rows_references(rewards_module):
    from test_distributed import _launch  # tests/ is on sys.path, as for the other tests' helpers

    _ppo_job(rewards_module, n_updates=1).save(rewards_module / "ppo.json")
    _launch("ppo", "ppo.json", "--check-sync", cwd=rewards_module)
    calls = _received(rewards_module)
    assert sorted(c["rank"] for c in calls) == [0, 1]  # each process scored its own 4 rollouts, once
    _assert_references_match(calls, 4)
    rows = [json.loads(line) for line in (rewards_module / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["episodes"] for m in rows] == [8] and math.isfinite(rows[0]["objective/scores"])


@pytest.mark.slow
def test_train_reward_on_a_custom_task_reads_only_its_comparisons(rewards_module):
    from labkit.labeling.store import LabelStore
    from labkit.reward import RewardConfig, RewardModel

    root = rewards_module
    with LabelStore(root / "labels.db") as store:
        for i, (post, _) in enumerate(POSTS * 3):
            cid = store.add_comparison(POLITE["name"], post, [" Thank you kindly.", " Go away now."])
            store.record_label(cid, best=0, labeler="mock")
            if i < 2:  # another task's comparisons are left out
                other = store.add_comparison("sentiment", post, [" happy", " sad"])
                store.record_label(other, best=0, labeler="mock")
    job = RewardJob(labels=str(root / "labels.db"), output_dir=str(root / "rm"), model="tiny", task=POLITE,
                    prompt_source=str(root / "prompts.jsonl"), pool="mean", layer=1,
                    reward=RewardConfig(batch_size=4, lr=1e-3, normalize_samples=8, heldout_fraction=0.0))
    job.save(root / "rm.yaml")
    assert cli.main(["train-reward", str(root / "rm.yaml")]) == 0
    summary = json.loads((root / "rm" / "summary.json").read_text())
    assert summary["examples"] == 12 and math.isfinite(summary["final"]["rm/loss"])
    rm = RewardModel.load(root / "rm", device="cpu")
    # the job's reading (the response mean of block 1's output), saved with the model
    assert rm.task_name == "polite-reply" and (rm.pool, rm.layer) == ("mean", 1)
    assert RewardJob.load(root / "rm" / "job.yaml") == job
    shutil.rmtree(root / "rm")
