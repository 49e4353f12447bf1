"""What making a PPO update all-or-nothing costs: the copy of the trainable weights and Adam's moments that
`PPOTrainer.step` takes before the first optimiser step (labkit/rl/trainer.py, `_Before`), on the embedded
model with full fine-tuning and the shared value head (the largest copy labkit takes; with LoRA only the
adapters are copied).

Two arms, each in a fresh process so that each has its own peak memory: "undo" (labkit as it is) and
"no-undo" (the copy replaced by nothing, for this measurement only), in ABBA order. Each runs one warm-up
update and `--updates` measured ones. Prints one JSON line: the copy's size and seconds, seconds per update
and peak RSS of both arms, and the ratios.

    python benchmarks/undo_cost.py                  # batch 16 rollouts, query 64, response 24, 4 epochs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from record import emit  # this script's folder is on sys.path


def arm(undo: bool, batch: int, updates: int) -> dict:
    import torch

    import labkit.rl.trainer as trainer_module
    from labkit.data import load_prompts
    from labkit.models import load_lm
    from labkit.rl import PPOConfig, PPOTrainer
    from labkit.tasks import SENTIMENT

    torch.set_num_threads(2)
    policy, tok = load_lm("smollm2-135m", device="cpu")
    prompts = load_prompts(SENTIMENT, source="demo")
    cfg = PPOConfig(batch_size=batch, micro_batch_size=min(batch, 16), total_updates=100)
    trainer = PPOTrainer(policy, tok, SENTIMENT, lambda q, r: [float(len(x)) for x in r], prompts, cfg, verbose=False)
    copy_s, copy_bytes = [], 0
    real = trainer_module._Before.take_weights

    def timed(self, t):
        nonlocal copy_bytes
        start = time.perf_counter()
        real(self, t)
        copy_s.append(time.perf_counter() - start)
        copy_bytes = sum(w.nbytes for w in self.weights) + sum(
            v.nbytes for st in self.optimizer.values() for v in st.values() if torch.is_tensor(v))

    trainer_module._Before.take_weights = timed if undo else (lambda self, t: None)
    trainer.step()  # warm-up: compiles, allocates Adam's moments
    seconds = []
    for _ in range(updates):
        start = time.perf_counter()
        trainer.step()
        seconds.append(time.perf_counter() - start)
    return {"update_s": statistics.median(seconds), "copy_s": statistics.median(copy_s) if copy_s else 0.0,
            "copy_bytes": copy_bytes, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--updates", type=int, default=2)
    p.add_argument("--arm", choices=["undo", "no-undo"], help=argparse.SUPPRESS)  # one arm, in a child process
    args = p.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm == "undo", args.batch, args.updates)))
        return
    runs: dict[str, list[dict]] = {"undo": [], "no-undo": []}
    for name in ("undo", "no-undo", "no-undo", "undo"):  # ABBA: drift on a shared machine cancels out
        out = subprocess.run([sys.executable, __file__, "--arm", name, "--batch", str(args.batch), "--updates",
                              str(args.updates)], capture_output=True, text=True, check=True, env=os.environ)
        runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    emit({
        "benchmark": "undo_cost", "model": "smollm2-135m", "batch": args.batch, "query": 64, "response": 24,
        "epochs": 4, "updates_per_arm": args.updates,
        "copy_gb": round(med["undo"]["copy_bytes"] / 2**30, 3), "copy_s": round(med["undo"]["copy_s"], 3),
        "update_s_undo": round(med["undo"]["update_s"], 2), "update_s_no_undo": round(med["no-undo"]["update_s"], 2),
        "time_ratio": round(med["undo"]["update_s"] / med["no-undo"]["update_s"], 3),
        "peak_rss_gb_undo": round(med["undo"]["peak_rss_gb"], 2),
        "peak_rss_gb_no_undo": round(med["no-undo"]["peak_rss_gb"], 2),
        "memory_ratio": round(med["undo"]["peak_rss_gb"] / med["no-undo"]["peak_rss_gb"], 3),
    })


if __name__ == "__main__":
    main()
