"""Bad settings fail at construction, before any model loads or state changes, with a ValueError that names the
class and field, the value and what is allowed (labkit.checks); job files add their file name, and a run folder's
job.yaml is never replaced by a failing or different job. No model is loaded here."""

import dataclasses
import json
import math
import re
import typing

import numpy as np
import pytest
import torch
import yaml

from labkit import data
from labkit.labeling.online import OnlineConfig
from labkit.reward import RewardConfig
from labkit.rl.config import PPOConfig
from labkit.scale import cli
from labkit.scale.jobs import PPOJob, RewardJob, yaml_loader
from labkit.tasks import PROMPT_SOURCES, SENTIMENT, TASKS, Task, TruncationRule

NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------------------------------
# the configs


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": NAN}, r"PPOConfig\.lr = nan: must be a finite number > 0\."),
    ({"lr": 0}, r"PPOConfig\.lr = 0\.0: must be a finite number > 0"),
    ({"lr": INF}, r"PPOConfig\.lr = inf: must be a finite number > 0"),
    ({"lr": "1e-5"}, r"PPOConfig\.lr = '1e-5' \(str\): must be a number; this one is a string: write the number without quotes"),
    ({"whiten_rewards": "false"}, r"PPOConfig\.whiten_rewards = 'false' \(str\): must be true or false \(a YAML bool, not a string\)\."),
    ({"whiten_rewards": 0}, r"PPOConfig\.whiten_rewards = 0 \(int\): must be true or false \(a bool\)"),
    ({"gradient_checkpointing": 1}, r"PPOConfig\.gradient_checkpointing = 1 \(int\): must be true or false"),
    ({"separate_value_first_epoch": "yes"}, r"PPOConfig\.separate_value_first_epoch = 'yes' \(str\)"),
    ({"batch_size": 0}, r"PPOConfig\.batch_size = 0: must be a whole number >= 1\."),
    ({"batch_size": True}, r"PPOConfig\.batch_size = True \(bool\): must be a whole number \(int\)\."),
    ({"batch_size": 2.5}, r"PPOConfig\.batch_size = 2\.5 \(float\): must be a whole number \(int\)"),
    ({"batch_size": "ten"}, r"PPOConfig\.batch_size = 'ten' \(str\): must be a whole number \(int\)\."),
    ({"minibatch_size": 0}, r"PPOConfig\.minibatch_size = 0: must be a whole number in \[1, 64\] \(at most batch_size"),
    ({"minibatch_size": 65}, r"PPOConfig\.minibatch_size = 65: must be a whole number in \[1, 64\]"),
    ({"minibatch_size": 8, "micro_batch_size": 9}, r"PPOConfig\.micro_batch_size = 9: must be a whole number in \[1, 8\]"),
    ({"batch_size": 16, "micro_batch_size": 17}, r"PPOConfig\.micro_batch_size = 17: must be a whole number in \[1, 16\]"),
    ({"minibatch_size": "4"}, r"PPOConfig\.minibatch_size = '4' \(str\): must be a whole number \(int\) or None"),
    ({"ppo_epochs": 0}, r"PPOConfig\.ppo_epochs = 0: must be a whole number >= 1"),
    ({"total_updates": 0}, r"PPOConfig\.total_updates = 0: must be a whole number >= 1 \(the learning rate decays"),
    ({"optimizer": "sgd"}, r"PPOConfig\.optimizer = 'sgd': must be one of 'tf_adam', 'adam'"),
    ({"init_beta": -0.1}, r"PPOConfig\.init_beta = -0\.1: must be a finite number >= 0 \(None = the task's\)"),
    ({"init_beta": NAN}, r"PPOConfig\.init_beta = nan: must be a finite number >= 0"),
    ({"kl_target": 0}, r"PPOConfig\.kl_target = 0\.0: must be a finite number > 0 \(None = a fixed beta, -1 = the task's target"),
    ({"kl_target": -2.0}, r"PPOConfig\.kl_target = -2\.0: must be a finite number > 0"),
    ({"kl_target": INF}, r"PPOConfig\.kl_target = inf: must be a finite number > 0"),
    ({"init_beta": 0.0, "kl_target": 6.0}, r"PPOConfig\.init_beta = 0\.0: a beta of 0 never moves .*kl_target=None"),
    ({"init_beta": 0.0}, r"PPOConfig\.init_beta = 0\.0: a beta of 0 never moves"),  # kl_target -1: the task's may adapt
    ({"kl_horizon": 0}, r"PPOConfig\.kl_horizon = 0: must be a whole number >= 1"),
    ({"gamma": 1.5}, r"PPOConfig\.gamma = 1\.5: must be a finite number in \[0, 1\]"),
    ({"lam": -0.1}, r"PPOConfig\.lam = -0\.1: must be a finite number in \[0, 1\]"),
    ({"cliprange": 0}, r"PPOConfig\.cliprange = 0\.0: must be a finite number > 0"),
    ({"cliprange_value": -1}, r"PPOConfig\.cliprange_value = -1\.0: must be a finite number > 0"),
    ({"vf_coef": -1}, r"PPOConfig\.vf_coef = -1\.0: must be a finite number >= 0"),
    ({"value_model": "sep"}, r"PPOConfig\.value_model = 'sep': must be one of 'shared', 'separate'"),
    ({"lora_r": -1}, r"PPOConfig\.lora_r = -1: must be a whole number >= 0 \(0 = full fine-tuning\)"),
    ({"lora_alpha": 0}, r"PPOConfig\.lora_alpha = 0\.0: must be a finite number > 0"),
    ({"generation_batch_size": 0}, r"PPOConfig\.generation_batch_size = 0: must be a whole number >= 1"),
    ({"seed": -1}, r"PPOConfig\.seed = -1: must be a whole number >= 0"),
    ({"seed": 1.5}, r"PPOConfig\.seed = 1\.5 \(float\): must be a whole number \(int\)"),
    ({"save_every": -1}, r"PPOConfig\.save_every = -1: must be a whole number >= 0"),
    ({"n_samples_shown": -1}, r"PPOConfig\.n_samples_shown = -1: must be a whole number >= 0"),
])
def test_bad_ppo_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**kwargs)


def test_ppo_settings_that_are_fine():
    cfg = PPOConfig(batch_size=4.0, lr=1, minibatch_size=np.int64(2), micro_batch_size=1, kl_target=None, init_beta=0)
    assert (cfg.batch_size, cfg.minibatch_size) == (4, 2) and type(cfg.batch_size) is int and type(cfg.minibatch_size) is int
    assert cfg.lr == 1.0 and type(cfg.lr) is float and type(cfg.init_beta) is float
    assert PPOConfig(kl_target=-1).kl_target == -1.0 and PPOConfig(kl_target=6).kl_target == 6.0  # the sentinel stays
    assert PPOConfig(lora_r=0, save_every=0, n_samples_shown=0, gamma=0, lam=1, vf_coef=0).lam == 1.0
    with pytest.raises(ValueError, match=r"Unknown PPOConfig fields \['lrr'\]"):
        PPOConfig.from_dict({"lrr": 1e-5})
    assert PPOConfig.from_dict({"lr": 2e-5}).lr == 2e-5


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": 0}, r"RewardConfig\.lr = 0\.0: must be a finite number > 0"),
    ({"lr": NAN}, r"RewardConfig\.lr = nan: must be a finite number > 0"),
    ({"batch_size": 0}, r"RewardConfig\.batch_size = 0: must be a whole number >= 1"),
    ({"epochs": 0}, r"RewardConfig\.epochs = 0: must be a whole number >= 1"),
    ({"heldout_fraction": 1.0}, r"RewardConfig\.heldout_fraction = 1\.0: must be a finite number in \[0, 1\) \(1 would leave nothing"),
    ({"heldout_fraction": -0.1}, r"RewardConfig\.heldout_fraction = -0\.1: must be a finite number in \[0, 1\)"),
    ({"eval_every": 0}, r"RewardConfig\.eval_every = 0: must be a whole number >= 1"),
    ({"normalize_samples": 0}, r"RewardConfig\.normalize_samples = 0: must be a whole number >= 1"),
    ({"optimizer": "Adam"}, r"RewardConfig\.optimizer = 'Adam': must be one of 'tf_adam', 'adam'"),
    ({"seed": -1}, r"RewardConfig\.seed = -1: must be a whole number >= 0"),
    ({"seed": "0"}, r"RewardConfig\.seed = '0' \(str\): must be a whole number \(int\); this one is a string"),
])
def test_bad_reward_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"comparisons_per_round": -1}, r"OnlineConfig\.comparisons_per_round = -1: must be a whole number >= 0"),
    ({"comparisons_per_round": 2.5}, r"OnlineConfig\.comparisons_per_round = 2\.5 \(float\): must be a whole number"),
    ({"validation_per_round": -2}, r"OnlineConfig\.validation_per_round = -2: must be a whole number >= 0"),
    ({"refit_every_labels": 0}, r"OnlineConfig\.refit_every_labels = 0: must be a whole number >= 1"),
    ({"ppo_updates_per_round": 0}, r"OnlineConfig\.ppo_updates_per_round = 0: must be a whole number >= 1"),
    ({"reward_config": {"lr": 1e-4}}, r"OnlineConfig\.reward_config = \{'lr': 0\.0001\} \(dict\): must be a RewardConfig"),
    ({"seed": -1}, r"OnlineConfig\.seed = -1: must be a whole number >= 0"),
    ({"reward_pool": "first"}, r"OnlineConfig\.reward_pool = 'first': must be one of 'last', 'mean'"),
    ({"reward_layer": -3}, r"OnlineConfig\.reward_layer = -3: must be a whole number >= 0"),
    ({"reward_layer": True}, r"OnlineConfig\.reward_layer = True \(bool\): must be a whole number"),
])
def test_bad_online_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OnlineConfig(**kwargs)


def test_online_validation_comparisons_may_be_odd():
    # each validation comparison takes K/2 responses from each model: their number need not be even
    assert OnlineConfig(validation_per_round=1).validation_per_round == 1
    assert OnlineConfig(validation_per_round=5, comparisons_per_round=0).comparisons_per_round == 0


@pytest.mark.parametrize("changes, message", [
    ({"name": ""}, r"Task\.name = '': must be a non-empty string"),
    ({"name": None}, r"Task\.name = None \(NoneType\): must be a string\."),
    ({"title": 3}, r"Task\.title = 3 \(int\): must be a string"),
    ({"prompt_source": "books"}, r"Task\.prompt_source = 'books': must be one of 'passages', 'tldr', 'cnndm'"),
    ({"query_length": 0}, r"Task\.query_length = 0: must be a whole number >= 1"),
    ({"response_length": 0}, r"Task\.response_length = 0: must be a whole number >= 1"),
    ({"response_length": "24"}, r"Task\.response_length = '24' \(str\): must be a whole number"),
    ({"temperature": 0}, r"Task\.temperature = 0\.0: must be a finite number > 0 \(logits are divided by it"),
    ({"temperature": -0.7}, r"Task\.temperature = -0\.7: must be a finite number > 0"),
    ({"truncation": "."}, r"Task\.truncation = '\.' \(str\): must be a TruncationRule or None"),
    ({"truncation": {"text": ".", "after": 2}}, r"Task\.truncation = \{.*\} \(dict\): must be a TruncationRule"),
    ({"penalty": NAN}, r"Task\.penalty = nan: must be a finite number\."),
    ({"init_beta": -1}, r"Task\.init_beta = -1\.0: must be a finite number >= 0"),
    ({"kl_target": 0}, r"Task\.kl_target = 0\.0: must be a finite number > 0 \(target KL in nats; None = a fixed beta\)"),
    ({"kl_target": -1}, r"Task\.kl_target = -1\.0: must be a finite number > 0"),  # -1 means "the task's" only in PPOConfig
    ({"init_beta": 0}, r"Task\.init_beta = 0\.0: a beta of 0 never moves"),
    ({"start_after": 1}, r"Task\.start_after = 1 \(int\): must be a string or None"),
])
def test_bad_tasks_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        SENTIMENT.with_(**changes)


@pytest.mark.parametrize("args, message", [
    (("", 3), r"TruncationRule\.text = '': must be a non-empty string"),
    ((1, 3), r"TruncationRule\.text = 1 \(int\): must be a string"),
    ((".", -1), r"TruncationRule\.after = -1: must be a whole number >= 0"),
    ((".", 2.5), r"TruncationRule\.after = 2\.5 \(float\): must be a whole number"),
])
def test_bad_truncation_rules_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        TruncationRule(*args)


def test_every_task_and_default_config_constructs():
    for task in TASKS.values():
        assert dataclasses.replace(task) == task  # its __post_init__ accepts it
    assert SENTIMENT.with_(init_beta=0, kl_target=None).init_beta == 0.0  # a fixed beta of 0: no KL penalty
    # a truncation `after` beyond the response is allowed: every response is penalised (tests/test_ppo.py uses it)
    assert SENTIMENT.with_(response_length=4).truncation.after == 16
    assert TruncationRule("\n", 0).text == "\n"
    assert set(PROMPT_SOURCES) == set(data._COLUMNS) == set(data._DEMO_FILES)
    PPOConfig(), RewardConfig(), OnlineConfig()
    PPOJob(run_dir="run", n_updates=1), RewardJob(labels="labels.db", output_dir="rm")


def _float_fields(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if f.init and hints[f.name] in (float, float | None)]


@pytest.mark.parametrize("build", [PPOConfig, RewardConfig, SENTIMENT.with_], ids=["PPOConfig", "RewardConfig", "Task"])
def test_every_float_field_refuses_nan(build):
    # check_types leaves finiteness to the range helpers: this catches a float field given none
    cls = Task if build == SENTIMENT.with_ else build
    names = _float_fields(cls)
    assert len(names) >= 2
    for name in names:
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name} = nan: must be a finite number"):
            build(**{name: NAN})


# --------------------------------------------------------------------------------------------------
# job files


def test_yaml_reads_exponents_without_a_dot_as_floats():
    loaded = yaml.load("a: 1e-5\nb: 1E+3\nc: -2e-6\nd: 1.5\ne: 7\nf: 1_000\ng: '1e-5'\nh: .inf\ni: 1.0e-5\n",
                       Loader=yaml_loader())
    assert loaded == {"a": 1e-5, "b": 1000.0, "c": -2e-6, "d": 1.5, "e": 7, "f": 1000, "g": "1e-5", "h": INF, "i": 1e-5}
    assert [type(loaded[k]) for k in "abcefg"] == [float, float, float, int, int, str]
    assert yaml.safe_load("a: 1e-5") == {"a": "1e-5"}  # PyYAML's own loader is left alone


PPO_YAML = """job: ppo
run_dir: {run_dir}
n_updates: 3
model: tiny
task: sentiment
task_overrides: {{response_length: 4, truncation: {{text: ".", after: 2}}}}
ppo: {{batch_size: 4, lr: 1e-5, total_updates: 1E+3, init_beta: 2.5e-2, kl_target: null}}
"""

RM_YAML = """job: train-reward
labels: labels.db
output_dir: rm
label_kinds: [train, validation]
reward: {batch_size: 8, lr: 1e-4}
"""


def _edit(text: str, key: str, value: str) -> str:
    """The YAML text with the line of top-level `key` replaced (or added) by `key: value`."""
    lines = [line for line in text.splitlines() if not line.startswith(f"{key}:")]
    return "\n".join(lines + [f"{key}: {value}"]) + "\n"


def test_a_hand_written_yaml_job_with_exponents_loads(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text(PPO_YAML.format(run_dir=tmp_path / "run"))
    job = PPOJob.load(path)
    assert job.ppo.lr == 1e-5 and type(job.ppo.lr) is float and job.ppo.init_beta == 0.025
    assert job.ppo.total_updates == 1000 and type(job.ppo.total_updates) is int
    assert job.task_spec().truncation == TruncationRule(".", 2)
    assert PPOJob.load(job.save(tmp_path / "again.yaml")) == job == PPOJob.load(job.save(tmp_path / "again.json"))
    (tmp_path / "rm.yaml").write_text(RM_YAML)
    assert RewardJob.load(tmp_path / "rm.yaml").reward.lr == 1e-4


@pytest.mark.parametrize("key, value, message", [
    ("n_updates", "ten", r"ppo\.yaml: PPOJob\.n_updates = 'ten' \(str\): must be a whole number \(int\)\."),
    ("n_updates", "0", r"ppo\.yaml: PPOJob\.n_updates = 0: must be a whole number >= 1"),
    ("run_dir", "3", r"ppo\.yaml: PPOJob\.run_dir = 3 \(int\): must be a string\."),
    ("dtype", "float33", r"ppo\.yaml: PPOJob\.dtype = 'float33': must be one of 'float32', 'bfloat16'"),
    ("prompt_split", "test", r"ppo\.yaml: PPOJob\.prompt_split = 'test': must be one of 'train', 'validation', 'all'"),
    ("model", "''", r"ppo\.yaml: PPOJob\.model = '': must be a non-empty string"),
    ("task_overrides", "{truncation: {text: '.', afterr: 2}}", r"ppo\.yaml: Unknown task_overrides\.truncation keys \['afterr'\]"),
    ("task_overrides", "[response_length, 4]", r"ppo\.yaml: PPOJob\.task_overrides = \['response_length', 4\] \(list\): must be a mapping"),
    ("task_overrides", "{temperature: 0}", r"ppo\.yaml: task_overrides: Task\.temperature = 0\.0: must be a finite number > 0"),
    ("task_overrides", "{truncation: {text: '.', after: -1}}", r"ppo\.yaml: task_overrides: TruncationRule\.after = -1"),
    ("task_overrides", "{truncation: '.'}", r"ppo\.yaml: task_overrides\.truncation = '\.': must be null \(no truncation\) or a mapping"),
    ("n_update", "3", r"ppo\.yaml keys \['n_update'\]; known keys: .*'n_updates'"),
    ("ppo", "{lr: .nan}", r"ppo\.yaml: PPOConfig\.lr = nan: must be a finite number > 0"),
    ("ppo", "{whiten_rewards: 'false'}", r"ppo\.yaml: PPOConfig\.whiten_rewards = 'false' \(str\): must be true or false \(a YAML bool"),
    ("ppo", "{lr: '1e-5'}", r"ppo\.yaml: PPOConfig\.lr = '1e-5' \(str\): must be a number; this one is a string"),
    ("ppo", "{batch_size: 4, minibatch_size: 8}", r"ppo\.yaml: PPOConfig\.minibatch_size = 8: must be a whole number in \[1, 4\]"),
    ("ppo", "{kl_target: 0}", r"ppo\.yaml: PPOConfig\.kl_target = 0\.0: must be a finite number > 0"),
    ("ppo", "5", r"ppo\.yaml: ppo must be a mapping of PPOConfig fields"),
])
def test_bad_ppo_job_files_name_the_file_field_and_value(tmp_path, key, value, message):
    path = tmp_path / "ppo.yaml"
    path.write_text(_edit(PPO_YAML.format(run_dir=tmp_path / "run"), key, value))
    with pytest.raises(ValueError, match=message):
        PPOJob.load(path)


@pytest.mark.parametrize("key, value, message", [
    ("label_kinds", "train", r"rm\.yaml: RewardJob\.label_kinds = 'train' \(str\): must be a list of str values"),
    ("label_kinds", "[]", r"rm\.yaml: RewardJob\.label_kinds = \[\]: must name at least one comparison kind"),
    ("label_kinds", "[train, 3]", r"rm\.yaml: RewardJob\.label_kinds = \['train', 3\] \(list\): must be a list of str"),
    ("output_dir", "null", r"rm\.yaml: RewardJob\.output_dir = None \(NoneType\): must be a string"),
    ("reward", "{heldout_fraction: 1.0}", r"rm\.yaml: RewardConfig\.heldout_fraction = 1\.0: must be a finite number in \[0, 1\)"),
    ("reward", "{batch_size: 0}", r"rm\.yaml: RewardConfig\.batch_size = 0: must be a whole number >= 1"),
    ("reward", "{optimizer: sgd}", r"rm\.yaml: RewardConfig\.optimizer = 'sgd': must be one of"),
    ("task", "sentimnet", r"rm\.yaml: Unknown task 'sentimnet'"),
    ("pool", "max", r"rm\.yaml: RewardJob\.pool = 'max': must be one of 'last', 'mean'"),
    ("layer", "-1", r"rm\.yaml: RewardJob\.layer = -1: must be a whole number >= 0 \(0 is the embeddings"),
    ("layer", "15.5", r"rm\.yaml: RewardJob\.layer = 15\.5 \(float\): must be a whole number"),
])
def test_bad_reward_job_files_name_the_file_field_and_value(tmp_path, key, value, message):
    path = tmp_path / "rm.yaml"
    path.write_text(_edit(RM_YAML, key, value))
    with pytest.raises(KeyError if key == "task" else ValueError, match=message):
        RewardJob.load(path)


@pytest.mark.parametrize("cls, change, message", [
    (PPOJob, {"n_updates": "3"}, r"ppo\.json: PPOJob\.n_updates = '3' \(str\): must be a whole number"),
    (PPOJob, {"ppo": {"kl_target": 0}}, r"ppo\.json: PPOConfig\.kl_target = 0\.0"),
    (PPOJob, {"ppo": {"gamma": 2}}, r"ppo\.json: PPOConfig\.gamma = 2\.0: must be a finite number in \[0, 1\]"),
    (RewardJob, {"reward": {"lr": NAN}}, r"rm\.json: RewardConfig\.lr = nan: must be a finite number > 0"),
    (RewardJob, {"task_overrides": {"query_length": 0}}, r"rm\.json: task_overrides: Task\.query_length = 0"),
])
def test_bad_json_job_files_name_the_file_field_and_value(tmp_path, cls, change, message):
    good = {"job": "ppo", "run_dir": "run", "n_updates": 3} if cls is PPOJob else \
        {"job": "train-reward", "labels": "labels.db", "output_dir": "rm"}
    path = tmp_path / ("ppo.json" if cls is PPOJob else "rm.json")
    path.write_text(json.dumps({**good, **change}))  # NaN is written as NaN, which json reads back
    with pytest.raises(ValueError, match=message):
        cls.load(path)


# --------------------------------------------------------------------------------------------------
# the run folder's job.yaml


def _job(tmp_path, **changes) -> PPOJob:
    base = {"run_dir": str(tmp_path / "run"), "n_updates": 3, "model": "tiny", "task_overrides": {"response_length": 4}, "ppo": PPOConfig(batch_size=4, lr=3e-4, kl_target=None)}
    return PPOJob(**{**base, **changes})


@pytest.fixture
def no_models(monkeypatch):
    """Loading a model fails the test: the checks must come first."""
    import labkit.models

    def load_lm(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(labkit.models, "load_lm", load_lm)


def test_a_bad_job_file_leaves_the_runs_job_yaml_alone(tmp_path, no_models):
    old = _job(tmp_path).save(tmp_path / "run" / "job.yaml")
    before = old.read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text(_edit(PPO_YAML.format(run_dir=tmp_path / "run"), "ppo", "{lr: .nan}"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}: PPOConfig\.lr = nan"):
        cli.main(["ppo", str(bad)])
    assert old.read_bytes() == before


def test_a_resumed_run_refuses_a_different_job_before_loading_models(tmp_path, no_models):
    old = _job(tmp_path).save(tmp_path / "run" / "job.yaml")
    before = old.read_bytes()
    other = _job(tmp_path, model="smollm2-135m", task_overrides={"response_length": 8},
                 ppo=PPOConfig(batch_size=4, lr=3e-4, kl_target=None, seed=3))
    with pytest.raises(ValueError, match=r"holds a run started by another job .*differs in: model: 'tiny' -> "
                       r"'smollm2-135m'; ppo\.seed: 0 -> 3; task\.response_length: 4 -> 8\. "
                       r"A resumed run may only change n_updates"):
        cli.run_ppo(other, torch.device("cpu"))
    assert old.read_bytes() == before


def test_a_resumed_run_may_change_n_updates_and_the_settings_the_trainer_applies(tmp_path, no_models):
    _job(tmp_path).save(tmp_path / "run" / "job.yaml")
    same = _job(tmp_path, n_updates=10, task_overrides={"response_length": 4, "query_length": 64},  # 64: the default
                ppo=PPOConfig(batch_size=4, lr=1e-4, kl_target=None, micro_batch_size=2, save_every=5))  # applied, reported
    cli.check_resume(same)
    cli.check_resume(_job(tmp_path, run_dir=str(tmp_path / "elsewhere")))  # no job.yaml there: a new run
    with pytest.raises(AssertionError, match="a model was loaded"):  # the check passed: models load next
        cli.run_ppo(same, torch.device("cpu"))


def test_an_unreadable_job_yaml_in_the_run_folder_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "job.yaml").write_text("job: ppo\nrun_dir: run\nn_updates: 0\n")
    with pytest.raises(ValueError, match=r"job\.yaml, the job this run was started with, does not load .*"
                       r"PPOJob\.n_updates = 0.*Fix or delete it"):
        cli.check_resume(_job(tmp_path))


def test_a_job_changed_after_it_was_built_is_not_saved(tmp_path):
    path = _job(tmp_path).save(tmp_path / "run" / "job.yaml")
    before = path.read_bytes()
    job = _job(tmp_path)
    job.n_updates = "ten"
    with pytest.raises(ValueError, match=r"PPOJob\.n_updates = 'ten' \(str\)"):
        job.save(path)
    job = _job(tmp_path)
    job.ppo.lr = math.nan
    with pytest.raises(ValueError, match=r"PPOConfig\.lr = nan"):
        job.save(path)
    assert path.read_bytes() == before
