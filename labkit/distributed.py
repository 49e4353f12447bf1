"""Data parallelism over the processes that `accelerate launch` starts: small helpers on torch.distributed.

Two layouts, chosen by the accelerate config the job is launched with:
- data parallel (a MULTI_GPU config, or --multi_gpu on CPUs): every process holds full copies of the
  models; after each backward pass, before the optimiser step, `average_gradients` all-reduces the
  gradients of the trainable parameters (in flat buckets), which is what DDP does. The models are not
  wrapped in DDP; the explicit all-reduce computes the same average;
- sharded (an FSDP config, fsdp_version 2): `shard_model` applies torch's FSDP2 `fully_shard` to every
  transformer block and the whole model, so each process holds a 1/N slice of the weights, gradients and
  Adam state; FSDP gathers a block's weights when it runs and reduce-scatters its gradients. Small
  unsharded pieces (the value head, the reward head) are still averaged by `average_gradients`.
In both, each process samples its own share of the rollouts / comparisons; the statistics the paper takes
over a batch (reward normalisation, reward and advantage whitening, the KL fed to the controller,
reported metrics) are taken over all processes' samples, so an N-process run with B samples per process
computes what one process with N*B samples would; each process seeds its sampling with
`process_seed(seed) = seed + rank * 100003` (the released code's rule), and only the main process writes
files. Sharded models need every process in every forward pass, so a process with less work than the
others runs stand-in steps (`max_over_processes`).

accelerate only launches the processes and sets up the process group (`init_processes`). Every helper is
a no-op, or the plain single-process computation, when torch.distributed is not initialised: a notebook
never notices this module.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from typing import Callable, Iterable, TypeVar

import torch
import torch.distributed as dist

SEED_STRIDE = 100_003
"""Per-process seed offset: process r seeds with seed + r * SEED_STRIDE, as the released code did."""

GRADIENT_BUCKET_NUMEL = 2**24
"""Gradients are all-reduced in flat buckets of at most this many elements (64 MB in fp32)."""

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------
# who am I


def init_processes() -> torch.device:
    """Join the process group set up by `accelerate launch` (or torchrun); return this process's device.

    In a plain `python` run this is a single process on the default device (CUDA if present, else CPU).
    Without CUDA the processes talk over gloo; with CUDA over NCCL, one GPU per process.
    """
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise RuntimeError(
            "labkit was launched with DeepSpeed, which it does not run: it shards with FSDP2 instead. For ZeRO-2 "
            "(sharded gradients and optimiser state) launch with `--config_file examples/accelerate/fsdp.yaml` and "
            "`fsdp_reshard_after_forward: false`; for ZeRO-3 (parameters sharded too) keep it true. See docs/scale_out.md."
        )
    if _env_flag("ACCELERATE_USE_FSDP"):
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise RuntimeError(
                "labkit shards with FSDP2 (torch's fully_shard) only; this launch asks for FSDP version "
                f"{os.environ.get('FSDP_VERSION', '1')}. Set `fsdp_version: 2` in the accelerate config "
                "(examples/accelerate/fsdp.yaml)."
            )
        if _env_flag("FSDP_OFFLOAD_PARAMS"):
            raise RuntimeError("labkit does not support `fsdp_offload_params: true` (parameters offloaded to the CPU); "
                               "set it to false, or use LoRA (PPOConfig.lora_r) to cut memory.")
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true" or not torch.cuda.is_available()
    return PartialState(cpu=cpu).device


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def finish() -> None:
    """Leave the process group at the end of a launched job (no-op in a single process)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside a process group of any size (started by `accelerate launch` / torchrun)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """The process that writes checkpoints, metrics and reads the label database."""
    return rank() == 0


def shows_progress(progress: bool) -> bool:
    """Whether to draw a progress bar: asked for, on the main process, and in the main thread (a notebook bar
    drawn from a background thread, such as the online loop's refits, lands in whichever cell happens to run)."""
    return progress and is_main() and threading.current_thread() is threading.main_thread()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def process_seed(seed: int) -> int:
    """This process's seed: seed + rank * 100003 (a single process keeps `seed`)."""
    return seed + rank() * SEED_STRIDE


def shard(items: list[T]) -> list[T]:
    """This process's share of a list that every process holds: items rank, rank + N, rank + 2N, ..."""
    return items[rank() :: world_size()]


def _comm_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# sharding (FSDP2) under an accelerate FSDP config


def sharded() -> bool:
    """True when launched with an accelerate FSDP config: models are sharded across the processes (FSDP2)."""
    return is_distributed() and _env_flag("ACCELERATE_USE_FSDP")


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded_tensor(t) -> bool:
    """A parameter (or optimiser state) sharded by FSDP2: a DTensor holding this process's slice."""
    return sharded() and isinstance(t, _dtensor_type())


def shard_model(model) -> None:
    """Shard `model` across the processes with FSDP2, in place, when launched with an FSDP config; else nothing.

    Each transformer block (the classes in the model's `_no_split_modules`, or accelerate's
    `fsdp_transformer_layer_cls_to_wrap`) becomes its own FSDP unit, then the whole causal LM; the tied
    embedding and vocabulary head stay in the root unit. Every process must call this on the same models in
    the same order, before building an optimiser on them. labkit calls every model through its own
    `forward` (`sampling.lm_forward`), so FSDP's hooks gather a unit's parameters just before it runs and
    free them after (`fsdp_reshard_after_forward: true`, ZeRO-3-like; false keeps them until the backward,
    ZeRO-2-like). Gradients come back reduce-scattered (averaged) into each process's slice.
    """
    if not sharded():
        return
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from labkit.speed.blocks import transformer_blocks, unwrap

    base = unwrap(model)
    if isinstance(base, FSDPModule):
        return  # already sharded (a reward model handed to a second trainer)
    mesh = _device_mesh("cuda" if dist.get_backend() == "nccl" else "cpu", world_size())
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    extra = {n.strip() for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip()}
    blocks = transformer_blocks(base, extra)
    if not blocks:
        block_names = set(getattr(base, "_no_split_modules", None) or []) | extra
        raise RuntimeError(f"Found no transformer blocks to shard in {type(base).__name__} (looked for {sorted(block_names)}); "
                           "name the block class with `fsdp_transformer_layer_cls_to_wrap` in the accelerate config.")
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    # given explicitly, FSDP reshards the root too (its default keeps the root gathered after the forward,
    # which for rho and the reward model, never run backward, would mean for ever)
    fully_shard(base, mesh=mesh, reshard_after_forward=reshard)


@functools.lru_cache(maxsize=None)
def _device_mesh(device_type: str, n: int):
    """One 1-D mesh over all n processes, shared by every sharded model."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (n,))


def local_and_total_numel(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters this process holds, parameters of the whole model): equal unless the module is sharded."""
    params = list(module.parameters())
    local = sum((p.to_local() if is_sharded_tensor(p) else p).numel() for p in params)
    return local, sum(p.numel() for p in params)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered from every process if it is sharded (a collective: every process must
    call it, in the same order), else `t` itself."""
    return t.full_tensor() if is_sharded_tensor(t) else t


def like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`full` (a whole tensor every process holds, e.g. read from a checkpoint) laid out as `target`: this
    process's slice of it when `target` is sharded, else `full` on target's device and dtype."""
    full = full.to(device=target.device, dtype=target.dtype)
    if not is_sharded_tensor(target):
        return full
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every process slices its own copy, no communication
    return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state as whole CPU tensors (gathered when sharded: a collective), each shared tensor once
    (a tied embedding and vocabulary head appear under one name), for safetensors."""
    out, seen = {}, set()
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = full_tensor(t).detach().cpu().contiguous()
    return out


def max_over_processes(n: int) -> int:
    """The largest `n` of any process: how many steps every process takes when sharded models need all of them
    in every forward pass (a process with less work runs stand-in steps whose results it discards)."""
    if not is_distributed():
        return n
    t = torch.tensor([float(n)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ------------------------------------------------------------------------------------------------
# reductions (new tensors; inputs are never modified)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of `x` over all processes (x may live on any device; the result is on x's)."""
    if not is_distributed():
        return x.detach().clone()
    out = x.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(x.device)


def on_every_process(flag: bool) -> bool:
    """`flag` holds on every process (one all-reduce; `flag` itself in one process)."""
    if not is_distributed():
        return flag
    return all_reduce_sum(torch.tensor([0.0 if flag else 1.0])).item() == 0


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Elementwise mean of `x` over all processes (each process's `x` counts once)."""
    if not is_distributed():
        return x.detach().clone()
    return all_reduce_sum(x) / world_size()


def global_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 mean and population variance over all processes' elements: two passes (sum, then squared
    deviations from the global mean). Processes may hold different numbers of elements, also zero."""
    flat = x.detach().double().flatten()
    n_and_sum = all_reduce_sum(torch.stack([flat.new_tensor(float(flat.numel())), flat.sum()]))
    n = n_and_sum[0]
    if n.item() == 0:
        raise ValueError("No process holds any element to take statistics of.")
    mean = n_and_sum[1] / n
    var = all_reduce_sum(((flat - mean) ** 2).sum()) / n
    return mean, var


def global_mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population (biased) std of every element of `x` on every process, as if concatenated.

    Equals the single-process result over the concatenation up to rounding (accumulated in float64).
    A single process returns `x.mean(), x.std(unbiased=False)` exactly.
    """
    if not is_distributed():
        return x.mean(), x.std(unbiased=False)
    mean, var = global_mean_var(x)
    return mean.to(x.dtype), var.sqrt().to(x.dtype)


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each float averaged over the processes (one all-reduce for the whole dict)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    t = all_reduce_mean(t)
    return {k: v for k, v in zip(keys, t.tolist())}


# ------------------------------------------------------------------------------------------------
# parameters and gradients


def _buckets(tensors: list[torch.Tensor], max_numel: int) -> Iterable[list[torch.Tensor]]:
    """Consecutive groups of tensors with one dtype and device and at most max_numel elements (or one tensor)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() > max_numel or t.dtype != bucket[0].dtype or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


@torch.no_grad()
def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's .grad by its mean over all processes (DDP's all-reduce), in place.

    Call after backward and before optimizer.step(). Each process's loss must be a mean over its own
    samples, scaled so that the average over processes is the loss of the whole batch (equal shares need
    no scaling). A parameter with a gradient on some process but none on another (a process with no
    samples this step) gets a zero gradient there; parameters without a gradient anywhere stay None.
    """
    if not is_distributed():
        return
    params = [p for p in params if not is_sharded_tensor(p)]  # FSDP already reduce-scattered (averaged) these
    if not params:
        return
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=_comm_device())
    has_grad = all_reduce_sum(has_grad)
    for p, count in zip(params, has_grad.tolist()):
        if count > 0 and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    n = world_size()
    for bucket in _buckets(grads, GRADIENT_BUCKET_NUMEL):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= n
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def prepare(trainable: Iterable[torch.Tensor], models: Iterable) -> None:
    """At a trainer's construction, before its optimiser exists: every process starts from the main process's
    trainable weights, then under an FSDP launch each model (None entries skipped) is split across the
    processes. Sharding replaces the parameters: collect the optimiser's list afterwards. A no-op in one
    process."""
    broadcast_parameters(trainable)
    for model in models:
        if model is not None:
            shard_model(model)


def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy the main process's values into every process's tensors (DDP does this when it wraps a model)."""
    if not is_distributed():
        return
    for p in params:
        dist.broadcast(p.data, src=src)


def weights_digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the exact bytes of the tensors, in order: equal digests mean bit-identical weights.
    Sharded tensors are gathered whole first (a collective)."""
    h = hashlib.sha256()
    for t in tensors:
        data = full_tensor(t).detach().cpu().contiguous().reshape(-1)
        h.update(str(data.dtype).encode())
        h.update(data.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_same_weights(tensors: Iterable[torch.Tensor]) -> str:
    """The weights' digest, after checking that every process holds the same one (RuntimeError if not)."""
    digest = weights_digest(tensors)
    digests = gather_objects(digest)
    if len(set(digests)) != 1:
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(f"Weights differ between processes: ranks {differing} differ from rank 0 "
                           f"(digests {[d[:12] for d in digests]}).")
    return digest


# ------------------------------------------------------------------------------------------------
# Python objects


def broadcast_object(obj: T, src: int = 0) -> T:
    """The main process's `obj` on every process (pickled; for small things such as labeled examples)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn: Callable[[], T]) -> T:
    """`fn()` on the main process only; every process gets its result.

    If `fn` raises on the main process, every process raises (no process is left waiting).
    """
    if not is_distributed():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every process
            error = e
    result, message = broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"The main process failed: {message}")
    return result
