"""Reward-model training throughput on 4-way comparisons (comparisons/s) on the embedded model.

Builds k=4 comparisons from demo passages (query 64 tokens, responses 24 tokens of real text), trains
for a few optimiser steps after a warm-up, and prints one JSON line. Each comparison is k sequences of
query + response through the trunk, forward and backward.

    python benchmarks/reward_train.py --batch 16 --steps 3

--dump-examples FILE also writes the comparisons as JSON (texts, best, and the token ids exactly as the
trainer encodes them), so that benchmarks/trl_reward_train.py can train TRL on the very same inputs.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from record import emit  # this script's folder is on sys.path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=16, help="comparisons per step")
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dump-examples", metavar="FILE", help="write the comparisons as JSON, then benchmark")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from labkit.data import load_prompts
    from labkit.models import load_lm
    from labkit.reward import KWayExample, RewardConfig, RewardTrainer, reward_model_from_lm
    from labkit.tasks import SENTIMENT, format_query

    lm, tok = load_lm(args.model)
    passages = [p.text for p in load_prompts(SENTIMENT, "all")]
    n = args.batch * (args.steps + 1)
    examples = []
    for i in range(n):
        query = tok.decode(format_query(SENTIMENT, passages[i % len(passages)], tok))
        # responses: 24-token slices of other passages (real text, realistic lengths)
        resp = [tok.decode(tok.encode(" " + passages[(i * 4 + j + 7) % len(passages)], add_special_tokens=False)[:24])
                for j in range(4)]
        examples.append(KWayExample(query, resp, i % 4))
    if args.dump_examples:
        enc = lambda t: tok.encode(t, add_special_tokens=False)  # as RewardModel.encode_texts does
        rows = [{"query": ex.query, "responses": ex.responses, "best": ex.best, "query_ids": enc(ex.query),
                 "response_ids": [enc(r) or [tok.eos_token_id] for r in ex.responses]} for ex in examples]
        with open(args.dump_examples, "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "steps": args.steps,
                       "pad_token_id": tok.pad_token_id, "examples": rows}, f)
    rm = reward_model_from_lm(lm, tok)
    trainer = RewardTrainer(rm, RewardConfig(batch_size=args.batch, heldout_fraction=0.0, eval_every=10**9))
    trainer.fit(examples[: args.batch], progress=False)  # warm-up
    t0 = time.perf_counter()
    trainer.fit(examples[args.batch :], progress=False)
    dt = time.perf_counter() - t0
    result = {"benchmark": "reward_train", "model": args.model, "k": 4, "batch": args.batch,
              "comparisons": n - args.batch, "seconds": round(dt, 2),
              "comparisons_per_s": round((n - args.batch) / dt, 3),
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    emit(result)


if __name__ == "__main__":
    main()
