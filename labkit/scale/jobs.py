"""Job files: a notebook's settings saved with one call, run headless by `labkit train-reward` / `labkit ppo`.

A job holds the same config dataclasses the notebook uses (`RewardConfig`, `PPOConfig`) plus what the
notebook set up by hand: which model, task, prompts, labels and output folder.

    job = PPOJob(run_dir="runs/ppo", n_updates=200, model="gpt2-large", task="sentiment",
                 reward="runs/rm", ppo=recipe_for("sentiment").ppo_config(total_updates=200))
    job.save("ppo.yaml")          # YAML for .yaml / .yml, JSON for anything else
    # on the cluster:  accelerate launch --config_file ddp.yaml -m labkit.scale.cli ppo ppo.yaml

Settings left out come from the task's recipe (labkit.recipes), not from the dataclasses' defaults: a job built
without `ppo=` / `reward=`, and each field a file's `ppo:` / `reward:` section does not list (so `ppo: {lr: 3e-6}`
for tldr keeps the recipe's whiten_rewards False). A saved job writes every field, so that it means the same
if a recipe changes later.

`load` refuses unknown keys (naming the known ones), a file written for the other command, and bad values
(the dataclasses' `__post_init__`, labkit.checks), all with the file's name, before any model loads. YAML
files may write floats as 1e-5: PyYAML alone (YAML 1.1) would read that as the string '1e-5'.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from labkit.checks import at_least, check_types, fail, non_empty, one_of
from labkit.recipes import RECIPES, Recipe, recipe_for
from labkit.reward import RewardConfig
from labkit.rl.config import PPOConfig
from labkit.tasks import Task, TruncationRule, get_task

DTYPES = ("float32", "bfloat16", "float16", "float64", None)
"""Weights' dtypes a job may ask for (torch's names; None = labkit's choice)."""
SPLITS = ("train", "validation", "all")
"""Prompt splits of labkit.data.load_prompts."""


@dataclass
class RewardJob:
    """`labkit train-reward`: fit a reward model on the labels in a label store, normalised on rho."""

    labels: str
    """Path of the label store (the SQLite file the labeling widget and mock labelers write)."""
    output_dir: str
    """Where the reward model (`RewardModel.save` format), metrics.jsonl and summary.json go."""
    model: str = "smollm2-135m"
    """The base model rho (a `load_lm` name: "smollm2-135m", "tiny", a hub id or a local folder)."""
    task: str = "sentiment"
    """One of the paper's tasks (labkit.tasks); only its comparisons are trained on."""
    task_overrides: dict = field(default_factory=dict)
    """Task fields to change, e.g. {"response_length": 8, "truncation": {"text": ".", "after": 4}}."""
    label_kinds: list[str] = field(default_factory=lambda: ["train", "validation"])
    """Comparison kinds to train on (the online loop trains on "train" and "validation")."""
    prompt_source: str = "demo"
    """Prompts whose rho samples set the normalisation: "demo", "hub" or a local file (labkit.data)."""
    prompt_split: str = "train"
    """"train", "validation" or "all" (demo and hub sources)."""
    reward: RewardConfig | None = None
    """Training settings; None = the task's recipe (`recipe_for(task).reward_config()`). `reward.batch_size` is
    per optimiser step over ALL processes (each takes a share)."""
    dtype: str | None = None
    """Weights' dtype, e.g. "float32" or "bfloat16"; None = fp32 (on a GPU the matmuls still run in bf16 autocast)."""

    def __post_init__(self):
        check_types(self)
        for name in ("labels", "output_dir", "model", "task", "prompt_source"):
            non_empty(self, name)
        if not self.label_kinds:
            fail(self, "label_kinds", "must name at least one comparison kind, e.g. [train, validation].")
        one_of(self, "prompt_split", SPLITS)
        one_of(self, "dtype", DTYPES)
        if self.reward is not None:
            self.reward.__post_init__()  # again: the config may have been changed after it was built
        self.task_spec()  # unknown task names, override keys or values fail here, not after the models load
        if self.reward is None:  # after task_spec: an unknown task is named as such, not as a missing recipe
            self.reward = recipe_for(self.task).reward_config()

    def save(self, path) -> Path:
        return _save(self, "train-reward", path)

    @classmethod
    def load(cls, path) -> RewardJob:
        return _load(cls, "train-reward", path)

    def task_spec(self) -> Task:
        return build_task(self.task, self.task_overrides)


@dataclass
class PPOJob:
    """`labkit ppo`: PPO against a saved reward model (or a mock scorer), checkpointing into run_dir."""

    run_dir: str
    """Checkpoint and metrics.jsonl folder. A job started again on the same run_dir resumes from it."""
    n_updates: int
    """Updates the run should reach in total: a resumed job only runs the ones still missing."""
    model: str = "smollm2-135m"
    """The policy's starting point and rho (a `load_lm` name)."""
    task: str = "sentiment"
    """One of the paper's tasks (labkit.tasks)."""
    task_overrides: dict = field(default_factory=dict)
    """Task fields to change, e.g. {"response_length": 8, "truncation": None}."""
    reward: str = "vader"
    """A saved reward model folder (`labkit train-reward`'s output_dir), or "vader": the mock sentiment
    labeler's score used directly as the reward (the paper's mock-sentiment experiment)."""
    prompt_source: str = "demo"
    """"demo" (embedded), "hub" (the paper's datasets) or a local file (labkit.data.load_prompts)."""
    prompt_split: str = "train"
    """"train", "validation" or "all" (demo and hub sources)."""
    ppo: PPOConfig | None = None
    """PPO settings; None = the task's recipe (`recipe_for(task).ppo_config()`). `ppo.batch_size` rollouts are
    sampled by EACH process per update."""
    dtype: str | None = None
    """Model dtype; None = labkit's choice."""

    def __post_init__(self):
        check_types(self)
        for name in ("run_dir", "model", "task", "reward", "prompt_source"):
            non_empty(self, name)
        at_least(self, "n_updates", 1, "updates the run reaches in total")
        one_of(self, "prompt_split", SPLITS)
        one_of(self, "dtype", DTYPES)
        if self.ppo is not None:
            self.ppo.__post_init__()  # again: the config may have been changed after it was built
        self.task_spec()
        if self.ppo is None:  # the learning rate decays to 0 over the updates this job runs
            self.ppo = recipe_for(self.task).ppo_config(total_updates=self.n_updates)

    def save(self, path) -> Path:
        return _save(self, "ppo", path)

    @classmethod
    def load(cls, path) -> PPOJob:
        return _load(cls, "ppo", path)

    def task_spec(self) -> Task:
        return build_task(self.task, self.task_overrides)


def build_task(name: str, overrides: dict) -> Task:
    """The named task with `overrides` applied; "truncation" may be None or {"text": ..., "after": ...}."""
    task = get_task(name)
    known = sorted(f.name for f in fields(Task) if f.name != "name")
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"Unknown task_overrides {unknown}; known task fields: {known}.")
    changes = dict(overrides)
    if not isinstance(changes.get("truncation"), (dict, TruncationRule, type(None))):
        raise ValueError(f"task_overrides.truncation = {changes['truncation']!r}: must be null (no truncation) or a "  # noqa: TRY004 - config errors are ValueErrors
                         "mapping {text: '.', after: 16}.")
    try:
        if isinstance(changes.get("truncation"), dict):
            changes["truncation"] = _from_dict(TruncationRule, changes["truncation"], "task_overrides.truncation")
        return task.with_(**changes)
    except ValueError as err:
        raise ValueError(str(err) if str(err).startswith("Unknown") else f"task_overrides: {err}") from None


def _from_dict(cls, data: dict, where: str, base=None):
    """cls(**data), checked; with `base` (a cls instance) the fields `data` leaves out are base's."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of {cls.__name__} fields, got {type(data).__name__}.")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown {where} keys {unknown}; known keys: {sorted(known)}.")
    missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{where} lacks the required keys {missing}.")
    return cls(**data) if base is None else replace(base, **data)


def _save(job, command: str, path) -> Path:
    path = Path(path)
    replace(job)  # checks the fields again (they may have been changed since): a bad job never overwrites a file
    data = {"job": command, **asdict(job)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# YAML 1.1 (PyYAML) needs a dot in a float: `lr: 1e-5` would be the string '1e-5'. Job files are also written
# by hand, so floats may have an exponent without a dot as in YAML 1.2 (1e-5, 1E+3, -2e-6); the rest is
# PyYAML's float pattern.
_YAML_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.VERBOSE)


@functools.cache
def yaml_loader():
    """A yaml.SafeLoader that also reads 1e-5 as a float."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789."))
    return Loader


def _load(cls, command: str, path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Job file {path} does not exist. Write one from a notebook with "
                                f"`{cls.__name__}(...).save({str(path)!r})`.")
    text = path.read_text()
    try:
        return _parse(cls, command, path, text)
    except (ValueError, KeyError) as err:  # every message names the file
        message = err.args[0] if err.args else str(err)
        raise type(err)(message if str(path) in str(message) else f"{path}: {message}") from None


def _parse(cls, command: str, path: Path, text: str):
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.load(text, Loader=yaml_loader())  # a SafeLoader subclass: safe
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a job file holds a mapping of {cls.__name__} fields.")
    data = dict(data)
    written_for = data.pop("job", command)
    if written_for != command:
        raise ValueError(f"{path} is a job for `labkit {written_for}`, not `labkit {command}`.")
    key, sub, from_recipe = ("reward", RewardConfig, Recipe.reward_config) if cls is RewardJob else \
        ("ppo", PPOConfig, Recipe.ppo_config)
    if data.get(key) is not None:  # absent or null: the job's __post_init__ takes the whole section from the recipe
        task = data.get("task", next(f.default for f in fields(cls) if f.name == "task"))
        recipe = RECIPES.get(task) if isinstance(task, str) else None  # None: the job refuses the task below
        # a PPO section without total_updates decays the learning rate over the job's n_updates, not the recipe's 100
        n = data.get("n_updates")
        extra = {"total_updates": n} if key == "ppo" and isinstance(n, int) and not isinstance(n, bool) and n >= 1 else {}
        data[key] = _from_dict(sub, data[key], f"{path}: {key}", base=from_recipe(recipe, **extra) if recipe else None)
    return _from_dict(cls, data, str(path))  # its __post_init__ checks the values and builds the task
