"""Each paper task's training settings: the released launch.py values a CPU can afford, the rest beside them.

The task itself (labkit.tasks) holds what defines the experiment: lengths, temperature, truncation and the KL
penalty (beta 0.15 adaptive to a target of 6 nats for the style tasks, a fixed 0.03 for TL;DR and 0.01 for CNN/DM;
launch.py get_experiments `rewards.kl_coef`, `rewards.adaptive_kl.target`). A recipe holds how to train for it:
PPO's and the reward model's settings, from launch.py (get_experiments, get_train_reward_experiments; the released
code trains GPT-2 124M), with the paper's 774M values (shared/reference/paper.md) in the field docstrings.

    recipe = recipe_for("tldr")
    ppo = recipe.ppo_config(lora_r=16, lr=1e-4)       # the recipe, with what you change checked by PPOConfig
    rm = recipe.reward_config(batch_size=8)
    # the released run's size (a GPU's): 512 rollouts per update, 1,000,000 episodes
    ppo = recipe.ppo_config(batch_size=recipe.released_ppo_batch_size, total_updates=recipe.released_total_updates)

Job files (labkit.scale.jobs) take the fields their `ppo:` / `reward:` section leaves out from the task's recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from labkit.checks import check_types, non_empty
from labkit.reward.train import RewardConfig
from labkit.rl.config import PPOConfig
from labkit.tasks import Task


@dataclass(frozen=True)
class Recipe:
    """How to train one task: PPO's and the reward model's settings, as released where a CPU can afford it.

    Where labkit departs from launch.py, on purpose:
    - PPO batch and length: `ppo_batch_size` and `total_updates` are a CPU's (a released style run is 1,954
      updates of 512 rollouts); the released sizes are the `released_*` fields. The learning rate stays the
      released one, although with a smaller batch its steps are noisier. The adaptive KL controller's horizon is
      in episodes (PPOConfig.kl_horizon, 10,000 as released), so at batch 64 beta moves 1/8 as far per update as
      at 512, and as far per episode.
    - Summaries do not whiten rewards (`whiten_rewards`), the released configs' intent; see that field.
    """

    task: str
    """The name of the task this recipe is for (RECIPES: the paper's four, labkit.tasks.TASKS)."""
    ppo_lr: float
    """PPO's peak learning rate, decayed linearly to 0 (launch.py get_experiments `ppo.lr`: 1e-5 style, 2e-6
    summaries; the paper at 774M: 1.41e-5 / 7.07e-6)."""
    ppo_batch_size: int
    """Rollouts per PPO update on a CPU: 64 style, 16 summaries (a summary rollout is ~585 tokens against ~88, so
    16 of them are ~1.7x the tokens of 64 style rollouts). Released: `released_ppo_batch_size`."""
    released_ppo_batch_size: int
    """launch.py `ppo.batch_size`: 512 style, 32 summaries (the paper at 774M: 1024 / 512)."""
    total_updates: int
    """PPO updates on a CPU (the learning rate's decay horizon): 100, i.e. 6,400 style / 1,600 summary episodes.
    Released: `released_total_episodes`."""
    released_total_episodes: int
    """launch.py `ppo.total_episodes`: 1,000,000 for all four tasks (the paper at 774M: 2M)."""
    whiten_rewards: bool
    """Scale per-token rewards by 1/std over the batch (PPOConfig.whiten_rewards): True style, False summaries.

    launch.py binds `rewards.whiten` False for tldr and cnndm, but train_policy.py's RewardHParams has no `whiten`
    field: reward whitening is `ppo.whiten_rewards` (PpoHParams, default True; PPOTrainer.loss calls
    `utils.whiten(rewards, shift_mean=False)`), and utils/hyperparams.py override_from_dict fails on an unknown
    key. So the released summary experiments could not run as written: the intent, no reward whitening for the
    summaries, is known; what the authors' own runs did is not. labkit follows the intent. A likely reason for it:
    the released whitening is per MPI rank, and train_policy.py HParams.validate asks for minibatches of >= 8 for
    it ("must additionally divide by # ranks"): 32 rollouts over launch.py's 8 ranks leave 4 per rank."""
    reward_lr: float
    """Reward model's peak learning rate, decayed linearly to 0 (launch.py get_train_reward_experiments `lr`: 5e-5
    style, 2.5e-5 summaries; the paper at 774M: 1.77e-5)."""
    reward_batch_size: int
    """Comparisons per reward-model step (launch.py `batch_size`: 32 style, 2 * 8 = 16 summaries; the paper at
    774M: 8 / 32). Affordable on a CPU as released."""
    reward_epochs: int
    """Passes over the labels: 1 (train_reward.py RewardModelTrainer.train loops once over `labels.num_train`:
    4,992 style / 46,000 summary labels in launch.py; the paper: one epoch)."""
    normalize_samples: int
    """rho samples that set the reward model's gain and bias, before and after training: 512 style, 256
    summaries. launch.py asks for `normalize_samples` 256, but train_reward.py sample_policy_responses draws
    ceil(256 / rollout_batch_size) whole batches of `rollout_batch_size` (512 style, 128 summaries), so the
    released code scores 512 and 256 samples (labkit.reward.train.RewardConfig.normalize_samples)."""

    def __post_init__(self):
        """Refuse a bad recipe now: its fields' types, the task's name, and the configs it makes."""
        check_types(self)
        non_empty(self, "task", "recipe_for finds a recipe by its task's name")
        self.ppo_config(), self.reward_config()  # their __post_init__ checks every value

    @property
    def released_total_updates(self) -> int:
        """The released run's number of updates: ceil(total_episodes / batch_size) (train_policy.py nupdates):
        1,954 style, 31,250 summaries."""
        return -(-self.released_total_episodes // self.released_ppo_batch_size)

    def ppo_config(self, **overrides) -> PPOConfig:
        """PPO settings of this recipe, with `overrides` (PPOConfig fields) applied and checked by PPOConfig.
        init_beta and kl_target are left to the task (PPOConfig's None / -1: the task's)."""
        base = {"lr": self.ppo_lr, "batch_size": self.ppo_batch_size, "total_updates": self.total_updates,
                "whiten_rewards": self.whiten_rewards}
        return _build(PPOConfig, base, overrides, self.task)

    def reward_config(self, **overrides) -> RewardConfig:
        """Reward-model settings of this recipe, with `overrides` (RewardConfig fields) applied and checked by
        RewardConfig."""
        base = {"lr": self.reward_lr, "batch_size": self.reward_batch_size, "epochs": self.reward_epochs,
                "normalize_samples": self.normalize_samples}
        return _build(RewardConfig, base, overrides, self.task)


def _build(cls, base: dict, overrides: dict, task: str):
    """cls(**base | overrides), the other fields at cls's defaults; an unknown override is refused naming the known
    fields (the constructor's TypeError would not list them)."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} fields {unknown} in an override of the {task!r} recipe; known "
                         f"fields: {known}.")
    return cls(**{**base, **overrides})


_STYLE = {"ppo_lr": 1e-5, "ppo_batch_size": 64, "released_ppo_batch_size": 512, "total_updates": 100,
          "released_total_episodes": 1_000_000, "whiten_rewards": True, "reward_lr": 5e-5, "reward_batch_size": 32,
          "reward_epochs": 1, "normalize_samples": 512}
_SUMMARY = {"ppo_lr": 2e-6, "ppo_batch_size": 16, "released_ppo_batch_size": 32, "total_updates": 100,
            "released_total_episodes": 1_000_000, "whiten_rewards": False, "reward_lr": 2.5e-5, "reward_batch_size": 16,
            "reward_epochs": 1, "normalize_samples": 256}

# launch.py gives TL;DR and CNN/DM the same PPO and reward-model settings; they differ in the task (temperature
# 0.7 / 0.5, beta 0.03 / 0.01, CNN/DM's "Article:" prefix), which labkit.tasks holds.
RECIPES: dict[str, Recipe] = {
    "sentiment": Recipe(task="sentiment", **_STYLE),
    "descriptiveness": Recipe(task="descriptiveness", **_STYLE),
    "tldr": Recipe(task="tldr", **_SUMMARY),
    "cnndm": Recipe(task="cnndm", **_SUMMARY),
}


def recipe_for(task: str | Task) -> Recipe:
    """The recipe of a paper task, by name or Task (a paper task with fields changed, e.g.
    `SENTIMENT.with_(response_length=8)`, keeps its name and so its recipe).

    A task of your own name has none, and gets an error rather than the recipe of a paper task that reads the same
    prompts: how to train depends on more than the prompts (lengths, what the labels reward), and a silent pick
    would hide that choice."""
    name = task.name if isinstance(task, Task) else task
    if name not in RECIPES:
        raise KeyError(f"No recipe for the task {name!r}; recipes exist for {', '.join(RECIPES)}. For a task of your "
                       "own, pass PPOConfig(...) and RewardConfig(...) explicitly, or build a Recipe(task=..., ...), "
                       "e.g. dataclasses.replace(RECIPES['sentiment'], task=...) with your changes.")
    return RECIPES[name]
