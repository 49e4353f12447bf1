"""Activation checkpointing of the transformer blocks: recompute in backward instead of keeping.

Why: a training forward keeps every block's intermediate tensors for the backward pass, about 12,000 floats
per token and block on SmolLM2 (norm inputs, q/k/v, attention output, the 3 x 1,536 MLP activations), so
1.4 MB per token over its 30 blocks: 2 GB for a micro-batch of 16 x 88 tokens, more than the model and its
Adam state together. With checkpointing a block keeps only its input and runs its forward again when the
gradient reaches it: activation memory of one block plus one (B, T, H) input per block, for one more
forward of the trunk per training pass (3x -> 4x forward compute).

`checkpoint_blocks(model)` swaps each block's class (the classes the model names in `_no_split_modules`,
the blocks FSDP shards too) for a subclass whose forward runs under `torch.utils.checkpoint` (non-reentrant)
whenever gradients are on and the block has trained weights; no-grad passes (sampling, scoring, rho) run as
before. The gradient is unchanged (tests/test_checkpointing.py). HF's own `gradient_checkpointing_enable`
acts only in train mode, and labkit keeps its models in eval mode (dropout off, the paper's setting).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from labkit.speed.blocks import transformer_blocks, unwrap


@functools.lru_cache(maxsize=None)
def _checkpointed_class(cls: type) -> type:
    """A subclass of block class `cls` whose forward is checkpointed while it trains (one per class). It keeps
    `cls`'s name, so that what finds blocks by class name (`_no_split_modules`, FSDP sharding) still does."""

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)
        return cls.forward(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"forward": forward, "_labkit_checkpointed": True, "__module__": cls.__module__})


def checkpoint_blocks(model) -> int:
    """Checkpoint every transformer block of `model` (in place); returns how many. Safe to call twice."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"Found no transformer blocks to checkpoint in {type(unwrap(model)).__name__}: its "
                         "`_no_split_modules` names none. Turn gradient checkpointing off for this model.")
    for block in blocks:
        if not getattr(type(block), "_labkit_checkpointed", False):
            block.__class__ = _checkpointed_class(type(block))
    return len(blocks)
