"""Supervised fine-tuning baseline: one epoch of next-token loss on reference summaries.

The paper's "supervised" baselines for TL;DR and CNN/DM fine-tune the pretrained model for one epoch on
the task's training split (query -> reference summary) before comparing against RL. The loss covers only
the summary tokens (and the closing newline, which is where the task truncates); the query is context.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from labkit.optim import linear_decay_scheduler, make_optimizer
from labkit.sampling import forward_responses, masked_ids_for, pad_left
from labkit.tasks import Task, format_query, get_task


@dataclass
class SFTConfig:
    """Supervised fine-tuning settings."""

    lr: float = 2e-5
    """Peak learning rate, decayed linearly to 0."""
    batch_size: int = 8
    """Examples per optimiser step."""
    epochs: int = 1
    """Passes over the training examples (the paper: 1)."""
    max_target_tokens: int = 75
    """Reference tokens kept per example (the task's response length)."""
    optimizer: str = "tf_adam"
    """"tf_adam" or "adam" (see labkit.optim)."""
    seed: int = 0
    """Shuffling seed."""


def target_ids(task: Task, reference: str, tokenizer, max_tokens: int) -> list[int]:
    """Tokens the model should produce after the query: " " + reference + the task's truncation text."""
    end = task.truncation.text if task.truncation is not None else ""
    text = " " + " ".join(reference.split("\n")) + end  # CNN/DM highlights are one per line: one paragraph
    return tokenizer.encode(text, add_special_tokens=False)[:max_tokens]


def supervised_finetune(model, tokenizer, task: Task | str, prompts, config: SFTConfig | None = None,
                        progress: bool = True) -> list[dict]:
    """Fine-tune `model` in place on (query, reference) pairs; returns per-step metrics."""
    from tqdm.auto import tqdm

    cfg = config or SFTConfig()
    task = get_task(task)
    pairs = [(p.text, p.reference) for p in prompts if getattr(p, "reference", None)]
    if not pairs:
        raise ValueError("Supervised fine-tuning needs prompts with reference summaries (Prompt.reference).")
    device = next(model.parameters()).device
    masked = masked_ids_for(model, tokenizer)
    examples = [(format_query(task, text, tokenizer), target_ids(task, ref, tokenizer, cfg.max_target_tokens))
                for text, ref in pairs]
    params = [p for p in model.parameters() if p.requires_grad]
    steps = math.ceil(len(examples) / cfg.batch_size) * cfg.epochs
    opt = make_optimizer(params, cfg.lr, cfg.optimizer)
    sched = linear_decay_scheduler(opt, steps)
    rng = random.Random(cfg.seed)
    history = []
    bar = tqdm(total=steps, desc="supervised fine-tuning", disable=not progress)
    for _ in range(cfg.epochs):
        rng.shuffle(examples)
        for i in range(0, len(examples), cfg.batch_size):
            batch = examples[i : i + cfg.batch_size]
            q_ids, q_len = pad_left([q for q, _ in batch], tokenizer.pad_token_id, device)
            T = max(len(t) for _, t in batch)
            tgt = torch.full((len(batch), T), tokenizer.pad_token_id, dtype=torch.long, device=device)
            mask = torch.zeros(len(batch), T, device=device)
            for b, (_, t) in enumerate(batch):
                tgt[b, : len(t)] = torch.tensor(t, device=device)
                mask[b, : len(t)] = 1
            # Right-padded targets: pads come after the real tokens, so they never affect them (causal).
            # over the ids PPO samples from (masked_ids_for), so that SFT and RL train one distribution
            logprobs = forward_responses(model, q_ids, q_len, tgt, temperature=1.0, masked_ids=masked).logprobs  # (B, T)
            loss = -(logprobs * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append({"step": len(history) + 1, "sft/loss": loss.item()})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return history
