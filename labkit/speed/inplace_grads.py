"""The vocabulary matrices' gradients, accumulated in place into `.grad`.

Why: a causal LM's input embedding and output head are (V, H) matrices (49,152 x 576 = 113 MB on SmolLM2,
which ties the two). In a plain backward every micro-batch builds fresh (V, H) tensors for them: the
embedding's dense gradient (zero-filled, then index-added), the head's weight gradient (a matmul output),
their sum for a tied weight, and then adds that into `.grad`; on a CPU fresh large tensors are also fresh
pages to fault in. Here the embedding's backward index-adds its rows straight into `weight.grad`, and the
head's backward runs its matmul with `addmm_` into `weight.grad`: one (V, H) buffer per optimiser step,
allocated when `.grad` is None, nothing of that size per micro-batch: fewer page faults and a lower peak
(`python benchmarks/vocab_grads_ab.py`, an A/B in one process).

`accumulate_vocab_grads_in_place(model)` swaps the classes of the model's input-embedding and output-head
modules for subclasses whose forward does this while their weight is trained and gradients are on; frozen
weights (rho, a reward model being scored, LoRA's base) take the plain path. The gradient equals autograd's
(tests/test_inplace_grads.py); the difference is only where it is written. Like autograd's own accumulation, a
backward pass adds into `.grad`, so callers zero it between optimiser steps as usual.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _grad_buffer(weight: nn.Parameter) -> torch.Tensor:
    """`weight.grad`, created as zeros the first time (after `zero_grad(set_to_none=True)`)."""
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    return weight.grad


class _EmbeddingFn(torch.autograd.Function):
    """F.embedding(ids, weight) whose backward index-adds into weight.grad (returns no gradient for weight)."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        ids = ids.reshape(-1)  # (N,)
        rows = grad.reshape(ids.shape[0], -1).to(weight.dtype)  # (N, H)
        if ctx.padding_idx is not None:  # the padding row gets no gradient, as in F.embedding
            keep = ids != ctx.padding_idx
            ids, rows = ids[keep], rows[keep]
        _grad_buffer(weight).index_add_(0, ids, rows)
        return None, None, None


class _LinearFn(torch.autograd.Function):
    """F.linear(x, weight) without bias whose backward adds x^T-weighted grads into weight.grad in place."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x)
        ctx.weight = weight
        return F.linear(x, weight)  # under autocast: bf16 matmul, as the plain module

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad.matmul(weight.to(grad.dtype)) if ctx.needs_input_grad[0] else None  # (..., H)
        g2 = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)  # (N, V)
        _grad_buffer(weight).addmm_(g2.t(), x.reshape(-1, x.shape[-1]).to(weight.dtype))  # += g^T x: (V, H)
        return grad_x, None


def _trained(weight: torch.Tensor) -> bool:
    """Take the in-place path only for a leaf parameter being trained (`.grad` is where autograd would write)."""
    return weight.requires_grad and torch.is_grad_enabled() and isinstance(weight, nn.Parameter)


class InPlaceGradEmbedding(nn.Embedding):
    """nn.Embedding whose weight gradient is index-added into `weight.grad` in place."""

    def forward(self, input):
        if not _trained(self.weight):
            return super().forward(input)
        return _EmbeddingFn.apply(input, self.weight, self.padding_idx)


class InPlaceGradLinear(nn.Linear):
    """A bias-free nn.Linear (an LM head) whose weight gradient is added into `weight.grad` in place."""

    def forward(self, input):
        if not _trained(self.weight):
            return super().forward(input)
        return _LinearFn.apply(input, self.weight)


def accumulate_vocab_grads_in_place(model) -> list[str]:
    """Swap `model`'s input embedding and (bias-free) output head for the in-place-gradient versions.

    Returns what was swapped ("embedding", "head"); modules of other types, or with options these do not
    reproduce (max_norm, scale_grad_by_freq, sparse, a bias), are left alone. Safe to call twice.
    """
    done = []
    emb = model.get_input_embeddings()
    if type(emb) in (nn.Embedding, InPlaceGradEmbedding) and emb.max_norm is None and not emb.scale_grad_by_freq \
            and not emb.sparse:
        emb.__class__ = InPlaceGradEmbedding
        done.append("embedding")
    head = model.get_output_embeddings()
    if type(head) in (nn.Linear, InPlaceGradLinear) and head.bias is None:
        head.__class__ = InPlaceGradLinear
        done.append("head")
    return done
