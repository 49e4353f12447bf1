"""PPO's losses against element-by-element references written from the PPO2 formulas."""

import math

import torch

from labkit.rl.losses import policy_loss, value_loss


def _data(seed=0, B=3, R=5):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(B, R, generator=g, dtype=torch.float64) * 0.3 - 2
    old = logp + torch.randn(B, R, generator=g, dtype=torch.float64) * 0.3  # ratios well outside 1 +- 0.2
    adv = torch.randn(B, R, generator=g, dtype=torch.float64)
    return logp, old, adv


def test_policy_loss_is_the_clipped_surrogate_entry_by_entry():
    logp, old, adv = _data()
    c = 0.2
    loss, stats = policy_loss(logp, old, adv, c)
    terms, clipped, kl, ratios = [], 0, 0.0, []
    for lp, o, a in zip(logp.flatten().tolist(), old.flatten().tolist(), adv.flatten().tolist()):
        r = math.exp(lp - o)
        unclipped, clip = -a * r, -a * min(max(r, 1 - c), 1 + c)
        terms.append(max(unclipped, clip))
        clipped += clip > unclipped
        kl += 0.5 * (lp - o) ** 2
        ratios.append(r)
    n = len(terms)
    assert math.isclose(loss.item(), sum(terms) / n, rel_tol=1e-12)
    assert 0 < clipped < n and math.isclose(stats["pg_clipfrac"], clipped / n, rel_tol=1e-6)  # a float32 mean
    assert math.isclose(stats["approxkl"], kl / n, rel_tol=1e-12)
    assert math.isclose(stats["ratio"], sum(ratios) / n, rel_tol=1e-12)


def test_policy_loss_gradient_is_zero_where_the_ratio_is_clipped_against_the_advantage():
    logp, old, adv = _data(1)
    logp.requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, 0.2)
    loss.backward()
    r = torch.exp(logp.detach() - old)
    outside = ((adv > 0) & (r > 1.2)) | ((adv < 0) & (r < 0.8))
    assert outside.any() and (logp.grad[outside] == 0).all()
    inside = ~outside
    torch.testing.assert_close(logp.grad[inside], (-adv * r / adv.numel())[inside])


def test_value_loss_is_the_clipped_squared_error_entry_by_entry():
    g = torch.Generator().manual_seed(2)
    v, old, ret = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    c = 0.2
    loss, clipfrac = value_loss(v, old, ret, c)
    terms, clipped = [], 0
    for vi, oi, ri in zip(v.flatten().tolist(), old.flatten().tolist(), ret.flatten().tolist()):
        vc = oi + min(max(vi - oi, -c), c)
        a, b = (vi - ri) ** 2, (vc - ri) ** 2
        terms.append(max(a, b))
        clipped += b > a
    assert math.isclose(loss.item(), 0.5 * sum(terms) / len(terms), rel_tol=1e-12)
    assert 0 < clipped < len(terms) and math.isclose(clipfrac, clipped / len(terms), rel_tol=1e-6)
