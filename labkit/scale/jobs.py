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

A task of your own is a mapping of `Task` fields in place of a paper task's name, and a reward of your own an
import path "module:function" (the CLI imports from the folder it runs in first, as `python -m` does):

    task: {name: politeness, title: Polite replies, instructions: "Which reply is the most polite?",
           prompt_source: tldr, query_length: 128, response_length: 24, temperature: 0.7,
           truncation: {text: "\\n", after: 8}, query_suffix: "\\n\\nReply:"}
    reward: myrewards:politeness       # def politeness(queries, responses, references=None) -> scores

`load` refuses unknown keys (naming the known ones), a file written for the other command, bad values (the
dataclasses' `__post_init__`, labkit.checks) and a reward function that does not import, all with the file's
name, before any model loads. YAML files may write floats as 1e-5: PyYAML alone (YAML 1.1) would read that as
the string '1e-5'.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
import traceback
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from labkit.checks import _check_type, at_least, fail, non_empty, one_of
from labkit.recipes import RECIPES, Recipe, recipe_for
from labkit.reward import RewardConfig
from labkit.reward.model import POOLS
from labkit.rl.config import PPOConfig
from labkit.tasks import TASKS, Task, TruncationRule, get_task

DTYPES = ("float32", "bfloat16", "float16", "float64", None)
"""Weights' dtypes a job may ask for (torch's names; None = labkit's choice)."""
SPLITS = ("train", "validation", "all")
"""Prompt splits of labkit.data.load_prompts."""
SOURCE_RECIPES = {"passages": "sentiment", "tldr": "tldr", "cnndm": "cnndm"}
"""The paper task whose recipe a task of your own (a `task:` mapping) takes, by its prompt_source."""

_TASK_DOC = ("a paper task's name ({}) or a mapping of Task fields (name, title, instructions, prompt_source, "
             "query_length, response_length, temperature, truncation, ...)").format(", ".join(TASKS))


@dataclass
class RewardJob:
    """`labkit train-reward`: fit a reward model on the labels in a label store, normalised on rho."""

    labels: str
    """Path of the label store (the SQLite file the labeling widget and mock labelers write)."""
    output_dir: str
    """Where the reward model (`RewardModel.save` format), metrics.jsonl and summary.json go."""
    model: str = "smollm2-135m"
    """The base model rho (a `load_lm` name: "smollm2-135m", "tiny", a hub id or a local folder)."""
    task: str | dict = "sentiment"
    """One of the paper's tasks by name (labkit.tasks), or a task of your own: a mapping of every `Task` field
    (those with defaults may be left out; a `Task` object is taken too and kept as its mapping). Only the
    comparisons stored under its name are trained on. A task of your own has no recipe: what the job leaves
    out comes from the recipe of the paper task reading the same prompts (`SOURCE_RECIPES`: prompt_source
    "passages" -> sentiment's, "tldr" -> tldr's, "cnndm" -> cnndm's)."""
    task_overrides: dict = field(default_factory=dict)
    """Task fields to change, e.g. {"response_length": 8, "truncation": {"text": ".", "after": 4}}."""
    label_kinds: list[str] = field(default_factory=lambda: ["train", "validation"])
    """Comparison kinds to train on (the online loop trains on "train" and "validation")."""
    prompt_source: str = "demo"
    """Prompts whose rho samples set the normalisation: a `labkit.data.load_prompts` source ("demo", "paper", "hub", a
    named hub dataset such as "trl-lib/tldr") or a local file in any of its schemas."""
    prompt_split: str = "train"
    """"train", "validation" or "all" (every split of the source; a local file is used whole)."""
    reward: RewardConfig | None = None
    """Training settings; None = the task's recipe (`recipe_of(task)`, for a paper task `recipe_for(task)`).
    `reward.batch_size` is per optimiser step over ALL processes (each takes a share)."""
    dtype: str | None = None
    """Weights' dtype, e.g. "float32" or "bfloat16"; None = fp32 (on a GPU the matmuls still run in bf16 autocast)."""
    pool: str = "last"
    """What the head reads of the hidden states: "last", the last real token's (as released), or "mean", the mean
    over the response's tokens (`RewardModel(pool=)`; docs/fidelity.md, pooled features)."""
    layer: int | None = None
    """Which hidden state the head reads: None, the final one after the last norm (as released); L, the output of
    block L (0: the embeddings). The notebooks read pool "mean" of layer 15 of SmolLM2's 30 with a fitted head
    (`reward.head_l2`): on a few hundred labels it picked the mock labelers' choice more often
    (benchmarks/reward_features.py; docs/fidelity.md item 12 says how far the evidence goes)."""

    def __post_init__(self):
        _check_fields(self)
        for name in ("labels", "output_dir", "model", "prompt_source"):
            non_empty(self, name)
        one_of(self, "pool", POOLS)
        at_least(self, "layer", 0, "0 is the embeddings; the model's block count is checked when it loads")
        if not self.label_kinds:
            fail(self, "label_kinds", "must name at least one comparison kind, e.g. [train, validation].")
        one_of(self, "prompt_split", SPLITS)
        one_of(self, "dtype", DTYPES)
        if self.reward is not None:
            self.reward.__post_init__()  # again: the config may have been changed after it was built
        self.task_spec()  # unknown task names, override keys or values fail here, not after the models load
        if self.reward is None:  # after task_spec: an unknown task is named as such, not as a missing recipe
            self.reward = recipe_of(self.task, self.task_overrides).reward_config()

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
    task: str | dict = "sentiment"
    """One of the paper's tasks by name (labkit.tasks), or a task of your own: a mapping of every `Task` field
    (those with defaults may be left out; a `Task` object is taken too and kept as its mapping). A task of your
    own has no recipe: what the job leaves out comes from the recipe of the paper task reading the same prompts
    (`SOURCE_RECIPES`: prompt_source "passages" -> sentiment's, "tldr" -> tldr's, "cnndm" -> cnndm's)."""
    task_overrides: dict = field(default_factory=dict)
    """Task fields to change, e.g. {"response_length": 8, "truncation": None}."""
    reward: str = "vader"
    """A saved reward model folder (`labkit train-reward`'s output_dir); "vader": the mock sentiment labeler's
    score used directly as the reward (the paper's mock-sentiment experiment); or a reward function's import
    path "module:attribute" (e.g. "myrewards:politeness"), imported when the job loads: a callable
    `(queries, responses) -> one score per response`, given each rollout's prompt reference too if it has a
    parameter named `references` (PPOTrainer). The CLI imports from the folder it runs in first."""
    prompt_source: str = "demo"
    """A `labkit.data.load_prompts` source: "demo" (embedded), "paper" (the 2019 paper's released data), "hub", a named
    hub dataset such as "trl-lib/tldr", or a local file in any of its schemas."""
    prompt_split: str = "train"
    """"train", "validation" or "all" (every split of the source; a local file is used whole)."""
    ppo: PPOConfig | None = None
    """PPO settings; None = the task's recipe (`recipe_of(task)`, for a paper task `recipe_for(task)`).
    `ppo.batch_size` rollouts are sampled by EACH process per update."""
    dtype: str | None = None
    """Model dtype; None = labkit's choice."""

    def __post_init__(self):
        _check_fields(self)
        for name in ("run_dir", "model", "reward", "prompt_source"):
            non_empty(self, name)
        at_least(self, "n_updates", 1, "updates the run reaches in total")
        one_of(self, "prompt_split", SPLITS)
        one_of(self, "dtype", DTYPES)
        if self.ppo is not None:
            self.ppo.__post_init__()  # again: the config may have been changed after it was built
        self.task_spec()
        reward_function(self.reward)  # an import path that does not import fails here, not after the models load
        if self.ppo is None:  # the learning rate decays to 0 over the updates this job runs
            self.ppo = recipe_of(self.task, self.task_overrides).ppo_config(total_updates=self.n_updates)

    def save(self, path) -> Path:
        return _save(self, "ppo", path)

    @classmethod
    def load(cls, path) -> PPOJob:
        return _load(cls, "ppo", path)

    def task_spec(self) -> Task:
        return build_task(self.task, self.task_overrides)


def _check_fields(job) -> None:
    """labkit.checks.check_types for every field but `task`, which is checked here: a name or a mapping (check_types
    reads only `X | None` unions). A `Task` object becomes its name if it is a paper task as defined, else its
    mapping; a mapping is written out whole (every field, Task's defaults filled in), so that a saved job means
    the same if a default changes later."""
    hints = typing.get_type_hints(type(job))
    for f in fields(job):
        if f.name != "task":
            _check_type(job, f.name, hints[f.name])
    if isinstance(job.task, Task):
        job.task = job.task.name if TASKS.get(job.task.name) == job.task else task_mapping(job.task)
    if isinstance(job.task, str):
        non_empty(job, "task", "a paper task's name, or a mapping of Task fields")
    elif isinstance(job.task, dict):
        job.task = task_mapping(task_from_mapping(job.task))
    else:
        fail(job, "task", f"must be {_TASK_DOC}.", show_type=True)


def task_mapping(task: Task) -> dict:
    """A Task as the mapping a job file holds (truncation as {text, after, tokens} or None)."""
    return asdict(task)


def task_from_mapping(data: dict, where: str = "task") -> Task:
    """A task of your own from a job file's `task:` mapping of Task fields, checked by Task's own __post_init__."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be {_TASK_DOC}, got a {type(data).__name__}.")  # noqa: TRY004 - config errors are ValueErrors
    data = dict(data)
    if not isinstance(data.get("truncation"), (dict, TruncationRule, type(None))):
        raise ValueError(f"{where}.truncation = {data['truncation']!r}: must be null (no truncation) or a mapping "
                         "{text: '.', after: 16}.")
    try:
        if isinstance(data.get("truncation"), dict):
            data["truncation"] = _from_dict(TruncationRule, data["truncation"], f"{where}.truncation")
        return _from_dict(Task, data, where)
    except ValueError as err:  # Task's own checks name the class and field; say where they came from
        raise ValueError(str(err) if str(err).startswith(("Unknown", where)) else f"{where}: {err}") from None


def build_task(task: str | dict | Task, overrides: dict) -> Task:
    """The task (a paper task's name, a mapping of Task fields or a Task) with `overrides` applied; "truncation"
    may be None or {"text": ..., "after": ...}."""
    task = task if isinstance(task, Task) else get_task(task) if isinstance(task, str) else task_from_mapping(task)
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


def recipe_of(task: str | dict | Task, overrides: dict | None = None) -> Recipe:
    """The recipe a job takes what it leaves out from: a paper task's own (by name, `recipe_for`); for a task of
    your own (a mapping), the recipe of the paper task reading the same prompts (`SOURCE_RECIPES`, by the
    prompt_source of the task with `overrides` applied)."""
    if isinstance(task, str):
        return recipe_for(task)
    return RECIPES[SOURCE_RECIPES[build_task(task, overrides or {}).prompt_source]]


def _recipe_or_none(task, overrides) -> Recipe | None:
    """`recipe_of`, or None for a task the job will refuse (its own error then names what is wrong)."""
    try:
        return recipe_of(task, overrides if isinstance(overrides, dict) else {})
    except (ValueError, KeyError, TypeError):
        return None


_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


def reward_function(reward: str):
    """The callable a PPOJob's `reward` names as "module:attribute", imported; None for "vader", a folder (a saved
    reward model) or any other path. A ValueError says what is wrong when the module or the attribute is missing,
    the module fails to import, or the attribute is not a function PPOTrainer can call."""
    if reward == "vader" or Path(reward).is_dir() or not _IMPORT_PATH.match(reward):
        return None
    module_name, attribute = reward.split(":")
    where = f"PPOJob.reward = {reward!r}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ValueError(f"{where}: there is no module {err.name!r} to import. Put {err.name.replace('.', '/')}.py "
                             "in the folder you run the command from (the CLI imports from it first) or install its "
                             "package, or fix the name (\"module:function\").") from None
        raise ValueError(f"{where}: importing {module_name!r} failed, {err} (a module it imports is missing: "
                         "install it).") from None
    except Exception as err:  # the user's module raised: say where, as the traceback would
        frame = traceback.extract_tb(err.__traceback__)[-1]
        raise ValueError(f"{where}: importing {module_name!r} raised {type(err).__name__}: {err} ({frame.filename}, "
                         f"line {frame.lineno}). Fix the module.") from None
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
            raise ValueError(f"{where}: {module_name} ({getattr(module, '__file__', '?')}) has no attribute "
                             f"{attribute!r}; the functions it defines: {names or 'none'}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{where} names {obj!r} ({type(obj).__name__}), which is not callable: it must name a "
                         "function (queries, responses) -> one score per response.")
    from labkit.rl.trainer import reward_takes_references  # here: labkit.rl imports more than a job file needs

    try:
        reward_takes_references(obj)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None
    return obj


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
        recipe = _recipe_or_none(task, data.get("task_overrides", {}))  # None: the job refuses the task below
        # a PPO section without total_updates decays the learning rate over the job's n_updates, not the recipe's 100
        n = data.get("n_updates")
        extra = {"total_updates": n} if key == "ppo" and isinstance(n, int) and not isinstance(n, bool) and n >= 1 else {}
        data[key] = _from_dict(sub, data[key], f"{path}: {key}", base=from_recipe(recipe, **extra) if recipe else None)
    return _from_dict(cls, data, str(path))  # its __post_init__ checks the values and builds the task
