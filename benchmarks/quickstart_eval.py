"""The quickstart's before/after, measured tighter, for comparing runs: resumes the final PPO checkpoint of one or
more kept quickstart runs and compares pi with rho on every validation prompt of the task, `--samples`
continuations per prompt instead of the notebook's few (`EVAL_SAMPLES`; 01 and 02 take four).

One sample of each of the 47 held-out prompts leaves a 95% interval of about +-0.15 on the VADER difference, wider
than the differences between the settings one wants to compare. Here sample s of every prompt is drawn with seed s
for both rho and pi (seeds 0 to EVAL_SAMPLES - 1 are the notebook's own samples), each prompt's
samples are averaged, and the paired difference and its interval run over the prompts
(labkit.evaluate.before_after), so that a prompt's own spread does not count as evidence. One JSON line per
run: the mock labeler's score of rho and pi (`judge`: VADER for sentiment; lines recorded before --task chose it
call it `vader_*`), their difference with its interval, the reward model's score difference, the correlation of
the reward model with that score on the samples with a truncation point, and KL of the final update. The last
line (all runs) lands in benchmarks/results/quickstart_eval.jsonl. Any notebook's lab folder works the same way.

    python benchmarks/quickstart.py --keep /tmp/qs_a                     # one run, its lab folder kept
    python benchmarks/quickstart.py --keep /tmp/qs_b --set RM_POOL='"last"' --set RM_LAYER=None
    python benchmarks/quickstart_eval.py /tmp/qs_a /tmp/qs_b --samples 8
    python benchmarks/notebook_times.py notebooks/02_descriptiveness.ipynb --keep /tmp/desc
    python benchmarks/quickstart_eval.py /tmp/desc --task descriptiveness --samples 8

Every run is resumed with the PPO settings saved in its checkpoint and its own reward model; rho is the model the
runs started from (`--model`), so runs of another model are refused by the trainer's checks.
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
from reward_sweep import JUDGES  # noqa: E402


def evaluate_run(run: Path, model: str, task_name: str, samples: int, max_prompts: int | None) -> dict:
    """Resume `run`'s final PPO checkpoint and measure pi against rho (module docstring)."""
    from labkit.data import load_prompts
    from labkit.evaluate import before_after
    from labkit.labeling import labelers
    from labkit.models import load_lm
    from labkit.reward import RewardModel
    from labkit.rl import PPOConfig, PPOTrainer
    from labkit.rl.checkpoint import latest
    from labkit.tasks import get_task

    checkpoint = latest(run / "ppo")
    if checkpoint is None:
        raise SystemExit(f"{run}/ppo holds no complete PPO checkpoint: keep a finished quickstart run with "
                         "`python benchmarks/quickstart.py --keep DIR`")
    saved = json.loads((checkpoint / "trainer.json").read_text())
    task = get_task(task_name)
    if (saved["task"]["response_length"], saved["task"]["query_length"]) != (task.response_length, task.query_length):
        task = task.with_(response_length=saved["task"]["response_length"], query_length=saved["task"]["query_length"])
    policy, tokenizer = load_lm(model)
    reward_model = RewardModel.load(run / "reward_model", device=policy.device)
    train = [p.text for p in load_prompts(task, "train")]
    trainer = PPOTrainer(policy, tokenizer, task, reward_model, train, PPOConfig(**saved["config"]), run_dir=run / "ppo",
                         verbose=False)
    if trainer.step_count != saved["step"]:
        raise SystemExit(f"{run}: resumed at update {trainer.step_count}, but its latest checkpoint is {saved['step']}")
    texts = [p.text for p in load_prompts(task, "validation")][:max_prompts]
    judge, labeler = JUDGES[task_name]
    result = before_after(trainer, texts, getattr(labelers, labeler)().score, samples=samples)
    effect, learned = result["effect"], result["learned"]
    return {"run": str(run), "reward_model": reward_model.training_summary(),
            "reads": {"pool": reward_model.pool, "layer": reward_model.layer}, "updates": trainer.step_count,
            "kl": trainer.history[-1]["objective/kl"], "prompts": len(texts), "samples": samples,
            "judge": judge, "judge_rho": effect["before"], "judge_pi": effect["after"], "diff": effect["diff"],
            "low": effect["low"], "high": effect["high"], "score_diff": learned["diff"], "score_low": learned["low"],
            "score_high": learned["high"], "rm_judge_corr": result["agreement"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="lab folders kept by `benchmarks/quickstart.py --keep DIR`")
    p.add_argument("--model", default="smollm2-135m", help="the model the runs started from")
    p.add_argument("--task", choices=sorted(JUDGES), default="sentiment",
                   help="the runs' task: its mock labeler's score judges rho and pi (VADER for sentiment)")
    p.add_argument("--samples", type=int, default=8, help="continuations per prompt, for rho and pi each")
    p.add_argument("--max-prompts", type=int, default=None, help="the first N validation prompts (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default=None, help="a label for the record")
    args = p.parse_args(argv)
    if args.samples < 1:
        raise SystemExit(f"--samples {args.samples}: at least 1")
    missing = [str(r) for r in args.runs if not (r / "reward_model" / "reward_config.json").exists()]
    if missing:
        raise SystemExit(f"not a kept quickstart lab folder (no reward_model/): {', '.join(missing)}")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    results = []
    for run in args.runs:
        line = evaluate_run(run, args.model, args.task, args.samples, args.max_prompts)
        print(json.dumps(line), flush=True)
        results.append(line)
    return emit({"benchmark": "quickstart_eval", "name": args.name, "model": args.model, "task": args.task,
                 "samples": args.samples, "results": results, "seconds": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
