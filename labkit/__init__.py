"""labkit: fine-tune language models from human preferences, in a notebook.

Modules, one concept each: models (loading), tasks (the paper's four tasks), data (prompt sources),
sampling (rollouts and log-probs), labels (the label database), labelers (mock labelers),
reward (reward model), ppo (the trainer), widgets (labeling and dashboard views).
"""

__version__ = "0.1.0"
