"""PPO against a reward with a KL penalty to the original model, step by step from a notebook.

`PPOTrainer.step()` is one update of the paper's recipe (the released code's train_policy.py, OpenAI
baselines' PPO2):
  1. sample queries and roll out the policy pi at the task temperature
  2. score: the reward model (or any callable) on truncated responses; no truncation token -> penalty
  3. log-probs of rho (the frozen original), pi's old log-probs and old values
  4. per-token rewards: -beta * kl_t, plus the score at the last token; whiten (mean kept)
  5. GAE (gamma 1, lambda 0.95), returns, whitened advantages
  6. PPO epochs over minibatches: clipped policy loss + 0.1 * clipped value loss (labkit/rl/losses.py)
  7. adapt beta (KL controller), decay the learning rate, report TRL-named metrics

Value function (labkit/rl/value.py): `value_model="shared"` (default) is the released code's zero-initialised
scalar head on the policy's own trunk: one forward pass gives log-probs and values, and no second model is
held. `value_model="separate"` is TRL/OpenRLHF's design: a separate trunk initialised from the reward model
(from rho with a zero head when the reward is a plain callable, and with a zero head on the reward model's trunk
when that head reads other features than each position's final hidden state: RewardModel's pool and layer). The
shared head is the default because it is the paper's code and costs half the compute and memory on a CPU.

Multi-process runs touch this file in three places only: `distributed.prepare` at construction, the
gradient all-reduce before each optimiser step, and the statistics the paper takes over the whole batch
(`global_whiten`, the KL fed to the controller, reported metrics). Checkpoints: labkit/rl/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import random
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from labkit import distributed
from labkit.models import model_identity, weights_fingerprint
from labkit.optim import gradients_are_finite, linear_decay_scheduler, make_optimizer, tensors_are_finite
from labkit.reward import RewardModel
from labkit.rl import checkpoint
from labkit.rl.advantages import compute_gae, global_whiten, kl_penalty_rewards, masked_mean
from labkit.rl.config import PPOConfig
from labkit.rl.interrupts import deferred_interrupt
from labkit.rl.kl_controller import AdaptiveKLController, FixedKLController
from labkit.rl.losses import policy_loss, value_loss
from labkit.rl.value import SeparateValueModel, ValueHead
from labkit.sampling import Rollout, batch_slices, forward_responses, masked_ids_for, prefix_rows, query_prefix, sample, unwrap
from labkit.speed.checkpointing import checkpoint_blocks
from labkit.tasks import Task, format_query, get_task

RewardFn = Callable[..., "list[float] | torch.Tensor"]
"""`(queries, responses) -> scores`, or `(queries, responses, references=...) -> scores` (`reward_takes_references`)."""


@dataclass
class UpdateBatch:
    """What the PPO epochs of one update train on; all (B, R) except the rollout."""

    roll: Rollout
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def _as_prompt_texts(prompts) -> tuple[list[str], list[str | None]]:
    """Source texts of `prompts` (str or labkit.data.Prompt) and their references (`Prompt.reference`; None for a
    plain string); a blank text is refused with its index (it would become an empty query, which no model can
    continue)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of texts (or labkit.data.Prompt), not one string: pass [text].")
    prompts = list(prompts)  # read twice below: a generator would be empty the second time
    texts = [p if isinstance(p, str) else getattr(p, "text", p) for p in prompts]
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"Prompt {i} is {t!r}: every prompt must be a non-empty text. Remove it or fill it in.")
    return texts, [None if isinstance(p, str) else getattr(p, "reference", None) for p in prompts]


def reward_takes_references(reward) -> bool:
    """Whether PPOTrainer calls the reward function `reward(queries, responses, references=[...])`: it has a
    parameter named `references` or takes **kwargs. Otherwise it is called `reward(queries, responses)`.

    A TypeError when it cannot be called either way (e.g. it takes one argument), so that a wrong function fails
    when it is set, not in the middle of an update. A callable whose signature Python cannot read (some builtins)
    is called the plain way."""
    try:
        sig = inspect.signature(reward)
    except (TypeError, ValueError):
        return False
    takes = any(p.kind is p.VAR_KEYWORD or (p.name == "references" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
                for p in sig.parameters.values())
    try:
        sig.bind([], [], references=[]) if takes else sig.bind([], [])
    except TypeError as err:
        how = "reward(queries, responses, references=...)" if takes else "reward(queries, responses)"
        raise TypeError(f"The reward function {getattr(reward, '__name__', type(reward).__name__)}{sig} cannot be called as "
                        f"{how}: {err}. A reward function takes the lists of query and response texts (and, to "
                        "get each prompt's reference, a parameter named `references`) and returns one score per "
                        "response.") from None
    return takes


class PPOTrainer:
    """Fine-tunes `policy` (pi) against `reward` with a KL penalty to a frozen copy of it (rho).

    reward: a `RewardModel`, or any callable `(queries: list[str], responses: list[str]) -> scores`; or None
    until one is set (the online loop fits its first reward model after the trainer exists). A callable with a
    parameter named `references` (or **kwargs) is called `reward(queries, responses, references=refs)`, where
    refs[i] is the reference of the prompt rollout i's query was made from (`Prompt.reference`, e.g. a post's own
    TL;DR; None for a prompt given as a plain string).
    prompts: source texts (str or labkit.data.Prompt); queries are formatted by the task.
    run_dir: where checkpoints go; if it already holds one, the trainer resumes from it.
    """

    def __init__(self, policy, tokenizer, task: Task | str, reward: RewardModel | RewardFn, prompts,
                 config: PPOConfig | None = None, run_dir: str | os.PathLike | None = None, verbose: bool = True):
        self.task = get_task(task)
        self.config = cfg = config or _recipe_ppo_config(self.task)
        self.tokenizer = tokenizer
        # the ids pi and rho never sample or normalise over (labkit.models.masked_token_report: added pad, chat
        # control tokens), in every pass, as the released code slices the logits (policy.py Policy.step_core)
        self.masked_ids = masked_ids_for(policy, tokenizer)
        self.reward = reward
        self.prompts, self.references = _as_prompt_texts(prompts)
        if not self.prompts:
            raise ValueError("PPOTrainer needs at least one prompt.")
        self.queries = [format_query(self.task, t, tokenizer) for t in self.prompts]  # token ids, formatted once
        empty = [i for i, q in enumerate(self.queries) if not q]
        if empty:
            raise ValueError(f"Prompt {empty[0]} ({self.prompts[empty[0]]!r}) gives an empty query for the task "
                             f"{self.task.name!r} ({len(empty)} such prompts): its text has no tokens to keep.")
        self.device = next(policy.parameters()).device
        # What a checkpoint of this run must match (checkpoint.check_fits): taken before LoRA or sharding wrap pi.
        self.identity = {"model": model_identity(policy, tokenizer), "value_model": cfg.value_model,
                         "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha}
        if isinstance(reward, RewardModel):
            reward.check_fits(self.task, tokenizer, policy)

        # rho: frozen original. With LoRA it is the same weights with adapters disabled (no second copy).
        if cfg.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                              bias="none")
            with warnings.catch_warnings():
                # peft's PeftModel reads `model.is_gradient_checkpointing`, which transformers 5 renamed and
                # warns about (FutureWarning: "`is_gradient_checkpointing` is deprecated ... v6"). Harmless: the
                # old name still returns the new property's value, and labkit never uses it; the red text in
                # every PPO cell only alarms. Only that one message is silenced, only around this call.
                warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                        category=FutureWarning)
                self.policy = get_peft_model(policy, lora)
            self.rho = None
        else:
            self.policy = policy
            self.rho = copy.deepcopy(policy).requires_grad_(False)
        self.policy.eval()  # dropout stays off while training (the paper's setting)

        d_model = unwrap(self.policy).config.hidden_size
        p0 = next(self.policy.parameters())
        self.value_head, self.value_model = None, None
        if cfg.value_model == "shared":
            self.value_head = ValueHead(d_model, device=self.device, dtype=p0.dtype)
        elif isinstance(reward, RewardModel) and reward.pool == "last" and reward.layer is None:
            self.value_model = SeparateValueModel(copy.deepcopy(reward.lm), copy.deepcopy(reward.head),
                                                  reward.gain.item(), reward.bias.item())
        elif isinstance(reward, RewardModel):  # its head reads other features than each position's final state
            self.value_model = SeparateValueModel(copy.deepcopy(reward.lm), ValueHead(d_model, self.device, p0.dtype).linear)
        else:
            self.value_model = SeparateValueModel(copy.deepcopy(unwrap(policy)), ValueHead(d_model, self.device, p0.dtype).linear)
        if self.value_model is not None:
            self.value_model.requires_grad_(True).eval()

        if cfg.gradient_checkpointing:
            checkpoint_blocks(self.policy)
            if self.value_model is not None:
                checkpoint_blocks(self.value_model.lm)

        distributed.prepare(self._trainable(), (self.policy, self.rho, self.value_model and self.value_model.lm,
                                                reward.lm if isinstance(reward, RewardModel) else None))
        self.params = self._trainable()
        self._grad_buffer: torch.Tensor | None = None  # the gradients' storage during an update (_zero_gradients)
        self._steps_in_update = 0  # optimiser steps applied in the update under way
        self.optimizer = make_optimizer(self.params, cfg.lr, cfg.optimizer)
        self.scheduler = linear_decay_scheduler(self.optimizer, cfg.total_updates)
        init_beta = cfg.init_beta if cfg.init_beta is not None else self.task.init_beta
        target = self.task.kl_target if cfg.kl_target == -1.0 else cfg.kl_target
        self.kl_ctl = AdaptiveKLController(init_beta, target, cfg.kl_horizon) if target is not None else FixedKLController(init_beta)
        self.kl_target = target

        # All randomness is owned here and checkpointed, so a resumed run repeats the same updates.
        self.rng = np.random.default_rng(distributed.process_seed(cfg.seed))
        self.generator = torch.Generator(device=self.device).manual_seed(distributed.process_seed(cfg.seed))
        self.step_count = 0
        self.history: list[dict] = []
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()  # held during an update; snapshots for sampling take it too
        self.resume_changes: list[str] = []  # config fields that differ from the resumed checkpoint's, applied
        self._checkpointed: tuple[int | None, Path | None] = (None, None)  # (step, folder) of the last save or load
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None:
            self._resume(verbose)

    @property
    def reward(self) -> RewardModel | RewardFn | None:
        """The reward PPO scores rollouts with; set it to swap it between updates (the online loop's refits)."""
        return self._reward[0]

    @reward.setter
    def reward(self, reward: RewardModel | RewardFn | None) -> None:
        # how a function is called is decided here, once, and stored with it in one assignment: an update reads
        # both together under the lock (`_rollout`), so a swap between updates never pairs one with the other's
        if reward is not None and not isinstance(reward, RewardModel) and not callable(reward):
            raise TypeError(f"reward is a {type(reward).__name__}: it must be a RewardModel, a function "
                            "(queries, responses) -> scores, or None until one is set.")
        takes = reward is not None and not isinstance(reward, RewardModel) and reward_takes_references(reward)
        self._reward = (reward, takes, reward_name(reward))

    def _resume(self, verbose: bool) -> None:
        """Continue from the run folder's newest complete checkpoint, if any, and cut metrics.jsonl back to it
        (a kill after an update's metrics line but before its checkpoint would otherwise repeat that step)."""
        found = checkpoint.latest(self.run_dir)
        damaged = checkpoint.incomplete(self.run_dir)
        if found is None and damaged:
            raise checkpoint.CheckpointError(
                f"{self.run_dir} holds checkpoint folders but none is complete ({', '.join(map(str, damaged))}: a "
                "file was deleted or cut short after it was written). Nothing was changed. Restore the missing "
                "files, or move the run folder away to start a new run.")
        if found is not None:
            self.load(found)
        if distributed.is_main():
            _cut_metrics(self.run_dir / "metrics.jsonl", self.step_count)
        if verbose and distributed.is_main() and found is not None:
            print(f"Resumed from {found} at update {self.step_count}.")
            for change in self.resume_changes:
                print(f"  changed since the checkpoint, applied from now on: {change}")
            for folder in damaged:
                print(f"  {folder} is damaged (a file missing or cut short) and was not used.")

    # ------------------------------------------------------------------------------------------
    # one update

    def step(self) -> dict:
        """One PPO update on a fresh batch of rollouts; returns its metrics (also appended to .history).

        Applied whole or not at all: if anything fails inside it (a reward that is not one finite number per
        rollout, non-finite log-probs, losses or gradients, an interrupt, any exception), the weights, the
        optimiser, the learning-rate schedule, the KL controller, every random stream and the step count are
        put back as they were before it, and the error says what failed. Rerunning the cell repeats it.
        Refused before it starts when the learning rate has decayed to 0 (`require_updates`)."""
        self.require_updates(1)
        before = _Before(self)
        try:
            metrics, roll, scores, kl = self._update(before)
        except BaseException:
            before.restore(self)
            raise
        self._record(metrics, roll, scores, kl)
        return metrics

    def _update(self, before: _Before) -> tuple[dict, Rollout, torch.Tensor, torch.Tensor]:
        """`step`'s seven steps; `before.take_weights` runs before the first optimiser step."""
        cfg, B = self.config, self.config.batch_size
        mb = cfg.minibatch_size or B
        t = {"start": _clock(self.device)}

        # 1. sample queries and roll out pi (no state changes before step 6: an interrupt here is harmless)
        roll, reward, reward_id, references = self._rollout()
        t["generation"] = _clock(self.device)

        # 2. score the truncated responses
        scores = self._score(roll, reward, references)  # (B,)

        # 3. rho's log-probs, and pi's old log-probs and values (`_old_logprobs_and_values`). A separate value
        #    model with one minibatch gets its old values from its first training epoch instead (step 5).
        values_from_training = (self.value_model is not None and mb >= B and cfg.ppo_epochs > 0
                                and cfg.separate_value_first_epoch)
        ref_logprobs = self._rho_logprobs(roll)  # (B, R)
        old_logprobs, old_values = self._old_logprobs_and_values(roll, values=not values_from_training)
        _require_finite("rho's log-probs of the responses (rho's weights hold NaN or inf)", ref_logprobs)
        _require_finite("pi's log-probs of the responses (pi's weights hold NaN or inf: load the last good "
                        "checkpoint)", old_logprobs)
        t["scoring"] = _clock(self.device)

        # 4. per-token rewards: -beta * kl_t, plus the score at the last token; whiten keeping the mean
        beta = self.kl_ctl.beta
        rewards, kl, non_score = kl_penalty_rewards(old_logprobs, ref_logprobs, scores, beta)  # (B, R) each
        if cfg.whiten_rewards:
            rewards = global_whiten(rewards, shift_mean=False)

        # 5. advantages (GAE) and returns; advantages whitened fully
        stats = {k: [] for k in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "ratio", "entropy")}
        if values_from_training:
            self._zero_gradients()
            old_values = self._first_value_epoch(roll, rewards, stats)  # (B, R); the value model's epoch 1 is done
        advantages, returns = compute_gae(rewards, old_values, gamma=cfg.gamma, lam=cfg.lam)
        batch = UpdateBatch(roll, old_logprobs, old_values, global_whiten(advantages), returns)
        _require_finite("the value function's old values", batch.old_values)
        _require_finite("the whitened advantages", batch.advantages)

        # 6. PPO epochs, one optimiser step per minibatch (an interrupt waits for the update's end; `step` undoes
        #    the update if anything fails in it)
        before.take_weights(self)
        self._steps_in_update = 0
        with deferred_interrupt(), self._lock:
            for epoch in range(cfg.ppo_epochs):
                perm = torch.from_numpy(self.rng.permutation(B)).to(self.device)
                for start in range(0, B, mb):
                    value_done = values_from_training and epoch == 0  # its gradients are in .grad already
                    self._optimizer_step(batch, perm[start : start + mb], epoch, value_done, stats)
            lr = self._end_update()

            # 7. adapt beta on this batch's KL (summed over tokens, mean over all processes' rollouts)
            kl_mean = distributed.all_reduce_mean(kl.sum(-1).mean()).item()
            self.kl_ctl.update(kl_mean, B * distributed.world_size())
            self.step_count += 1
        t["end"] = _clock(self.device)

        metrics = self._metrics(roll, scores, kl, non_score, ref_logprobs, old_logprobs, old_values, stats, beta,
                                kl_mean, lr, t)
        metrics["reward/model"] = reward_id  # which r scored this update: the scores' scale changes with r
        return metrics, roll, scores, kl

    # ------------------------------------------------------------------------------------------
    # the update's parts, in order

    def _rollout(self) -> tuple[Rollout, RewardModel | RewardFn, str | None, list[str | None] | None]:
        """Step 1: B queries drawn with replacement and pi's responses, keeping the sampler's keys and values of
        the queries for the scoring pass; the reward and its name, read under the lock (an online refit swaps it
        between updates, never within one); and, for a reward function that takes them, the references of the
        rows' prompts (row b's query is prompt idx[b]'s: `sample` keeps the order), else None.

        Under several processes `idx` is this process's own draw (its rng is seeded per process) and the rollout
        holds only this process's rows, so each process scores its own rows with their own references."""
        cfg = self.config
        idx = self.rng.integers(0, len(self.queries), size=cfg.batch_size)
        with self._lock:
            roll = sample(self.policy, self.tokenizer, [self.queries[i] for i in idx], self.task,
                          generator=self.generator, batch_size=cfg.generation_batch_size, keep_query_prefix=True,
                          masked_ids=self.masked_ids)
            reward, takes_references, name = self._reward
            return roll, reward, name, [self.references[i] for i in idx] if takes_references else None

    def _score(self, roll: Rollout, reward, references: list[str | None] | None = None) -> torch.Tensor:
        """Step 2: scores (B,) of truncated responses; the task's penalty where no truncation token was found.
        `references` (one per row, from `_rollout`) are passed to a reward function that takes them."""
        if reward is None:
            raise RuntimeError("This trainer has no reward yet: set trainer.reward to a RewardModel or a function, "
                               "or call OnlineLoop.refit() to fit one on the labels so far.")
        if isinstance(reward, RewardModel):
            scores = reward.score_rollout(roll, batch_size=self._chunk_size(len(roll))).float().to(self.device)
            _require_finite("the reward model's scores (its weights, gain or bias hold NaN or inf)", scores)
        else:
            extra = {} if references is None else {"references": references}
            scores = scores_from_reward_fn(reward(roll.query_texts, roll.response_texts, **extra), len(roll)).to(self.device)
        return torch.where(roll.found, scores, torch.full_like(scores, self.task.penalty))

    def _rho_logprobs(self, roll: Rollout) -> torch.Tensor:
        """Step 3: (B, R) rho's tempered log-probs of the sampled responses.

        Where the rollout kept pi's query prefix, rho's passes take the same two steps as pi's scoring pass
        (its own prefill of the queries, exactly as the sampler ran pi's, then the R response positions over
        it), so that at equal weights both sides of the KL are equal bit for bit. If rho's cache has no plain
        prefix, the rollout's is dropped and both score whole sequences.
        """
        model = self.policy if self.rho is None else self.rho
        off = self.policy.disable_adapter() if self.rho is None else contextlib.nullcontext()
        with torch.no_grad(), off:
            prefix = None
            if roll.query_prefix is not None:
                prefix = query_prefix(model, roll.query_ids, roll.query_lengths, self.config.generation_batch_size)
                if prefix is None:
                    roll.query_prefix = None
            return torch.cat([forward_responses(model, roll.query_ids[s], roll.query_lengths[s], roll.response_ids[s],
                                                self.task.temperature, prefix=prefix_rows(prefix, s),
                                                masked_ids=self.masked_ids).logprobs
                              for s in self._chunks(len(roll))])

    @torch.no_grad()
    def _old_logprobs_and_values(self, roll: Rollout, values: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Step 3: pi's old log-probs (B, R) and old values (B, R) (None unless `values`) from one scoring pass
        over the R response positions that continues from the sampler's own keys and values of the queries
        (pi's prefill is not run twice). Not the sampler's log-probs: token-by-token generation differs from
        a pass over the responses by float noise (~3e-5), and with a large beta reward whitening would blow
        that noise up into a training signal; both sides of the KL come from the same kind of pass."""
        old = [self._policy_and_values(roll.query_ids[s], roll.query_lengths[s], roll.response_ids[s],
                                       prefix=prefix_rows(roll.query_prefix, s), separate_values=values)
               for s in self._chunks(len(roll))]
        roll.query_prefix = None  # (B, kv_heads, Q-1, d) per layer, ~190 MB on SmolLM2: not needed in training
        return torch.cat([o[0] for o in old]), torch.cat([o[1] for o in old]) if values else None

    def _first_value_epoch(self, roll: Rollout, rewards: torch.Tensor, stats: dict) -> torch.Tensor:
        """Step 5 with `separate_value_first_epoch`: epoch 1 of the separate value model's training (forward and
        backward in micro-batches); returns its values (B, R), which are the old values.

        Why: with one minibatch no optimiser step comes before epoch 1's backward, so the values of its
        forward are the old values. GAE needs all of them before the policy's loss (the advantages are
        whitened over the batch), but the value loss needs only its own rows' returns (GAE runs along each
        row). So the value model's epoch 1 runs first and its no-grad scoring pass (a whole forward over
        B x (Q + R) tokens) is not needed. Its gradients stay in .grad for the policy's epoch 1 to join.
        """
        cfg, B = self.config, len(roll)
        old_values = []
        for s in self._chunks(B):
            vpred = self.value_model(roll.query_ids[s], roll.query_lengths[s], roll.response_ids[s])  # (b, R)
            values = vpred.detach()
            _, returns = compute_gae(rewards[s], values, gamma=cfg.gamma, lam=cfg.lam)  # these rows' returns only
            vf_loss, vf_clipfrac = value_loss(vpred, values, returns, cfg.cliprange_value)
            (cfg.vf_coef * vf_loss * (s.stop - s.start) / B).backward()  # as one minibatch, as in step 6
            stats["vf_loss"].append(vf_loss.item())
            stats["vf_clipfrac"].append(vf_clipfrac)
            old_values.append(values)
        return torch.cat(old_values)

    def _optimizer_step(self, batch: UpdateBatch, mb_idx: torch.Tensor, epoch: int, value_done: bool,
                        stats: dict) -> None:
        """Step 6, one minibatch (rows `mb_idx`): its loss's gradients accumulated over micro-batches, averaged
        over processes, checked, applied. `value_done`: the value model's gradients for it are in .grad already
        (`_first_value_epoch`), so only the policy's loss runs."""
        if not value_done:
            self._zero_gradients()
        for i in batch_slices(len(mb_idx), self.config.micro_batch_size):
            self._accumulate(batch, mb_idx[i], len(mb_idx), epoch == 0, value_done, stats)
        distributed.average_gradients(self.params)  # DDP's all-reduce; no-op in one process
        if not distributed.on_every_process(gradients_are_finite(self.params)):
            raise FloatingPointError(
                f"PPO update {self.step_count + 1}, epoch {epoch + 1}, optimiser step {self._steps_in_update + 1}: "
                "non-finite gradients (a learning rate too high for these weights, or a loss that overflowed). "
                "The update was not applied: the trainer is as after the previous update.")
        self.optimizer.step()
        self._steps_in_update += 1

    def _accumulate(self, batch: UpdateBatch, i: torch.Tensor, mb_size: int, first_epoch: bool, value_done: bool,
                    stats: dict) -> None:
        """Forward and backward of rows `i` of a minibatch of `mb_size` rows, weighted so that the micro-batches'
        gradients add up to the minibatch's. Entropy is reported for the first epoch only (the policy before
        this update's steps); later epochs skip its softmax over (micro, R, V)."""
        cfg, roll = self.config, batch.roll
        logprobs, vpred, entropy = self._policy_and_values(roll.query_ids[i], roll.query_lengths[i], roll.response_ids[i],
                                                           want_entropy=first_epoch, separate_values=not value_done)
        vf_loss = 0.0
        if vpred is not None:
            vf_loss, vf_clipfrac = value_loss(vpred, batch.old_values[i], batch.returns[i], cfg.cliprange_value)
            stats["vf_loss"].append(vf_loss.item())
            stats["vf_clipfrac"].append(vf_clipfrac)
        pg_loss, pg_stats = policy_loss(logprobs, batch.old_logprobs[i], batch.advantages[i], cfg.cliprange)
        ((pg_loss + cfg.vf_coef * vf_loss) * len(i) / mb_size).backward()  # accumulate as if one minibatch
        stats["pg_loss"].append(pg_loss.item())
        for k, v in pg_stats.items():
            stats[k].append(v)
        if entropy is not None:
            stats["entropy"].append(entropy.sum(-1).mean().item())

    def _end_update(self) -> float:
        """After the last optimiser step: decay the learning rate and free the gradients (not needed until the
        next update's backward: freeing them now keeps its rollout and scoring passes one model size smaller).
        Returns the learning rate this update used."""
        if not distributed.on_every_process(tensors_are_finite(self.params)):
            raise FloatingPointError(f"PPO update {self.step_count + 1}: its optimiser steps made weights NaN or inf "
                                     "(a learning rate too high). The update was not applied.")
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._grad_buffer = None
        return lr

    def _metrics(self, roll, scores, kl, non_score, ref_logprobs, old_logprobs, old_values, stats, beta, kl_mean, lr,
                 t) -> dict:
        """Step 7's report, with TRL's metric names; per-process values averaged over the processes."""
        B = len(roll)
        ratio_k3 = torch.exp(ref_logprobs - old_logprobs)  # k3 = (r - 1) - log r >= 0 per token, unbiased
        metrics = {
            "step": self.step_count,
            "episodes": self.step_count * B * distributed.world_size(),
            "objective/kl": kl_mean,
            "objective/kl3": ((ratio_k3 - 1) - torch.log(ratio_k3)).sum(-1).mean().item(),
            "objective/kl_coef": beta,
            "objective/kl_target": self.kl_target,
            "objective/scores": scores.mean().item(),
            "objective/scores_std": distributed.global_mean_std(scores)[1].item(),
            "objective/non_score_reward": non_score.sum(-1).mean().item(),
            "objective/rlhf_reward": (scores + non_score.sum(-1)).mean().item(),
            "objective/entropy": float(np.mean(stats["entropy"])),
            "objective/truncated_frac": roll.found.float().mean().item(),
            "policy/approxkl_avg": float(np.mean(stats["approxkl"])),
            "policy/clipfrac_avg": float(np.mean(stats["pg_clipfrac"])),
            "loss/policy_avg": float(np.mean(stats["pg_loss"])),
            "loss/value_avg": float(np.mean(stats["vf_loss"])),
            "val/clipfrac_avg": float(np.mean(stats["vf_clipfrac"])),
            "val/ratio": float(np.mean(stats["ratio"])),
            "val/mean": masked_mean(old_values, None).item(),
            "lr": lr,
            "eps": B * distributed.world_size() / (t["end"] - t["start"]),
            "time/generation": t["generation"] - t["start"],
            "time/scoring": t["scoring"] - t["generation"],
            "time/optimization": t["end"] - t["scoring"],
            "time/step": t["end"] - t["start"],
        }
        metrics.update(distributed.mean_over_processes({k: v for k, v in metrics.items() if k not in _GLOBAL_METRICS}))
        return metrics

    def _record(self, metrics: dict, roll: Rollout, scores: torch.Tensor, kl: torch.Tensor) -> None:
        """Keep the metrics and a few samples for the dashboard; with a run_dir append the metrics and checkpoint."""
        self.history.append(metrics)
        kl_sum = kl.sum(-1)  # (B,)
        self.samples = [
            {"query": roll.query_texts[b], "response": roll.response_texts[b], "score": round(scores[b].item(), 3),
             "kl": round(kl_sum[b].item(), 3)}
            for b in range(min(self.config.n_samples_shown, len(roll)))
        ]
        if self.run_dir is not None:
            if distributed.is_main():
                self.run_dir.mkdir(parents=True, exist_ok=True)
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if self.config.save_every and self.step_count % self.config.save_every == 0:
                self.save()

    # ------------------------------------------------------------------------------------------
    # helpers

    def _trainable(self) -> list[nn.Parameter]:
        """What the optimiser updates: pi's trainable weights (all, or the LoRA adapters), then the value function's."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return params + list((self.value_head or self.value_model).parameters())

    def _policy_and_values(self, q_ids, q_len, r_ids, want_entropy=False, prefix=None, separate_values=True):
        """New log-probs (B, R), values (B, R), and entropy for a batch (with gradients, unless `prefix`:
        pi's query prefix for these rows, for the no-grad scoring pass; see `forward_responses`).
        separate_values=False skips the separate value model (values None)."""
        if self.value_head is not None:
            out = forward_responses(self.policy, q_ids, q_len, r_ids, self.task.temperature, want_entropy=want_entropy,
                                    want_hidden=True, prefix=prefix, masked_ids=self.masked_ids)
            return out.logprobs, self.value_head(out.hidden), out.entropy
        out = forward_responses(self.policy, q_ids, q_len, r_ids, self.task.temperature, want_entropy=want_entropy, prefix=prefix,
                                masked_ids=self.masked_ids)
        return out.logprobs, self.value_model(q_ids, q_len, r_ids) if separate_values else None, out.entropy

    def _zero_gradients(self) -> None:
        """Zero gradients before an optimiser step, as views into one flat buffer (plain tensors of one dtype).

        Why: left to itself, autograd keeps the first micro-batch's gradient tensors as `.grad`: a few hundred
        tensors allocated among that micro-batch's activations, which then stay for the whole update while
        every later micro-batch's activations have to fit around them in the C heap. One buffer the size of the
        trainable weights is its own mapping, outside the heap, and is freed with the gradients after the
        update; backward adds into it in place (benchmarks/README.md, "Memory"). Sharded (FSDP) or mixed-dtype
        parameters keep autograd's own gradients.
        """
        params = self.params
        if self._grad_buffer is not None:
            self._grad_buffer.zero_()
            return
        if len({(p.dtype, p.device) for p in params}) != 1 or any(type(p.data) is not torch.Tensor for p in params):
            self.optimizer.zero_grad(set_to_none=True)
            return
        self._grad_buffer = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        offset = 0
        for p in params:
            p.grad = self._grad_buffer[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def _chunk_size(self, n: int) -> int:
        """Rollouts per no-grad scoring forward: micro_batch_size, so that one holds one chunk's (b, R, V) logits."""
        return self.config.micro_batch_size or self.config.minibatch_size or n

    def _chunks(self, n: int) -> list[slice]:
        return batch_slices(n, self._chunk_size(n))

    # ------------------------------------------------------------------------------------------
    # training loops

    def updates_left(self) -> int:
        """Updates this run has before its learning rate reaches 0: PPOConfig.total_updates less those done."""
        return self.config.total_updates - self.step_count

    def require_updates(self, n_updates: int) -> None:
        """Refuse `n_updates` more updates, before any of them runs, when some would run past `total_updates`: the
        learning rate is 0 there (linear decay, as released), so they would sample, score and log curves that look
        like training while the policy stays as it is."""
        left = self.updates_left()
        if n_updates > left:
            raise ValueError(
                f"{n_updates} more PPO update(s) asked for at update {self.step_count}, but this run's learning rate "
                f"decays to 0 at update {self.config.total_updates} (PPOConfig.total_updates): {max(left, 0)} left "
                "that would change the policy. Ask for at most that many, or build the trainer again with a larger "
                "total_updates on the same run_dir: it resumes from its last checkpoint and the decay continues "
                "towards the new horizon.")

    def train(self, n_updates: int, dashboard=None, progress: bool = True) -> list[dict]:
        """Run `n_updates` updates (stops early after the current update if `stop()` is called); returns their
        metrics (also appended to .history).

        dashboard: gets each update's metrics and samples. One that has shown nothing yet first gets this
        trainer's earlier updates (a run resumed from its run_dir at update 5 shows updates 1-5, then goes on).
        progress: a bar over the updates with the time left (tqdm), on the main process of the main thread only.
        """
        from tqdm.auto import tqdm

        self.require_updates(n_updates)
        self._stop.clear()
        out = []
        if dashboard is not None and self.history and hasattr(dashboard, "load_history") and not dashboard.history:
            dashboard.load_history(self.history)
        bar = tqdm(total=n_updates, desc="PPO updates", unit="update", disable=not distributed.shows_progress(progress))
        try:
            for _ in range(n_updates):
                m = self.step()
                out.append(m)
                if dashboard is not None:
                    dashboard.log(m, self.samples)
                bar.update(1)
                bar.set_postfix(score=f"{m['objective/scores']:.3f}", kl=f"{m['objective/kl']:.2f}")
                if self._stop.is_set():
                    break
        finally:
            bar.close()
            if dashboard is not None:
                dashboard.flush()
        return out

    def train_in_background(self, n_updates: int, dashboard=None) -> threading.Thread:
        """Start `train(n)` in a thread and return at once, so widgets stay responsive while it runs."""
        self.require_updates(n_updates)  # refused here, in the cell, not in the thread
        thread = threading.Thread(target=self.train, args=(n_updates, dashboard, False), daemon=True, name="labkit-ppo")
        thread.start()
        return thread

    def stop(self) -> None:
        """Ask a running `train` to end cleanly after the current update."""
        self._stop.set()

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, roll: Rollout, references: list[str | None] | None = None) -> torch.Tensor:
        """The score PPO maximises, (B,), for any rollout (e.g. `sample_rho`'s or `sample_policy`'s on held-out
        prompts): the reward of each truncated response, the task's penalty where none was found. `references`
        (one per row) only for a reward function that takes them."""
        reward, takes_references, _ = self._reward
        if takes_references and (references is None or len(references) != len(roll)):
            raise ValueError(f"this trainer's reward takes references: pass one per row ({len(roll)})")
        return self._score(roll, reward, references if takes_references else None)

    # sampling from the current policy (for labeling while training)

    @torch.no_grad()
    def sample_policy(self, prompts: list[str], n: int = 1, seed: int | None = None) -> Rollout:
        """Sample n responses per prompt from the current weights, consistent with training updates."""
        queries = [format_query(self.task, p, self.tokenizer) for p in prompts for _ in range(n)]
        gen = torch.Generator(device=self.device).manual_seed(seed if seed is not None else random.randrange(2**31))
        with self._lock:
            return sample(self.policy, self.tokenizer, queries, self.task, generator=gen, masked_ids=self.masked_ids)

    @torch.no_grad()
    def sample_rho(self, prompts: list[str], n: int = 1, seed: int | None = None) -> Rollout:
        queries = [format_query(self.task, p, self.tokenizer) for p in prompts for _ in range(n)]
        gen = torch.Generator(device=self.device).manual_seed(seed if seed is not None else random.randrange(2**31))
        if self.rho is None:
            with self._lock, self.policy.disable_adapter():
                return sample(self.policy, self.tokenizer, queries, self.task, generator=gen, masked_ids=self.masked_ids)
        return sample(self.rho, self.tokenizer, queries, self.task, generator=gen, masked_ids=self.masked_ids)

    # ------------------------------------------------------------------------------------------
    # checkpoints (labkit/rl/checkpoint.py)

    def save(self, folder=None) -> Path:
        """Checkpoint the full state: into the run folder's `checkpoints/step-NNNNNN/` (keeping the newest
        `config.keep_checkpoints`), or into `folder` when given. Atomic and fsynced (labkit/rl/checkpoint.py);
        every process calls it in a multi-process run."""
        if folder is not None:
            folder = checkpoint.save(self, folder)
        elif self.run_dir is None:
            raise ValueError("This trainer has no run_dir: pass a folder, trainer.save('path/to/checkpoint').")
        else:
            folder = checkpoint.save_step(self, self.run_dir, keep=self.config.keep_checkpoints)
        self._checkpointed = (self.step_count, folder)
        return folder

    def load(self, folder) -> None:
        """Restore a checkpoint written by `save` into this trainer (built with the same models)."""
        checkpoint.load(self, folder)
        self._checkpointed = (self.step_count, Path(folder))


def _clock(device: torch.device) -> float:
    """Wall-clock seconds once the device's queued work is done: on a GPU the host runs ahead of the kernels,
    and a phase's time would otherwise be charged to the next phase that waits for a result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def reward_name(reward) -> str | None:
    """A short name for a reward, logged with every update as "reward/model": a reward model by its weights
    ("r:3f9a0c1e", labkit.models.weights_fingerprint), a function by its name ("fn:vader_score"). Scores from two
    reward models are on two scales (each refit of the online loop normalises a new r on rho), so the dashboard
    marks where the name changes, and a curve across a refit is not read as the policy's doing."""
    if reward is None:
        return None
    if isinstance(reward, RewardModel):
        return f"r:{weights_fingerprint(reward)[:8]}"
    return f"fn:{getattr(reward, '__qualname__', type(reward).__name__)}"


# Metrics already equal on every process (global or shared state); all others are averaged over processes.
_GLOBAL_METRICS = {"step", "episodes", "objective/kl", "objective/kl_coef", "objective/kl_target",
                   "objective/scores_std", "lr"}


def _require_finite(what: str, x: torch.Tensor) -> None:
    """Raise before any state changes if `x` (B, ...) holds NaN or inf, naming `what` and the first rollout."""
    bad = ~torch.isfinite(x)
    if distributed.on_every_process(not bool(bad.any())):
        return
    rows = bad.reshape(len(x), -1).any(-1).nonzero().flatten().tolist() if bad.any() else []
    where = f" for rollout {rows[0]}" + (f" (and {len(rows) - 1} more)" if len(rows) > 1 else "") if rows else " on another process"
    raise FloatingPointError(f"NaN or inf in {what}{where}. The update was not applied: the trainer is as before it.")


def scores_from_reward_fn(out, n: int) -> torch.Tensor:
    """A reward function's return as (n,) float32 scores, or a clear error: it must give one finite real number
    per response (a list, tuple, numpy array or tensor)."""
    if isinstance(out, torch.Tensor):
        values = out.detach().float().cpu().flatten().tolist() if out.dim() == 1 else None
    elif isinstance(out, np.ndarray):
        values = out.tolist() if out.ndim == 1 else None
    elif isinstance(out, (list, tuple)):
        values = list(out)
    else:
        raise TypeError(f"The reward function returned a {type(out).__name__}; it must return one score per response: "
                        f"a list of {n} floats (or a 1-d array or tensor).")
    if values is None:
        raise ValueError(f"The reward function returned shape {tuple(out.shape)}; expected one score per response ({n},).")
    if len(values) != n:
        raise ValueError(f"The reward function returned {len(values)} scores for {n} responses; it must return one per response.")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"The reward function returned {v!r} ({type(v).__name__}) for rollout {i}; scores must be "
                            "real numbers (int or float).")
        if not np.isfinite(v):
            raise FloatingPointError(f"The reward function returned {v} for rollout {i}; scores must be finite. The update "
                                     "was not applied: the trainer is as before it.")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


class _Before:
    """What an update changes, taken before it, so that a failed update can be undone (`PPOTrainer.step`).

    The random streams, the KL controller and the step count at the start; the weights, the optimiser's state
    and the schedule just before the first optimiser step (`take_weights`). When the run folder holds a
    checkpoint of exactly this state (a run_dir saving every update, or just resumed), that checkpoint is
    the copy and nothing is held in memory. Otherwise: a copy of the trainable weights and of Adam's two
    moments, on the host for a GPU model (3x the trainable weights while the update runs; with LoRA only the
    adapters'; benchmarks/undo_cost.py measures it).
    """

    def __init__(self, trainer: PPOTrainer):
        self.numpy_rng = copy.deepcopy(trainer.rng.bit_generator.state)
        self.generator = trainer.generator.get_state()
        self.torch_rng = torch.get_rng_state()
        self.kl_ctl = copy.deepcopy(trainer.kl_ctl.state_dict())
        self.step_count = trainer.step_count
        self.weights: list[torch.Tensor] | None = None
        self.checkpoint: Path | None = None

    def take_weights(self, trainer: PPOTrainer) -> None:
        step, folder = trainer._checkpointed
        if step == trainer.step_count and folder is not None and checkpoint.is_complete(folder) == step:
            self.checkpoint = folder
            return
        opt = trainer.optimizer
        self.weights = [_host_copy(p) for p in trainer.params]
        self.optimizer = {p: {k: _host_copy(v) if torch.is_tensor(v) else v for k, v in st.items()}
                          for p, st in opt.state.items()}
        self.lrs = [g["lr"] for g in opt.param_groups]
        self.scheduler = copy.deepcopy(trainer.scheduler.state_dict())

    def restore(self, trainer: PPOTrainer) -> None:
        trainer.rng.bit_generator.state = self.numpy_rng
        trainer.generator.set_state(self.generator)
        torch.set_rng_state(self.torch_rng)
        trainer.kl_ctl.load_state_dict(self.kl_ctl)
        trainer.step_count = self.step_count
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer._grad_buffer = None
        if self.checkpoint is not None:
            history = trainer.history
            checkpoint.load(trainer, self.checkpoint, check=False)  # the state this update started from
            trainer.history = history
            self.checkpoint = None
            self.restore(trainer)  # and the random streams as they were at the start of the update
            return
        if self.weights is None:
            return
        opt = trainer.optimizer
        with torch.no_grad():
            for p, saved in zip(trainer.params, self.weights):
                p.copy_(saved)
            for p in list(opt.state):  # in place, so that the state keeps its device, dtype and layout
                if p not in self.optimizer:
                    del opt.state[p]
                    continue
                for k, v in self.optimizer[p].items():
                    if torch.is_tensor(v):
                        opt.state[p][k].copy_(v)
                    else:
                        opt.state[p][k] = v
        for g, lr in zip(opt.param_groups, self.lrs):
            g["lr"] = lr
        trainer.scheduler.load_state_dict(self.scheduler)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy that the update cannot touch: on the host for a GPU tensor (GPU memory is the scarcer), a clone
    of this process's shard for a sharded one."""
    t = t.detach()
    if t.device.type == "cpu" or hasattr(t, "to_local"):
        return t.clone()
    return t.to("cpu", copy=True)


def _cut_metrics(path: Path, step: int) -> None:
    """Keep metrics.jsonl's lines of updates 1..step (and none cut short by a kill), atomically."""
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if line.endswith("\n") and isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    if kept == lines:
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _recipe_ppo_config(task: Task) -> PPOConfig:
    """The task's recipe (labkit.recipes), or PPOConfig's defaults for a task without one."""
    from labkit.recipes import RECIPES  # here: labkit.recipes imports labkit.rl, whose __init__ imports this module

    recipe = RECIPES.get(task.name)
    return recipe.ppo_config() if recipe else PPOConfig()
