"""Where a transformers causal LM keeps the parts the speed layer touches: the base model under a peft
wrapper, and its transformer blocks."""

from __future__ import annotations

import torch


def unwrap(model):
    """The plain transformers model under a peft wrapper (adapters stay injected and active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def transformer_blocks(model, extra_names=()) -> list[torch.nn.Module]:
    """The model's transformer blocks: modules whose class is named in its `_no_split_modules` or `extra_names`."""
    base = unwrap(model)
    names = set(getattr(base, "_no_split_modules", None) or []) | set(extra_names)
    return [m for m in base.modules() if type(m).__name__ in names]
