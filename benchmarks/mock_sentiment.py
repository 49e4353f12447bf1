"""The paper's mock-sentiment experiment, end to end, on the embedded SmolLM2-135M on a CPU.

Ziegler et al. (2019) replace the human with a sentiment classifier (the "mock human") and ask: does RL on a
reward model learned from that classifier's 4-way picks raise the classifier's own score? Here the mock
human is VADER (`VaderLabeler`, id "mock:vader"), and the four phases are:

  1. labels  sample 4 responses per TRAIN prompt from rho (the embedded model, task temperature 0.7),
             store them in a LabelStore (<out>/labels.db) and have VADER pick the most positive one; it
             skips a comparison whose best score is tied (mostly several 0.0s), as a person would;
  2. reward  a reward model (fresh head on a copy of rho) normalised on rho's samples, trained --rm-epochs
             epochs on those labels, normalised again; held-out 4-way accuracy (chance 0.25) is reported;
  3. ppo     PPO of a copy of rho against the REWARD MODEL (never against VADER) with the KL penalty and
             the adaptive KL controller;
  4. eval    VALIDATION prompts, several samples each with fixed seeds: mean VADER compound of rho's
             samples (vader_before) and of the trained policy's (vader_after), also KL(pi || rho) there.

The last stdout line is one JSON record (settings, per-phase seconds and results).

    python benchmarks/mock_sentiment.py --quick        # shortened run, under 15 minutes on 2 CPU cores
    python benchmarks/mock_sentiment.py                # full run, under 2 hours on 2 CPU cores

Budget choices (the paper's settings are for 8 V100s, not for 2 CPU cores), all flags:
- labels: 1,000 (the paper's mock experiments start at 2,500); sampling them is ~20 minutes here.
- reward model: only the top --rm-train-layers transformer layers (plus the final norm and the head) are
  trained; the rest of the trunk is frozen, which saves most of the backward pass and Adam's work. A sweep
  on the same 1,000 labels (GPU, fp32, held-out accuracy over 2-3 seeds, each its own held-out split):
  top 8 layers, lr 1e-4, 2 epochs: 0.39 / 0.38 (the previous default); top 8, lr 3e-4, 2 epochs: 0.55-0.60;
  all layers, lr 1e-4, 2 epochs: 0.73; top 16, lr 6e-4, 1 epoch: 0.71 / 0.71 / 0.76. The default is the
  last: about the best accuracy, in less time than two epochs of the top 8 (21 vs 23 minutes on this CPU,
  including normalisation). The paper's lr (1.77e-5
  for 774M; the code's 5e-5 for 124M) is for 5,000 to 60,000 labels and full fine-tuning: with 1,000
  labels and a partly frozen trunk, lr 1e-4 left the reward model near chance. (Until this sweep, -1 here
  trained the head alone: the copy of rho came frozen.)
- reward normalisation as released: 512 untruncated rho samples in the full run (train_reward.py requests
  256 and rounds up to whole rollout batches, one of 512 for the style tasks); fewer in --quick.
- PPO: full fine-tuning with TF-style Adam at a learning rate far above the paper's 1.41e-5 / batch 1024,
  since only a few thousand episodes fit; the adaptive KL controller's horizon is shortened to match
  (the code's 10,000 episodes would leave beta fixed over so short a run).
- --time-budget caps the whole run: PPO stops early (and says so) when the next update plus the final
  evaluation would not fit. The CPU is shared with other work, so wall-clock speed varies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from record import emit  # this script's folder is on sys.path

FULL = dict(n_labels=1000, rm_batch=16, rm_lr=6e-4, rm_epochs=1, rm_train_layers=16, norm_samples=512, ppo_updates=30,
            ppo_batch=64, ppo_minibatch=32, ppo_epochs=2, ppo_lr=5e-5, eval_prompts=47, eval_samples=4,
            time_budget=6900.0)
QUICK = dict(n_labels=128, rm_batch=16, rm_lr=6e-4, rm_epochs=1, rm_train_layers=6, norm_samples=32, ppo_updates=8,
             ppo_batch=32, ppo_minibatch=16, ppo_epochs=2, ppo_lr=2e-5, eval_prompts=47, eval_samples=2,
             time_budget=840.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shortened run (< 15 min): smaller defaults for every budget knob")
    p.add_argument("--out", default="runs/mock_sentiment", help="output folder: labels.db, metrics, samples, result.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m", help="labkit.models.load_lm name (tests may pass 'tiny')")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    # labels
    p.add_argument("--n-labels", type=int, help="labeled 4-way comparisons (skipped ties not counted)")
    p.add_argument("--labeler-temperature", type=float, default=0.0, help="0: VADER's argmax; > 0: noisy softmax picks")
    p.add_argument("--keep-ties", action="store_true",
                   help="label tied tops too (first of the tied best) instead of skipping them as a person would")
    p.add_argument("--sample-batch", type=int, default=32, help="sequences sampled at once (all phases)")
    # reward model
    p.add_argument("--rm-batch", type=int, help="comparisons per reward-model step")
    p.add_argument("--rm-lr", type=float, help="reward-model peak learning rate (linear decay to 0 over all epochs)")
    p.add_argument("--rm-epochs", type=int, help="passes over the labels (the paper: 1; 2 in the full run, see above)")
    p.add_argument("--rm-train-layers", type=int, help="top transformer layers trained in the reward model; -1 = all")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="share of labels kept out to measure accuracy")
    p.add_argument("--norm-samples", type=int, help="rho samples for each reward normalisation (untruncated, as released)")
    # PPO
    p.add_argument("--ppo-updates", type=int, help="PPO updates (the learning rate decays to 0 over these)")
    p.add_argument("--ppo-batch", type=int, help="rollouts per PPO update")
    p.add_argument("--ppo-minibatch", type=int, help="rollouts per optimiser step")
    p.add_argument("--ppo-epochs", type=int, help="passes over each batch")
    p.add_argument("--ppo-lr", type=float, help="PPO peak learning rate (TF Adam; with LoRA use ~1e-4..5e-4)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank for the policy; 0 = full fine-tuning")
    p.add_argument("--init-beta", type=float, default=None, help="initial KL coefficient (default: the task's 0.15)")
    p.add_argument("--kl-target", type=float, default=6.0, help="target KL in nats per response; <= 0: fixed beta")
    p.add_argument("--kl-horizon", type=int, default=1000, help="adaptive controller horizon in episodes (code: 10,000)")
    p.add_argument("--response-length", type=int, default=None, help="tokens per response (default: the task's 24)")
    # evaluation
    p.add_argument("--eval-prompts", type=int, help="validation prompts (the demo set has 47)")
    p.add_argument("--eval-samples", type=int, help="samples per validation prompt, fixed seeds")
    p.add_argument("--time-budget", type=float, help="seconds for the whole run; PPO stops early to fit")
    p.add_argument("--reuse", action="store_true",
                   help="reuse labels already in <out>/labels.db (and a saved reward model trained with the same settings)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


class Clock:
    """Wall-clock seconds per phase, and the CPU seconds this process used in each (all threads).

    The CPU is often shared with other work: CPU seconds / threads is then a rough (high) estimate of the
    wall time on an idle machine (threads also burn CPU while they wait).
    """

    def __init__(self):
        self.start = time.time()
        self.cpu_start = time.process_time()
        self.phases: dict[str, float] = {}
        self.cpu_phases: dict[str, float] = {}
        self._t = self._c = None

    def elapsed(self) -> float:
        return time.time() - self.start

    def begin(self) -> None:
        self._t, self._c = time.time(), time.process_time()

    def end(self, phase: str) -> float:
        wall = time.time() - self._t
        self.phases[phase] = round(self.phases.get(phase, 0.0) + wall, 1)
        self.cpu_phases[phase] = round(self.cpu_phases.get(phase, 0.0) + time.process_time() - self._c, 1)
        return wall


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# phase 1: comparisons from rho, labeled by VADER


def collect_labels(args, store, rho, tok, task, prompts, labeler):
    """Sample 4-way comparisons from rho until VADER has labeled args.n_labels of them (it skips tied tops)."""
    from labkit.labeling.comparisons import make_comparisons
    from labkit.labeling.labelers import label_pending

    def labeled():
        return len(store.training_set(task=task.name, kind="train"))

    have = labeled()
    if have and not args.reuse:
        raise SystemExit(f"{store.path} already holds {have} labeled comparisons; pass --reuse to use them "
                         "or choose a fresh --out.")
    if have < args.n_labels:
        log(f"labels: sampling comparisons x 4 responses from rho until {args.n_labels} are labeled ({have} reused)")
    order = list(range(len(prompts)))
    random.Random(args.seed).shuffle(order)
    chunk = max(1, args.sample_batch // 4) * 4  # prompts per call: a few sampling batches, then label and commit
    t0, first = time.time(), have
    while have < args.n_labels:
        made = len(store.comparisons(task=task.name, kind="train"))
        if made >= 5 * args.n_labels + 64:
            raise SystemExit(f"labels: only {have} of {made} sampled comparisons have a single best response by "
                             f"VADER; this model's samples are not decisive enough (try --keep-ties)")
        # cycle through the shuffled train prompts; a few more than missing, since ~1/4 of them are skipped
        n = min(chunk, max(4, round((args.n_labels - have) * 1.4)))
        part = [prompts[order[(made + i) % len(order)]] for i in range(n)]
        gen = torch.Generator(device=rho.device).manual_seed(args.seed * 1000 + made + 1)
        make_comparisons(store, rho, tok, task, part, k=4, source="rho", batch_size=args.sample_batch, generator=gen)
        label_pending(store, labeler, task=task.name)
        have = labeled()
        rate = (time.time() - t0) / max(1, have - first)
        log(f"labels: {have}/{args.n_labels} labeled ({rate:.2f} s/label, ~{rate * max(0, args.n_labels - have):.0f} s left)")
    # How decisive the mock human is: VADER scores a 24-token continuation exactly 0 when it has no sentiment word.
    made = store.comparisons(task=task.name, kind="train")
    n_tied = n_all_tied = 0
    for c in made:
        s = labeler.score(c.responses)
        n_tied += s.count(max(s)) > 1
        n_all_tied += len(set(s)) == 1
    stats = {"comparisons_sampled": len(made), "labels_top_tied_frac": round(n_tied / len(made), 3),
             "labels_all_tied_frac": round(n_all_tied / len(made), 3), "skip_ties": labeler.skip_ties}
    return stats


# --------------------------------------------------------------------------------------------------
# phase 2: reward model


def rm_settings(args) -> dict:
    return {k: getattr(args, k) for k in ("n_labels", "rm_batch", "rm_lr", "rm_epochs", "rm_train_layers",
                                          "heldout_fraction", "norm_samples", "labeler_temperature", "keep_ties", "seed", "model")}


def train_reward_model(args, out, rho, tok, task, prompts, examples):
    from labkit.recipes import recipe_for
    from labkit.reward import RewardModel, RewardTrainer, reward_model_from_lm

    folder = out / "reward_model"
    meta_file = out / "reward_model_meta.json"
    if args.reuse and meta_file.exists() and json.loads(meta_file.read_text()).get("settings") == rm_settings(args):
        meta = json.loads(meta_file.read_text())
        log(f"reward: reusing {folder} (held-out accuracy {meta['rm_heldout_accuracy']:.3f})")
        rm = RewardModel.load(folder)
        rm.requires_grad_(False)
        return rm, meta["stats"]

    texts = [p.text for p in prompts]
    rm = reward_model_from_lm(rho, tok)
    train_layers = None if args.rm_train_layers < 0 else args.rm_train_layers  # RewardConfig's None: every layer
    n_trainable = rm.train_top_layers(train_layers)  # here for the count; fit applies the config's train_layers
    log(f"reward: {n_trainable / 1e6:.1f}M trainable parameters (top {args.rm_train_layers} layers + head)")
    t0 = time.time()
    before = rm.normalize(rho, task, texts, n_samples=args.norm_samples, seed=args.seed + 11, batch_size=args.sample_batch)
    log(f"reward: normalised on {args.norm_samples} rho samples before training ({time.time() - t0:.0f} s)")
    # the task's recipe (labkit.recipes) with this script's budget choices (module docstring) over it
    cfg = recipe_for(task).reward_config(lr=args.rm_lr, batch_size=args.rm_batch, epochs=args.rm_epochs,
                                         heldout_fraction=args.heldout_fraction, eval_every=10**9,  # once, at the end
                                         normalize_samples=args.norm_samples, seed=args.seed, train_layers=train_layers)
    trainer = RewardTrainer(rm, cfg)
    t0 = time.time()
    history = _fit_with_progress(trainer, examples)
    train_seconds = time.time() - t0
    last = history[-1]
    t0 = time.time()
    after = rm.normalize(rho, task, texts, n_samples=args.norm_samples, seed=args.seed + 12, batch_size=args.sample_batch)
    log(f"reward: normalised again ({time.time() - t0:.0f} s)")
    rm.requires_grad_(False)
    losses = [m["rm/loss"] for m in history]
    tail = losses[-max(1, len(losses) // 4) :]
    stats = {
        "rm_heldout_accuracy": round(last["rm/heldout_accuracy"], 4),
        "rm_heldout_loss": round(last["rm/heldout_loss"], 4),
        "rm_heldout_n": len(trainer.split(examples)[1]),
        "rm_train_loss_last_quarter": round(statistics.mean(tail), 4),
        "rm_steps": len(history),
        "rm_train_seconds": round(train_seconds, 1),
        "rm_raw_before": {k: round(v, 4) for k, v in before.items()},
        "rm_raw_after": {k: round(v, 4) for k, v in after.items()},
    }
    rm.save(folder)
    meta_file.write_text(json.dumps({"settings": rm_settings(args), "rm_heldout_accuracy": stats["rm_heldout_accuracy"],
                                     "stats": stats}, indent=1))
    (out / "reward_history.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    return rm, stats


def _fit_with_progress(trainer, examples):
    """RewardTrainer.fit, with a progress line every ~10% of the steps (fit's own bar is a tqdm bar)."""
    cfg = trainer.config
    total = math.ceil(len(trainer.split(examples)[0]) / cfg.batch_size) * cfg.epochs
    every = max(1, total // 10)
    t0 = time.time()

    class Progress:
        n = 0

        def log(self, m):
            self.n += 1
            if self.n % every == 0 or self.n == total:
                rate = (time.time() - t0) / self.n
                extra = f", held-out acc {m['rm/heldout_accuracy']:.3f}" if "rm/heldout_accuracy" in m else ""
                log(f"reward: step {self.n}/{total} loss {m['rm/loss']:.3f} acc {m['rm/accuracy']:.2f}"
                    f"{extra} ({rate:.1f} s/step, ~{rate * (total - self.n):.0f} s left)")

        def flush(self):
            pass

    return trainer.fit(examples, dashboard=Progress(), progress=False)


# --------------------------------------------------------------------------------------------------
# phase 4 (also run before phase 3): evaluation on validation prompts


@torch.no_grad()
def evaluate(args, model, tok, task, val_prompts, labeler, rm, rho_model=None, adapters_off=None):
    """VADER (and the reward model) on samples of `model` for each validation prompt, fixed seed.

    rho_model / adapters_off: how to get rho's log-probs, to report KL(model || rho) on these samples.
    """
    from labkit.sampling import sample, score_logprobs
    from labkit.tasks import format_query

    queries = [format_query(task, p.text, tok) for p in val_prompts for _ in range(args.eval_samples)]
    gen = torch.Generator(device=model.device).manual_seed(args.seed + 12345)
    roll = sample(model, tok, queries, task, generator=gen, batch_size=args.sample_batch)
    vader = labeler.score(roll.response_texts)
    found = roll.found.float().tolist()
    rewards = []
    for i in range(0, len(roll), args.sample_batch):
        s = slice(i, i + args.sample_batch)
        rewards.append(rm(roll.query_ids[s], roll.query_lengths[s], roll.truncated_ids[s], roll.truncated_lengths[s].clamp(min=1)))
    rewards = torch.cat(rewards)
    scores = torch.where(roll.found, rewards, torch.full_like(rewards, task.penalty))
    out = {
        "vader": statistics.mean(vader),
        "vader_penalised": statistics.mean(v if f else task.penalty for v, f in zip(vader, found)),
        "vader_positive_frac": statistics.mean(v > 0.05 for v in vader),
        "vader_negative_frac": statistics.mean(v < -0.05 for v in vader),
        "found_frac": statistics.mean(found),
        "rm_score": scores.mean().item(),
        "n": len(roll),
    }
    if rho_model is not None or adapters_off is not None:
        ref = []
        for i in range(0, len(roll), args.sample_batch):
            s = slice(i, i + args.sample_batch)
            args_ = (roll.query_ids[s], roll.query_lengths[s], roll.response_ids[s], task.temperature)
            if adapters_off is not None:
                with adapters_off():
                    ref.append(score_logprobs(model, *args_, masked_ids=roll.masked_ids))
            else:
                ref.append(score_logprobs(rho_model, *args_, masked_ids=roll.masked_ids))
        out["kl"] = (roll.logprobs - torch.cat(ref)).sum(-1).mean().item()
    texts = [{"query": roll.query_texts[i][-160:], "response": roll.response_texts[i], "vader": vader[i]}
             for i in range(0, len(roll), args.eval_samples)]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}, texts, vader, rewards.tolist()


def pearson(x, y) -> float:
    if len(x) < 3 or statistics.pstdev(x) == 0 or statistics.pstdev(y) == 0:
        return float("nan")
    mx, my = statistics.mean(x), statistics.mean(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y)) / len(x)
    return cov / (statistics.pstdev(x) * statistics.pstdev(y))


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    clock = Clock()
    loadavg_start = [round(x, 2) for x in os.getloadavg()]

    from labkit.data import load_prompts
    from labkit.labeling.labelers import VaderLabeler
    from labkit.labeling.store import LabelStore
    from labkit.models import load_lm
    from labkit.recipes import recipe_for
    from labkit.rl import PPOTrainer
    from labkit.reward import examples_from_store
    from labkit.tasks import SENTIMENT

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = SENTIMENT if args.response_length is None else SENTIMENT.with_(response_length=args.response_length)
    train_prompts = load_prompts(task, "train")
    val_prompts = load_prompts(task, "validation")[: args.eval_prompts]
    labeler = VaderLabeler(temperature=args.labeler_temperature, seed=args.seed, skip_ties=not args.keep_ties)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    log(f"settings: {json.dumps(settings)}")

    clock.begin()
    rho, tok = load_lm(args.model, seed=args.seed)
    rho.requires_grad_(False)
    log(f"loaded {args.model} in {clock.end('load'):.0f} s; {len(train_prompts)} train / {len(val_prompts)} validation prompts")

    # 1. labels ---------------------------------------------------------------------------------
    clock.begin()
    with LabelStore(out / "labels.db") as store:
        label_stats = collect_labels(args, store, rho, tok, task, train_prompts, labeler)
        # on the stored token ids (the ones sampled and shown), in training_set's order as collect_labels counted
        examples = examples_from_store(store, task, kind="train")[: args.n_labels]
    log(f"labels: {len(examples)} in {clock.end('labels'):.0f} s; {json.dumps(label_stats)}")

    # 2. reward model ------------------------------------------------------------------------------
    clock.begin()
    rm, rm_stats = train_reward_model(args, out, rho, tok, task, train_prompts, examples)
    log(f"reward: held-out accuracy {rm_stats['rm_heldout_accuracy']:.3f} on {rm_stats.get('rm_heldout_n')} "
        f"(chance 0.25), loss {rm_stats['rm_heldout_loss']:.3f} (chance {math.log(4):.3f}); {clock.end('reward'):.0f} s")

    # 4a. evaluation of rho (before PPO: full fine-tuning changes the weights in place) -------------------
    clock.begin()
    before, before_texts, vader_b, rm_b = evaluate(args, rho, tok, task, val_prompts, labeler, rm)
    eval_before_seconds = clock.end("eval")
    rm_vader_corr = pearson(vader_b, rm_b)
    log(f"eval before: {json.dumps(before)}; corr(reward model, VADER) on rho samples {rm_vader_corr:.3f} "
        f"({eval_before_seconds:.0f} s)")

    # 3. PPO against the reward model ---------------------------------------------------------------
    clock.begin()
    cfg = recipe_for(task).ppo_config(  # the task's recipe with this script's budget choices over it
        batch_size=args.ppo_batch, minibatch_size=args.ppo_minibatch, ppo_epochs=args.ppo_epochs, lr=args.ppo_lr,
        total_updates=args.ppo_updates, lora_r=args.lora_r, init_beta=args.init_beta,
        kl_target=args.kl_target if args.kl_target > 0 else None, kl_horizon=args.kl_horizon,
        generation_batch_size=args.sample_batch, seed=args.seed, save_every=0)
    policy = rho  # PPOTrainer keeps a frozen copy as rho (full fine-tuning) or disables the LoRA adapters
    rho.requires_grad_(True)
    trainer = PPOTrainer(policy, tok, task, rm, train_prompts, cfg, run_dir=None, verbose=False)
    history, stopped_early = [], False
    reserve = eval_before_seconds * 1.5 + 30  # the final evaluation also scores rho's log-probs
    metrics_file = open(out / "ppo_metrics.jsonl", "w")
    for update in range(args.ppo_updates):
        if history:
            step_s = statistics.mean(m["time/step"] for m in history[-3:])
            if clock.elapsed() + step_s + reserve > args.time_budget:
                stopped_early = True
                log(f"ppo: stopping after {update} updates to fit --time-budget {args.time_budget:.0f} s")
                break
        m = trainer.step()
        history.append(m)
        metrics_file.write(json.dumps(m) + "\n")
        metrics_file.flush()
        log(f"ppo {m['step']}/{args.ppo_updates}: score {m['objective/scores']:+.3f} kl {m['objective/kl']:.2f} "
            f"beta {m['objective/kl_coef']:.4f} found {m['objective/truncated_frac']:.2f} "
            f"approxkl {m['policy/approxkl_avg']:.4f} clip {m['policy/clipfrac_avg']:.3f} "
            f"({m['time/generation']:.0f}+{m['time/scoring']:.0f}+{m['time/optimization']:.0f} s)")
        s = trainer.samples[0]
        log(f"    sample: {s['response']!r} (score {s['score']:+.2f})")
    metrics_file.close()
    clock.end("ppo")

    # 4b. evaluation of the trained policy ---------------------------------------------------------
    clock.begin()
    trainer.policy.requires_grad_(False)
    if trainer.rho is None:
        after, after_texts, vader_a, _ = evaluate(args, trainer.policy, tok, task, val_prompts, labeler, rm,
                                                  adapters_off=trainer.policy.disable_adapter)
    else:
        after, after_texts, vader_a, _ = evaluate(args, trainer.policy, tok, task, val_prompts, labeler, rm,
                                                  rho_model=trainer.rho)
    log(f"eval after: {json.dumps(after)} ({clock.end('eval'):.0f} s)")
    for b, a in list(zip(before_texts, after_texts))[:6]:
        log(f"  query  ...{b['query'][-100:]!r}\n    before ({b['vader']:+.2f}): {b['response']!r}\n"
            f"    after  ({a['vader']:+.2f}): {a['response']!r}")
    (out / "samples.json").write_text(json.dumps({"before": before_texts, "after": after_texts}, indent=1))

    last = history[-3:] if history else []
    result = {
        "benchmark": "mock_sentiment",
        "quick": args.quick,
        "model": args.model,
        "n_labels": len(examples),
        **label_stats,
        "rm_heldout_accuracy": rm_stats["rm_heldout_accuracy"],
        "rm_heldout_loss": rm_stats["rm_heldout_loss"],
        "rm_heldout_n": rm_stats.get("rm_heldout_n"),
        "rm_vader_corr_rho_samples": round(rm_vader_corr, 4),
        "vader_before": before["vader"],
        "vader_after": after["vader"],
        "vader_gain": round(after["vader"] - before["vader"], 4),
        "vader_penalised_before": before["vader_penalised"],
        "vader_penalised_after": after["vader_penalised"],
        "found_frac_before": before["found_frac"],
        "found_frac_after": after["found_frac"],
        "rm_score_before": before["rm_score"],
        "rm_score_after": after["rm_score"],
        "kl_val_after": after.get("kl"),
        "kl_final": round(history[-1]["objective/kl"], 4) if history else None,
        "kl_final_mean_last3": round(statistics.mean(m["objective/kl"] for m in last), 4) if last else None,
        "kl_target": args.kl_target if args.kl_target > 0 else None,
        "beta_final": round(trainer.kl_ctl.beta, 5),
        "ppo_updates_done": len(history),
        "ppo_episodes": len(history) * args.ppo_batch,
        "ppo_stopped_early": stopped_early,
        "score_first": round(history[0]["objective/scores"], 4) if history else None,
        "score_final_mean_last3": round(statistics.mean(m["objective/scores"] for m in last), 4) if last else None,
        "targets_met": {
            "rm_accuracy_ge_0.5": rm_stats["rm_heldout_accuracy"] >= 0.5,
            "labels_le_2000": len(examples) <= 2000,
            "vader_gain_ge_0.3": after["vader"] - before["vader"] >= 0.3,
            "kl_within_2x_target": (args.kl_target > 0 and bool(history)
                                    and history[-1]["objective/kl"] <= 2 * args.kl_target),
        },
        "seconds": round(clock.elapsed(), 1),
        "phase_seconds": clock.phases,
        "cpu_seconds": round(time.process_time() - clock.cpu_start, 1),
        "phase_cpu_seconds": clock.cpu_phases,
        "loadavg_start": loadavg_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "rm_details": rm_stats,
        "settings": settings,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    emit(result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
