"""TRL 0.19.1's PPOTrainer on the shapes of benchmarks/ppo_step.py: seconds per PPO update, its split, peak RSS.

Why: to put labkit's PPO update time next to a widely used PPO implementation on the same model, shapes and
threads, measured on this machine (benchmarks/ppo_side_by_side.py runs both back to back).

Setup as benchmarks/ppo_step.py: the embedded SmolLM2-135M, fp32 on CPU, batch 64 rollouts per update,
queries of exactly 64 tokens, 24 response tokens (stop_token None, so all 24 are always generated; no
missing-EOS penalty), temperature 0.7, 4 PPO epochs, 1 minibatch of 64 split into micro-batches of 16 for
gradient accumulation, AdamW (the Trainer's default, fused), lr 1e-5. TRL's design: policy, ref_model,
reward_model and value_model are four separate models, all loaded from the same folder (reward and value
as AutoModelForSequenceClassification(num_labels=1), the reward head untrained: speed only). No eval,
saving, logging or sample generations (num_sample_generations=0).

TRL's batch arithmetic (ppo_trainer.py, one process): local_batch_size = per_device_train_batch_size *
gradient_accumulation_steps = --micro-batch * (--batch / --micro-batch) = --batch rollouts per update;
local_mini_batch_size = local_batch_size / num_mini_batches (1) = --batch; each PPO epoch runs --batch /
--micro-batch micro-batches under accelerator.accumulate and one optimiser step. Generation and the
no-grad scoring passes run in chunks of local_rollout_forward_batch_size (--rollout-batch, TRL's default 64).

Queries: labkit/demo_data/passages.jsonl (read with json; labkit is not importable in the TRL venv), all
passages joined by spaces, tokenised without special tokens, cut into consecutive --query-token windows.

Device and precision (--device, --bf16): on a CPU fp32 by default; on CUDA (the default where there is one)
TRL's `bf16=True` by default, as labkit runs bf16 autocast on CUDA: accelerate's mixed precision, bf16 autocast
over fp32 weights. TRL applies it only where accelerate wraps the model, i.e. the training forwards of the
PolicyAndValueWrapper; generation (the unwrapped policy's generate) and the no-grad ref, reward and value
forwards of scoring run in the weights' fp32, and the JSON's "autocast" field reports what was seen in each
phase. On CUDA the timing points below synchronize the device first, so the host's clock measures finished work.

Timing: one warm-up update, then --updates measured updates; an update runs from the end of the previous
one (a TrainerCallback's on_step_end) to its own on_step_end, so it includes TRL's per-update clean-up
(gc.collect) and data loading. The matmul peak in the compute dtype (the same function as ppo_step.py:
2048^3 on a CPU, 8192^3 on CUDA; bf16 with --bf16) is measured before the first update and inside
on_step_end after every update (excluded from the update times), and the median used; with --bf16 the fp32
peak is also measured once, before the first update. Split: generation_s = time inside policy.generate;
scoring_s = from the end of generation to the first training forward (ref, value and reward forwards,
log-probs from the generation scores, GAE); optimization_s = from the first training forward to on_step_end
(PPO epochs, metrics); overhead_s = the rest (clean-up between updates, data loading).

The model is labkit's converted embedded model, $LABKIT_CACHE/models/smollm2-135m (default ~/.cache/labkit),
written by transformers 5 and loaded here with transformers 4.x as in trl_reward_train.py; --model takes any
such folder, e.g. the random GPT-2 that benchmarks/gpu_ppo.py writes (GPT2LMHeadModel and
GPT2ForSequenceClassification through the Auto classes, with the embedded model's tokenizer).

Setup (once): see benchmarks/trl_reward_train.py (/tmp/trlvenv with torch 2.13.0, trl 0.19.1, transformers 4.57.6).
On a machine whose python already has torch, accelerate and their kin but a transformers 5 (a GPU image), the
TRL side's wheels go into their own folder, put first on the path:
    pip install --no-index --no-deps --target /tmp/site_trl WHEELS && PYTHONPATH=/tmp/site_trl python3 benchmarks/trl_ppo_step.py ...
Run:
    /tmp/trlvenv/bin/python benchmarks/trl_ppo_step.py --updates 3 --threads 2
    /tmp/trlvenv/bin/python benchmarks/trl_ppo_step.py --batch 8 --micro-batch 4 --response 4 --epochs 1 --updates 1   # smoke test
    python3 benchmarks/trl_ppo_step.py --model GPT2_FOLDER --micro-batch 64 --updates 2   # CUDA: bf16 by default
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from ppo_step import matmul_peak_gflops  # this script's folder is on sys.path; ppo_step imports labkit lazily
from record import emit  # this script's folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent


def default_model_dir() -> Path:
    """labkit.models.embedded_model_dir(), without importing labkit (it needs transformers 5)."""
    return Path(os.environ.get("LABKIT_CACHE", Path.home() / ".cache" / "labkit")).expanduser() / "models" / "smollm2-135m"


def load_tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(folder)  # v5's "TokenizersBackend" class is unknown to 4.x
    if tok.unk_token is not None and tok.unk_token_id != tok.eos_token_id:
        tok.pad_token = tok.unk_token  # as labkit.models._setup_tokenizer: <|endoftext|>, id 0, distinct from EOS
    return tok


def load_model(folder: Path, cls, tok, **config_kwargs):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, **config_kwargs)
    rope = getattr(config, "rope_parameters", None)  # transformers 5 layout; 4.x reads rope_theta
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
    config.pad_token_id = tok.pad_token_id  # the sequence-classification head pools the last non-pad token
    model = cls.from_pretrained(folder, config=config, dtype=torch.float32)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model


def query_windows(tok, length: int, passages: Path) -> list[list[int]]:
    texts = [json.loads(line)["text"] for line in passages.read_text().splitlines() if line.strip()]
    ids = tok(" ".join(texts), add_special_tokens=False).input_ids
    windows = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    # TRL masks every pad-id token as padding: a query must not contain one, or it would be shorter than --query
    windows = [w for w in windows if tok.pad_token_id not in w]
    return windows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder (default: labkit's converted embedded model)")
    p.add_argument("--batch", type=int, default=64, help="rollouts per update")
    p.add_argument("--query", type=int, default=64, help="query tokens (exact)")
    p.add_argument("--response", type=int, default=24, help="response tokens (all generated: no stop token)")
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs per update")
    p.add_argument("--micro-batch", type=int, default=16, help="per_device_train_batch_size (gradient accumulation chunk)")
    p.add_argument("--rollout-batch", type=int, default=64,
                   help="local_rollout_forward_batch_size: rollouts per generate / no-grad scoring call (TRL's default 64)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--updates", type=int, default=3, help="measured updates after one warm-up (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where TRL's accelerator puts the four models (default: cuda where there is one)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="TRL's bf16=True: bf16 autocast over fp32 weights (default: on with cuda, off on cpu)")
    p.add_argument("--passages", default=str(ROOT / "labkit" / "demo_data" / "passages.jsonl"))
    args = p.parse_args()
    if args.batch % args.micro_batch:
        raise SystemExit("--batch must be a multiple of --micro-batch")
    if args.bf16 is None:
        args.bf16 = args.device == "cuda"  # as labkit: bf16 autocast by default on CUDA only
    torch.set_num_threads(args.threads)

    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PrinterCallback, TrainerCallback
    from transformers.trainer_callback import ProgressCallback
    from trl import PPOConfig, PPOTrainer

    folder = Path(args.model) if args.model else default_model_dir()
    if not (folder / "config.json").exists():
        raise SystemExit(f"{folder} has no model: run `.venv/bin/python -m labkit.models --prepare` first, or pass --model.")
    device = torch.device(args.device)
    compute_dtype = torch.bfloat16 if args.bf16 else torch.float32
    peaks = [matmul_peak_gflops(device, compute_dtype)]
    fp32_peak = matmul_peak_gflops(device, torch.float32) if args.bf16 else None  # fp32: the median of peaks, below
    # the host's clock reads finished work only after the device's queue is drained
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    tok = load_tokenizer(folder)
    windows = query_windows(tok, args.query, Path(args.passages))
    if len(windows) < args.batch:
        raise SystemExit(f"only {len(windows)} query windows of {args.query} tokens, {args.batch} needed")
    policy = load_model(folder, AutoModelForCausalLM, tok)
    ref_policy = load_model(folder, AutoModelForCausalLM, tok)
    reward_model = load_model(folder, AutoModelForSequenceClassification, tok, num_labels=1)
    value_model = load_model(folder, AutoModelForSequenceClassification, tok, num_labels=1)

    clock = {"gen": 0.0}

    # generation: time inside the policy's generate (TRL calls unwrapped_model.policy.generate)
    generate = policy.generate

    def timed_generate(*a, **kw):
        sync()
        t0 = time.perf_counter()
        clock["in_gen"] = True
        try:
            return generate(*a, **kw)
        finally:
            sync()
            clock["gen_end"] = time.perf_counter()
            clock["gen"] += clock["gen_end"] - t0
            clock["in_gen"] = False

    policy.generate = timed_generate

    # whether autocast is on when the four models' trunks run, by phase: TRL autocasts only what accelerate wrapped
    # (the PolicyAndValueWrapper's forward), so --bf16 does not reach generation or scoring
    autocast = {"generation": set(), "scoring": set(), "optimization": set()}

    def autocast_probe(module, inputs):
        phase = "generation" if clock.get("in_gen") else "optimization" if "train_start" in clock else "scoring"
        autocast[phase].add(torch.is_autocast_enabled(device.type))

    for m in (policy, ref_policy, reward_model, value_model):  # TRL calls the reward and value models' trunks directly
        getattr(m, m.base_model_prefix).register_forward_pre_hook(autocast_probe)

    class Timer(TrainerCallback):
        def __init__(self):
            self.updates = []  # one dict per update

        def on_train_begin(self, a, state, control, **kw):
            sync()
            self.t_resume = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync()
            t = time.perf_counter()
            total = t - self.t_resume
            gen, scoring = clock["gen"], clock["train_start"] - clock["gen_end"]
            opt = t - clock["train_start"]
            self.updates.append({"step": total, "generation": gen, "scoring": scoring, "optimization": opt,
                                 "overhead": total - gen - scoring - opt})
            clock["gen"] = 0.0
            clock.pop("train_start")
            peaks.append(matmul_peak_gflops(device, compute_dtype))  # not counted: t_resume is taken after it
            self.t_resume = time.perf_counter()

    timer = Timer()
    n_updates = args.updates + 1
    cfg = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-"), exp_name="trl_ppo_step", seed=0,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.batch // args.micro_batch,
        num_mini_batches=1, num_ppo_epochs=args.epochs, total_episodes=args.batch * n_updates,
        local_rollout_forward_batch_size=args.rollout_batch, response_length=args.response,
        temperature=args.temperature, stop_token=None, stop_token_id=None, missing_eos_penalty=None,
        num_sample_generations=0, learning_rate=1e-5, bf16=args.bf16, fp16=False, use_cpu=device.type == "cpu",
        gradient_checkpointing=False, report_to=[], logging_strategy="no", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, push_to_hub=False)
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, train_dataset=Dataset.from_dict({"input_ids": windows}),
                         value_model=value_model, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # it prints the metrics dict of every update
    trainer.remove_callback(ProgressCallback)
    a = trainer.args
    assert (a.local_batch_size, a.local_mini_batch_size, a.num_total_batches) == (args.batch, args.batch, n_updates), \
        (a.local_batch_size, a.local_mini_batch_size, a.num_total_batches)

    # first training forward of an update: the PolicyAndValueWrapper is only called in the PPO epochs
    def first_train_forward(module, inputs):
        if "train_start" not in clock:
            sync()  # once per update: scoring's queued work belongs to scoring
            clock["train_start"] = time.perf_counter()

    trainer.accelerator.unwrap_model(trainer.model).register_forward_pre_hook(first_train_forward)

    trainer.train()
    assert len(timer.updates) == n_updates, timer.updates
    for i, u in enumerate(timer.updates):
        print(f"update {i}{' (warm-up)' if i == 0 else ''}: {u['step']:.1f} s (generation {u['generation']:.1f}, "
              f"scoring {u['scoring']:.1f}, optimisation {u['optimization']:.1f}, overhead {u['overhead']:.1f})", flush=True)
    runs = timer.updates[1:]
    med = {k: statistics.median(u[k] for u in runs) for k in runs[0]}
    peak = statistics.median(peaks)
    if not args.bf16:
        fp32_peak = peak
    weights = next(trainer.model.parameters())
    assert weights.device.type == device.type, (weights.device, device)  # TRL's accelerator placed the models
    result = {
        "benchmark": "trl_ppo_step", "trl": trl.__version__, "torch": torch.__version__,
        "model": args.model or "smollm2-135m", "device": str(weights.device),
        "dtype": str(weights.dtype).removeprefix("torch."), "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bf16": args.bf16,
        "autocast": {k: v.pop() if len(v) == 1 else sorted(v) for k, v in autocast.items()}, "value": "separate",
        "batch": args.batch, "query": args.query, "response": args.response, "epochs": args.epochs,
        "micro_batch": args.micro_batch, "rollout_batch": args.rollout_batch, "threads": torch.get_num_threads(),
        "optim": getattr(a.optim, "value", str(a.optim)), "updates": args.updates,
        "seconds_per_update": round(med["step"], 2), "episodes_per_s": round(args.batch / med["step"], 3),
        "generation_s": round(med["generation"], 2), "scoring_s": round(med["scoring"], 2),
        "optimization_s": round(med["optimization"], 2), "overhead_s": round(med["overhead"], 2),
        "update_seconds": [round(u["step"], 2) for u in runs],
        "warmup_seconds": round(timer.updates[0]["step"], 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        **({"peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)} if device.type == "cuda" else {}),
        "matmul_peak_gflops": round(peak, 1), "matmul_peak_range_gflops": [round(min(peaks), 1), round(max(peaks), 1)],
        "fp32_matmul_peak_gflops": round(fp32_peak, 1),
    }
    emit(result)


if __name__ == "__main__":
    main()
