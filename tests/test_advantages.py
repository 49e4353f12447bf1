"""Pure functions of labkit.rl.advantages against naive python-loop references."""

import inspect

import torch

from labkit.rl.advantages import compute_gae, kl_penalty_rewards, masked_mean, masked_var, whiten

B, T = 4, 7
LENGTHS = [7, 3, 5, 1]  # ragged rows, right padded


def ragged_mask() -> torch.Tensor:
    return torch.tensor([[t < n for t in range(T)] for n in LENGTHS])  # (B, T) bool


def naive_gae(rewards, values, lengths, gamma, lam):
    """Sum form A_t = sum_l (gamma*lam)^l delta_{t+l}, per row, with V = 0 at and after the row's length."""
    adv = [[0.0] * T for _ in range(B)]
    for b, n in enumerate(lengths):
        r = rewards[b].tolist()
        v = values[b].tolist()[:n] + [0.0]  # V_n = 0: the episode ends after its last valid token
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            adv[b][t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    return torch.tensor(adv, dtype=torch.float64)


def test_gae_defaults_are_paper_values():
    params = inspect.signature(compute_gae).parameters
    assert params["gamma"].default == 1.0
    assert params["lam"].default == 0.95


def test_gae_matches_naive_reference_without_mask():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, ret = compute_gae(rewards, values)  # gamma = 1, lam = 0.95
    torch.testing.assert_close(adv, naive_gae(rewards, values, [T] * B, 1.0, 0.95))
    torch.testing.assert_close(ret, adv + values)
    for gamma, lam in [(0.9, 0.8), (1.0, 1.0), (0.99, 0.0)]:
        adv, _ = compute_gae(rewards, values, gamma=gamma, lam=lam)
        torch.testing.assert_close(adv, naive_gae(rewards, values, [T] * B, gamma, lam))


def test_gae_lam_one_gamma_one_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, ret = compute_gae(rewards, values, gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(ret, reward_to_go)
    torch.testing.assert_close(adv, reward_to_go - values)


def test_gae_with_ragged_mask():
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = ragged_mask()
    adv, ret = compute_gae(rewards, values, mask)
    torch.testing.assert_close(adv, naive_gae(rewards, values, LENGTHS, 1.0, 0.95))
    assert (adv[~mask] == 0).all()
    torch.testing.assert_close(ret, adv + values)
    # A float mask gives the same answer as a bool mask.
    adv_f, _ = compute_gae(rewards, values, mask.double())
    torch.testing.assert_close(adv_f, adv)


def test_gae_padding_does_not_leak_into_valid_tokens():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = ragged_mask()
    adv, _ = compute_gae(rewards, values, mask)
    garbage = torch.full((B, T), 1e3, dtype=torch.float64)
    adv2, _ = compute_gae(torch.where(mask, rewards, garbage), torch.where(mask, values, garbage), mask)
    torch.testing.assert_close(adv2, adv)


def test_gae_does_not_modify_inputs():
    rewards = torch.randn(B, T)
    values = torch.randn(B, T)
    r0, v0 = rewards.clone(), values.clone()
    compute_gae(rewards, values, ragged_mask())
    assert torch.equal(rewards, r0) and torch.equal(values, v0)


def test_masked_mean_and_var_match_selected_entries():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = ragged_mask()
    selected = x[mask]
    torch.testing.assert_close(masked_mean(x, mask), selected.mean())
    torch.testing.assert_close(masked_var(x, mask), selected.var(unbiased=False))  # population variance
    torch.testing.assert_close(masked_mean(x, None), x.mean())
    torch.testing.assert_close(masked_var(x, None), x.var(unbiased=False))


def test_whiten_full_gives_mean_zero_std_one():
    g = torch.Generator().manual_seed(5)
    x = 3.0 + 2.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    w = whiten(x)
    torch.testing.assert_close(w.mean(), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(w.std(unbiased=False), torch.tensor(1.0, dtype=torch.float64))


def test_whiten_without_shift_keeps_the_mean():
    g = torch.Generator().manual_seed(6)
    x = 3.0 + 2.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    w = whiten(x, shift_mean=False)
    torch.testing.assert_close(w.mean(), x.mean())
    torch.testing.assert_close(w.std(unbiased=False), torch.tensor(1.0, dtype=torch.float64))
    # Only a rescaling around the mean: w - mean is proportional to x - mean.
    torch.testing.assert_close(w - x.mean(), (x - x.mean()) / x.std(unbiased=False), rtol=1e-6, atol=1e-6)


def test_whiten_with_mask_uses_valid_entries_only():
    g = torch.Generator().manual_seed(7)
    x = 3.0 + 2.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = ragged_mask()
    w = whiten(x, mask)
    torch.testing.assert_close(w[mask].mean(), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(w[mask].std(unbiased=False), torch.tensor(1.0, dtype=torch.float64))
    x_garbage = torch.where(mask, x, torch.full_like(x, 1e4))
    torch.testing.assert_close(whiten(x_garbage, mask)[mask], w[mask])
    w_keep = whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(w_keep[mask].mean(), x[mask].mean())


def naive_kl_rewards(logprobs, ref_logprobs, scores, betas, lengths):
    rewards = [[0.0] * T for _ in range(B)]
    for b, n in enumerate(lengths):
        for t in range(n):
            rewards[b][t] = -betas[b] * (logprobs[b, t].item() - ref_logprobs[b, t].item())
        rewards[b][n - 1] += scores[b].item()
    return torch.tensor(rewards, dtype=torch.float64)


def test_kl_penalty_rewards_matches_naive_reference():
    g = torch.Generator().manual_seed(8)
    logprobs = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref_logprobs = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    rewards, kl, non_score = kl_penalty_rewards(logprobs, ref_logprobs, scores, 0.15)
    torch.testing.assert_close(rewards, naive_kl_rewards(logprobs, ref_logprobs, scores, [0.15] * B, [T] * B))
    torch.testing.assert_close(kl, logprobs - ref_logprobs)
    torch.testing.assert_close(non_score, -0.15 * kl)
    # Score sits in the last column only.
    torch.testing.assert_close(rewards[:, -1] - non_score[:, -1], scores)
    torch.testing.assert_close(rewards[:, :-1], non_score[:, :-1])


def test_kl_penalty_rewards_ragged_mask_and_per_row_beta():
    g = torch.Generator().manual_seed(9)
    logprobs = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref_logprobs = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    betas = [0.1, 0.2, 0.05, 0.3]
    mask = ragged_mask()
    rewards, kl, non_score = kl_penalty_rewards(
        logprobs, ref_logprobs, scores, torch.tensor(betas, dtype=torch.float64), mask
    )
    torch.testing.assert_close(rewards, naive_kl_rewards(logprobs, ref_logprobs, scores, betas, LENGTHS))
    # The score is at the last real token (index length - 1), not the first pad after it.
    for b, n in enumerate(LENGTHS):
        torch.testing.assert_close(rewards[b, n - 1] - non_score[b, n - 1], scores[b])
    # Padding is not charged.
    assert (kl[~mask] == 0).all() and (rewards[~mask] == 0).all()
    # 0-d tensor beta behaves like a float.
    r_scalar, _, _ = kl_penalty_rewards(logprobs, ref_logprobs, scores, torch.tensor(0.2), mask)
    r_float, _, _ = kl_penalty_rewards(logprobs, ref_logprobs, scores, 0.2, mask)
    torch.testing.assert_close(r_scalar, r_float)


def test_kl_penalty_signs():
    # pi puts more mass on the sampled tokens than rho: kl > 0 must LOWER the reward.
    logprobs = torch.full((2, 3), -1.0)
    ref_logprobs = torch.full((2, 3), -2.0)
    scores = torch.tensor([0.0, 0.0])
    rewards, kl, non_score = kl_penalty_rewards(logprobs, ref_logprobs, scores, 0.5)
    assert (kl > 0).all()
    assert (non_score < 0).all() and (rewards < 0).all()
    torch.testing.assert_close(rewards.sum(1), torch.tensor([-1.5, -1.5]))  # -beta * sum kl = -0.5 * 3
    # A higher score RAISES the reward; a larger beta makes it pay more for the same kl.
    rewards_hi, _, _ = kl_penalty_rewards(logprobs, ref_logprobs, torch.tensor([2.0, 2.0]), 0.5)
    assert (rewards_hi.sum(1) > rewards.sum(1)).all()
    rewards_big_beta, _, _ = kl_penalty_rewards(logprobs, ref_logprobs, scores, 1.0)
    assert (rewards_big_beta.sum(1) < rewards.sum(1)).all()
    # Total reward of an episode = score - beta * summed kl.
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    r, _, _ = kl_penalty_rewards(logprobs, ref_logprobs, torch.tensor([2.0, 3.0]), 0.5, mask)
    torch.testing.assert_close(r.sum(1), torch.tensor([2.0 - 0.5 * 2, 3.0 - 0.5 * 3]))
