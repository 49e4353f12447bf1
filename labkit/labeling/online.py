"""The paper's online procedure: label samples of the current policy while it trains, refit r, repeat.

Ziegler et al. (2019), "online" data collection:
  1. before the first PPO step, train r on the labels collected so far (comparisons sampled from rho);
  2. keep sampling 4-way comparisons from the CURRENT policy pi and have them labeled;
  3. retrain r from scratch (a fresh head on rho, all labels so far) at evenly spaced label counts
     (the paper: 19 more times over the label budget), and swap it into PPO;
  4. a constant stream of validation comparisons (y0, y1 ~ rho; y2, y3 ~ pi) measures how often pi
     beats rho, and also feeds r's training set.

Two ways to run it from a notebook:

    loop = OnlineLoop(trainer, store, rho, tokenizer, prompts, OnlineConfig(refit_every_labels=100))
    loop.round()              # cell by cell: refit if due, a few PPO updates, new comparisons to label

    thread = loop.start(500, dashboard=dash, labeler="alice")   # returns at once
    stop_button(loop)         # label in the widget meanwhile; the thread refits when enough labels arrived

Thread safety: the policy's weights are only read (sampled) under `trainer._lock`, which PPO holds while it
changes them, and a refitted reward model is swapped in under the same lock. The label store is
thread-safe by itself.
"""

from __future__ import annotations

import random
import re
import threading
from dataclasses import dataclass

import torch

from labkit.checks import at_least, check_types, one_of
from labkit.labeling.comparisons import comparison_item, policy_source, rollout_rows
from labkit.data import Prompt
from labkit.evaluate import policy_verdicts, win_rate
from labkit.labeling.store import LabelStore
from labkit.rl.trainer import PPOTrainer
from labkit.reward import RewardConfig, RewardTrainer, examples_from_store, reward_model_from_lm
from labkit.reward.model import POOLS
from labkit.sampling import Rollout, sample
from labkit.tasks import format_query

K = 4
"""Responses per comparison (the paper's 4-way comparisons). Validation comparisons take K/2 from each model."""
TRAINING_KINDS = ("train", "validation")
"""Comparison kinds r is trained on. Others (e.g. "eval", held out for a final human evaluation) are not."""


@dataclass
class OnlineConfig:
    """Settings of the online loop (sizes per labeling round; r's own settings in `reward_config`)."""

    comparisons_per_round: int = 20
    """New 4-way comparisons (kind "train") sampled from the current policy per labeling round."""
    validation_per_round: int = 4
    """Validation comparisons per round (kind "validation"): y0, y1 ~ rho and y2, y3 ~ pi, stored in that
    order (the labeling widget shuffles the display). They measure pi against rho and also train r."""
    refit_every_labels: int = 50
    """Refit r (fresh head on rho, all labels so far) once this many new labels arrived since the last fit.
    The paper refits 19 times at evenly spaced label counts: use about label_budget / 20."""
    ppo_updates_per_round: int = 2
    """PPO updates per `round()` (cell-by-cell mode)."""
    reward_config: RewardConfig | None = None
    """How each refit trains r; its `normalize_samples` and `seed` also set r's normalisation on rho. None = the
    task's recipe (labkit.recipes; RewardConfig's defaults for a task without one)."""
    reward_pool: str = "last"
    """What each refit's head reads of rho's hidden states: "last", the last real token's (as released), or "mean",
    the mean over the response's tokens (`RewardModel(pool=)`)."""
    reward_layer: int | None = None
    """Which hidden state it reads: None, the final one (as released); L, the output of block L (`RewardModel(layer=)`;
    checked against rho's blocks when the loop is built)."""
    seed: int = 0
    """Seeds which prompts new comparisons use and the sampling of their responses."""

    def __post_init__(self):
        """Refuse bad settings now, before any sampling (labkit.checks). Any validation_per_round is fine: each
        validation comparison takes K/2 responses from each model, whatever their number."""
        check_types(self)  # reward_config must be a RewardConfig (which checked its own fields)
        at_least(self, "comparisons_per_round", 0)
        at_least(self, "validation_per_round", 0)
        at_least(self, "refit_every_labels", 1)
        at_least(self, "ppo_updates_per_round", 1)
        at_least(self, "seed", 0)
        one_of(self, "reward_pool", POOLS)
        at_least(self, "reward_layer", 0, "0 is the embeddings")


def _recipe_reward_config(task) -> RewardConfig:
    from labkit.recipes import RECIPES  # here: labkit.recipes imports labkit.rl, which imports the trainer

    recipe = RECIPES.get(task.name)
    return recipe.reward_config() if recipe else RewardConfig()


def _text(prompt: Prompt | str) -> str:
    return prompt.text if isinstance(prompt, Prompt) else prompt


class OnlineLoop:
    """Alternates PPO on `trainer` with labeling of fresh policy samples and refits of the reward model.

    rho_lm: the frozen base LM (e.g. `trainer.rho`, or a second `load_lm` with LoRA). Every refit starts
    from a copy of it with a fresh head, and it samples the rho half of validation comparisons and r's
    normalisation batch. It must not share weights with the policy being trained.
    prompts: source texts (str or labkit.data.Prompt) that new comparisons are drawn from.
    """

    def __init__(self, trainer: PPOTrainer, store: LabelStore, rho_lm, tokenizer, prompts,
                 config: OnlineConfig | None = None):
        trained = {id(p) for p in trainer.params}
        if any(id(p) in trained for p in rho_lm.parameters()):
            raise ValueError("rho_lm shares weights with the policy being trained; pass trainer.rho, or load "
                             "the base model again (with LoRA, trainer.rho is None).")
        if not prompts:
            raise ValueError("OnlineLoop needs at least one prompt to sample comparisons from.")
        config = config or OnlineConfig()
        blocks = rho_lm.config.num_hidden_layers
        if config.reward_layer is not None and config.reward_layer > blocks:
            raise ValueError(f"OnlineConfig.reward_layer = {config.reward_layer}: rho has hidden states 0 (the "
                             f"embeddings) to {blocks} (the final one); pass one of those, or None for the final one.")
        self.trainer = trainer
        self.store = store
        self.rho_lm = rho_lm
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.config = config
        self.task = trainer.task
        self.fits: list[dict] = []  # the final metrics of every refit, oldest first
        self.labels_at_fit = 0  # training examples the current reward model was fitted on
        self.error: BaseException | None = None  # what ended the background thread, if it failed
        self.thread: threading.Thread | None = None
        self._rng = random.Random(self.config.seed)
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------------------
    # comparisons to label

    def _sample_pi(self, queries: list[list[int]], seed: int) -> tuple[Rollout, str]:
        """Sample the current policy; also return its name, "policy@<update>:<weights>" (policy_source)."""
        trainer = self.trainer
        gen = torch.Generator(device=trainer.device).manual_seed(seed)
        with trainer._lock:  # never mid-update; the name read under the same lock is that of the sampled weights
            roll = sample(trainer.policy, self.tokenizer, queries, self.task, generator=gen,
                          batch_size=trainer.config.generation_batch_size)
            return roll, policy_source(trainer)

    def _sample_rho(self, queries: list[list[int]], seed: int) -> Rollout:
        gen = torch.Generator(device=next(self.rho_lm.parameters()).device).manual_seed(seed)
        return sample(self.rho_lm, self.tokenizer, queries, self.task, generator=gen,
                      batch_size=self.trainer.config.generation_batch_size)

    def new_comparisons(self, n: int | None = None) -> list[int]:
        """Store `n` (default comparisons_per_round) 4-way comparisons sampled from the current policy
        (kind "train", every source the policy's name "policy@<update>:<weights>") and validation_per_round
        validation comparisons (sources rho, rho, policy, policy). Returns the new ids: train ones first."""
        cfg = self.config
        n = cfg.comparisons_per_round if n is None else n
        train = self._rng.choices(self.prompts, k=n)
        val = self._rng.choices(self.prompts, k=cfg.validation_per_round)
        half = K // 2
        if not train and not val:
            return []

        def queries(prompts, per_prompt):
            return [format_query(self.task, _text(p), self.tokenizer) for p in prompts for _ in range(per_prompt)]

        # 1. pi: K responses per train prompt, then `half` per validation prompt, in one locked pass
        roll, policy = self._sample_pi(queries(train, K) + queries(val, half), seed=self._rng.randrange(2**31))
        pi_rows = rollout_rows(roll, self.tokenizer)
        # 2. rho: the other half of each validation comparison (rho is frozen: no lock needed)
        rho_rows = []
        if val:
            rho_rows = rollout_rows(self._sample_rho(queries(val, half), seed=self._rng.randrange(2**31)), self.tokenizer)

        # 3. store all of them in one transaction
        items = [comparison_item(self.task.name, p, pi_rows[i * K:(i + 1) * K], [policy] * K, "train")
                 for i, p in enumerate(train)]
        val_pi = pi_rows[len(train) * K:]
        items += [comparison_item(self.task.name, p, rho_rows[i * half:(i + 1) * half] + val_pi[i * half:(i + 1) * half],
                        ["rho"] * half + [policy] * half, "validation")
                  for i, p in enumerate(val)]
        return self.store.add_comparisons(items)

    def pending(self, labeler: str) -> int:
        """Comparisons of the training kinds that `labeler` has not labeled or skipped yet."""
        return sum(len(self.store.pending(labeler, task=self.task.name, kind=kind)) for kind in TRAINING_KINDS)

    # ------------------------------------------------------------------------------------------
    # the reward model

    def _examples(self):
        return [ex for kind in TRAINING_KINDS for ex in examples_from_store(self.store, self.task, kind)]

    def labels_since_fit(self) -> int:
        """Training examples (one per comparison and labeler) added since the last refit."""
        return len(self._examples()) - self.labels_at_fit

    def refit(self, dashboard=None) -> dict:
        """Train a new r from scratch on all labels so far and swap it into the trainer; returns its final
        metrics. The old r keeps scoring PPO until the swap, so this may run while PPO trains."""
        cfg = self.config.reward_config or _recipe_reward_config(self.task)
        examples = self._examples()
        texts = [_text(p) for p in self.prompts]
        # 1. a fresh head on a copy of rho, normalised on rho's samples so that beta keeps its meaning
        rm = reward_model_from_lm(self.rho_lm, self.tokenizer, seed=cfg.seed + len(self.fits),
                                  pool=self.config.reward_pool, layer=self.config.reward_layer)
        rm.normalize(self.rho_lm, self.task, texts, n_samples=cfg.normalize_samples, seed=cfg.seed)
        # 2. fit on every label so far, then normalise again
        run = RewardTrainer(rm, cfg).fit(examples, dashboard=dashboard, progress=False)
        rm.normalize(self.rho_lm, self.task, texts, n_samples=cfg.normalize_samples, seed=cfg.seed)
        rm.requires_grad_(False).eval()
        # 3. swap: an update holds this lock from its rollout to its end
        with self.trainer._lock:
            self.trainer.reward = rm
        self.labels_at_fit = len(examples)
        metrics = {**run[-1], "online/refits": len(self.fits) + 1, "online/labels": len(examples),
                   "online/step": self.trainer.step_count}
        self.fits.append(metrics)
        return metrics

    def maybe_refit(self, dashboard=None) -> dict | None:
        """`refit()` if at least refit_every_labels new labels arrived since the last fit, else None."""
        if self.labels_since_fit() >= self.config.refit_every_labels:
            return self.refit(dashboard)
        return None

    # ------------------------------------------------------------------------------------------
    # cell by cell

    def _require_idle(self):
        if self.thread is not None and self.thread.is_alive():
            raise RuntimeError("The online loop is running in the background; call loop.stop() and wait for "
                               "loop.thread to end first.")

    def round(self, dashboard=None, reward_dashboard=None) -> dict:
        """One labeling round from a cell: refit r if due, ppo_updates_per_round PPO updates, then new
        comparisons from the updated policy. Label those (widget or mock labeler) before the next round."""
        self._require_idle()
        self.trainer.require_updates(self.config.ppo_updates_per_round)  # before a refit: refused whole
        fit = self.maybe_refit(reward_dashboard)
        updates = self.trainer.train(self.config.ppo_updates_per_round, dashboard=dashboard, progress=False)
        ids = self.new_comparisons()
        return {"step": self.trainer.step_count, "refit": fit, "updates": updates, "new_comparisons": ids}

    # ------------------------------------------------------------------------------------------
    # concurrently, while someone labels

    def start(self, n_updates: int, dashboard=None, on_update=None, labeler: str = "me",
              reward_dashboard=None) -> threading.Thread:
        """Run up to `n_updates` PPO updates in a background thread and return at once.

        Before each update the thread refits r if due and, when `labeler` (the name used in the labeling
        widget) has fewer than comparisons_per_round comparisons left, samples a new round from the current
        policy. on_update(metrics) is called after each update. An exception ends the thread and is kept
        in `self.error`.
        """
        self._require_idle()
        self.trainer.require_updates(n_updates)
        self._stop.clear()
        self.error = None
        args = (n_updates, dashboard, on_update, labeler, reward_dashboard)
        self.thread = threading.Thread(target=self._run, args=args, daemon=True, name="labkit-online")
        self.thread.start()
        return self.thread

    def _run(self, n_updates, dashboard, on_update, labeler, reward_dashboard):
        try:
            for _ in range(n_updates):
                if self._stop.is_set():
                    break
                self.maybe_refit(reward_dashboard)
                if self.pending(labeler) < self.config.comparisons_per_round:
                    self.new_comparisons()
                if self._stop.is_set():
                    break
                metrics = self.trainer.step()
                if dashboard is not None:
                    dashboard.log(metrics, self.trainer.samples)
                if on_update is not None:
                    on_update(metrics)
        except Exception as e:
            self.error = e
            raise  # threading's excepthook prints the traceback
        finally:
            if dashboard is not None:
                dashboard.flush()

    def stop(self) -> None:
        """Ask the background thread (or a `trainer.train`) to end after the current update."""
        self._stop.set()
        self.trainer.stop()

    # ------------------------------------------------------------------------------------------
    # evaluation

    def _validation_picks(self, labeler: str | None) -> dict[str, list[bool]]:
        """{policy source: [did pi win?] per labeled validation comparison of that policy}, policies in the order
        they were first sampled; only `labeler`'s labels if given."""
        picks: dict[str, list[bool]] = {}
        for comparison, label, won, _ in policy_verdicts(self.store, self.task.name, "policy@", kind="validation"):
            if labeler is None or label.labeler == labeler:
                policy = next(s for s in comparison.sources if s.startswith("policy@"))
                picks.setdefault(policy, []).append(won)
        if not picks:
            who = "anyone" if labeler is None else repr(labeler)
            raise ValueError(f"no validation comparisons of task {self.task.name!r} are labeled by {who} yet; "
                             "label some (in the widget, or labelers.label_pending(..., kind='validation')) first")
        return picks

    def policy_win_rates(self, labeler: str | None = None) -> list[dict]:
        """How often labelers preferred pi's responses to rho's in the labeled validation comparisons, per
        policy: one row per policy that made some, oldest first, each {"policy" (its source name), "update",
        "rate", "low", "high", "n", "chance" (0.5: 2 of the 4 responses are pi's)}; only `labeler`'s labels if
        given. Each row judges one policy: pi at update 0 is rho, so early rows sit near chance and later ones
        say whether training moved pi the labelers' way. A row's interval is wide when its policy has only a
        few comparisons: `policy_win_rate(since_update=)` pools the later ones. Every run whose comparisons are
        in this store has its rows (a new run in the same lab has other weights, so other names)."""
        return [{"policy": name, "update": _update_of(name), **win_rate(sum(won), len(won)), "chance": 0.5}
                for name, won in self._validation_picks(labeler).items()]

    def policy_win_rate(self, labeler: str | None = None, since_update: int = 0) -> dict:
        """The validation win rate of pi against rho pooled over the policies from update `since_update` on:
        `win_rate` plus "chance" (0.5), "policies" (how many were pooled) and "updates" (the first and last
        update among them). The default, 0, pools every policy of the run: a running rate, which the early,
        rho-like policies pull towards chance. For the policy as it is now, use a blind evaluation
        (labeling.comparisons.make_policy_vs_rho, as the notebooks do) or `policy_win_rates()[-1]`."""
        picks = {name: won for name, won in self._validation_picks(labeler).items() if _update_of(name) >= since_update}
        if not picks:
            raise ValueError(f"no labeled validation comparisons of a policy at update >= {since_update}; lower "
                             f"since_update (the labeled ones are of updates "
                             f"{sorted({_update_of(n) for n in self._validation_picks(labeler)})})")
        won = [w for ws in picks.values() for w in ws]
        updates = [_update_of(name) for name in picks]
        return {**win_rate(sum(won), len(won)), "chance": 0.5, "policies": len(picks),
                "updates": (min(updates), max(updates))}


def _update_of(source: str) -> int:
    """The update count in a policy's source name: "policy@40:3f9a0c1e" (or, before weights were named, "policy@40")."""
    found = re.fullmatch(r"policy@(\d+)(:[0-9a-f]+)?", source)
    if found is None:
        raise ValueError(f"a validation comparison names its policy {source!r}; the online loop names policies "
                         "'policy@<update>:<weights>' (labeling.comparisons.policy_source), and the win rate per "
                         "policy reads the update from that name")
    return int(found.group(1))


def stop_button(loop: OnlineLoop):
    """A "Stop training" button for a loop started with `loop.start(...)`: the update in progress finishes."""
    import ipywidgets as widgets

    button = widgets.Button(description="Stop training", icon="stop", tooltip="Stop after the current update")
    button.add_class("labkit-stop")

    def on_click(_):
        loop.stop()
        button.disabled = True

    button.on_click(on_click)
    return button
