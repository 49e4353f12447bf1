"""Reinforcement learning from the reward: rollouts scored, per-token KL rewards, GAE, the PPO update, KL
control, value functions and the trainer's checkpoints."""

from labkit.rl.trainer import PPOConfig, PPOTrainer

__all__ = ["PPOConfig", "PPOTrainer"]
