"""Seconds per TFAdam step on the embedded model's parameters: PyTorch's fused Adam kernel (with TF's eps
rescaled, what labkit runs) against the per-tensor loop (what sharded parameters still take), alternating in
one process on the same parameters and gradients; medians of `--steps`. Prints one JSON line at the end.

    python benchmarks/optimizer_step.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from record import emit  # this script's folder is on sys.path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from labkit import optim
    from labkit.models import load_lm

    model, _ = load_lm(args.model)
    params = [q for q in model.parameters() if q.requires_grad]
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    arms = {"fused": optim.TFAdam(params, lr=1e-7), "loop": optim.TFAdam(params, lr=1e-7)}
    fusable = optim._fusable
    times = {name: [] for name in arms}
    for i in range(args.steps + 1):  # the first step of each arm allocates its state: not timed
        for name, opt in arms.items():
            optim._fusable = fusable if name == "fused" else (lambda q: False)
            t0 = time.perf_counter()
            opt.step()
            if i:
                times[name].append(time.perf_counter() - t0)
    optim._fusable = fusable
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"TFAdam step over {sum(q.numel() for q in params) / 1e6:.1f}M parameters: fused {med['fused']:.3f} s, "
          f"per-tensor loop {med['loop']:.3f} s ({med['loop'] / med['fused']:.1f}x)")
    emit({"benchmark": "optimizer_step", "model": args.model, "threads": args.threads,
          "params": sum(q.numel() for q in params), "fused_s": round(med["fused"], 4),
          "loop_s": round(med["loop"], 4), "ratio": round(med["loop"] / med["fused"], 2)})


if __name__ == "__main__":
    main()
