"""RMSNorm and the SwiGLU product of Llama-family blocks as compiled kernels on a CPU.

Why: in a training micro-batch on SmolLM2 (16 x 87 positions) the matrix products run near the machine's
peak, and much of the rest is elementwise work that eager PyTorch does one pass over memory at a time:
transformers' RMSNorm is six kernels forward (cast, square, mean, add, rsqrt, two products) and more backward,
61 times per pass; the MLP's silu(gate) * up is two forward and three backward, each over a (16, 87, 1536)
tensor, and keeps silu(gate) alive for the backward. `torch.compile` fuses each into one loop forward and one
backward, with fewer tensors allocated and saved (`python benchmarks/fused_kernels.py` measures eager against
compiled, alternating in one process; its results land in benchmarks/results/fused_kernels.jsonl).

`use_fused_kernels(model)` swaps the classes of a model's `LlamaRMSNorm` and SiLU `LlamaMLP` modules for the
subclasses below (same parameters and state dict; copies of the model keep them). Their forward takes the
compiled kernel for CPU tensors and transformers' own formula elsewhere (on a GPU, under `torch.compile` of
the whole model, or inside `eager()`). The kernels compute the same formulas in fp32 (rounding differs from
eager by ~1e-7 relative). The first call per kind of input (with or without gradients, one position or many)
compiles for a few seconds; inductor's cache on disk makes later processes faster. If compiling fails (no C++
compiler, say), the formula runs eagerly from then on, after one warning.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: x / sqrt(mean(x^2) + eps) over the last dim, in fp32, times the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the product that feeds a Llama MLP's down projection."""
    return F.silu(gate) * up


_COMPILED = {fn: torch.compile(fn, dynamic=True) for fn in (rms_norm, swiglu)}
# Each kernel is compiled once per variant of its inputs (dtype, grad mode, whether the weight is trained, eps:
# a policy, rho, a reward model and float64 checks in one process make more than torch's default of 8). Past
# that limit torch runs new variants eagerly while old ones stay compiled, so two passes that should agree
# bit for bit (pi and rho at equal weights: a KL of exactly 0) could take different kernels.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
_state = {"enabled": True, "failed": None}  # failed: the compile error, once one happened


@contextlib.contextmanager
def eager():
    """Run the modules' eager formulas inside this block (benchmarks and tests compare the two)."""
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before


def _run(fn, *args):
    """fn(*args) through its compiled kernel where that applies, else eagerly."""
    if (not _state["enabled"] or _state["failed"] is not None or args[0].device.type != "cpu"
            or torch.compiler.is_compiling()):
        return fn(*args)
    try:
        return _COMPILED[fn](*args)
    except Exception as err:  # noqa: BLE001 - told apart below: eager raising too means bad input, not the compiler
        out = fn(*args)
        _state["failed"] = err
        warnings.warn(f"labkit: compiling the fused {fn.__name__} kernel failed ({type(err).__name__}: "
                      f"{str(err).splitlines()[0][:200] if str(err) else ''}); running RMSNorm and SwiGLU eagerly "
                      "from now on (correct, slower on a CPU). A working C++ compiler (gcc) lets torch.compile build them.",
                      RuntimeWarning, stacklevel=3)
        return out


class FusedRMSNorm(LlamaRMSNorm):
    """LlamaRMSNorm whose forward runs the compiled `rms_norm` on a CPU."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _run(rms_norm, hidden_states, self.weight, self.variance_epsilon)


class FusedSwiGLUMLP(LlamaMLP):
    """LlamaMLP (with SiLU) whose gate-up product runs the compiled `swiglu` on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_run(swiglu, self.gate_proj(x), self.up_proj(x)))


def use_fused_kernels(model) -> int:
    """Swap `model`'s LlamaRMSNorm and SiLU LlamaMLP modules to the fused subclasses; returns how many.
    Other architectures (GPT-2, ...) are left as they are."""
    n = 0
    for module in model.modules():
        if type(module) is LlamaRMSNorm:
            module.__class__ = FusedRMSNorm
            n += 1
        elif type(module) is LlamaMLP and isinstance(module.act_fn, (SiLUActivation, torch.nn.SiLU)):
            module.__class__ = FusedSwiGLUMLP
            n += 1
    return n
