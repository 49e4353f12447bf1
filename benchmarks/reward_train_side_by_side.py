"""labkit's RewardTrainer vs TRL 0.19.1's RewardTrainer, back to back on the same comparisons.

Runs benchmarks/reward_train.py with labkit's venv (it also dumps its comparisons), then
benchmarks/trl_reward_train.py with the TRL venv on that dump, and prints both JSON lines and a last one
with ratio = labkit comparisons/s / TRL comparisons/s (both per 4-way comparison; see the TRL script for
how a 4-way label becomes 3 pairs). Standard library only: run it with any python3.

TRL venv, once (torch as the Makefile pins it; the CPU wheel comes from this machine's pip config):
    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install -q torch==2.13.0 trl==0.19.1 transformers==4.57.6 datasets accelerate
Then:
    python3 benchmarks/reward_train_side_by_side.py --batch 16 --steps 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from record import emit  # this script's folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Run a benchmark script (with extra environment variables `env`) and return its last JSON line."""
    print("+", " ".join(f"{k}={v}" for k, v in (env or {}).items()), " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})}).stdout
    line = [x for x in out.splitlines() if x.startswith("{")][-1]
    print(line, flush=True)
    return json.loads(line)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16, help="4-way comparisons per step")
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="an HF folder for both (default: the embedded SmolLM2-135M)")
    p.add_argument("--labkit-python", default=str(ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--trl-python", default="/tmp/trlvenv/bin/python")
    args = p.parse_args()

    common = ["--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        dump = str(Path(tmp) / "examples.json")
        lab = run([args.labkit_python, "benchmarks/reward_train.py", *common, "--dump-examples", dump,
                   *(["--model", args.model] if args.model else [])])
        trl = run([args.trl_python, "benchmarks/trl_reward_train.py", *common, "--examples", dump,
                   *(["--model", args.model] if args.model else [])])
    emit({"benchmark": "reward_train_side_by_side", "batch": args.batch, "steps": args.steps,
          "threads": args.threads, "labkit_comparisons_per_s": lab["comparisons_per_s"],
          "trl_comparisons_per_s": trl["comparisons_per_s"],
          "ratio": round(lab["comparisons_per_s"] / trl["comparisons_per_s"], 3)})


if __name__ == "__main__":
    main()
