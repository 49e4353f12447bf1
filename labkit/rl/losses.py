"""PPO's two losses as pure functions (OpenAI baselines' PPO2, as the released code's train_policy.py).

All tensors are (B, R): one entry per response token, every token counted (the released code trains on
all R tokens; labkit's responses are exactly R tokens long).
"""

from __future__ import annotations

import torch


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate: mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c))), ratio = exp(logp - logp_old).

    Returns the loss and its statistics (no gradient): the fraction of entries where the clipped term is
    the larger, approxkl = 0.5 * mean((logp - logp_old)^2), and the mean ratio.
    """
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    loss = torch.max(pg_losses, pg_losses2).mean()
    with torch.no_grad():
        stats = {"pg_clipfrac": (pg_losses2 > pg_losses).float().mean().item(),
                 "approxkl": 0.5 * (logratio**2).mean().item(), "ratio": ratio.mean().item()}
    return loss, stats


def value_loss(vpred: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, float]:
    """0.5 * mean(max((v - ret)^2, (v_clipped - ret)^2)), v_clipped kept within cliprange_value of the old
    values. Returns the loss and the fraction of entries where the clipped term is the larger."""
    vpredclipped = old_values + (vpred - old_values).clamp(-cliprange_value, cliprange_value)
    vf_losses1 = (vpred - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    with torch.no_grad():
        clipfrac = (vf_losses2 > vf_losses1).float().mean().item()
    return 0.5 * torch.max(vf_losses1, vf_losses2).mean(), clipfrac
