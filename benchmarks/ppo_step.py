"""Seconds per PPO update on the embedded model, its split, peak memory and MFU.

Sentiment-task shapes: batch 64 rollouts, query 64 tokens, response 24, 4 PPO epochs, 1 minibatch
(split into micro-batches for gradient accumulation). The reward is a reward model (an LM trunk plus a
scalar head) as in a real run. Prints one JSON line at the end.

MFU counts matmul FLOPs honestly (attention scores ignored, ~2%), with N = the trunk's matmul weights
(all Linear layers inside the transformer blocks), M = those of the last block's MLP, H = d_model * vocab
(the LM head), B = batch, Q = query, R = response, T = Q + R, E = PPO epochs:
  generation  2*N*B*(T-1) + 2*H*B*R - 2*M*B*(Q-1)   (prefill + one token at a time with a KV cache; the
              prefill reads one position, so the last block's MLP runs there only: labkit/speed/last_mlp.py)
  scoring     rho: 2*N*B*T + 2*H*B*(R+1) - 2*M*B*(Q-1) (its own query prefill, then the R response positions);
              pi (old log-probs and shared values): 2*N*B*R + 2*H*B*R (the R response positions only,
              continuing from the sampler's query prefix); reward model: 2*N*B*T - 2*M*B*(T-R) (its last
              block's MLP at the scored positions, at most R distinct ones: counted as R);
              a separate value model adds nothing here: with one minibatch its old values come from
              its first training epoch's forward (PPOTrainer._first_value_epoch)
  training    E * 3 * (2*N*B*(T-1) + 2*H*B*R - 2*M*B*(T-1-R))  (forward + backward = 3x forward; the last
              response token is input to nothing, so positions 0 .. T-2 run, and the last block's MLP only at
              the R read; not that with gradient checkpointing); separate value model: + E * 3 * (2*N*B*(T-1)
              - 2*M*B*(T-1-R)); LoRA: backward ~1x forward (no weight grads), so 2x
and divides by the measured time and a matmul peak measured in this process on the model's device, in the
dtype the matmuls run in: fp32 on CPU; bf16 on CUDA (fp32 weights, bf16 autocast), where the peak is that of
large 8192^3 products, so a 135M model's small matmuls reach only a few percent of it. The peak is measured
before the first update and after every update and the median used: on this shared machine it moved
between 151 and 261 GFLOP/s from run to run.

    python benchmarks/ppo_step.py                      # shared value head (the paper's default)
    python benchmarks/ppo_step.py --value separate     # TRL's design: a separate value model
    python benchmarks/ppo_step.py --lora-r 16
    python benchmarks/ppo_step.py --bf16-autocast     # CPU: fp32 weights, bf16 matmuls (AVX512-BF16 / AMX)
    python benchmarks/ppo_step.py --gradient-checkpointing   # less memory, more compute
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
from record import emit  # this script's folder is on sys.path


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """Matrix-product GFLOP/s on this device and dtype: 2048^2 on CPU, 8192^2 on CUDA."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def _matmul_weights(module) -> int:
    """Weights of the matrix products in `module`: nn.Linear, and GPT-2's Conv1D (a Linear with its weight
    transposed; counting only nn.Linear would give GPT-2 a trunk of zero FLOPs)."""
    from transformers.pytorch_utils import Conv1D

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))


def trunk_matmul_params(model) -> int:
    from labkit.sampling import unwrap

    base = unwrap(model)
    return _matmul_weights(getattr(base, base.base_model_prefix))


def last_mlp_matmul_params(model) -> int:
    """M: the matmul weights of the last transformer block's MLP (what `prune_last_mlp` skips at unread positions)."""
    from labkit.speed.blocks import transformer_blocks

    return _matmul_weights(transformer_blocks(model)[-1].mlp)


def update_flops(N, H, M, B, Q, R, E, value, lora, checkpointing=False) -> dict:
    T = Q + R
    gen = 2 * N * B * (T - 1) + 2 * H * B * R - 2 * M * B * (Q - 1)
    rho = 2 * N * B * T + 2 * H * B * (R + 1) - 2 * M * B * (Q - 1)
    pi = 2 * N * B * R + 2 * H * B * R
    score = rho + pi + 2 * N * B * T - 2 * M * B * (T - R)  # a separate value model's old values: from its training forward
    mult = 2 if lora else 3
    pass_ = 2 * N * B * (T - 1) - (0 if checkpointing else 2 * M * B * (T - 1 - R))  # one training pass's trunk
    train = E * mult * (pass_ + 2 * H * B * R) + (E * 3 * pass_ if value == "separate" else 0)
    # gradient checkpointing's recomputed forward is not counted: it is not the model's work, only the method's
    return {"generation": gen, "scoring": score, "training": train, "total": gen + score + train}


def sentiment_trainer(policy, tok, batch, query, response, epochs, micro_batch, value="shared", lora_r=0,
                      gradient_checkpointing=False):
    """A PPOTrainer at the benchmark's shapes, against an untrained reward model copied from the policy."""
    from labkit.data import load_prompts
    from labkit.rl import PPOConfig, PPOTrainer
    from labkit.reward import reward_model_from_lm
    from labkit.tasks import SENTIMENT

    # Exact shapes: queries of exactly `query` tokens (no sentence trimming), `response` new tokens.
    task = SENTIMENT.with_(query_length=query, response_length=response, start_after=None, end_at=None)
    passages = [p.text for p in load_prompts(task, "all")]
    prompts = [" ".join(passages[i : i + 3]) for i in range(0, len(passages) - 3, 3)]
    rm = reward_model_from_lm(policy, tok).requires_grad_(False)
    trainer = PPOTrainer(policy, tok, task, rm, prompts, verbose=False, config=PPOConfig(
        batch_size=batch, micro_batch_size=micro_batch, ppo_epochs=epochs, total_updates=100,
        value_model=value, lora_r=lora_r, lr=1e-5 if not lora_r else 1e-4, gradient_checkpointing=gradient_checkpointing))
    assert all(len(q) == query for q in trainer.queries[:8]), "prompts too short for the query length"
    return trainer


def write_profile(trainer, device, path: str) -> None:
    """One more update under torch.profiler; its operator table (top 40 by device time on a GPU, and top 40 by
    CPU time) goes to `path`. A GPU whose busy time is far below the update's wall time waits on the host."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        m = trainer.step()
    table = prof.key_averages()
    lines = [f"profiled update: {m['time/step']:.3f} s (generation {m['time/generation']:.3f}, "
             f"scoring {m['time/scoring']:.3f}, optimisation {m['time/optimization']:.3f}; slower than unprofiled)"]
    if device.type == "cuda":
        # kernels only: an operator's self device time is the time of its kernels, which are rows of their own
        busy = sum(e.self_device_time_total for e in table if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
        try:
            by_device = table.table(sort_by="self_device_time_total", row_limit=40)
        except (AttributeError, KeyError, ValueError):  # older torch names it after CUDA
            by_device = table.table(sort_by="self_cuda_time_total", row_limit=40)
        lines += [f"GPU busy (sum of kernel times): {busy:.3f} s", by_device]
    lines.append(table.table(sort_by="self_cpu_time_total", row_limit=40))
    with open(path, "w") as f:
        f.write("\n\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a load_lm name or a local model folder")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--query", type=int, default=64)
    p.add_argument("--response", type=int, default=24)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=16, help="gradient accumulation chunk")
    p.add_argument("--value", choices=["shared", "separate"], default="shared")
    p.add_argument("--lora-r", type=int, default=0)
    p.add_argument("--updates", type=int, default=4, help="measured updates after one warm-up (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the blocks' activations in backward (less memory, ~1/3 more training compute)")
    p.add_argument("--bf16-autocast", action="store_true",
                   help="bf16 matmuls on a CPU too (weights stay fp32); on CUDA they are the default")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="after the measured updates, run one more under torch.profiler and write its table of "
                        "operators (by device time, then by CPU time) to FILE: where an update's time goes")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from labkit.models import load_lm

    policy, tok = load_lm(args.model, bf16_autocast=True if args.bf16_autocast else None)
    device, dtype = next(policy.parameters()).device, next(policy.parameters()).dtype
    bf16 = args.bf16_autocast or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    compute_dtype = torch.bfloat16 if bf16 else dtype
    peaks = [matmul_peak_gflops(device, compute_dtype)]  # measured again after every update, median used
    fp32_peak = matmul_peak_gflops(device, torch.float32) if compute_dtype != torch.float32 else None  # fp32: set below
    trainer = sentiment_trainer(policy, tok, args.batch, args.query, args.response, args.epochs, args.micro_batch,
                                args.value, args.lora_r, args.gradient_checkpointing)

    runs = []
    for i in range(args.updates + 1):
        m = trainer.step()
        print(f"update {i}{' (warm-up)' if i == 0 else ''}: {m['time/step']:.1f} s "
              f"(generation {m['time/generation']:.1f}, scoring {m['time/scoring']:.1f}, optimisation {m['time/optimization']:.1f})",
              flush=True)
        if i > 0:
            runs.append(m)
        peaks.append(matmul_peak_gflops(device, compute_dtype))
    if args.profile:
        write_profile(trainer, device, args.profile)
    med = statistics.median(m["time/step"] for m in runs)
    peak = statistics.median(peaks)
    if compute_dtype == torch.float32:
        fp32_peak = peak
    split = {k: statistics.median(m[f"time/{k}"] for m in runs) for k in ("generation", "scoring", "optimization")}
    N = trunk_matmul_params(trainer.policy)
    H = policy.config.hidden_size * policy.config.vocab_size
    M = last_mlp_matmul_params(trainer.policy)
    flops = update_flops(N, H, M, args.batch, args.query, args.response, args.epochs, args.value, args.lora_r > 0,
                         args.gradient_checkpointing)
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "benchmark": "ppo_step", "model": args.model, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "value": args.value, "lora_r": args.lora_r,
        "batch": args.batch, "query": args.query, "response": args.response, "epochs": args.epochs,
        "micro_batch": args.micro_batch, "threads": args.threads, "gradient_checkpointing": args.gradient_checkpointing,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),  # glibc's, when set (ppo_side_by_side --also-lean)
        # four decimals: the tiny CPU check's phases take hundredths of a second
        "seconds_per_update": round(med, 4), "episodes_per_s": round(args.batch / med, 3),
        "generation_s": round(split["generation"], 4), "scoring_s": round(split["scoring"], 4),
        "optimization_s": round(split["optimization"], 4), "peak_rss_gib": round(peak_rss_gib, 2),
        **({"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)} if device.type == "cuda" else {}),
        "flops_per_update": f"{flops['total']:.3e}", "matmul_peak_gflops": round(peak, 1),
        "matmul_peak_range_gflops": [round(min(peaks), 1), round(max(peaks), 1)],
        "fp32_matmul_peak_gflops": round(fp32_peak, 1),
        "achieved_gflops": round(flops["total"] / med / 1e9, 1), "mfu": round(flops["total"] / med / (peak * 1e9), 3),
        # the optimisation phase alone (step 4-7: rewards, GAE, the PPO epochs), against its own FLOPs
        "training_mfu": round(flops["training"] / split["optimization"] / (peak * 1e9), 3),
        "generation_tokens_per_s": round(args.batch * args.response / split["generation"], 1),
        "flop_formula": "N=%d trunk matmul params, M=%d last block's MLP, H=%d head params; see the module docstring" % (N, M, H),
    }
    emit(result)


if __name__ == "__main__":
    main()
