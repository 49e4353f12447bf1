"""Reward-model settings on stored labels: held-out 4-way accuracy for each setting and seed, and how well the
reward model agrees with the mock labeler's own score on fresh samples.

Trains a fresh reward model (new head on a copy of rho, as `mock_sentiment.py` does) for every
(setting, seed) on the first --n-labels labeled comparisons of a label store, and prints one JSON line per
run: the setting, held-out accuracy and loss (chance 0.25 / 1.386), the last quarter's training loss and
the seconds. A seed also picks its own held-out split, so the spread over seeds is the measurement noise
of a 100-comparison held-out set plus the training noise. The last line is a JSON summary: mean accuracy
per setting, also recorded in benchmarks/results/reward_sweep.jsonl.

--vader-samples N also samples N responses from rho on the validation prompts (once, seed 0) and reports each
reward model's Pearson correlation with VADER on them (`vader_corr`): on a few hundred labels the held-out set
is a dozen comparisons, so its accuracy moves in steps of 0.08, while the correlation over N samples is what
PPO will climb. How the quickstart's reward-model settings were chosen:

    python benchmarks/quickstart.py --keep runs/qs-lab              # its labels (runs/qs-lab/labels.db)
    python benchmarks/reward_sweep.py runs/qs-lab/labels.db --vader-samples 128 --seeds 0 1 \
        --settings lr=6e-4,epochs=1,layers=6,batch=8 lr=1e-3,epochs=4,layers=0,batch=8 ...

    python benchmarks/mock_sentiment.py --out runs/mock_full            # makes runs/mock_full/labels.db
    python benchmarks/reward_sweep.py runs/mock_full/labels.db --seeds 0 1 2 \
        --settings lr=1e-4,epochs=2,layers=8 lr=6e-4,epochs=1,layers=16 lr=1e-4,epochs=2,layers=-1

On this 2-core CPU one run of the default setting costs what the mock run's reward phase costs (about 21
minutes); on an H100 10-20 seconds. The
numbers in `mock_sentiment.py`'s docstring came from this sweep on an H100 with `--dtype float32`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import emit  # noqa: E402

KEYS = {"lr": float, "epochs": int, "layers": int, "batch": int, "l2": float}


def parse_setting(text: str) -> dict:
    """"lr=6e-4,epochs=1,layers=16" -> {"lr": 6e-4, "epochs": 1, "layers": 16, "batch": 16}; "l2=1" -> the head
    fitted on the frozen trunk (RewardConfig.head_l2), which takes no lr, epochs or layers."""
    setting = {"batch": 16}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in KEYS or not value:
            raise SystemExit(f"bad setting {text!r}: use key=value pairs separated by commas, keys {sorted(KEYS)}")
        setting[key] = KEYS[key](value)
    if "l2" in setting:
        if setting.keys() & {"lr", "epochs", "layers"}:
            raise SystemExit(f"setting {text!r}: l2 fits the head alone; lr, epochs and layers do not apply")
        return setting
    missing = {"lr", "epochs", "layers"} - setting.keys()
    if missing:
        raise SystemExit(f"setting {text!r} lacks {sorted(missing)}")
    return setting


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("labels", help="a label store (labels.db) with labeled sentiment comparisons")
    p.add_argument("--n-labels", type=int, default=1000, help="use the first N labeled comparisons")
    p.add_argument("--settings", nargs="+", default=["lr=1e-4,epochs=2,layers=8", "lr=6e-4,epochs=1,layers=16"],
                   help="key=value,... with lr, epochs, layers (-1 = all) and optionally batch; or l2=X (the head "
                        "fitted on the frozen trunk, RewardConfig.head_l2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default=None, help="weights' dtype (default fp32; CUDA runs matmuls in bf16 autocast)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vader-samples", type=int, default=0,
                   help="also report the correlation with VADER on this many rho samples of validation prompts")
    args = p.parse_args(argv)
    settings = [parse_setting(s) for s in args.settings]
    if not Path(args.labels).exists():
        raise SystemExit(f"{args.labels} does not exist: run benchmarks/mock_sentiment.py first, or pass a label store")
    torch.set_num_threads(args.threads)

    from labkit.data import load_prompts
    from labkit.labeling.labelers import VaderLabeler
    from labkit.labeling.store import LabelStore
    from labkit.models import load_lm
    from labkit.reward import RewardConfig, RewardTrainer, examples_from_store, reward_model_from_lm
    from labkit.tasks import SENTIMENT

    prompts = [p.text for p in load_prompts(SENTIMENT, "train")]
    rho, tok = load_lm(args.model, dtype=args.dtype)
    rho.requires_grad_(False)
    with LabelStore(args.labels) as store:
        examples = examples_from_store(store, SENTIMENT, kind="train")[: args.n_labels]  # on the stored token ids
    if not examples:
        raise SystemExit(f"{args.labels} holds no labeled sentiment comparisons")
    probe = judged_probe(rho, tok, SENTIMENT, args.vader_samples, VaderLabeler().score) if args.vader_samples else None

    accuracies: dict[str, list[float]] = {}
    correlations: dict[str, list[float]] = {}
    for setting in settings:
        name = ",".join(f"{k}={v}" for k, v in setting.items())
        for seed in args.seeds:
            t0 = time.time()
            torch.manual_seed(seed)  # the head's init
            rm = reward_model_from_lm(rho, tok)
            rm.normalize(rho, SENTIMENT, prompts, n_samples=64, seed=seed + 11, batch_size=32)
            if "l2" in setting:
                cfg = RewardConfig(head_l2=setting["l2"], batch_size=setting["batch"], heldout_fraction=0.1, seed=seed)
            else:
                cfg = RewardConfig(lr=setting["lr"], batch_size=setting["batch"], epochs=setting["epochs"],
                                   heldout_fraction=0.1, eval_every=10**9, seed=seed,
                                   train_layers=None if setting["layers"] < 0 else setting["layers"])
            history = RewardTrainer(rm, cfg).fit(examples, progress=False)
            losses = [m["rm/loss"] for m in history]
            record = {"setting": name, "seed": seed, "n_labels": len(examples),
                      "heldout_accuracy": round(history[-1]["rm/heldout_accuracy"], 3),
                      "heldout_loss": round(history[-1]["rm/heldout_loss"], 3),
                      "train_loss_last_quarter": round(statistics.mean(losses[-max(1, len(losses) // 4):]), 3),
                      "seconds": round(time.time() - t0, 1)}
            if probe is not None:
                record["vader_corr"] = round(vader_corr(rm, probe), 3)
                correlations.setdefault(name, []).append(record["vader_corr"])
            print(json.dumps(record), flush=True)
            accuracies.setdefault(name, []).append(record["heldout_accuracy"])
            del rm
    summary = {"benchmark": "reward_sweep", "labels": str(args.labels), "model": args.model, "device": str(rho.device),
               "n_labels": len(examples), "seeds": args.seeds,
               "mean_heldout_accuracy": {k: round(statistics.mean(v), 3) for k, v in accuracies.items()}}
    if probe is not None:
        summary["vader_samples"] = args.vader_samples
        summary["mean_vader_corr"] = {k: round(statistics.mean(v), 3) for k, v in correlations.items()}
    return emit(summary)


# each task's mock labeler (labkit.labeling.labelers) and the name its score goes by: what PPO will climb, so what a
# reward model should agree with
JUDGES = {"sentiment": ("VADER", "VaderLabeler"), "descriptiveness": ("descriptiveness", "DescriptivenessLabeler")}


@torch.no_grad()
def judged_probe(rho, tok, task, n: int, score):
    """n rho samples on the validation prompts (seed 0) and `score` of each (a mock labeler's: VADER for sentiment):
    one fixed probe for every setting."""
    from labkit.data import load_prompts
    from labkit.sampling import sample
    from labkit.tasks import format_query

    prompts = [p.text for p in load_prompts(task, "validation")]
    queries = [format_query(task, prompts[i % len(prompts)], tok) for i in range(n)]
    roll = sample(rho, tok, queries, task, generator=torch.Generator(device=rho.device).manual_seed(0), batch_size=32)
    return roll, score(roll.response_texts)


@torch.no_grad()
def vader_corr(rm, probe) -> float:
    """Pearson correlation of the reward model's scores with VADER on the probe's responses (as PPO scores them:
    the truncated ones)."""
    roll, vader = probe
    scores = []
    for i in range(0, len(roll), 32):
        s = slice(i, i + 32)
        scores += rm(roll.query_ids[s], roll.query_lengths[s], roll.truncated_ids[s],
                     roll.truncated_lengths[s].clamp(min=1)).tolist()
    return statistics.correlation(scores, vader)


if __name__ == "__main__":
    main()
