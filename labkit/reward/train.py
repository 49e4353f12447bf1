"""Training the reward model on k-way comparisons: softmax cross-entropy over the k rewards, one epoch,
learning rate decayed linearly to 0 (the released code's train_reward.py).

Labels may mix comparison sizes (2-way and 4-way, say): every batch holds comparisons of one k, because the loss is a
softmax over each row's k rewards; the batches of all sizes are then trained in one shuffled order (`batches_by_k`).
The released code has one size per run (label_types.py best_of_4), so a single-k run is batched exactly as before."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labkit import distributed
from labkit.checks import above, at_least, check_types, in_range, one_of
from labkit.optim import gradients_are_finite, linear_decay_scheduler, make_optimizer
from labkit.reward.model import RewardModel, query_format_ids, strip_query_format
from labkit.tasks import Task


@dataclass
class RewardConfig:
    """Reward-model training settings (defaults: the released code's 124M style-task values)."""

    lr: float = 5e-5
    """Peak learning rate, decayed linearly to 0 over the run (paper 774M: 1.77e-5)."""
    batch_size: int = 32
    """Comparisons per optimiser step (each has k responses); under N processes each takes a 1/N share."""
    epochs: int = 1
    """Passes over the labels (the paper: 1)."""
    heldout_fraction: float = 0.1
    """Share of comparisons kept out of training to measure held-out loss and accuracy."""
    eval_every: int = 10
    """Optimiser steps between held-out evaluations (also evaluated at the end)."""
    normalize_samples: int = 256
    """rho samples that set gain/bias before and after training, untruncated (`RewardModel.normalize`). The released
    code requests 256 and rounds up to whole rollout batches: 512 samples for the style tasks (one batch of 512),
    256 for the summaries (two of 128); labkit's recipes (labkit.recipes) give those counts."""
    optimizer: str = "tf_adam"
    """"tf_adam" (TensorFlow's eps semantics, as the original) or "adam" (PyTorch's)."""
    seed: int = 0
    """Seeds the held-out split, the shuffling and the normalisation samples."""
    train_layers: int | None = None
    """Train only the top `train_layers` transformer blocks, the final norm and the head; the blocks below keep rho's
    weights. None trains every weight, as released (train_reward.py RewardModelTrainer: the optimizer minimises over
    all the model's trainable variables). On a few hundred labels and a CPU, the top few blocks train faster (no
    backward pass through the frozen ones) and overfit less; 0 trains the head and final norm only."""
    head_l2: float | None = None
    """None: train by gradient descent, as released. A number: keep every trunk weight at rho's and fit only the
    linear head, to convergence (full-batch L-BFGS), on the k-way loss plus `head_l2` * |w|^2, w being the head's
    weights on standardised features (`fit_linear_head`). The model is the released one (a linear head on the final
    hidden state of the last token); only the fitting departs from train_reward.py (one epoch of Adam on every weight),
    for a hundred or a few hundred labels, where gradient descent on the trunk learns little: on 128 mock sentiment
    labels (2 seeds) the fitted head reached held-out accuracy 0.50 and correlation 0.24 with VADER on rho's
    validation samples, the quickstart's fine-tuning (6 blocks, lr 6e-4) 0.25 and 0.18 (benchmarks/reward_sweep.py
    with settings l2=...; results in reward_sweep.jsonl). lr, batch_size (except as the feature pass's batch),
    epochs, optimizer and train_layers do not apply; the larger head_l2, the smoother the reward."""

    def __post_init__(self):
        """Refuse bad settings now, before any model loads (labkit.checks)."""
        check_types(self)
        above(self, "lr", 0)
        at_least(self, "batch_size", 1)
        at_least(self, "epochs", 1)
        in_range(self, "heldout_fraction", 0, 1, "1 would leave nothing to train on", hi_open=True)
        at_least(self, "eval_every", 1, "optimiser steps between held-out evaluations")
        at_least(self, "normalize_samples", 1)
        one_of(self, "optimizer", ("tf_adam", "adam"))
        at_least(self, "seed", 0)
        if self.train_layers is not None:
            at_least(self, "train_layers", 0, "transformer blocks trained at the top (None: all)")
        if self.head_l2 is not None:
            above(self, "head_l2", 0, "the L2 penalty of the head fit (None: gradient descent as released)")
            if self.train_layers:
                raise ValueError(f"RewardConfig: head_l2={self.head_l2} fits the head alone on a frozen trunk, so "
                                 f"train_layers={self.train_layers} would be ignored; leave train_layers at None (or 0), "
                                 "or set head_l2=None to train the top blocks by gradient descent.")


@dataclass(frozen=True)
class KWayExample:
    """One labeled comparison: a query, k responses and the index of the best one.

    With token ids (`examples_from_store` fills them from the label store) the reward model trains and evaluates on
    exactly the ids that were sampled, shown and that PPO scores; decoded text does not always encode back to the
    same ids, and decoding drops special tokens. Without them the texts are encoded with the reward model's
    tokenizer."""

    query: str
    responses: list[str]
    best: int
    query_tokens: list[int] | None = None
    """The query's ids as stored: formatted for the policy (with the task's prefix and suffix, which the reward
    model does not read: `RewardTrainer` removes them, labkit.reward.model.strip_query_format)."""
    response_tokens: list[list[int]] | None = None
    """Each response's ids as scored (truncated)."""
    task: Task | None = None
    """The comparison's task: its query prefix and suffix are the ones removed (None: the query is read whole)."""


def examples_from_store(store, task: Task | str | None = None, kind: str | None = None) -> list[KWayExample]:
    """The reward model's training set from a label store: one example per (comparison, labeler), with the stored
    token ids.

    task: a Task (use it for a task of your own: its query prefix and suffix are the ones the reward model does not
    read), one of the paper's task names, or None for every task in the store.
    A comparison stored without token ids (`LabelStore.add_comparison` without them) is kept as text."""
    from labkit.tasks import get_task

    wanted = task.name if isinstance(task, Task) else task
    tasks = {task.name: task} if isinstance(task, Task) else {}
    out = []
    for c, lab in store.training_set(task=wanted, kind=kind):
        if c.task not in tasks:
            try:
                tasks[c.task] = get_task(c.task)
            except KeyError:
                raise ValueError(f"Comparison {c.id} is of the task {c.task!r}, which is not one of the paper's: pass "
                                 "its Task object (examples_from_store(store, task=my_task)) so that the reward model "
                                 "reads its queries as PPO will.") from None
        have_tokens = bool(c.query_tokens) and all(c.response_tokens)
        out.append(KWayExample(c.query, list(c.responses), lab.best,
                               query_tokens=list(c.query_tokens) if have_tokens else None,
                               response_tokens=[list(t) for t in c.response_tokens] if have_tokens else None,
                               task=tasks[c.task]))
    return out


def kway_loss(rewards: torch.Tensor, best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax cross-entropy over the k rewards (B, k) with the labeled best (B,); also accuracy (B,)."""
    loss = F.cross_entropy(rewards, best)
    correct = (rewards.argmax(-1) == best).float()
    return loss, correct


def _by_k(examples: list[KWayExample]) -> dict[int, list[KWayExample]]:
    """`examples` grouped by their number of responses k, in order of k, each group in the given order."""
    groups: dict[int, list[KWayExample]] = {}
    for ex in examples:
        groups.setdefault(len(ex.responses), []).append(ex)
    return dict(sorted(groups.items()))


def batches_by_k(examples: list[KWayExample], batch_size: int, rng: random.Random) -> list[list[KWayExample]]:
    """One epoch's batches: each k's comparisons shuffled and cut into batches of `batch_size` (the last one of each
    k may be smaller), then, when there are several k, the batches shuffled together so that sizes are interleaved
    over the run (and over its decaying learning rate) rather than trained one after the other.

    With one k this is exactly a shuffle of all examples cut into consecutive batches."""
    batches = []
    for group in _by_k(examples).values():
        order = list(range(len(group)))
        rng.shuffle(order)
        batches += [[group[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    if len(_by_k(examples)) > 1:
        rng.shuffle(batches)
    return batches


def fit_linear_head(features: dict[int, torch.Tensor], best: dict[int, torch.Tensor], l2: float, *,
                    rounds: int = 30, iters_per_round: int = 10, on_round=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear scores s = h @ w_raw + b_raw that minimise the mean k-way softmax cross-entropy plus l2 * |w|^2,
    w being the weights on standardised features z = (h - mean) / std (so that l2 treats every feature alike).

    features: k -> (n_k, k, H) hidden states of n_k comparisons of k responses; best: k -> (n_k,) labeled indices.
    Full-batch L-BFGS, `iters_per_round` iterations at a time, until a round no longer lowers the objective
    (relative change < 1e-7) or after `rounds` rounds; `on_round(round, w_raw, b_raw)` after each (e.g. to log).
    Returns (w_raw (H,), b_raw ()) in the units of h, float32. The objective is convex, so the result does not depend
    on the start (zeros)."""
    flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in features.values()]).float()  # (sum n_k*k, H)
    mean, std = flat.mean(0), flat.std(0).clamp(min=1e-6)
    z = {k: (f.float() - mean) / std for k, f in features.items()}
    n = sum(len(b) for b in best.values())
    w = torch.zeros(flat.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=iters_per_round, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = sum(F.cross_entropy(z[k] @ w, best[k], reduction="sum") for k in z) / n + l2 * (w * w).sum()
        loss.backward()
        return loss

    def raw():  # s = z @ w = h @ (w / std) - mean @ (w / std)
        w_raw = (w / std).detach()
        return w_raw, -(mean @ w_raw)

    previous = float("inf")
    for r in range(rounds):
        value = float(opt.step(objective).detach())
        if on_round is not None:
            on_round(r, *raw())
        if abs(previous - value) <= 1e-7 * max(1.0, abs(value)):
            break
        previous = value
    return raw()


class RewardTrainer:
    """Trains a RewardModel on k-way examples; `fit` can be called again to continue on new labels."""

    def __init__(self, reward_model: RewardModel, config: RewardConfig | None = None):
        self.rm = reward_model
        self.config = config or RewardConfig()
        self.history: list[dict] = []
        self.step = 0
        self._formats: dict = {}  # Task -> its query format ids (`_query_format`)

    def _batch_rewards(self, batch: list[KWayExample]) -> torch.Tensor:
        k = len(batch[0].responses)
        if any(len(ex.responses) != k for ex in batch):  # a bug in the batching, not bad input: batches_by_k groups
            raise ValueError(f"A batch mixes comparisons of {sorted({len(ex.responses) for ex in batch})} responses; "
                             "group them by k first (labkit.reward.train.batches_by_k).")
        queries, responses = zip(*(self._tokens(ex) for ex in batch))
        q_ids, q_len, r_ids, r_len = self.rm.pad(list(queries), [r for rs in responses for r in rs])
        return self.rm.kway(q_ids, q_len, r_ids, r_len)  # (B, k): each query runs once for its k responses

    def _tokens(self, ex: KWayExample) -> tuple[list[int], list[list[int]]]:
        """The ids the reward model reads for one example: the stored ones (the query without its task's prefix and
        suffix, as `RewardModel.score_rollout` reads PPO's), else the texts encoded."""
        tok = self.rm.tokenizer
        if ex.query_tokens is None or ex.response_tokens is None:
            query = ex.query
            if ex.task is not None:  # the text shown is the formatted query: remove the same prefix and suffix
                prefix, suffix = ex.task.query_prefix, ex.task.query_suffix
                query = query[len(prefix):] if prefix and query.startswith(prefix) else query
                query = query[: len(query) - len(suffix)] if suffix and query.endswith(suffix) else query
            return tok.encode(query, add_special_tokens=False), [tok.encode(r, add_special_tokens=False) for r in ex.responses]
        query_format = self._query_format(ex.task)
        return strip_query_format(ex.query_tokens, query_format), ex.response_tokens

    def _query_format(self, task: Task | None) -> dict | None:
        """`task`'s prefix/suffix ids (None for no task). The first one seen is recorded on the reward model if
        `normalize` has not yet, so that it scores PPO's queries as it was trained; a different one is refused."""
        if task is None:
            return None
        fmt = self._formats.get(task)
        if fmt is None:
            fmt = query_format_ids(task, self.rm.tokenizer)
            if self.rm.query_format is not None and self.rm.query_format != fmt:
                raise ValueError(f"These labels are of the task {task.name!r}, whose query prefix/suffix differ from "
                                 "the ones this reward model reads (set by `normalize` or earlier labels): train one "
                                 "reward model per task.")
            self.rm.query_format = self._formats[task] = fmt
        return fmt

    def _check_query_formats(self, examples: list[KWayExample]) -> None:
        """Refuse, before anything changes, examples whose tasks format queries differently from each other or from
        the reward model: one reward model reads one task's queries."""
        formats = {json.dumps(query_format_ids(t, self.rm.tokenizer)) for t in {ex.task for ex in examples} if t is not None}
        if self.rm.query_format is not None:
            formats.add(json.dumps(self.rm.query_format))
        if len(formats) > 1:
            raise ValueError("These labels' tasks put different prefixes/suffixes around their queries (or another one "
                             "than this reward model reads): train one reward model per task.")

    @torch.no_grad()
    def evaluate(self, examples: list[KWayExample], batch_size: int | None = None) -> dict:
        """Held-out loss and accuracy (how often the labeled best gets the highest reward).

        Under N processes each scores a 1/N share of `examples`; the sums are added over processes.
        """
        if not examples:
            return {}
        bs = batch_size or self.config.batch_size
        loss_sum, n_correct = 0.0, 0.0
        for group in _by_k(examples).values():  # one k per batch; every process walks the same groups
            mine = distributed.shard(group)
            for i in range(0, distributed.max_over_processes(len(mine)), bs):
                batch = mine[i : i + bs]
                if not batch:  # a stand-in pass, dropped: sharded models need every process in every pass
                    self._batch_rewards(group[:1])
                    continue
                r = self._batch_rewards(batch)
                best = torch.tensor([ex.best for ex in batch], device=r.device)
                loss, c = kway_loss(r, best)
                loss_sum += loss.item() * len(batch)
                n_correct += c.sum().item()
        loss_sum, n_correct = distributed.all_reduce_sum(torch.tensor([loss_sum, n_correct], dtype=torch.float64)).tolist()
        return {"rm/heldout_loss": loss_sum / len(examples), "rm/heldout_accuracy": n_correct / len(examples)}

    def split(self, examples: list[KWayExample]) -> tuple[list[KWayExample], list[KWayExample]]:
        """A seeded train / held-out split (at least one held-out example when there are >= 5)."""
        order = list(range(len(examples)))
        random.Random(self.config.seed).shuffle(order)
        n_held = int(len(examples) * self.config.heldout_fraction)
        if n_held == 0 and len(examples) >= 5 and self.config.heldout_fraction > 0:
            n_held = 1
        held = [examples[i] for i in order[:n_held]]
        train = [examples[i] for i in order[n_held:]]
        return train, held

    def _gradients(self, batch: list[KWayExample], params: list, opt) -> tuple[float, float]:
        """The gradient of the mean k-way loss over `batch` in `params`' .grad, checked finite; returns the batch's
        summed loss and number of correct picks.

        Under N processes each takes a share of the batch, its loss weighted so that the gradient averaged over
        processes is the whole batch's; a process with no share runs a stand-in comparison with weight 0,
        because a sharded model needs every process in every pass.
        """
        mine = distributed.shard(batch)
        weight = len(mine) * distributed.world_size() / len(batch)
        opt.zero_grad(set_to_none=True)
        r = self._batch_rewards(mine or batch[:1])  # (b, k)
        best = torch.tensor([ex.best for ex in mine or batch[:1]], device=r.device)
        loss, correct = kway_loss(r, best)
        (loss * weight).backward()
        loss_sum, n_correct = (loss.item() * len(mine), correct.sum().item()) if weight else (0.0, 0.0)
        distributed.average_gradients(params)
        loss_sum, n_correct = distributed.all_reduce_sum(torch.tensor([loss_sum, n_correct], dtype=torch.float64)).tolist()
        if not distributed.on_every_process(gradients_are_finite(params)):
            raise FloatingPointError(
                f"Reward-model step {self.step + 1}: the loss ({loss_sum / len(batch):.4g}) or its gradients "
                "are not finite, so this step was not applied and the model is as after the previous step. "
                "Lower the learning rate (RewardConfig.lr), or check the labeled texts.")
        return loss_sum, n_correct

    def fit(self, examples: list[KWayExample], dashboard=None, progress: bool = True) -> list[dict]:
        """Train on `examples` for `config.epochs` epochs; returns this run's metrics (also in .history, and in the
        reward model's `history`, which `RewardModel.save` keeps beside the weights).

        progress: a bar over the steps with the time left (tqdm), on the main process of the main thread only."""
        from tqdm.auto import tqdm

        cfg = self.config
        if not examples:
            raise ValueError("No labeled comparisons to train on: label some first (widget or a mock labeler).")
        self._check_query_formats(examples)  # before any step changes the model
        train, held = self.split(examples)
        if cfg.head_l2 is not None:
            return self._fit_head(train, held, dashboard, progress)
        rng = random.Random(cfg.seed + self.step)
        steps_per_epoch = sum(math.ceil(len(g) / cfg.batch_size) for g in _by_k(train).values())
        total = steps_per_epoch * cfg.epochs
        self.rm.train_top_layers(cfg.train_layers)
        params = [p for p in self.rm.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg.lr, cfg.optimizer)
        sched = linear_decay_scheduler(opt, total)
        run = []
        self.rm.trained_on = {"comparisons": len(train), "heldout": len(held)}
        shown = distributed.shows_progress(progress)
        bar = tqdm(total=total, desc="reward model", unit="step", disable=not shown)
        try:
            for epoch in range(cfg.epochs):
                batches = batches_by_k(train, cfg.batch_size, rng)
                for s, batch in enumerate(batches):
                    t0 = time.time()
                    k = len(batch[0].responses)
                    lr = opt.param_groups[0]["lr"]
                    loss_sum, n_correct = self._gradients(batch, params, opt)
                    opt.step()
                    sched.step()
                    self.step += 1
                    m = {"step": self.step, "rm/loss": loss_sum / len(batch), "rm/accuracy": n_correct / len(batch), "rm/lr": lr,
                         "rm/chance_loss": math.log(k), "rm/chance_accuracy": 1 / k, "time/step": time.time() - t0}
                    last = epoch == cfg.epochs - 1 and s == len(batches) - 1
                    if held and (self.step % cfg.eval_every == 0 or last):
                        m.update(self.evaluate(held))
                    run.append(m)
                    self.history.append(m)
                    self.rm.history.append(m)
                    if dashboard is not None:
                        dashboard.log(m)
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['rm/loss']:.3f}")
        finally:
            bar.close()
            if dashboard is not None:
                dashboard.flush()
        return run

    @torch.no_grad()
    def features(self, examples: list[KWayExample], progress: bool = False) -> tuple[dict, dict]:
        """The frozen trunk's `kway_hidden` of every example, grouped by k: (k -> (n_k, k, H) float32,
        k -> (n_k,) labeled best), `config.batch_size` comparisons per forward pass. Every process computes all of
        them (a forward pass only, and the same on each), so that each fits the same head."""
        from tqdm.auto import tqdm

        feats, best = {}, {}
        bs = self.config.batch_size
        with tqdm(total=len(examples), desc="reward model features", unit="comparison",
                  disable=not distributed.shows_progress(progress) or not examples) as bar:
            for k, group in _by_k(examples).items():
                chunks = []
                for i in range(0, len(group), bs):
                    queries, responses = zip(*(self._tokens(ex) for ex in group[i : i + bs]))
                    q_ids, q_len, r_ids, r_len = self.rm.pad(list(queries), [r for rs in responses for r in rs])
                    chunks.append(self.rm.kway_hidden(q_ids, q_len, r_ids, r_len).float().view(len(queries), k, -1).cpu())
                    bar.update(len(queries))
                feats[k] = torch.cat(chunks)
                best[k] = torch.tensor([ex.best for ex in group])
        return feats, best

    def _fit_head(self, train: list[KWayExample], held: list[KWayExample], dashboard, progress: bool) -> list[dict]:
        """`fit` with `config.head_l2` set: the head fitted on the frozen trunk's features (`fit_linear_head`), so that
        r = gain * head(h) + bias equals the fitted scores at the current gain and bias (the second `normalize`
        rescales it as after gradient descent). One logged step per L-BFGS round: training and held-out loss and
        accuracy of r."""
        cfg, rm = self.config, self.rm
        rm.requires_grad_(False)  # nothing in the trunk changes; the head is set below, not trained by autograd
        feats, best = self.features(train, progress)
        held_feats, held_best = self.features(held, progress) if held else ({}, {})
        gain, bias = float(rm.gain), float(rm.bias)
        chance_loss = sum(math.log(k) * len(b) for k, b in best.items()) / len(train)
        chance_acc = sum(len(b) / k for k, b in best.items()) / len(train)
        run = []
        rm.trained_on = {"comparisons": len(train), "heldout": len(held)}

        def metrics(w, b, fs, bs_):  # loss and accuracy of s = h @ w + b (r at this gain and bias)
            n = sum(len(x) for x in bs_.values())
            loss = sum(F.cross_entropy(fs[k] @ w + b, bs_[k], reduction="sum").item() for k in fs) / n
            correct = sum(((fs[k] @ w).argmax(-1) == bs_[k]).sum().item() for k in fs) / n
            return loss, correct

        t_last = time.time()

        def log(r, w, b):
            nonlocal t_last
            self.step += 1
            loss, acc = metrics(w, b, feats, best)
            m = {"step": self.step, "rm/loss": loss, "rm/accuracy": acc, "rm/head_l2": cfg.head_l2,
                 "rm/chance_loss": chance_loss, "rm/chance_accuracy": chance_acc, "time/step": time.time() - t_last}
            if held:
                m["rm/heldout_loss"], m["rm/heldout_accuracy"] = metrics(w, b, held_feats, held_best)
            t_last = time.time()
            run.append(m)
            self.history.append(m)
            rm.history.append(m)
            if dashboard is not None:
                dashboard.log(m)

        try:
            w, b = fit_linear_head(feats, best, cfg.head_l2, on_round=log)
        finally:
            if dashboard is not None:
                dashboard.flush()
        with torch.no_grad():  # gain * (h @ W + c) + bias == h @ w + b
            rm.head.weight.copy_((w / gain).to(rm.head.weight)[None])
            rm.head.bias.fill_((float(b) - bias) / gain)
        return run

