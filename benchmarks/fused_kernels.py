"""Compiled RMSNorm and SwiGLU (labkit/speed/fused.py) vs transformers' eager formulas, A/B in one process.

One SmolLM2 model; each unit of work is `--micro` training micro-batches of ppo_step.py's shapes (16 rollouts
x (64 + 24) tokens, shared-head PPO's forward: log-probs at the 24 response positions and the final hidden
states, then a backward pass) followed by one no-gradient scoring pass of the same rows (as rho's). The arms
alternate (eager, compiled, compiled, eager, ...), so that both see the same machine state; the compiled
arm's kernels are built in a warm-up unit first. Prints each unit's seconds and a last JSON line with the
medians and their ratios.

    python benchmarks/fused_kernels.py --pairs 6
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from record import emit  # this script's folder is on sys.path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=6, help="measured units per arm, after one warm-up unit each")
    p.add_argument("--micro", type=int, default=2, help="training micro-batches per unit")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from labkit.speed import fused
    from labkit.models import load_lm
    from labkit.sampling import forward_responses

    model, tok = load_lm("smollm2-135m")
    model.requires_grad_(True)
    B, Q, R = args.micro_batch, 64, 24
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, len(tok), (B, Q), generator=gen)
    r = torch.randint(0, len(tok), (B, R), generator=gen)
    q_len = torch.full((B,), Q)

    def unit(arm: str) -> tuple[float, float]:
        with fused.eager() if arm == "eager" else contextlib.nullcontext():
            t0 = time.perf_counter()
            for _ in range(args.micro):
                out = forward_responses(model, q, q_len, r, 0.7, want_hidden=True)
                (out.logprobs.sum() + 1e-3 * out.hidden.sum()).backward()
            model.zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            with torch.no_grad():
                forward_responses(model, q, q_len, r, 0.7)
            return t1 - t0, time.perf_counter() - t1

    train, score = {"eager": [], "compiled": []}, {"eager": [], "compiled": []}
    for i in range(args.pairs + 1):
        for arm in (("eager", "compiled") if i % 2 == 0 else ("compiled", "eager")):
            t, s = unit(arm)
            print(f"{'warm-up ' if i == 0 else ''}{arm}: training {t:.2f} s, scoring {s:.2f} s", flush=True)
            if i:
                train[arm].append(t)
                score[arm].append(s)
    if fused._state["failed"] is not None:
        raise SystemExit(f"the compiled arm fell back to eager: {fused._state['failed']!r}")
    med = {k: {arm: statistics.median(v) for arm, v in d.items()} for k, d in (("train", train), ("score", score))}
    emit({"benchmark": "fused_kernels", "micro_batch": B, "micro_batches_per_unit": args.micro,
          "threads": args.threads, "pairs": args.pairs,
          "train_eager_s": round(med["train"]["eager"], 3), "train_compiled_s": round(med["train"]["compiled"], 3),
          "train_speedup": round(med["train"]["eager"] / med["train"]["compiled"], 3),
          "score_eager_s": round(med["score"]["eager"], 3), "score_compiled_s": round(med["score"]["compiled"], 3),
          "score_speedup": round(med["score"]["eager"] / med["score"]["compiled"], 3)})


if __name__ == "__main__":
    main()
