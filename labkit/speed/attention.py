"""Attention over short padded sequences on a CPU: the query heads that share a key/value head as one product.

Why: PPO on the sentiment and descriptiveness tasks attends over 88 positions (64 query + 24 response
tokens), and queries of different lengths are left-padded, so every call carries a padding mask. With a mask,
PyTorch's CPU flash-attention kernel (what transformers' SDPA path runs) spends more time on its tiling than on
the arithmetic, and for grouped-query attention (SmolLM2: 9 query heads over 3 key/value heads) transformers
first copies every key/value head out to its 3 query heads. Here each group of query heads is stacked into one
(n_rep * q, D) matrix against its own (S, D) keys: two batched matrix products forward, five backward (with the
softmax probabilities kept from the forward), no copies of the keys and values. This wins for short keys
with a padding mask; without a mask SDPA's causal kernel is about as fast, and for long keys flash attention
wins (the kept probabilities, B x H x q x S floats per layer, grow with S^2). `python benchmarks/attention.py`
measures both side by side per key length; `MAX_KEYS` holds the crossovers it found.

`use_grouped_attention(model)` switches a Hugging Face model to `grouped_attention`, which hands every case
it does not cover to transformers' own SDPA function unchanged: no mask, a GPU, another dtype than fp32 or
bf16 autocast, dropout, one query position (decoding, where transformers packs the heads itself), more keys
than `MAX_KEYS`, and the extras some models pass (soft-capping, position biases, attention weights out).
The masks are transformers' SDPA masks (True = attend), so padding and sliding windows behave as under SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "labkit_grouped"
MAX_KEYS = {True: 128, False: 96}  # longest key length handled here, with / without gradients (measured crossovers)


class _GroupedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v, with the n_rep query heads of each key/value head as one matrix.

    query (B, H, q, D), key and value (B, KV, S, D) with H = KV * n_rep (head h reads key/value head
    h // n_rep, as transformers' `repeat_kv`), bias (b, 1, q, S) additive with b in {1, B}.
    Returns (B, H, q, D).
    """

    @staticmethod
    def forward(ctx, query, key, value, bias, scale):
        B, H, q, D = query.shape
        KV, S = key.shape[1], key.shape[2]
        n = H // KV
        qg = query.reshape(B, KV, n * q, D)  # the group's query heads stacked: (B, KV, n*q, D)
        scores = torch.matmul(qg, key.transpose(-1, -2)).mul_(scale)  # (B, KV, n*q, S)
        scores.view(B, KV, n, q, S).add_(bias.unsqueeze(2))  # bias (b, 1, 1, q, S) over every head
        probs = torch.softmax(scores, dim=-1)  # (B, KV, n*q, S)
        out = torch.matmul(probs, value)  # (B, KV, n*q, D)
        ctx.save_for_backward(qg, key, value, probs, out)
        ctx.scale = scale
        return out.view(B, H, q, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qg, key, value, probs, out = ctx.saved_tensors
        B, KV, nq, D = qg.shape
        g = grad_out.reshape(B, KV, nq, D)
        grad_value = torch.matmul(probs.transpose(-1, -2), g)  # (B, KV, S, D)
        # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O)
        grad_scores = torch.matmul(g, value.transpose(-1, -2))  # dP (B, KV, n*q, S)
        grad_scores.sub_(torch.linalg.vecdot(g, out).unsqueeze(-1)).mul_(probs).mul_(ctx.scale)
        grad_query = torch.matmul(grad_scores, key).view(grad_out.shape)  # (B, H, q, D)
        grad_key = torch.matmul(grad_scores.transpose(-1, -2), qg)  # (B, KV, S, D)
        return grad_query, grad_key, grad_value, None, None


def _additive_bias(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(b, 1, q, S) bias to add to the scores: 0 where a position may be attended, the dtype's lowest finite
    value where not (finite, so that a row with nothing to attend, a left-padding position's own row, gives
    finite numbers that nothing reads, where -inf would give NaN and NaN gradients)."""
    if mask.dtype != torch.bool:  # already additive
        return mask.to(like.dtype)
    return torch.full(mask.shape, torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device).masked_fill_(mask, 0.0)


def grouped_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, position_bias=None, **kwargs):
    """transformers' attention-function interface (as `sdpa_attention_forward`): query (B, H, q, D), key and
    value (B, KV, S, D), the SDPA mask (b, 1, q, S) or None; returns ((B, q, H, D), None)."""
    _, H, q, D = query.shape
    KV, S = key.shape[1], key.shape[2]
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    plain = (
        attention_mask is None or query.device.type != "cpu" or torch.is_autocast_enabled("cpu")
        or any(t.dtype != torch.float32 for t in (query, key, value))
        or dropout > 0 or q == 1 or S > MAX_KEYS[grad] or H % KV or value.shape[-1] != D
        or position_bias is not None or kwargs.get("softcap") is not None or kwargs.get("output_attentions")
        or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    bias = _additive_bias(attention_mask, query)
    scale = scaling if scaling is not None else D**-0.5
    out = _GroupedAttention.apply(query, key, value, bias, scale)  # (B, H, q, D)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_attention(model) -> bool:
    """Run `model`'s attention through `grouped_attention` where the model supports choosing it (every model
    written against transformers' attention interface: Llama/SmolLM2, GPT-2, ...); others keep theirs.
    Registers the function under NAME with transformers (again: the same entry) and SDPA's masks for it."""
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return False
    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
