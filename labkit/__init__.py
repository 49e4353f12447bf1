"""labkit: fine-tune language models from human preferences, in a notebook.

The house, lowest floor first (a module imports only its own floor or lower; tests/test_layout.py):
- speed/      everything that makes a transformers model run faster; `speed.apply(model)`, one switch
- models, tasks, data, optim, distributed, sampling: loading, the paper's tasks, prompt sources, the
  optimiser, multi-process collectives, rollouts and log-probs
- reward/     the reward model and its training on k-way comparisons
- rl/         per-token rewards, GAE, PPO losses, KL control, value functions, the trainer
- evaluate, sft, recipes: win rates, ROUGE, frontier plots; the supervised baseline; each task's training
  settings (the released launch.py's)
- labeling/   the label store (no torch), comparison queues, programmatic labelers, the online procedure
- scale/, widgets/: job files and the `labkit` command; the labeling widget and the dashboard
"""

__version__ = "0.1.0"
