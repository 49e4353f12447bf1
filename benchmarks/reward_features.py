"""Which of rho's frozen hidden states a fitted reward head should read, on a few hundred labels.

labkit's reward model reads, as released, the final hidden state (after the last norm) of the last token of query +
response (rewards.py RewardModelTrainer; labkit.reward.model). With the trunk frozen and the head
fitted alone (RewardConfig.head_l2), the features are all there is, so this measures the alternatives on stored
labels: for each layer in --layers, the last token's hidden state (`last@L`) and the mean over the response's
tokens (`mean@L`); the final layer is after the final norm, as the reward model reads it. For each feature set and
each --l2 it prints one JSON line:

- `cv_accuracy`: 5-fold cross-validated 4-way accuracy of the fitted head on the labeled comparisons (chance 0.25);
- `judge_corr`: Pearson correlation of the head fitted on all labels with the mock labeler's own score on
  --probe-samples rho samples of the validation prompts: VADER for --task sentiment, the descriptiveness
  heuristic for --task descriptiveness (lines recorded before --task existed call it `vader_corr`);
- `judge_corr_found`: the same on the samples with a truncation point only, the ones PPO scores with the reward
  model (the others get the task's penalty): what PPO will climb.

The last line, the summary, lands in benchmarks/results/reward_features.jsonl. A research question rather than a
setting: labkit's reward model reads `last@<final>` only.

    python benchmarks/quickstart.py --keep runs/qs-lab        # the quickstart's labels (runs/qs-lab/labels.db)
    python benchmarks/reward_features.py runs/qs-lab/labels.db
    python benchmarks/reward_features.py runs/descriptiveness/labels.db --task descriptiveness   # 02's labels
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import emit  # noqa: E402
from reward_sweep import JUDGES, judged_probe  # noqa: E402


@torch.no_grad()
def hidden_features(lm, query: list[int], response: list[int], layers: list[int]) -> dict[str, torch.Tensor]:
    """{"last@L": (H,), "mean@L": (H,)} for each L in `layers` (0 = embeddings; the last = after the final norm)
    of one query + response, read by the LM's own forward with every hidden state kept."""
    ids = torch.tensor([query + response], device=lm.device)
    hidden = lm(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states  # L+1 of (1, T, H)
    out = {}
    for layer in layers:
        h = hidden[layer][0].float().cpu()  # (T, H)
        out[f"last@{layer}"] = h[-1]
        out[f"mean@{layer}"] = h[len(query):].mean(0)  # the response's tokens only
    return out


def cv_accuracy(x: torch.Tensor, best: torch.Tensor, l2: float, folds: int = 5) -> float:
    """Cross-validated accuracy of `fit_linear_head` on (N, k, H) features and (N,) labeled indices."""
    from labkit.reward.train import fit_linear_head

    k = x.shape[1]
    fold = torch.arange(len(x)) % folds
    correct = 0
    for f in range(folds):
        train, test = fold != f, fold == f
        w, _ = fit_linear_head({k: x[train]}, {k: best[train]}, l2)
        correct += ((x[test] @ w).argmax(-1) == best[test]).sum().item()
    return correct / len(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("labels", help="a label store (labels.db) with labeled 4-way comparisons of --task")
    p.add_argument("--task", choices=sorted(JUDGES), default="sentiment")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="hidden-state layers to read (default: the middle, two thirds up, and the final one)")
    p.add_argument("--l2", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    p.add_argument("--probe-samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not Path(args.labels).exists():
        raise SystemExit(f"{args.labels} does not exist: run benchmarks/quickstart.py --keep DIR first")
    torch.set_num_threads(args.threads)

    from labkit.evaluate import pearson
    from labkit.labeling import labelers
    from labkit.labeling.store import LabelStore
    from labkit.models import load_lm
    from labkit.reward import RewardConfig, RewardTrainer, examples_from_store, reward_model_from_lm
    from labkit.reward.train import fit_linear_head
    from labkit.sampling import unwrap
    from labkit.tasks import get_task

    t0 = time.time()
    task = get_task(args.task)
    rho, tok = load_lm(args.model)
    rho.requires_grad_(False)
    n_layers = rho.config.num_hidden_layers
    layers = sorted(set(args.layers or [n_layers // 2, 2 * n_layers // 3, n_layers]))
    bad = [layer for layer in layers if not 0 <= layer <= n_layers]
    if bad:
        raise SystemExit(f"--layers {bad}: {args.model} has hidden states 0..{n_layers}")
    with LabelStore(args.labels) as store:
        examples = [ex for ex in examples_from_store(store, task, kind="train") if len(ex.responses) == 4]
    if len(examples) < 10:
        raise SystemExit(f"{args.labels} holds {len(examples)} labeled 4-way {task.name} comparisons; 5 folds need 10")
    rm = reward_model_from_lm(rho, tok)  # only for the ids the reward model reads (the query without its format)
    reads = RewardTrainer(rm, RewardConfig(head_l2=1.0))._tokens
    base = unwrap(rho)

    def feats(query, response):
        return hidden_features(base, query, response or [tok.eos_token_id], layers)

    rows = []
    for ex in examples:
        query, responses = reads(ex)
        rows.append([feats(query, r) for r in responses])
    names = list(rows[0][0])
    x = {n: torch.stack([torch.stack([f[n] for f in row]) for row in rows]) for n in names}  # (N, 4, H)
    best = torch.tensor([ex.best for ex in examples])

    judge_name, labeler = JUDGES[args.task]
    roll, judged = judged_probe(rho, tok, task, args.probe_samples, getattr(labelers, labeler)().score)
    q_ids, q_len = rm.reward_queries(roll.query_ids, roll.query_lengths)
    probe = []
    for i in range(len(roll)):
        n = int(roll.truncated_lengths[i])
        probe.append(feats(q_ids[i, q_ids.shape[1] - int(q_len[i]):].tolist(), roll.truncated_ids[i, :n].tolist()))
    px = {n: torch.stack([f[n] for f in probe]) for n in names}  # (probe_samples, H)
    found = roll.found.tolist()  # PPO scores only these with the reward model (the rest get the task's penalty)

    results = []
    for l2 in args.l2:
        for n in names:
            w, _ = fit_linear_head({4: x[n]}, {4: best}, l2)
            scores = (px[n] @ w).tolist()
            line = {"features": n, "l2": l2, "cv_accuracy": round(cv_accuracy(x[n], best, l2), 3),
                    "judge_corr": round(pearson(list(zip(scores, judged))), 3),
                    "judge_corr_found": round(pearson([(a, b) for a, b, ok in zip(scores, judged, found) if ok]), 3)}
            print(json.dumps(line), flush=True)
            results.append(line)
    return emit({"benchmark": "reward_features", "labels": str(args.labels), "model": args.model, "task": task.name,
                 "judge": judge_name, "n_labels": len(examples), "probe_samples": args.probe_samples,
                 "probe_found": sum(found),
                 "reads_now": f"last@{n_layers}", "results": results, "seconds": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
