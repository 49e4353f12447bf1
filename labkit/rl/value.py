"""The value function: a scalar head on the policy's own trunk (the released code's), or a separate model."""

from __future__ import annotations

import torch
import torch.nn as nn

from labkit.sampling import forward_responses


class ValueHead(nn.Module):
    """Scalar value per position from final hidden states (B, R, H) -> (B, R); zero init as the released code
    (train_policy.py's value head)."""

    def __init__(self, d_model: int, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(d_model, 1, device=device, dtype=dtype)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden):
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()  # hidden is bf16 under autocast


class SeparateValueModel(nn.Module):
    """A trunk of its own plus a scalar head (TRL's design): initialised from the reward model (trunk, head,
    gain, bias), or from rho with a zero head when the reward is a plain callable."""

    def __init__(self, lm, head: nn.Linear, gain: float = 1.0, bias: float = 0.0):
        super().__init__()
        self.lm = lm
        self.head = head
        with torch.no_grad():  # fold the reward model's normalisation into the head
            self.head.weight.mul_(gain)
            self.head.bias.mul_(gain).add_(bias)

    def forward(self, query_ids, query_lengths, response_ids):
        """Values (B, R) at the positions before each response token; the trunk's vocabulary head never runs."""
        out = forward_responses(self.lm, query_ids, query_lengths, response_ids, 1.0, want_hidden=True, want_logprobs=False)
        return self.head(out.hidden.to(self.head.weight.dtype)).squeeze(-1).float()  # (B, R)
