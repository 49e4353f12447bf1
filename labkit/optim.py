"""Adam with TensorFlow's epsilon, and the linear learning-rate decay used for both reward model and PPO.

Why TF semantics matter: the released code ran tf.train.AdamOptimizer(eps=1e-5), which adds eps to the
*un-bias-corrected* sqrt(v). PyTorch's Adam adds eps to the bias-corrected sqrt(v) / sqrt(1 - b2^t), which
is much larger early in training, so the same eps damps small gradients far less: Huang et al. (2023) saw
~6x larger early steps (approxkl 0.0024 vs 0.00037) and KL spikes on larger models. On step 1,
for a gradient g:
    TF:      delta = lr * g / (|g| + eps / sqrt(1 - b2))   (eps effectively ~31.6x larger)
    PyTorch: delta = lr * g / (|g| + eps)
"""

import math

import torch
from torch.optim import adam
from torch.optim.lr_scheduler import LambdaLR


class TFAdam(torch.optim.Optimizer):
    """Adam as TensorFlow 1 implements it (tf.train.AdamOptimizer).

    At step t, for each parameter p with gradient g:
        lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t)
        m    = b1 * m + (1 - b1) * g
        v    = b2 * v + (1 - b2) * g^2
        p   -= lr_t * m / (sqrt(v) + eps)
    Parameters without a gradient are skipped (their step count does not advance).
    """

    def __init__(self, params, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-5):
        if lr < 0.0:
            raise ValueError(f"TFAdam: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"TFAdam: betas must be in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"TFAdam: eps must be >= 0, got {eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            fused: dict[tuple, list[torch.Tensor]] = {}  # (step, device, dtype) -> params for one fused call
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # m
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # v
                if _fusable(p):
                    fused.setdefault((int(state["step"]), p.device, p.dtype), []).append(p)
                    continue
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                # Bias correction folded into the step size; eps stays on the raw sqrt(v) (the TF difference).
                lr_t = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                p.addcdiv_(m, v.sqrt().add_(eps), value=-lr_t)
            for (t, _, _), params in fused.items():
                # PyTorch's fused Adam kernel (one pass over each tensor instead of several; measured by
                # `python benchmarks/optimizer_step.py`) computes lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t)
                # + eps'), the step above exactly when eps' = eps / sqrt(1 - b2^t).
                states = [self.state[p] for p in params]
                steps = [torch.tensor(float(t), device=p.device) for p in params]  # the kernel counts these up
                adam.adam(params, [p.grad for p in params], [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                          [], steps, fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=0.0,
                          eps=eps / math.sqrt(1.0 - beta2 ** (t + 1)), maximize=False)
                for st in states:
                    st["step"] = t + 1
        return loss


def _fusable(p: torch.Tensor) -> bool:
    """Whether PyTorch's fused Adam kernel takes `p`: a plain (unsharded) floating tensor on a CPU or GPU."""
    return type(p.data) is torch.Tensor and p.dtype in (torch.float32, torch.float64) and p.device.type in ("cpu", "cuda")


def make_optimizer(params, lr: float, kind: str = "tf_adam") -> torch.optim.Optimizer:
    """Adam with eps = 1e-5: "tf_adam" (TensorFlow semantics, the default, as in the released code) or
    "adam" (torch.optim.Adam with the same eps, to compare against)."""
    if kind == "tf_adam":
        return TFAdam(params, lr=lr, eps=1e-5)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, eps=1e-5)
    raise ValueError(f"unknown optimizer kind {kind!r}: expected 'tf_adam' or 'adam'")


def linear_decay_scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    """lr at step s = lr * max(0, 1 - s / total_steps): linear decay to 0 at total_steps (call .step()
    after each optimizer step)."""

    def factor(step: int) -> float:
        return max(0.0, 1.0 - step / total_steps)

    return LambdaLR(optimizer, factor)


def gradients_are_finite(params) -> bool:
    """No NaN or inf in this process's gradients of `params`: checked before an optimiser step, which would
    spread one NaN into every weight it touches (and Adam's moments) for good. A sharded (DTensor) gradient
    is checked on this process's shard: combine the answers over the processes (`distributed.on_every_process`)."""
    return tensors_are_finite([p.grad for p in params if p.grad is not None])


def tensors_are_finite(tensors) -> bool:
    """No NaN or inf in any of `tensors` (this process's shard of a DTensor): one fused norm per tensor, one
    sync."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    if not local:
        return True
    norms = torch._foreach_norm([t.detach() for t in local])  # inf or NaN exactly when an entry is
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
