"""The PPO trainer's checkpoints: safetensors for tensors, JSON for the rest (no pickle).

A checkpoint holds everything a resumed run needs to repeat the same updates: the trainable weights (pi's,
or its LoRA adapters, and the value function's), the optimiser's state, the learning-rate schedule, the KL
controller, the history, and every random state (numpy's for prompts and minibatch order, torch's for
sampling). Under several processes each process's random state is kept, and the weights of a sharded run
are gathered whole, so the files are what one process would write.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from labkit import distributed

FORMAT = "labkit-ppo-checkpoint"


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
        "format": FORMAT, "version": 1, "step": trainer.step_count,
        "config": asdict(trainer.config), "task": asdict(trainer.task), "optimizer": opt_meta,
        "scheduler": trainer.scheduler.state_dict(), "kl_controller": trainer.kl_ctl.state_dict(),
        "numpy_rng": trainer.rng.bit_generator.state, "history": trainer.history,
        "world_size": distributed.world_size(), "process_numpy_rng": process_numpy_rng,
    }
    return tensors, meta


def save(trainer, folder) -> Path:
    """Write the trainer's full state atomically: a crash mid-save leaves the previous checkpoint intact.

    Under several processes every process calls it (their random states are gathered); the main process
    writes and the others wait for it.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors, meta = state_of(trainer)
    if not distributed.is_main():
        distributed.barrier()  # until the main process has written the checkpoint
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps(meta, default=_json_default))
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return folder


def load(trainer, folder) -> None:
    """Restore a checkpoint written by `save` into `trainer` (built with the same models)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "trainer.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder} is not a labkit PPO checkpoint.")
    tensors = load_file(str(folder / "state.safetensors"))
    params = trainer.params
    n_params = sum(1 for k in tensors if k.startswith("param."))
    if n_params != len(params):
        raise ValueError(f"Checkpoint {folder} has {n_params} trainable tensors, this trainer {len(params)}: "
                         "build the trainer with the same model, LoRA and value settings as the saved run.")
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
