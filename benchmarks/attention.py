"""Attention time per layer: transformers' SDPA path against labkit's grouped attention, side by side.

SmolLM2's attention shapes (9 query heads over 3 key/value heads, head size 64), rows x positions as in PPO
(16 rows per micro-batch), key lengths from 64 to 384, with and without gradients, with a padding mask (the
usual case: left-padded queries) and without one (queries of one length: transformers passes no mask and SDPA
runs its causal kernel; the grouped arm then gets the causal mask spelled out). Inputs are laid out as
transformers hands them over (views of (B, T, heads, D)).
Both arms alternate in one process; medians of `--repeats` calls. Prints one JSON line at the end; the
crossover it shows is `labkit.speed.attention.MAX_KEYS`.

    python benchmarks/attention.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from record import emit  # this script's folder is on sys.path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 88, 128, 192, 256, 384])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from labkit.speed import attention
    from labkit.speed.attention import grouped_attention

    MAX_KEYS = dict(attention.MAX_KEYS)
    attention.MAX_KEYS = {True: 10**9, False: 10**9}  # measure the grouped kernel at every length

    H, KV, D, B = 9, 3, 64, args.rows
    module = SimpleNamespace(is_causal=True, num_key_value_groups=H // KV)
    arms = {"sdpa": sdpa_attention_forward, "grouped": grouped_attention}
    rows = []
    for T in args.lengths:
        leaves = [torch.randn(B, T, h, D, requires_grad=True) for h in (H, KV, KV)]
        pad = torch.zeros(B, T, dtype=torch.bool)
        pad[::2, :8] = True  # every other row left-padded by 8
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        padded = (causal[None] & ~pad[:, None, :]).unsqueeze(1)  # (B, 1, T, T)
        grad_out = torch.randn(B, T, H, D)
        for mask_name, mask in (("padding mask", padded), ("no mask", None)):
            for grad in (True, False):
                def call(fn):
                    q, k, v = (t.transpose(1, 2) for t in leaves)  # (B, heads, T, D) views, as transformers has them
                    with torch.set_grad_enabled(grad):
                        # without a mask labkit hands over to SDPA; the grouped arm gets the causal mask spelled
                        # out, to show what its kernel would do there
                        m = causal[None, None] if mask is None and fn is grouped_attention else mask
                        out, _ = fn(module, q, k, v, m, scaling=D**-0.5)
                        if grad:
                            out.backward(grad_out)
                times = {name: [] for name in arms}
                for fn in arms.values():
                    call(fn)
                for _ in range(args.repeats):
                    for name, fn in arms.items():
                        t0 = time.perf_counter()
                        call(fn)
                        times[name].append(time.perf_counter() - t0)
                med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
                row = {"keys": T, "mask": mask_name, "grad": grad, "sdpa_ms": round(med["sdpa"], 2),
                       "grouped_ms": round(med["grouped"], 2), "ratio": round(med["sdpa"] / med["grouped"], 2),
                       "grouped_used": T <= MAX_KEYS[grad]}
                rows.append(row)
                print(f"keys {T:4d}  {mask_name:12s}  {'forward+backward' if grad else 'forward, no grad':16s}  "
                      f"SDPA {med['sdpa']:7.2f} ms  grouped {med['grouped']:7.2f} ms  ({med['sdpa'] / med['grouped']:.2f}x)"
                      f"{'' if row['grouped_used'] else '  [labkit uses SDPA here]'}", flush=True)
    emit({"benchmark": "attention", "rows": B, "heads": H, "kv_heads": KV, "head_dim": D,
          "threads": args.threads, "max_keys": MAX_KEYS, "per_layer": rows})


if __name__ == "__main__":
    main()
