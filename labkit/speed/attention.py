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
than `MAX_KEYS`, and the extras some models pass (position biases, attention weights out).
The masks are transformers' SDPA masks (True = attend), so padding and sliding windows behave as under SDPA.

Models whose attention SDPA cannot compute keep their own (`needs_own_attention`: Gemma-2's logit
soft-capping, GPT-OSS's attention sinks); the switch is decided per model, from its class and config. Should
such an extra reach `grouped_attention` anyway, it runs the model's own eager attention rather than SDPA,
which refuses soft-capping and silently drops sinks.
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "labkit_grouped"
MAX_KEYS = {True: 128, False: 96}  # longest key length handled here, with / without gradients (measured crossovers)
# attention-function arguments that change the result and that SDPA refuses (softcap) or ignores (sinks): the
# Gemma-2 family's tanh soft-capping of the scores, GPT-OSS-style sink logits
_EAGER_ONLY = ("softcap", "s_aux", "sinks")


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
        or position_bias is not None or kwargs.get("output_attentions")
        or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
    )
    if any(kwargs.get(k) is not None for k in _EAGER_ONLY):
        return _own_eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    bias = _additive_bias(attention_mask, query)
    scale = scaling if scaling is not None else D**-0.5
    out = _GroupedAttention.apply(query, key, value, bias, scale)  # (B, H, q, D)
    return out.transpose(1, 2).contiguous(), None


def _own_eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    """The model's own eager attention function (`eager_attention_forward` of the module that defines its
    attention class), called as transformers' eager path calls it: with an additive mask, always given.
    The mask here is SDPA's, boolean (b, 1, q, S); transformers' eager mask is the same with 0 where True and
    the dtype's lowest value where False, which `_additive_bias` writes. Where SDPA's mask was skipped (None:
    no padding), the causal pattern SDPA's `is_causal` would apply is built: row i sees keys 0..i (upper-left,
    as `sdpa_attention_forward` crops the keys to q), every key for one query position."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:  # nothing better known: SDPA, which says what it cannot do
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q, S = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and q > 1:
        attention_mask = torch.ones(q, S, dtype=torch.bool, device=query.device).tril()[None, None]  # (1, 1, q, S)
    if attention_mask is not None:
        attention_mask = _additive_bias(attention_mask, query)
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def needs_own_attention(model) -> str | None:
    """Why `model` must keep its own attention implementation, or None when `grouped_attention` computes it.
    `grouped_attention` computes what SDPA computes, so a model class that declares SDPA unable to run its
    attention (`_supports_sdpa = False`: Gemma-2 soft-caps the scores, GPT-OSS adds sink logits) keeps its
    own, and so does any model whose config asks for soft-capped scores (a Gemma-3 config may set it)."""
    if not getattr(type(model), "_supports_sdpa", False):
        return f"{type(model).__name__} does not support SDPA attention"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "its config soft-caps the attention scores (attn_logit_softcapping)"
    return None


def use_grouped_attention(model) -> bool:
    """Run `model`'s attention through `grouped_attention` where the model supports choosing it (every model
    written against transformers' attention interface: Llama/SmolLM2, GPT-2, ...) and SDPA computes its
    attention (`needs_own_attention`); others keep theirs (Gemma-2: transformers' eager attention).
    Registers the function under NAME with transformers (again: the same entry) and SDPA's masks for it."""
    if not getattr(model, "_can_set_attn_implementation", lambda: False)() or needs_own_attention(model):
        return False
    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
