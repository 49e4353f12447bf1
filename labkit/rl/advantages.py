"""Per-token rewards, whitening and GAE for PPO on language models (Ziegler et al. 2019).

Shapes: B = batch of (query, response) episodes, T = response length in tokens. Every tensor here is
indexed by response token: position t holds the quantity for response token y_t.

`mask` (B, T), bool or float, marks the valid response tokens (1) and padding (0). Masks must come from
lengths, never from comparing tokens with the pad id (pad == EOS corrupts them). `mask=None` means every
token is valid, which is what the released code does: it trains on, and charges KL for, all T tokens.

All functions are pure: no in-place changes to their inputs, no state (`global_whiten` takes its statistics
over the processes of a multi-process run).
"""

import torch

from labkit import distributed


def _float_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The (B, T) mask as 0/1 in `like`'s dtype; all ones when None."""
    if mask is None:
        return torch.ones_like(like)
    return mask.to(like.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of x over the entries where mask is 1 (all entries if mask is None). Returns a scalar."""
    m = _float_mask(mask, x)
    return (x * m).sum() / m.sum()


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Population (biased, divide by N) variance of x over the valid entries, as in baselines' PPO2."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and var taken over the valid entries only.

    shift_mean=False adds the mean back, i.e. only rescales x to unit std: this is the paper's reward
    whitening, which keeps the sign and level of the reward. Advantage whitening uses the default
    (mean 0, std 1). Padding entries are transformed too but never enter the statistics; losses mask them.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def global_whiten(x: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """`whiten(x)` (no mask) with the mean and variance taken over all processes' rows, as if one process
    held the whole batch. A single process calls `whiten` itself, so notebook runs are bit-for-bit unchanged."""
    if not distributed.is_distributed():
        return whiten(x, shift_mean=shift_mean, eps=eps)
    mean, var = distributed.global_mean_var(x)
    mean, var = mean.to(x.dtype), var.to(x.dtype)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens; returns (advantages, returns), each (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t, with V_T = 0 (the episode ends after the last token),
    A_t = delta_t + gamma * lam * A_{t+1}, and returns = A + V (the value targets, built from V_old).

    With a mask, a padding position acts like the end of the episode: its advantage is 0, and neither its
    value nor its advantage flows into earlier steps, so the last valid token of a ragged row sees V = 0.
    The paper uses gamma = 1, lam = 0.95.
    """
    m = _float_mask(mask, values)  # (B, T)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)  # (B, T)
    lastgaelam = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
    next_values = torch.zeros_like(values[:, 0])  # (B,) V_{t+1}; V_T = 0
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_values - values[:, t]  # (B,)
        lastgaelam = (delta + gamma * lam * lastgaelam) * m[:, t]
        advantages[:, t] = lastgaelam
        # Padding must not feed earlier steps: its value is treated as 0 (end of episode).
        next_values = values[:, t] * m[:, t]
    returns = advantages + values
    return advantages, returns


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position where mask is 1 in each row (mask (B, T)).

    This is where the score goes: the last real token, not the first pad after it.
    Assumes every row has at least one valid token.
    """
    T = mask.shape[1]
    positions = torch.arange(1, T + 1, device=mask.device)  # 1-based so that padding (0) never wins
    return (mask.long() * positions).argmax(dim=1)


def kl_penalty_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    beta: float | torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's per-token reward R = r(x, y) - beta * log(pi(y|x) / rho(y|x)), spread over tokens.

    logprobs, ref_logprobs: (B, T) log pi(y_t | x, y_<t) and log rho(y_t | x, y_<t) of the sampled tokens
    (both from temperature-scaled logits). scores: (B,) reward-model score r(x, y). beta: float, 0-d tensor
    or (B,) tensor (one beta per episode).

    Returns (rewards, kl, non_score_reward), each (B, T):
      kl_t = log pi - log rho (the sampled k1 estimator; can be negative per token),
      non_score_reward_t = -beta * kl_t (a positive kl lowers the reward),
      rewards = non_score_reward + score at the last valid token of each row.
    With a mask, padding positions get kl = 0: they are not charged and their log-probs are meaningless.
    """
    m = _float_mask(mask, logprobs)  # (B, T)
    kl = (logprobs - ref_logprobs) * m  # (B, T)
    beta = torch.as_tensor(beta, dtype=logprobs.dtype, device=logprobs.device)
    if beta.dim() == 1:
        beta = beta[:, None]  # (B, 1): one beta per row
    non_score_reward = -beta * kl  # (B, T)
    last = last_valid_index(m)  # (B,)
    rows = torch.arange(logprobs.shape[0], device=logprobs.device)
    rewards = non_score_reward.clone()
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl, non_score_reward
