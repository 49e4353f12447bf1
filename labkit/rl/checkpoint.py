"""The PPO trainer's checkpoints: safetensors for tensors, JSON for the rest (no pickle).

A checkpoint holds everything a resumed run needs to repeat the same updates: the trainable weights (pi's,
or its LoRA adapters, and the value function's), the optimiser's state, the learning-rate schedule, the KL
controller, the history, and every random state (numpy's for prompts and minibatch order, torch's for
sampling). Under several processes each process's random state is kept, and the weights of a sharded run
are gathered whole, so the files are what one process would write. It also records what it belongs to
(the task, the model's and tokenizer's fingerprints, the value and LoRA settings): resuming into anything
else is refused (`check_fits`).

In a run folder, each saved update gets a folder of its own, written as databases write files:

    run_dir/checkpoints/step-000012/{state.safetensors, trainer.json, COMPLETE}

1. write the files into `.tmp-step-000012-<pid>/`, each fsynced;
2. write COMPLETE last (it names the files and their sizes) and fsync it and the folder;
3. rename the folder into place (atomic) and fsync the parent folder;
4. only then delete checkpoints beyond the newest `keep` and any orphaned temporary folders.
A kill at any point leaves the previous complete checkpoint untouched, and `latest` only ever picks a folder
with a COMPLETE whose files have the sizes it names. tests/test_checkpoint_crashes.py makes every write,
fsync and rename of this protocol fail in turn, and kills a training process at random times.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from labkit import distributed

FORMAT = "labkit-ppo-checkpoint"
VERSION = 2
"""1: a single `checkpoint/` folder replaced in place (read, never written); 2: a folder per step with COMPLETE
and the run's identity."""
_STEP = re.compile(r"step-(\d+)$")
_LEGACY = re.compile(r"^(checkpoint|\.checkpoint\.(old|tmp)-\d+)$")  # version 1's folder and its temporaries


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


def state_of(trainer) -> tuple[dict, dict]:
    """(tensors, meta): what `save` writes. Every process takes part (sharded tensors are gathered)."""
    tensors = {f"param.{i}": distributed.full_tensor(p).detach().contiguous().cpu() for i, p in enumerate(trainer.params)}
    opt_state = trainer.optimizer.state_dict()
    opt_meta = {"param_groups": opt_state["param_groups"], "scalars": {}}
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"opt.{pid}.{k}"] = distributed.full_tensor(v).contiguous().cpu()
            else:
                opt_meta["scalars"][f"{pid}.{k}"] = v.item() if torch.is_tensor(v) else v
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    tensors["rng.generator"] = trainer.generator.get_state().cpu()
    process_numpy_rng = []
    if distributed.world_size() > 1:  # each process samples its own rollouts: keep every one's random state
        states = distributed.gather_objects((trainer.rng.bit_generator.state, torch.get_rng_state(),
                                             trainer.generator.get_state().cpu()))
        for r, (numpy_state, torch_cpu, generator) in enumerate(states):
            tensors[f"rng.torch_cpu.{r}"], tensors[f"rng.generator.{r}"] = torch_cpu, generator
            process_numpy_rng.append(numpy_state)
    meta = {
        "format": FORMAT, "version": VERSION, "step": trainer.step_count, "identity": trainer.identity,
        "config": asdict(trainer.config), "task": asdict(trainer.task), "optimizer": opt_meta,
        "scheduler": trainer.scheduler.state_dict(), "kl_controller": trainer.kl_ctl.state_dict(),
        "numpy_rng": trainer.rng.bit_generator.state, "history": trainer.history,
        "world_size": distributed.world_size(), "process_numpy_rng": process_numpy_rng,
    }
    return tensors, meta


# --------------------------------------------------------------------------------------------------
# writing


def save(trainer, folder) -> Path:
    """Write the trainer's full state into `folder`, atomically (steps 1-3 above); an existing `folder` is
    replaced only once the new one is complete. Every process calls it (their random states are gathered);
    the main process writes and the others wait for it."""
    folder = Path(folder)
    tensors, meta = state_of(trainer)
    if distributed.is_main():
        _write(folder, tensors, meta)
    distributed.barrier()  # the others wait until the main process has written it
    return folder


def save_step(trainer, run_dir, keep: int) -> Path:
    """Checkpoint the trainer's current update into `run_dir/checkpoints/step-NNNNNN/`, then keep the newest
    `keep` complete checkpoints (never fewer than this one) and delete orphaned temporary folders."""
    root = Path(run_dir) / "checkpoints"
    folder = save(trainer, root / f"step-{trainer.step_count:06d}")
    if distributed.is_main():
        prune(Path(run_dir), keep=max(1, keep))
    return folder


def _write(folder: Path, tensors: dict, meta: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_tensors(tmp / "state.safetensors", tensors)
    _write_file(tmp / "trainer.json", json.dumps(meta, default=_json_default).encode())
    # COMPLETE last: a folder without it, or whose files are not the sizes it names, is never loaded
    sizes = {name: (tmp / name).stat().st_size for name in ("state.safetensors", "trainer.json")}
    _write_file(tmp / "COMPLETE", json.dumps({"step": meta["step"], "sizes": sizes}).encode())
    _fsync_dir(tmp)
    if folder.exists():  # the same step saved again (an explicit save, or a step re-done after a crash)
        aside = folder.parent / f".old-{folder.name}-{os.getpid()}"
        os.replace(folder, aside)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
        shutil.rmtree(aside)
    else:
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)


def _write_tensors(path: Path, tensors: dict) -> None:
    """safetensors straight to the file (no second copy of the weights in memory as bytes), then fsync."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable: on Linux only an fsync of the folder itself does."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(run_dir: Path, keep: int) -> None:
    """Keep one folder for each of the newest `keep` saved steps and delete every other checkpoint folder of
    the run: older steps, a second copy of a step, and temporary folders left by a crashed save (only the main
    process of one run writes here, so any left now are orphans, complete or not). For a step, the folder
    kept is its `step-*` one if it has one (else a completed temporary, or version 1's folder)."""
    found = candidates(run_dir)
    by_step: dict[int, Path] = {}
    for step, folder in sorted(found, key=lambda c: (c[0], _STEP.search(c[1].name) is not None)):
        by_step[step] = folder  # the named folder sorts last within a step, so it wins
    kept = {by_step[s] for s in sorted(by_step)[-keep:]}
    root = run_dir / "checkpoints"
    temporaries = [f for f in root.iterdir() if f.name.startswith((".tmp-", ".old-"))] if root.is_dir() else []
    temporaries += [f for f in run_dir.iterdir() if f.name.startswith((".checkpoint.tmp-", ".checkpoint.old-"))]
    for folder in ({f for _, f in found} | set(temporaries)) - kept:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# finding and reading


def is_complete(folder: Path) -> int | None:
    """The step of a complete checkpoint folder, else None. Version 2: COMPLETE names the files' sizes.
    Version 1 (no COMPLETE): trainer.json parses and the safetensors file is as long as its header says."""
    try:
        if (folder / "COMPLETE").exists():
            done = json.loads((folder / "COMPLETE").read_text())
            if all((folder / n).stat().st_size == size for n, size in done["sizes"].items()):
                return int(done["step"])
            return None
        meta = json.loads((folder / "trainer.json").read_text())
        if meta.get("format") == FORMAT and _safetensors_whole(folder / "state.safetensors"):
            return int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _safetensors_whole(path: Path) -> bool:
    """The file ends where its header says its last tensor ends (a write cut short is shorter)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return path.stat().st_size == 8 + n + end


def candidates(run_dir) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in a run folder: version 2's `checkpoints/step-*` and their
    temporary folders completed before a crash; version 1's `checkpoint/` and the hidden copies its save
    could leave behind when killed between its two renames."""
    run_dir = Path(run_dir)
    folders = [f for f in run_dir.iterdir() if _LEGACY.match(f.name)] if run_dir.is_dir() else []
    root = run_dir / "checkpoints"
    if root.is_dir():
        folders += [f for f in root.iterdir() if f.is_dir()]
    return [(step, f) for f in folders if (step := is_complete(f)) is not None]


def incomplete(run_dir) -> list[Path]:
    """Checkpoint folders in their final place (not temporaries) that are not complete: damaged after they
    were written (a file deleted or cut short). Never written by `save`, which renames only complete ones."""
    run_dir = Path(run_dir)
    named = [run_dir / "checkpoint"] + (sorted((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else [])
    return [f for f in named if f.is_dir() and is_complete(f) is None]


def latest(run_dir) -> Path | None:
    """The newest complete checkpoint of a run folder, or None when it has none."""
    found = candidates(run_dir)
    return max(found, key=lambda c: (c[0], _STEP.search(c[1].name) is not None))[1] if found else None


def load(trainer, folder, check: bool = True) -> None:
    """Restore a checkpoint written by `save` into `trainer`, after `check_fits`: nothing in the trainer
    changes when the checkpoint is refused. check=False: the trainer's own checkpoint, read back to undo a
    failed update (`PPOTrainer.step`), restored as it was saved."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if is_complete(folder) is None:
        copies = [f for f in folder.parent.glob(f".*-{folder.name}-*") if is_complete(f) is not None]
        raise CheckpointError(
            f"{folder} is not a complete labkit PPO checkpoint (COMPLETE, trainer.json or state.safetensors missing "
            "or cut short). Nothing was loaded." + (f" A save of it was interrupted; complete copies: "
                                                   f"{', '.join(map(str, copies))}." if copies else ""))
    meta = json.loads((folder / "trainer.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    changes = check_fits(trainer, meta, tensors, folder) if check else None
    params = trainer.params
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(distributed.like(tensors[f"param.{i}"], p))  # this process's slice when sharded
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = distributed.like(v, params[int(pid)])
    for k, v in meta["optimizer"]["scalars"].items():
        pid, name = k.split(".", 1)
        adam = isinstance(trainer.optimizer, torch.optim.Adam)
        state.setdefault(int(pid), {})[name] = torch.tensor(v) if name == "step" and adam else v
    trainer.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    trainer.scheduler.load_state_dict(meta["scheduler"])
    trainer.kl_ctl.load_state_dict(meta["kl_controller"])
    trainer.step_count = meta["step"]
    trainer.history = meta["history"]
    _restore_rng(trainer, tensors, meta)
    if changes is not None:
        _apply_changes(trainer, changes)
        trainer.resume_changes = changes


# What a resumed run takes from its new config, reported: the trainer reads these each update (or they are
# re-applied after loading: the learning rate and its schedule, the KL target and horizon).
# The rest cannot change mid-run: value model and LoRA shape the saved tensors, the optimiser kind their
# state; the seed and init_beta only set where a run starts (the random streams and beta continue from the
# checkpoint).
FIXED_FIELDS = ("value_model", "lora_r", "lora_alpha", "optimizer", "seed", "init_beta")


def check_fits(trainer, meta: dict, tensors: dict, folder) -> list[str]:
    """Refuse a checkpoint of another run (format, task, model, tokenizer, value model, LoRA, tensors), with
    what differs and what to do; return the config changes that will be applied ("field: old -> new")."""
    from labkit.models import identity_differences

    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder} is not a labkit PPO checkpoint (format {meta.get('format')!r}).")
    if meta.get("version", 1) > VERSION:
        raise CheckpointError(f"{folder} was written by a newer labkit (checkpoint version {meta['version']}, this "
                              f"labkit reads up to {VERSION}): upgrade labkit to resume it.")
    fresh_run = "Resume it with the same settings, or give this run a new run_dir to start afresh."
    saved_task, task = _with_legacy_truncation(meta.get("task", {})), asdict(trainer.task)
    differing = [k for k, v in task.items() if k in saved_task and saved_task[k] != v]
    if differing:
        task_diff = "; ".join(f"{k}: {saved_task[k]!r} -> {task[k]!r}" for k in differing)
        hint = _legacy_truncation_hint(meta.get("task", {}), task, differing)
        raise CheckpointError(f"{folder} was trained on another task ({task_diff}). {hint or fresh_run}")
    identity = meta.get("identity")
    if identity is not None:
        model_diff = identity_differences(identity["model"], trainer.identity["model"])
        if model_diff:
            raise CheckpointError(
                f"{folder} was trained from another model than this trainer's policy ({'; '.join(model_diff)}): its "
                "KL would be measured against the wrong reference. Load the model the run started from "
                f"({identity['model'].get('name') or 'see trainer.json'}). {fresh_run}")
    saved_cfg, cfg = meta.get("config", {}), asdict(trainer.config)
    fixed = [f"{k}: {saved_cfg[k]!r} -> {cfg[k]!r}" for k in FIXED_FIELDS if k in saved_cfg and saved_cfg[k] != cfg[k]]
    if fixed:
        raise CheckpointError(f"{folder} was saved with other settings that cannot change mid-run ({'; '.join(fixed)}). "
                              f"{fresh_run}")
    if (saved_cfg.get("kl_target") is None) != (trainer.config.kl_target is None):
        raise CheckpointError(f"{folder}: kl_target {saved_cfg.get('kl_target')!r} -> {trainer.config.kl_target!r} "
                              f"switches between a fixed and an adaptive beta, which cannot change mid-run. {fresh_run}")
    n_params = sum(1 for k in tensors if k.startswith("param."))
    shapes = [tuple(tensors[f"param.{i}"].shape) for i in range(n_params)]
    mine = [tuple(p.shape) for p in trainer.params]
    if shapes != mine:
        raise CheckpointError(f"{folder} holds {n_params} trainable tensors of other shapes than this trainer's "
                              f"{len(mine)}: build the trainer with the same model, LoRA and value settings as the "
                              "saved run.")
    return [f"{k}: {saved_cfg[k]!r} -> {cfg[k]!r}" for k in cfg if k in saved_cfg and saved_cfg[k] != cfg[k]]


def _with_legacy_truncation(saved_task: dict) -> dict:
    """A saved task as today's fields read it. A truncation rule saved before `TruncationRule.tokens` existed
    cut at every token containing its text (labkit then had only that rule): it reads as tokens="contains", so
    a task that asks for it resumes, and the default "exact" (a different task) is refused (`_legacy_truncation_hint`)."""
    rule = saved_task.get("truncation")
    if isinstance(rule, dict) and "tokens" not in rule:
        return {**saved_task, "truncation": {**rule, "tokens": "contains"}}
    return saved_task


def _legacy_truncation_hint(saved_task: dict, task: dict, differing: list[str]) -> str:
    """What to do when a task differs from a saved one only by a pre-`tokens` truncation rule (the broad set)
    against the same rule with exact matching; else "". `differing`: the task fields that differ."""
    rule, now = saved_task.get("truncation"), task.get("truncation")
    if differing != ["truncation"] or not (isinstance(rule, dict) and "tokens" not in rule and isinstance(now, dict)):
        return ""
    if {**rule, "tokens": now.get("tokens")} != now:
        return ""  # the text or `after` differs too: another task whatever the matching
    return (f"It was saved before TruncationRule had `tokens`: that run cut responses (and trimmed queries) at every "
            f"token containing {rule.get('text')!r} (the broad set, tokens='contains'), and this task matches the "
            f"exact token only (tokens={now.get('tokens')!r}, as released). To resume it, pass the task with "
            "TruncationRule(..., tokens='contains'), e.g. task.with_(truncation=dataclasses.replace(task.truncation, "
            "tokens='contains')); or give this run a new run_dir to start afresh with exact truncation.")


def _apply_changes(trainer, changes: list[str]) -> None:
    """Re-apply the new config where loading the checkpoint restored the old value: the peak learning rate
    and decay horizon (the schedule continues from the saved update), the KL target and horizon."""
    cfg = trainer.config
    sched = trainer.scheduler
    sched.base_lrs = [cfg.lr for _ in sched.base_lrs]
    for group, base, factor in zip(trainer.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * factor(sched.last_epoch)  # lr_lambdas come from this run's total_updates
    sched._last_lr = [g["lr"] for g in trainer.optimizer.param_groups]
    if hasattr(trainer.kl_ctl, "target"):
        trainer.kl_ctl.target, trainer.kl_ctl.horizon = trainer.kl_target, cfg.kl_horizon


def _restore_rng(trainer, tensors: dict, meta: dict) -> None:
    """This process's random state from a checkpoint written by as many processes; else new streams."""
    saved_world, r = meta.get("world_size", 1), distributed.rank()
    if saved_world != distributed.world_size():
        # written by a different number of processes: derive fresh per-process streams from the step
        if distributed.is_main():
            print(f"The checkpoint was written by {saved_world} process(es), this run has "
                  f"{distributed.world_size()}: sampling continues with new random streams.")
        seed = [distributed.process_seed(trainer.config.seed), trainer.step_count]
        trainer.rng = np.random.default_rng(seed)
        trainer.generator.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        return
    suffix = f".{r}" if saved_world > 1 else ""
    trainer.rng.bit_generator.state = meta["process_numpy_rng"][r] if saved_world > 1 else meta["numpy_rng"]
    torch.set_rng_state(tensors["rng.torch_cpu" + suffix])
    generator_state = tensors["rng.generator" + suffix]
    on_cuda = trainer.generator.device.type == "cuda"
    trainer.generator.set_state(generator_state if on_cuda else generator_state.to(trainer.generator.device))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")
