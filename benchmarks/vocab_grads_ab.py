"""In-place vocabulary gradients (labkit/speed/inplace_grads.py) vs autograd's own, A/B in one process.

One SmolLM2 model whose embedding and head classes are switched between labkit's in-place versions and the
stock nn.Embedding / nn.Linear before each optimiser-step-sized unit of work: `--micro` training micro-batches
of ppo_step.py's shapes (16 rollouts x (64 + 24) tokens, shared-head PPO's forward: log-probs at the 24
response positions and the final hidden states), each with a backward pass, then `zero_grad(set_to_none=True)`
as the PPO loop does per optimiser step. The order alternates (plain, in-place, in-place, plain, ...), so that
both arms see the same machine state. Prints each unit's seconds and minor page faults, and a last JSON line
with the medians and their ratio.

    python benchmarks/vocab_grads_ab.py --pairs 6
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn as nn
from record import emit  # this script's folder is on sys.path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=6, help="measured units per arm, after one warm-up unit each")
    p.add_argument("--micro", type=int, default=2, help="micro-batches per unit (gradient accumulation)")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from labkit.speed.inplace_grads import InPlaceGradEmbedding, InPlaceGradLinear
    from labkit.models import load_lm
    from labkit.sampling import forward_responses

    model, tok = load_lm("smollm2-135m")
    model.requires_grad_(True)
    B, Q, R = args.micro_batch, 64, 24
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, len(tok), (B, Q), generator=gen)
    r = torch.randint(0, len(tok), (B, R), generator=gen)
    q_len = torch.full((B,), Q)

    def use(inplace: bool):
        model.get_input_embeddings().__class__ = InPlaceGradEmbedding if inplace else nn.Embedding
        model.get_output_embeddings().__class__ = InPlaceGradLinear if inplace else nn.Linear

    def unit() -> tuple[float, int]:
        faults0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for _ in range(args.micro):
            out = forward_responses(model, q, q_len, r, 0.7, want_hidden=True)
            (out.logprobs.sum() + 1e-3 * out.hidden.sum()).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0

    times, faults = {"plain": [], "inplace": []}, {"plain": [], "inplace": []}
    for i in range(args.pairs + 1):
        for arm in (("plain", "inplace") if i % 2 == 0 else ("inplace", "plain")):
            use(arm == "inplace")
            s, f = unit()
            print(f"{'warm-up ' if i == 0 else ''}{arm}: {s:.2f} s, {f} minor page faults", flush=True)
            if i:
                times[arm].append(s)
                faults[arm].append(f)
    med = {arm: statistics.median(v) for arm, v in times.items()}
    emit({"benchmark": "vocab_grads_ab", "micro_batch": B, "micro_batches_per_unit": args.micro,
          "threads": args.threads, "pairs": args.pairs,
          "plain_s": round(med["plain"], 3), "inplace_s": round(med["inplace"], 3),
          "speedup": round(med["plain"] / med["inplace"], 3),
          "plain_faults": int(statistics.median(faults["plain"])),
          "inplace_faults": int(statistics.median(faults["inplace"]))})


if __name__ == "__main__":
    main()
