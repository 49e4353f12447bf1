"""labkit's PPO update vs TRL 0.19.1's PPOTrainer, back to back on the same model, shapes and threads.

Runs benchmarks/ppo_step.py with labkit's venv (shared value head, the paper's default), again with
--value separate (TRL's design: a separate value model), then benchmarks/trl_ppo_step.py with the TRL venv,
and prints each JSON line and a last one with speedup = TRL seconds per update / labkit seconds per update
and memory_ratio = labkit peak RSS / TRL peak RSS. Defaults: the sentiment shapes of ppo_step.py (batch 64,
query 64, response 24, 4 PPO epochs, micro-batches of 16, fp32 on CPU). Each script measures its own fp32
matmul peak; they are repeated in the last line, since on a shared machine they move from run to run.
Standard library only: run it with any python3.

TRL venv, once: see benchmarks/trl_reward_train.py. Then:
    python3 benchmarks/ppo_side_by_side.py --updates 3 --threads 2
    python3 benchmarks/ppo_side_by_side.py --updates 2 --rounds 3 --skip-separate   # shared head and TRL, ABBA
    python3 benchmarks/ppo_side_by_side.py --updates 3 --also-micro-batch 4   # + labkit at micro-batch 4 (memory)
    python3 benchmarks/ppo_side_by_side.py --updates 3 --also-checkpointing   # + labkit with gradient checkpointing (memory)
    python3 benchmarks/ppo_side_by_side.py --updates 3 --also-lean   # + checkpointing and glibc returning freed memory
    python3 benchmarks/ppo_side_by_side.py --updates 3 --also-bf16   # + labkit with bf16 matmuls (not the fp32 comparison)
    python3 benchmarks/ppo_side_by_side.py --batch 8 --micro-batch 4 --response 4 --epochs 1 --updates 1   # smoke test
"""

from __future__ import annotations

import argparse
import statistics

from reward_train_side_by_side import ROOT, run  # this script's folder is on sys.path
from record import emit  # this script's folder is on sys.path


def median_run(runs: list[dict]) -> dict:
    """The run with the median seconds per update (with an even count, its seconds are the two middle ones' mean)."""
    runs = sorted(runs, key=lambda r: r["seconds_per_update"])
    mid = dict(runs[(len(runs) - 1) // 2])
    mid["seconds_per_update"] = round(statistics.median(r["seconds_per_update"] for r in runs), 2)
    return mid


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=3, help="measured updates after one warm-up (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-separate", action="store_true", help="skip labkit with --value separate")
    p.add_argument("--batch", type=int, default=None, help="rollouts per update (default: the scripts' 64)")
    p.add_argument("--query", type=int, default=None, help="query tokens (default 64)")
    p.add_argument("--response", type=int, default=None, help="response tokens (default 24)")
    p.add_argument("--epochs", type=int, default=None, help="PPO epochs (default 4)")
    p.add_argument("--micro-batch", type=int, default=None, help="gradient accumulation chunk (default 16)")
    p.add_argument("--also-micro-batch", type=int, default=None,
                   help="one more labkit shared-head run at this micro-batch (smaller: less memory, slower)")
    p.add_argument("--also-checkpointing", action="store_true",
                   help="one more labkit shared-head run with gradient checkpointing (memory)")
    p.add_argument("--also-lean", action="store_true",
                   help="one more labkit shared-head run with gradient checkpointing and MALLOC_MMAP_THRESHOLD_=1048576 "
                        "(glibc returns freed blocks of 1 MiB and more to the OS: the smallest footprint)")
    p.add_argument("--also-bf16", action="store_true",
                   help="one more labkit shared-head run with bf16 autocast (a CPU with AMX or AVX512-BF16); reported "
                        "apart: a different precision from TRL's fp32")
    p.add_argument("--rounds", type=int, default=1,
                   help="run labkit's shared head and TRL this many times, alternating which goes first (ABBA), "
                        "and compare medians: this machine's speed drifts over the minutes one run takes")
    p.add_argument("--labkit-python", default=str(ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--trl-python", default="/tmp/trlvenv/bin/python")
    args = p.parse_args()

    common = ["--updates", str(args.updates), "--threads", str(args.threads)]
    for flag in ("batch", "query", "response", "epochs", "micro_batch"):
        if getattr(args, flag) is not None:
            common += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    shared_runs, trl_runs = [run([args.labkit_python, "benchmarks/ppo_step.py", *common])], []
    also = None
    if args.also_micro_batch:
        also = run([args.labkit_python, "benchmarks/ppo_step.py", *[c for i, c in enumerate(common)
                    if c != "--micro-batch" and (i == 0 or common[i - 1] != "--micro-batch")],
                    "--micro-batch", str(args.also_micro_batch)])
    ckpt = run([args.labkit_python, "benchmarks/ppo_step.py", *common, "--gradient-checkpointing"]) if args.also_checkpointing else None
    lean = run([args.labkit_python, "benchmarks/ppo_step.py", *common, "--gradient-checkpointing"],
               env={"MALLOC_MMAP_THRESHOLD_": "1048576"}) if args.also_lean else None
    bf16 = run([args.labkit_python, "benchmarks/ppo_step.py", *common, "--bf16-autocast"]) if args.also_bf16 else None
    separate = None if args.skip_separate else run([args.labkit_python, "benchmarks/ppo_step.py", *common, "--value", "separate"])
    trl_runs.append(run([args.trl_python, "benchmarks/trl_ppo_step.py", *common]))
    for r in range(1, args.rounds):  # TRL first in odd rounds, labkit first in even ones
        pair = [lambda: trl_runs.append(run([args.trl_python, "benchmarks/trl_ppo_step.py", *common])),
                lambda: shared_runs.append(run([args.labkit_python, "benchmarks/ppo_step.py", *common]))]
        for go in pair if r % 2 else pair[::-1]:
            go()
    shared, trl = median_run(shared_runs), median_run(trl_runs)

    trl_s = trl["seconds_per_update"]
    default_shapes = all(getattr(args, f) is None for f in ("batch", "query", "response", "epochs", "micro_batch"))
    out = {
        "benchmark": "ppo_side_by_side", "updates": args.updates, "threads": args.threads,
        **{k: trl[k] for k in ("batch", "query", "response", "epochs", "micro_batch")},
        "rounds": [{"labkit_shared_s": a["seconds_per_update"], "trl_s": b["seconds_per_update"],
                    "speedup_shared": round(b["seconds_per_update"] / a["seconds_per_update"], 3),
                    "fp32_matmul_peak_gflops": [a.get("fp32_matmul_peak_gflops"), b.get("fp32_matmul_peak_gflops")]}
                   for a, b in zip(shared_runs, trl_runs)],
        "labkit_shared_s": shared["seconds_per_update"],
        "labkit_separate_s": separate["seconds_per_update"] if separate else None,
        "trl_s": trl_s,
        "speedup_shared": round(trl_s / shared["seconds_per_update"], 2),
        "speedup_separate": round(trl_s / separate["seconds_per_update"], 2) if separate else None,
        "memory_ratio_shared": round(shared["peak_rss_gib"] / trl["peak_rss_gib"], 3),
        "memory_ratio_separate": round(separate["peak_rss_gib"] / trl["peak_rss_gib"], 3) if separate else None,
        **({f"labkit_shared_micro{args.also_micro_batch}_s": also["seconds_per_update"],
            f"speedup_shared_micro{args.also_micro_batch}": round(trl_s / also["seconds_per_update"], 2),
            f"memory_ratio_shared_micro{args.also_micro_batch}": round(also["peak_rss_gib"] / trl["peak_rss_gib"], 3)}
           if also else {}),
        **({"labkit_shared_checkpointing_s": ckpt["seconds_per_update"],
            "speedup_shared_checkpointing": round(trl_s / ckpt["seconds_per_update"], 2),
            "memory_ratio_shared_checkpointing": round(ckpt["peak_rss_gib"] / trl["peak_rss_gib"], 3)} if ckpt else {}),
        **({"labkit_shared_lean_s": lean["seconds_per_update"],
            "speedup_shared_lean": round(trl_s / lean["seconds_per_update"], 2),
            "memory_ratio_shared_lean": round(lean["peak_rss_gib"] / trl["peak_rss_gib"], 3)} if lean else {}),
        **({"labkit_shared_bf16_s": bf16["seconds_per_update"], "speedup_shared_bf16": round(trl_s / bf16["seconds_per_update"], 2),
            "labkit_shared_bf16_peak_rss_gib": bf16["peak_rss_gib"]} if bf16 else {}),
        "mfu": {name: r.get("mfu") for name, r in (("labkit_shared", shared), ("labkit_separate", separate)) if r},
        # TRL's, with the count of its FLOPs at the default shapes (3.8e13 per update)
        "mfu_trl": round(3.8e13 / trl_s / (trl["fp32_matmul_peak_gflops"] * 1e9), 3) if default_shapes else None,
        "peak_rss_gib": {"labkit_shared": shared["peak_rss_gib"],
                         **({f"labkit_shared_micro{args.also_micro_batch}": also["peak_rss_gib"]} if also else {}),
                         "labkit_separate": separate["peak_rss_gib"] if separate else None, "trl": trl["peak_rss_gib"]},
        "split_s": {name: {k: r.get(f"{k}_s") for k in ("generation", "scoring", "optimization")}
                    for name, r in (("labkit_shared", shared), ("labkit_separate", separate), ("trl", trl)) if r},
        "fp32_matmul_peak_gflops": {"labkit_shared": shared.get("fp32_matmul_peak_gflops"),
                                    "labkit_separate": separate.get("fp32_matmul_peak_gflops") if separate else None,
                                    "trl": trl.get("fp32_matmul_peak_gflops")},
    }
    emit(out)


if __name__ == "__main__":
    main()
