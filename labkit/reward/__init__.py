"""The reward model and its training on human comparisons."""

from labkit.reward.model import RewardModel, reward_model_from_lm
from labkit.reward.train import KWayExample, RewardConfig, RewardTrainer, examples_from_store, kway_loss

__all__ = ["KWayExample", "RewardConfig", "RewardModel", "RewardTrainer", "examples_from_store", "kway_loss",
           "reward_model_from_lm"]
