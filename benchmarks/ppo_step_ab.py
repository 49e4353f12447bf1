"""One PPO trainer, updates alternating between labkit's sampler and log-prob code and the plain versions
they replaced, in one process: a same-machine-state ratio for changes smaller than the machine's drift.

"plain" = `torch.multinomial` in the sampler and divide / log_softmax / gather for the log-probs (what
labkit ran before `sampling.sample_categorical` and `sampling.tempered_logprobs`). Shapes are ppo_step.py's
(batch 64, query 64, response 24, 4 epochs, micro-batch 16, shared value head, fp32). After one warm-up
update, `--pairs` pairs of updates run in alternating order (plain, current, current, plain, ...); prints
each update and a last JSON line with the medians and their ratio. The two arms sample different rollouts
(the random streams differ), so the ratio is of the whole update's time, not of identical work.

    python benchmarks/ppo_step_ab.py --pairs 2
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from record import emit  # this script's folder is on sys.path


def plain_logprobs(logits, ids, temperature, want_entropy=False):
    # as labkit had it (unsharded): the head's output divided in place, then log_softmax and gather
    logp_all = F.log_softmax(logits.float().div_(temperature), dim=-1)  # (B, R, V)
    entropy = None
    if want_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1), entropy


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from labkit import sampling
    from labkit.models import load_lm
    from ppo_step import sentiment_trainer  # this script's folder is on sys.path

    arms = {
        "current": (sampling.sample_categorical, sampling.tempered_logprobs),
        "plain": (lambda probs, gen: torch.multinomial(probs, 1, generator=gen), plain_logprobs),
    }
    policy, tok = load_lm("smollm2-135m")
    trainer = sentiment_trainer(policy, tok, batch=64, query=64, response=24, epochs=4, micro_batch=16)
    order = ["current"] + [a for i in range(args.pairs) for a in (("plain", "current") if i % 2 == 0 else ("current", "plain"))]
    times = {"current": [], "plain": []}
    for i, arm in enumerate(order):
        sampling.sample_categorical, sampling.tempered_logprobs = arms[arm]
        m = trainer.step()
        print(f"update {i} {arm}{' (warm-up)' if i == 0 else ''}: {m['time/step']:.1f} s (generation "
              f"{m['time/generation']:.1f}, scoring {m['time/scoring']:.1f}, optimisation {m['time/optimization']:.1f})", flush=True)
        if i > 0:
            times[arm].append(m)
    med = {a: {k: round(statistics.median(m[f"time/{k}"] for m in ms), 2) for k in ("step", "generation", "scoring", "optimization")}
           for a, ms in times.items()}
    emit({"benchmark": "ppo_step_ab", "pairs": args.pairs, "threads": args.threads, "median_s": med,
          "speedup": round(med["plain"]["step"] / med["current"]["step"], 3)})


if __name__ == "__main__":
    main()
