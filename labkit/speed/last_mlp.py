"""The last transformer block's MLP only at the positions whose outputs are read.

Why: the last block's keys and values are needed at every position (attention reads them), but what comes
after its attention (the MLP, the final norm, the head) matters only where the caller reads the output: in a
PPO training pass over 64 query + 23 response positions, the 24 positions that predict response tokens. On
SmolLM2 the MLP is 75% of a block's matmul weights, so this skips 1.7% of the training pass's FLOPs (and more
of a prefill, where one position is read).

`prune_last_mlp(model)` puts a forward pre-hook on the last block's `mlp` that gathers the read positions
(B, K, H), and a forward hook that scatters its output back into zeros (B, T, H): the other positions' final
hidden states are then not the model's, and `sampling.lm_forward` returns only the read ones. The positions
reach the hooks through a context variable that `reading_only` sets around one model call. Works for any
model whose blocks have a position-wise `mlp` (Llama, GPT-2, ...); others are left alone.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from labkit.speed.blocks import transformer_blocks

# (positions (K,), T) while a `reading_only` block runs: the positions of its T inputs whose outputs are read
_ONLY: contextvars.ContextVar = contextvars.ContextVar("labkit_only_positions", default=None)


def prune_last_mlp(model) -> bool:
    """Hook the last block's MLP (see the module docstring); False (and nothing done) where there is none.
    Copies of the model keep the hooks."""
    blocks = transformer_blocks(model)
    mlp = getattr(blocks[-1], "mlp", None) if blocks else None
    if not isinstance(mlp, torch.nn.Module):
        return False
    mlp.register_forward_pre_hook(_gather_read_positions)
    mlp.register_forward_hook(_scatter_read_positions)
    return True


@contextlib.contextmanager
def reading_only(base, only: torch.Tensor | None, T: int):
    """Around one call of `base` on T positions of which only `only` (1-D) are read. Nothing happens when
    all are read, or while gradients flow through checkpointed blocks: their backward recomputes the forward
    outside this block, where the hooks see no positions, and the recomputation must match the forward."""
    if only is None or only.numel() >= T or (torch.is_grad_enabled() and _checkpointed(base)):
        yield
        return
    token = _ONLY.set((only, T))
    try:
        yield
    finally:
        _ONLY.reset(token)


def _gather_read_positions(module, args):
    only = _ONLY.get()
    if only is None or args[0].dim() != 3 or args[0].shape[1] != only[1]:
        return None
    return (args[0][:, only[0]], *args[1:])  # (B, K, H)


def _scatter_read_positions(module, args, out):
    only = _ONLY.get()
    if only is None or args[0].shape[1] != only[0].numel():  # the pre-hook did not gather
        return None
    full = out.new_zeros(out.shape[0], only[1], out.shape[2])  # (B, T, H)
    return full.index_copy(1, only[0], out)


def _checkpointed(base) -> bool:
    """Blocks recompute their forward in backward (labkit.speed.checkpointing, or HF's in train mode)."""
    return any(getattr(type(m), "_labkit_checkpointed", False)
               or (base.training and getattr(m, "gradient_checkpointing", False) is True) for m in base.modules())
