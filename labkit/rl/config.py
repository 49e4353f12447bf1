"""PPO settings: one dataclass, each field documented with the released code's value where it has one."""

from __future__ import annotations

from dataclasses import dataclass, fields

from labkit.checks import above, at_least, check_types, fail, in_range, one_of


@dataclass
class PPOConfig:
    """PPO settings. Defaults follow the released code's style tasks where a CPU can afford it (see each field);
    `labkit.recipes.recipe_for(task).ppo_config()` gives each paper task's (summaries: lr 2e-6, no reward
    whitening), and job files take what they leave out from it."""

    batch_size: int = 64
    """Rollouts per update and process: N processes sample N * batch_size in all (the paper: 1024 style /
    512 summaries in all; code at 124M: 512 / 32; labkit.recipes on a CPU: 64 / 16)."""
    minibatch_size: int | None = None
    """Rollouts per optimiser step; None = the whole batch (the code's 1 minibatch)."""
    micro_batch_size: int | None = None
    """Rollouts per forward/backward inside a minibatch (gradient accumulation), and per forward of the
    no-grad scoring passes; None = minibatch. Smaller uses less memory, at some speed (benchmarks/README.md,
    "Memory")."""
    ppo_epochs: int = 4
    """Passes over each batch, with a fresh permutation each pass."""
    lr: float = 1e-5
    """Peak learning rate, decayed linearly to 0 over `total_updates` (code: 1e-5 style, 2e-6 summaries)."""
    total_updates: int = 100
    """Planned number of updates: sets the learning-rate decay horizon (train_policy.py `train_minibatch`:
    lr * (1 - step / nupdates)). A short look at a long run, as 01_sentiment and 02_descriptiveness take, passes
    the released run's (`Recipe.released_total_updates`), so its updates keep about the peak rate, as the released
    run's first ones do; decaying to 0 over 20 updates all but stopped the policy over the last third
    (docs/fidelity.md item 13). Updates past it are refused (`PPOTrainer.require_updates`): at lr 0 they would
    move nothing. A run resumed with a larger value continues its decay towards the new one."""
    optimizer: str = "tf_adam"
    """"tf_adam" (eps on the un-corrected sqrt(v), the original's; default) or "adam" (PyTorch's)."""
    init_beta: float | None = None
    """Initial KL coefficient; None = the task's (0.15 style, 0.03 TL;DR, 0.01 CNN/DM)."""
    kl_target: float | None = -1.0
    """Target KL (nats per sequence) of the adaptive controller; None = fixed beta; -1 = the task's."""
    kl_horizon: int = 10_000
    """Adaptive controller horizon in episodes (the code's 10,000)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """PPO policy ratio clip."""
    cliprange_value: float = 0.2
    """Value clip around the old values."""
    vf_coef: float = 0.1
    """Value-loss coefficient in loss = pg_loss + vf_coef * vf_loss."""
    whiten_rewards: bool = True
    """Scale per-token rewards by 1/std over the batch, keeping the mean (the code's default; launch.py meant it
    off for the summaries, as labkit.recipes has it: see Recipe.whiten_rewards)."""
    value_model: str = "shared"
    """"shared" (head on the policy trunk, zero init) or "separate" (a copy of the reward model)."""
    lora_r: int = 0
    """LoRA rank; 0 = full fine-tuning. With LoRA, rho is the policy with adapters disabled."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (effective scale alpha / r)."""
    generation_batch_size: int | None = None
    """Rollouts sampled at once (memory bound); None = the whole batch."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping them
    (labkit/speed/checkpointing.py; the policy's blocks, and the separate value model's): activation memory of
    about one block, for one more forward pass per training pass (~1/3 more training compute). For a big
    model or a small machine. Changes the policy model passed in (its blocks' classes), not its results."""
    separate_value_first_epoch: bool = True
    """With `value_model="separate"` and one minibatch: take the old values from the value model's first
    training epoch instead of a no-grad pass of their own (`PPOTrainer._first_value_epoch`). The update is the
    same (tests/test_ppo.py); it saves one forward pass of the value model over the whole batch."""
    seed: int = 0
    """Seeds prompt choice, sampling and minibatch order (all saved in checkpoints); process r of N uses
    seed + r * 100003."""
    save_every: int = 1
    """With a run_dir, checkpoint after every this many updates (0 = only when asked)."""
    keep_checkpoints: int = 2
    """With a run_dir, how many of the newest checkpoints (`run_dir/checkpoints/step-NNNNNN/`) to keep; older
    ones are deleted only after a newer one is complete (labkit/rl/checkpoint.py). At least 1."""
    n_samples_shown: int = 4
    """Samples per update passed to the dashboard's table."""

    def __post_init__(self):
        """Refuse bad settings now, before any model loads (labkit.checks)."""
        check_types(self)
        at_least(self, "batch_size", 1)
        in_range(self, "minibatch_size", 1, self.batch_size, "at most batch_size; None = the whole batch")
        in_range(self, "micro_batch_size", 1, self.minibatch_size or self.batch_size,
                 "at most minibatch_size, or batch_size without one; None = the minibatch")
        at_least(self, "ppo_epochs", 1)
        above(self, "lr", 0)
        at_least(self, "total_updates", 1, "the learning rate decays to 0 over it")
        one_of(self, "optimizer", ("tf_adam", "adam"))
        at_least(self, "init_beta", 0, "None = the task's")
        if self.kl_target not in (None, -1.0):
            above(self, "kl_target", 0, "None = a fixed beta, -1 = the task's target, else the target KL in nats")
        if self.init_beta == 0 and self.kl_target is not None:  # the controller multiplies beta: 0 stays 0
            fail(self, "init_beta", "a beta of 0 never moves under the adaptive controller (it multiplies beta); "
                 "set kl_target=None for a fixed beta of 0 (no KL penalty), or init_beta > 0.")
        at_least(self, "kl_horizon", 1)
        in_range(self, "gamma", 0, 1)
        in_range(self, "lam", 0, 1)
        above(self, "cliprange", 0)
        above(self, "cliprange_value", 0)
        at_least(self, "vf_coef", 0)
        one_of(self, "value_model", ("shared", "separate"))
        at_least(self, "lora_r", 0, "0 = full fine-tuning")
        above(self, "lora_alpha", 0)
        at_least(self, "generation_batch_size", 1, "None = the whole batch")
        at_least(self, "seed", 0)
        at_least(self, "save_every", 0, "0 = only when asked")
        at_least(self, "keep_checkpoints", 1, "the newest checkpoint is always kept")
        at_least(self, "n_samples_shown", 0)

    @classmethod
    def from_dict(cls, d: dict) -> PPOConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown PPOConfig fields {sorted(unknown)}; known fields: {sorted(known)}.")
        return cls(**d)
