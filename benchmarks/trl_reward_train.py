"""TRL 0.19.1's RewardTrainer on the same comparisons as benchmarks/reward_train.py, per 4-way comparison.

Why: to put labkit's reward-model throughput (4-way softmax loss, k = 4 sequences per comparison) next to
a widely used pairwise trainer on the same model, tokens and batch. TRL's trainer only takes pairs, so each
4-way comparison becomes 3 pairs (chosen = the labeled best, rejected = each other response): that is how
a pairwise trainer consumes a "best of 4" label (the paper's own loss uses the 4 rewards jointly). TRL runs
the chosen and the rejected sequences as two separate forward passes, so one comparison costs it 6
sequences against labkit's 4; `comparisons_per_s` counts 4-way comparisons, i.e. pairs / 3.

The comparisons are read from the file that `reward_train.py --dump-examples FILE` writes, token ids
included, and fed pre-tokenised (query ids + response ids, each encoded without special tokens, exactly as
labkit's trainer encodes them), so both trainers see the same tokens. One optimiser step = --batch
comparisons = 3 * batch pairs (labkit's step is --batch comparisons). fp32 on CPU, AdamW (the Trainer's
default, fused), linear decay, lr 5e-5 as labkit, no gradient clipping (labkit has none), no checkpointing,
no eval, no logging. One warm-up step, then --steps measured steps; a callback times on_step_begin ->
on_step_end (forward, backward, optimiser; not the data loader). `seconds_incl_data` also counts the
collation between steps, as labkit's own timing (which includes tokenising) does.

The default model is labkit's converted embedded model, $LABKIT_CACHE/models/smollm2-135m (default
~/.cache/labkit), written by transformers 5; it is loaded here with transformers 4.x as
AutoModelForSequenceClassification(num_labels=1) (rope_theta taken from v5's `rope_parameters`, the
tokenizer through PreTrainedTokenizerFast, pad = <|endoftext|> as labkit sets it).

Setup (once), with the Makefile's torch:
    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install -q torch==2.13.0 trl==0.19.1 transformers==4.57.6 datasets accelerate
Run:
    .venv/bin/python benchmarks/reward_train.py --batch 16 --steps 3 --dump-examples /tmp/rm_examples.json
    /tmp/trlvenv/bin/python benchmarks/trl_reward_train.py --examples /tmp/rm_examples.json --batch 16 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from record import emit  # this script's folder is on sys.path


def default_model_dir() -> Path:
    """labkit.models.embedded_model_dir(), without importing labkit (it needs transformers 5)."""
    return Path(os.environ.get("LABKIT_CACHE", Path.home() / ".cache" / "labkit")).expanduser() / "models" / "smollm2-135m"


def load(folder: Path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast

    if not (folder / "config.json").exists():
        raise SystemExit(f"{folder} has no model: run `.venv/bin/python -m labkit.models --prepare` first, or pass --model.")
    config = AutoConfig.from_pretrained(folder, num_labels=1)
    rope = getattr(config, "rope_parameters", None)  # transformers 5 layout; 4.x reads rope_theta
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
    tok = PreTrainedTokenizerFast.from_pretrained(folder)  # v5's "TokenizersBackend" class is unknown to 4.x
    if tok.unk_token is not None and tok.unk_token_id != tok.eos_token_id:
        tok.pad_token = tok.unk_token  # as labkit.models._setup_tokenizer
    config.pad_token_id = tok.pad_token_id  # the head pools the last non-pad token
    model = AutoModelForSequenceClassification.from_pretrained(folder, config=config, dtype=torch.float32)
    return model, tok


def pairs(examples: list[dict]) -> dict[str, list]:
    """Each k-way comparison -> k-1 pairs (best, other), pre-tokenised as query ids + response ids."""
    out = {"input_ids_chosen": [], "attention_mask_chosen": [], "input_ids_rejected": [], "attention_mask_rejected": []}
    for ex in examples:
        seqs = [ex["query_ids"] + r for r in ex["response_ids"]]
        for j, rejected in enumerate(seqs):
            if j == ex["best"]:
                continue
            for side, ids in (("chosen", seqs[ex["best"]]), ("rejected", rejected)):
                out[f"input_ids_{side}"].append(ids)
                out[f"attention_mask_{side}"].append([1] * len(ids))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", required=True, help="JSON from reward_train.py --dump-examples")
    p.add_argument("--model", default=None, help="HF folder (default: labkit's converted embedded model)")
    p.add_argument("--batch", type=int, default=16, help="4-way comparisons per step (x3 pairs)")
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    examples = json.loads(Path(args.examples).read_text())["examples"]
    k = len(examples[0]["response_ids"])
    n = args.batch * (args.steps + 1)
    if len(examples) < n:
        raise SystemExit(f"{args.examples} has {len(examples)} comparisons, {n} needed: dump with the same --batch/--steps.")
    data = pairs(examples[:n])
    max_len = max(len(x) for side in ("chosen", "rejected") for x in data[f"input_ids_{side}"])
    model, tok = load(Path(args.model) if args.model else default_model_dir())

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps, self.ends = [], []

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            t = time.perf_counter()
            self.steps.append(t - self.t0)
            self.ends.append(t)

    timer = Timer()
    cfg = RewardConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-rm-"), per_device_train_batch_size=(k - 1) * args.batch,
        num_train_epochs=1, max_steps=args.steps + 1, learning_rate=5e-5, lr_scheduler_type="linear",
        max_grad_norm=0.0, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        max_length=max_len, center_rewards_coefficient=None, report_to=[], logging_strategy="no",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=Dataset.from_dict(data),
                            processing_class=tok, callbacks=[timer])
    trainer.train()
    assert len(timer.steps) == args.steps + 1, timer.steps
    dt = sum(timer.steps[1:])
    comparisons = n - args.batch
    result = {"benchmark": "trl_reward_train", "trl": trl.__version__, "model": args.model or "smollm2-135m",
              "k": k, "batch": args.batch, "threads": torch.get_num_threads(), "comparisons": comparisons, "pairs": (k - 1) * comparisons,
              "seconds": round(dt, 2), "seconds_incl_data": round(timer.ends[-1] - timer.ends[0], 2),
              "comparisons_per_s": round(comparisons / dt, 3),
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    emit(result)


if __name__ == "__main__":
    main()
