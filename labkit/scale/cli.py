"""The command line for cluster jobs: `labkit train-reward JOB` and `labkit ppo JOB`.

A job file is what a notebook saves with one call (labkit.scale.jobs): `RewardJob(...).save("rm.yaml")`,
`PPOJob(...).save("ppo.yaml")`. The same command runs on one process or many:

    labkit ppo ppo.yaml                                                # one process (its GPU if any)
    accelerate launch --config_file examples/accelerate/ddp.yaml -m labkit.scale.cli ppo ppo.yaml   # 8 GPUs
    accelerate launch --multi_gpu --num_processes 2 -m labkit.scale.cli ppo ppo.yaml     # no GPU: 2 CPU processes

Several processes run data-parallel (labkit.distributed): each samples its share, gradients are averaged,
batch statistics are global, and only the main process reads the label database and writes files. Under
an FSDP config (examples/accelerate/fsdp.yaml) the models are also sharded across the processes.
Both commands write `metrics.jsonl` (one JSON dict per step) into their folder while they run; a notebook
plots it live with `Dashboard.from_jsonl(path)` and `dash.refresh_from_jsonl(path)`.

A job's reward may be a function of your own, "module:function" (labkit.scale.jobs.reward_function): both
commands import from the folder they run in first, as `python -m` does, so that a module in that folder imports
under the `labkit` console script too (whose sys.path starts at the script's own folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from labkit import distributed
from labkit.rl import checkpoint
from labkit.rl.config import PPOConfig
from labkit.scale.jobs import PPOJob, RewardJob, reward_function


class MetricsFile:
    """Appends each metrics dict as one JSON line, on the main process only: what `Dashboard.from_jsonl` reads.

    It has a Dashboard's `log` and `flush`, so a trainer's `dashboard=` argument can write to it.
    """

    def __init__(self, path):
        self.path = Path(path)
        if distributed.is_main():  # a new run starts a new file (the dashboard notices and starts over)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def log(self, metrics: dict, samples: list[dict] | None = None) -> None:
        if distributed.is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def flush(self) -> None:
        pass  # every line is written when it is logged


def _say(message: str) -> None:
    if distributed.is_main():
        print(f"labkit: {message}", flush=True)


def _say_layout(name: str, module) -> None:
    """How much of `module` each process holds: all of it (data parallel) or a slice (FSDP)."""
    local, total = distributed.local_and_total_numel(module)
    how = "sharded with FSDP2" if distributed.sharded() else "a full copy"
    _say(f"{name}: {local:,} of {total:,} parameters on process 0 ({how}).")


# --------------------------------------------------------------------------------------------------
# labkit train-reward


def _read_examples(job: RewardJob, task):
    from labkit.labeling.store import LabelStore
    from labkit.reward import examples_from_store

    path = Path(job.labels)
    if not path.exists():  # LabelStore would create an empty store: refuse instead
        raise FileNotFoundError(f"Label store {path} does not exist (RewardJob.labels).")
    with LabelStore(path) as store:
        return [ex for kind in job.label_kinds for ex in examples_from_store(store, task, kind)]


def train_reward(job: RewardJob, device, check_sync: bool = False) -> dict:
    """Fit a reward model as the online loop's refit does: fresh head on rho, normalise, train, normalise.

    The job was checked when it was built (`RewardJob.load`, `__post_init__`). Each run trains from scratch
    and replaces what output_dir held: out/job.yaml is written after the model, and always describes it."""
    from labkit.data import load_prompts
    from labkit.models import load_lm
    from labkit.reward import RewardTrainer, reward_model_from_lm

    cfg = job.reward
    task = job.task_spec()
    out = Path(job.output_dir)
    # 1. labels: the main process reads the database, every process gets the examples
    examples = distributed.run_on_main(lambda: _read_examples(job, task))
    _say(f"{len(examples)} labeled comparisons for task {task.name!r} on {distributed.world_size()} process(es).")
    # 2. rho and a fresh reward model on a copy of it; the same initial head on every process
    torch.manual_seed(cfg.seed)
    rho, tokenizer = load_lm(job.model, device=device, dtype=job.dtype)
    rm = reward_model_from_lm(rho, tokenizer, seed=cfg.seed, pool=job.pool, layer=job.layer)
    rho.requires_grad_(False)
    distributed.broadcast_parameters(rm.parameters())
    distributed.shard_model(rho)  # under an FSDP launch: each process holds a slice of each (else a no-op)
    distributed.shard_model(rm.lm)
    _say_layout("reward model", rm)
    texts = [p.text for p in load_prompts(task, split=job.prompt_split, source=job.prompt_source)]
    # 3. normalise on rho's samples, train, normalise again (samples shared out between processes)
    before = rm.normalize(rho, task, texts, n_samples=cfg.normalize_samples, seed=cfg.seed)
    history = RewardTrainer(rm, cfg).fit(examples, dashboard=MetricsFile(out / "metrics.jsonl"),
                                         progress=distributed.is_main())
    after = rm.normalize(rho, task, texts, n_samples=cfg.normalize_samples, seed=cfg.seed)
    rm.requires_grad_(False).eval()
    summary = {"world_size": distributed.world_size(), "examples": len(examples), "steps": len(history),
               "normalize_before": before, "normalize_after": after, "final": history[-1]}
    if check_sync:
        summary["weights_digest"] = distributed.check_same_weights(rm.state_dict().values())
        _say(f"weights identical on {distributed.world_size()} process(es): sha256 {summary['weights_digest']}")
    # 4. the main process writes (sharded weights are gathered first, by every process); the others wait so
    #    that the files exist when the command returns
    rm.save(out)
    if distributed.is_main():
        job.save(out / "job.yaml")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    distributed.barrier()
    _say(f"reward model saved to {out} (final loss {history[-1]['rm/loss']:.4f}).")
    return summary


# --------------------------------------------------------------------------------------------------
# labkit ppo


def _load_reward(job: PPOJob, tokenizer, device):
    """The job's reward: a function of your own, vader's score, or a saved reward model (PPOJob.reward)."""
    from labkit.reward import RewardModel

    function = reward_function(job.reward)  # imported when the job loaded: the module is cached
    if function is not None:
        return function  # PPOTrainer passes it references if it takes them
    if job.reward == "vader":
        from labkit.labeling.labelers import VaderLabeler

        vader = VaderLabeler()
        return lambda queries, responses: vader.score(responses)
    return RewardModel.load(job.reward, device=device, dtype=job.dtype).requires_grad_(False)  # fit: PPOTrainer


MAY_CHANGE_ON_RESUME = {"run_dir", "n_updates", "task.title", "task.instructions"} | {
    f"ppo.{f.name}" for f in fields(PPOConfig) if f.name not in checkpoint.FIXED_FIELDS}
"""What a job started again on the same run_dir may change: how far to go, the task's texts for labelers, and
the PPO settings that the trainer applies from the resumed update on and reports (`checkpoint.check_fits`; as
in a notebook). run_dir: the same folder, maybe spelled otherwise."""


def _run_settings(job: PPOJob) -> dict:
    """The job's fields, the task resolved (so that {"response_length": 24} equals the default) and the
    PPO settings flattened into "task.x" and "ppo.x" keys, less those in MAY_CHANGE_ON_RESUME."""
    flat = {f"task.{k}": v for k, v in asdict(job.task_spec()).items()}
    flat |= {f"ppo.{k}": v for k, v in asdict(job.ppo).items()}
    flat |= {k: v for k, v in asdict(job).items() if k not in ("task", "task_overrides", "ppo")}
    return {k: v for k, v in flat.items() if k not in MAY_CHANGE_ON_RESUME}


def check_resume(job: PPOJob) -> None:
    """Refuse to run `job` in a run_dir whose job.yaml (the job that started the run) differs from it in
    anything but MAY_CHANGE_ON_RESUME, listing the differences. A resumed run would otherwise continue the
    checkpoint under other settings, and its job.yaml would no longer say how the run was made.

    The choice: refuse rather than keep the old job.yaml and go on, because a different model, reward or PPO
    setting is more often a wrong run_dir than a wish; to change them on purpose, start a new run_dir, or
    edit or delete the old job.yaml. An old job.yaml that no longer loads is refused the same way."""
    old_path = Path(job.run_dir) / "job.yaml"
    if not old_path.exists():
        return
    try:
        old = PPOJob.load(old_path)
    except (ValueError, KeyError) as err:
        raise ValueError(f"{old_path}, the job this run was started with, does not load ({err}). Fix or delete "
                         "it to resume this run, or give the job another run_dir.") from None
    before, after = _run_settings(old), _run_settings(job)
    changed = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(before.keys() | after.keys())
               if before.get(k) != after.get(k)]
    if changed:
        raise ValueError(f"{job.run_dir} holds a run started by another job ({old_path}); this job differs in: "
                         + "; ".join(changed) + ". A resumed run may only change n_updates and "
                         f"{', '.join(sorted(MAY_CHANGE_ON_RESUME - {'run_dir', 'n_updates'}))}. "
                         "Use another run_dir, or delete that job.yaml (and the checkpoint) to start over.")


def run_ppo(job: PPOJob, device, check_sync: bool = False) -> dict:
    """Train (or resume) PPO in job.run_dir until job.n_updates updates are done.

    Order: the job was checked when it was built (`PPOJob.load`, `__post_init__`); then it is compared with
    the run_dir's job.yaml (`check_resume`); then the models load; only then is run_dir/job.yaml written."""
    from labkit.data import load_prompts
    from labkit.models import load_lm
    from labkit.rl.trainer import PPOTrainer

    cfg = job.ppo
    task = job.task_spec()
    run_dir = Path(job.run_dir)
    distributed.run_on_main(lambda: check_resume(job))  # before any model loads; every process raises alike
    torch.manual_seed(cfg.seed)  # identical initial weights everywhere (PPOTrainer also broadcasts them)
    policy, tokenizer = load_lm(job.model, device=device, dtype=job.dtype)
    reward = _load_reward(job, tokenizer, device)
    prompts = load_prompts(task, split=job.prompt_split, source=job.prompt_source)
    trainer = PPOTrainer(policy, tokenizer, task, reward, prompts, cfg, run_dir=run_dir, verbose=distributed.is_main())
    _say_layout("policy", trainer.policy)
    if distributed.is_main():
        job.save(run_dir / "job.yaml")
    remaining = job.n_updates - trainer.step_count
    _say(f"PPO on {distributed.world_size()} process(es) x {cfg.batch_size} rollouts per update; "
         f"{max(0, remaining)} of {job.n_updates} updates to go.")
    if remaining > 0:
        trainer.train(remaining, progress=distributed.is_main())
        if not (cfg.save_every and trainer.step_count % cfg.save_every == 0):
            trainer.save()  # every process calls it; the main one writes
    summary = {"world_size": distributed.world_size(), "step": trainer.step_count,
               "final": trainer.history[-1] if trainer.history else None}
    if check_sync:
        summary["weights_digest"] = distributed.check_same_weights(trainer.params)
        _say(f"weights identical on {distributed.world_size()} process(es): sha256 {summary['weights_digest']}")
    _say(f"checkpoint and metrics.jsonl in {run_dir}.")
    return summary


# --------------------------------------------------------------------------------------------------


def _import_from_working_directory() -> None:
    """Put the working directory first on sys.path, as `python -m labkit.scale.cli` does: the `labkit` console
    script starts sys.path at its own folder, where a job's "myrewards:score" would not be found."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # "": the interactive interpreter's way of saying the same
        sys.path.insert(0, cwd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="labkit", description="Train headless from a job file saved in a notebook (labkit.scale.jobs). "
        "Run under `accelerate launch` for several processes; see docs/scale_out.md.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train-reward", "fit a reward model on a label store (RewardJob file)"),
                       ("ppo", "run or resume PPO (PPOJob file)")):
        p = commands.add_parser(name, help=text, description=text)
        p.add_argument("job", help="job file (.yaml, .yml or .json) written by RewardJob/PPOJob(...).save(path)")
        p.add_argument("--check-sync", action="store_true",
                       help="at the end, check that every process holds bit-identical weights and print their digest")
    args = parser.parse_args(argv)
    _import_from_working_directory()  # before the job loads: it imports a reward function of the user's
    if args.command == "train-reward":
        job = RewardJob.load(args.job)
        train_reward(job, distributed.init_processes(), args.check_sync)
    else:
        job = PPOJob.load(args.job)
        run_ppo(job, distributed.init_processes(), args.check_sync)
    distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
