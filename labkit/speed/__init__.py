"""The speed layer: everything labkit does to run a transformers model faster, applied in one place.

`apply(model)` is called by every model loader (`models.load_lm` for the policy, and so rho and the value
model copied from it; `RewardModel.load`); nothing else in labkit patches a model. Each trick leaves the
model's results unchanged (tests/test_speed.py compares log-probs, rewards and gradients with the layer on
and off, in float64, for several model families):

- inplace_grads: the input embedding's and the LM head's weight gradients are added in place into one
  `.grad` buffer instead of a (V, H) tensor per micro-batch.
- attention: grouped attention for short padded sequences on a CPU (SDPA everywhere else); a model whose
  attention SDPA cannot compute (Gemma-2's soft-capping) keeps its own.
- fused: compiled RMSNorm and SwiGLU for Llama-family models on a CPU.
- last_mlp: the last block's MLP only at the positions whose outputs are read.

`checkpointing` (activation checkpointing, `PPOConfig.gradient_checkpointing`) lives here too but is a
memory option the trainer applies when asked, not part of `apply`.

The switch: `load_lm(..., speedups=False)`, or the environment variable LABKIT_SPEEDUPS=0 for notebooks and
CI, gives plain transformers modules. Three tricks change a module's class (`module.__class__ = ...`) rather
than wrap it: transformers' code calls those modules by attribute (`self.embed_tokens`, `self.mlp`, ...), and
a swap keeps their parameters, hooks and state-dict names exactly as they were; each swap is one subclass
whose only change is `forward`.
"""

from __future__ import annotations

import os

ENV = "LABKIT_SPEEDUPS"


def enabled_by_default() -> bool:
    """On unless the environment variable LABKIT_SPEEDUPS is 0, false, no or off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def apply(model, enabled: bool | None = None) -> dict:
    """Apply every speed trick to `model` (a transformers causal LM) in place; returns what was applied.

    enabled: None = `enabled_by_default()`; False applies nothing. The choice is recorded on the model
    (`model.labkit_speedups`) so that copies and reports can tell.
    """
    from labkit.speed.attention import use_grouped_attention
    from labkit.speed.fused import use_fused_kernels
    from labkit.speed.inplace_grads import accumulate_vocab_grads_in_place
    from labkit.speed.last_mlp import prune_last_mlp

    on = enabled_by_default() if enabled is None else bool(enabled)
    model.labkit_speedups = on
    if not on:
        return {}
    return {
        "inplace_grads": accumulate_vocab_grads_in_place(model),
        "grouped_attention": use_grouped_attention(model),
        "fused_kernels": use_fused_kernels(model),
        "last_mlp": prune_last_mlp(model),
    }
