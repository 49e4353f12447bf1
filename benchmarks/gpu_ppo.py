"""labkit's PPO update on a GPU at the paper's model size: against the chip's matmul peak and TRL 0.19.1.

One command measures everything, each part in its own process (a crash or hang in one is recorded and the
rest still run), and prints one JSON line per part; every line also goes to --results
(benchmarks/results/gpu_ppo.jsonl by default), tagged with the run's id and the GPU's name:

  peak      the matmul peak of this device in its compute dtype (bf16 on a GPU: 8192^3 products on random
            data), measured in this process; ppo_step.py measures its own again around every update and uses
            those for its MFU
  model     a GPT-2 774M folder with random weights (gpt2-large's shapes: 36 layers, d_model 1280, 20 heads,
            vocabulary 50,257; timing only, nothing downloaded) and the embedded model's tokenizer (its ids are
            below 49,152, inside GPT-2's vocabulary)
  shared    benchmarks/ppo_step.py on that folder, shared value head (the paper's design): seconds per update
            and its split (generation / scoring / optimisation), generation tokens/s, MFU of the whole update
            and of the optimisation phase (FLOP formula: ppo_step.py's docstring), peak GPU memory;
            --profile-dir adds one profiled update's operator table
  trl       benchmarks/trl_ppo_step.py: TRL 0.19.1's PPOTrainer on the same folder and shapes, in its own
            environment (--trl-python, --trl-pythonpath: TRL needs transformers 4.x, labkit 5.x)
  separate  labkit with a separate value model (TRL's design)
  micro     labkit's shared head once more at --also-micro-batch (gradient accumulation, as on a CPU)
  decode    benchmarks/gpu_decode.py: one rollout's decode loop as labkit runs it, over a static KV cache, and
            with each step replayed from a CUDA graph (same tokens checked)
  mock      benchmarks/mock_sentiment.py --reuse on the embedded model, end to end, with the labels already in
            --mock-out (made on a CPU and carried: sampling labels is not what this times)
  summary   labkit's speed over TRL's, the phase shares, and the GPU issue's goals met or not

Shapes (the paper's style tasks, per GPU): batch 64 rollouts, query 64, response 24, 4 PPO epochs, one
minibatch, micro-batch 64 (no accumulation: the model and its activations fit). Precision: fp32 weights.
labkit runs every matmul under bf16 autocast on a GPU (its default); TRL's `bf16=True` autocasts only its
training forwards (accelerate wraps the model it trains), so its generation and scoring passes run in fp32:
that is TRL's behaviour with that setting, and trl_ppo_step.py reports it (`autocast`).

    python benchmarks/gpu_ppo.py --trl-python /tmp/trlvenv/bin/python --mock-out runs/mock_gpu --also-micro-batch 16
    python benchmarks/gpu_ppo.py --parts mock --mock-out runs/mock_gpu    # one part alone
    python benchmarks/gpu_ppo.py --summarise      # a summary of the newest record of each part in --results
    python benchmarks/gpu_ppo.py --size tiny      # a 2-layer GPT-2 and tiny shapes on a CPU: the test suite's check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

# gpt2-large (the paper's 774M model) and a 2-layer model of the same family for the CPU check
SIZES = {
    "large": dict(n_embd=1280, n_layer=36, n_head=20),
    "tiny": dict(n_embd=64, n_layer=2, n_head=4),
}
SHAPES = {
    "large": dict(batch=64, query=64, response=24, epochs=4, micro_batch=64, updates=2),
    "tiny": dict(batch=8, query=64, response=4, epochs=1, micro_batch=4, updates=1),
}
PARTS = ("shared", "trl", "separate", "decode", "micro", "mock")
# The goals (a GPU and the large size only)
GOAL_SPEEDUP, GOAL_TRAINING_MFU, GOAL_MOCK_SECONDS = 2.0, 0.40, 60.0


def write_random_gpt2(folder: Path, size: str, tokenizer_dir: Path, device: str) -> dict:
    """A GPT-2 of `size` with random weights (transformers' own initialisation, seed 0) and the tokenizer of
    `tokenizer_dir`, saved as a model folder that load_lm and TRL's loader both read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    config = GPT2Config(vocab_size=50257, n_positions=1024, **SIZES[size])
    torch.manual_seed(0)
    with torch.device(device):  # initialising 774M weights on a CPU takes a while; on the GPU it is instant
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    return {"params": n, **SIZES[size], "vocab": config.vocab_size}


def run_part(name: str, cmd: list[str], log, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run one part in its own process; its output goes to this process's stdout and to `log`. Returns its last
    JSON line, or a record of how it failed."""
    print(f"+ {' '.join(cmd)}", flush=True)
    log.write(f"\n===== {name}: {' '.join(cmd)}\n")
    log.flush()
    t0 = time.time()
    lines: list[str] = []
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})})
        watchdog = threading.Timer(timeout, proc.kill) if timeout else None  # a hung part must not stop the rest
        if watchdog:
            watchdog.start()
        for line in proc.stdout:  # one part's output, streamed
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            lines.append(line.rstrip("\n"))
        rc = proc.wait()
        if watchdog:
            watchdog.cancel()
    except OSError as err:  # e.g. no such interpreter
        return {"part": name, "error": f"{type(err).__name__}: {err}"}
    finally:
        log.flush()
    records = [x for x in lines if x.startswith("{")]
    if rc != 0 or not records:
        tail = " | ".join(lines[-3:])[-600:]
        return {"part": name, "error": f"exit status {rc} after {time.time() - t0:.0f} s: {tail}"}
    return {"part": name, **json.loads(records[-1]), "wall_s": round(time.time() - t0, 1)}


def summarise(records: dict, on_gpu: bool, size: str) -> dict:
    """Ratios and the GPU issue's goals from the parts' records (a goal whose part failed is None)."""
    shared, separate, trl, mock = (records.get(k, {}) for k in ("shared", "separate", "trl", "mock"))
    out = {"part": "summary"}

    def ok(r):
        return bool(r) and "error" not in r

    if ok(shared) and ok(trl):
        out["speedup_shared_vs_trl"] = round(trl["seconds_per_update"] / shared["seconds_per_update"], 2)
    if ok(separate) and ok(trl):
        out["speedup_separate_vs_trl"] = round(trl["seconds_per_update"] / separate["seconds_per_update"], 2)
    if ok(shared):
        phases = {k: shared[f"{k}_s"] for k in ("generation", "scoring", "optimization")}
        out["shared_largest_phase"] = max(phases, key=phases.get)
        # shares of the three phases' sum: each phase is a median over updates, so the medians need not add up
        # to the median update time
        out["shared_phase_shares"] = {k: round(v / sum(phases.values()), 3) for k, v in phases.items()}
    if ok(mock):
        out["mock_seconds"] = mock.get("seconds")
    decode = records.get("decode", {})
    if ok(decode) and decode.get("eager_s") and decode.get("graph_s"):
        out["decode_graph_speedup"] = round(decode["eager_s"] / decode["graph_s"], 2)
    if on_gpu and size == "large":
        out["goals"] = {
            "ppo_update_2x_trl": out["speedup_shared_vs_trl"] >= GOAL_SPEEDUP if "speedup_shared_vs_trl" in out else None,
            "training_mfu_40pct": shared["training_mfu"] >= GOAL_TRAINING_MFU if ok(shared) else None,
            "generation_not_largest": out["shared_largest_phase"] != "generation" if ok(shared) else None,
            "mock_sentiment_under_60s": out["mock_seconds"] < GOAL_MOCK_SECONDS if ok(mock) else None,
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="large")
    for k, v in SHAPES["large"].items():
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"default {v} (tiny: {SHAPES['tiny'][k]})")
    p.add_argument("--also-micro-batch", type=int, default=None,
                   help="part 'micro': one more shared-head run at this micro-batch (gradient accumulation), e.g. 16 as on a CPU")
    p.add_argument("--workdir", default=None, help="where the random model folder goes (default: a temporary one)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded model's, labkit's cache)")
    p.add_argument("--trl-python", default=None, help="TRL's interpreter; without it the TRL part is not run")
    p.add_argument("--trl-pythonpath", default=None, help="PYTHONPATH for TRL's process (its wheels, installed with --target)")
    p.add_argument("--mock-out", default=None,
                   help="a mock_sentiment.py --out folder holding labels.db; without it the mock part is not run")
    p.add_argument("--mock-args", default="", help="extra arguments for mock_sentiment.py, e.g. '--quick'")
    p.add_argument("--profile-dir", default=None, help="write the shared-head run's profiled update here")
    p.add_argument("--log", default=None, help="all parts' output (default: <workdir>/gpu_ppo.log)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "gpu_ppo.jsonl"),
                   help="JSON lines file the records are appended to")
    p.add_argument("--part-timeout", type=float, default=900.0, help="seconds before a part is stopped")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)} (peak and model always run, except for mock alone)")
    p.add_argument("--summarise", action="store_true",
                   help="run nothing: append a summary of the newest record of each part in --results (parts measured "
                        "by separate commands, e.g. when the embedded model had to travel to the GPU on its own)")
    args = p.parse_args(argv)
    if args.summarise:
        latest = {}
        for line in Path(args.results).read_text().splitlines():
            r = json.loads(line)
            if r["part"] != "summary":
                latest[r["part"]] = r
        rec = {"run": time.strftime("%Y-%m-%dT%H:%M:%S"), "gpu": latest.get("peak", {}).get("gpu"),
               "size": latest.get("shared", {}).get("size"), "from_runs": sorted({r["run"] for r in latest.values()}),
               **summarise(latest, latest.get("peak", {}).get("gpu") is not None, latest.get("shared", {}).get("size"))}
        print(json.dumps(rec))
        with open(args.results, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        p.error(f"unknown parts {sorted(parts - set(PARTS))}; choose from {','.join(PARTS)}")
    for k, v in SHAPES[args.size].items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    import tempfile

    import torch

    from ppo_step import matmul_peak_gflops

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    compute = torch.bfloat16 if on_gpu else torch.float32  # what labkit's matmuls run in there by default
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    gpu = torch.cuda.get_device_name() if on_gpu else None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="labkit-gpu-ppo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    log = open(args.log or workdir / "gpu_ppo.log", "a")
    records: dict[str, dict] = {}

    def record(rec: dict) -> None:
        rec = {"run": run_id, "gpu": gpu, "size": args.size, **rec}
        records[rec["part"]] = rec
        line = json.dumps(rec)
        print(line, flush=True)
        log.write(line + "\n")
        with open(results, "a") as f:
            f.write(line + "\n")

    lab_env = {"PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)}
    if parts != {"mock"}:  # the mock run needs neither the peak nor the random model
        peaks = sorted(matmul_peak_gflops(device, compute) for _ in range(3))
        record({"part": "peak", "device": str(device), "dtype": str(compute).removeprefix("torch."),
                "matmul_peak_gflops": round(peaks[1], 1), "range_gflops": [round(peaks[0], 1), round(peaks[-1], 1)],
                "torch": torch.__version__, **({"cuda": torch.version.cuda} if on_gpu else {})})

        from labkit.models import embedded_model_dir

        folder = workdir / f"gpt2-{args.size}-random"
        t0 = time.time()
        info = write_random_gpt2(folder, args.size, Path(args.tokenizer) if args.tokenizer else embedded_model_dir(),
                                 "cuda" if on_gpu else "cpu")
        record({"part": "model", "folder": str(folder), **info, "seconds": round(time.time() - t0, 1)})
        shapes = ["--batch", str(args.batch), "--query", str(args.query), "--response", str(args.response),
                  "--epochs", str(args.epochs), "--updates", str(args.updates)]
        ppo_step = [sys.executable, "benchmarks/ppo_step.py", "--model", str(folder), *shapes]
        micro = ["--micro-batch", str(args.micro_batch)]
        profile = ["--profile", str(Path(args.profile_dir) / "profile_shared.txt")] if args.profile_dir else []

    # in order of importance: a run cut short by its time limit loses the last ones
    if "shared" in parts:
        record(run_part("shared", [*ppo_step, *micro, *profile], log, lab_env, args.part_timeout))
    if "trl" in parts and args.trl_python:
        trl_env = {"PYTHONPATH": args.trl_pythonpath} if args.trl_pythonpath else {}
        record(run_part("trl", [args.trl_python, "benchmarks/trl_ppo_step.py", "--model", str(folder), *shapes, *micro],
                        log, trl_env, args.part_timeout))
    if "separate" in parts:
        record(run_part("separate", [*ppo_step, *micro, "--value", "separate"], log, lab_env, args.part_timeout))
    if "decode" in parts:
        record(run_part("decode", [sys.executable, "benchmarks/gpu_decode.py", "--model", str(folder), "--batch",
                                   str(args.batch), "--query", str(args.query), "--response", str(args.response)],
                        log, lab_env, args.part_timeout))
    if "micro" in parts and args.also_micro_batch:
        record(run_part("micro", [*ppo_step, "--micro-batch", str(args.also_micro_batch)], log, lab_env, args.part_timeout))
    if "mock" in parts and args.mock_out:
        record(run_part("mock", [sys.executable, "benchmarks/mock_sentiment.py", "--reuse", "--out", args.mock_out,
                                 *args.mock_args.split()], log, lab_env, args.part_timeout))
    record(summarise(records, on_gpu, args.size))
    log.close()


if __name__ == "__main__":
    main()
