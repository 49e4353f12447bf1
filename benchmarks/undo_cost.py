"""What making a PPO update all-or-nothing costs: the copy of the trainable weights and Adam's moments that
`PPOTrainer.step` takes before the first optimiser step (labkit/rl/trainer.py, `_Before`), on the embedded
model with full fine-tuning and the shared value head (the largest copy labkit takes; with LoRA only the
adapters are copied).

Three arms, each in a fresh process so that each has its own peak memory, in ABCCBA order: "copy" (labkit
without a run folder: the copy in memory), "none" (the copy replaced by nothing, for this measurement only)
and "checkpoint" (labkit with a run folder saving every update: the undo reads that checkpoint back instead,
and nothing is copied; its time includes writing the checkpoints). Each runs one warm-up update and
`--updates` measured ones. Prints one JSON line: the copy's size and seconds, seconds per update and peak RSS
of each arm, and the ratios to "none".

    python benchmarks/undo_cost.py                  # batch 16 rollouts, query 64, response 24, 4 epochs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from record import emit  # this script's folder is on sys.path

ARMS = ["copy", "none", "checkpoint"]


def arm(name: str, batch: int, updates: int) -> dict:
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
    run_dir = tempfile.mkdtemp(prefix="labkit-undo-") if name == "checkpoint" else None
    trainer = PPOTrainer(policy, tok, SENTIMENT, lambda q, r: [float(len(x)) for x in r], prompts, cfg, run_dir=run_dir,
                         verbose=False)
    copy_s, copy_bytes = [], 0
    real = trainer_module._Before.take_weights

    def timed(self, t):
        nonlocal copy_bytes
        start = time.perf_counter()
        real(self, t)
        copy_s.append(time.perf_counter() - start)
        if self.weights is not None:  # None: the undo will read the run folder's checkpoint back
            copy_bytes = sum(w.nbytes for w in self.weights) + sum(
                v.nbytes for st in self.optimizer.values() for v in st.values() if torch.is_tensor(v))

    trainer_module._Before.take_weights = (lambda self, t: None) if name == "none" else timed
    trainer.step()  # warm-up: compiles, allocates Adam's moments
    seconds = []
    for _ in range(updates):
        start = time.perf_counter()
        trainer.step()
        seconds.append(time.perf_counter() - start)
    if run_dir:
        shutil.rmtree(run_dir)
    return {"update_s": statistics.median(seconds), "copy_s": statistics.median(copy_s) if copy_s else 0.0,
            "copy_bytes": copy_bytes, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--updates", type=int, default=2)
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one arm, in a child process
    args = p.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, args.batch, args.updates)))
        return
    runs: dict[str, list[dict]] = {a: [] for a in ARMS}
    for name in ARMS + ARMS[::-1]:  # ABCCBA: drift on a shared machine cancels out
        out = subprocess.run([sys.executable, __file__, "--arm", name, "--batch", str(args.batch), "--updates",
                              str(args.updates)], capture_output=True, text=True, check=True, env=os.environ)
        runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    emit({
        "benchmark": "undo_cost", "model": "smollm2-135m", "batch": args.batch, "query": 64, "response": 24,
        "epochs": 4, "updates_per_arm": args.updates,
        "copy_gb": round(med["copy"]["copy_bytes"] / 2**30, 3), "copy_s": round(med["copy"]["copy_s"], 3),
        **{f"update_s_{a}": round(med[a]["update_s"], 2) for a in ARMS},
        **{f"peak_rss_gb_{a}": round(med[a]["peak_rss_gb"], 2) for a in ARMS},
        **{f"time_ratio_{a}": round(med[a]["update_s"] / med["none"]["update_s"], 3) for a in ("copy", "checkpoint")},
        **{f"memory_ratio_{a}": round(med[a]["peak_rss_gb"] / med["none"]["peak_rss_gb"], 3) for a in ("copy", "checkpoint")},
    })


if __name__ == "__main__":
    main()
