"""KL controllers against a naive reference sequence of updates."""

import json

import pytest

from labkit.rl.kl_controller import AdaptiveKLController, FixedKLController


def naive_adaptive_betas(init_beta, target, horizon, kls, n_episodes):
    beta, betas = init_beta, []
    for kl in kls:
        e = (kl - target) / target
        e = 0.2 if e > 0.2 else (-0.2 if e < -0.2 else e)
        beta = beta * (1 + e * n_episodes / horizon)
        betas.append(beta)
    return betas


def test_defaults_are_style_task_settings():
    ctl = AdaptiveKLController()
    assert (ctl.init_beta, ctl.target, ctl.horizon, ctl.beta) == (0.15, 6.0, 10_000, 0.15)


def test_adaptive_matches_naive_sequence():
    kls = [0.5, 3.0, 5.9, 6.0, 6.5, 7.2, 12.0, 40.0, 2.0, 6.1]
    ctl = AdaptiveKLController(init_beta=0.15, target=6.0, horizon=10_000)
    got = []
    for kl in kls:
        ctl.update(kl, n_episodes=512)
        got.append(ctl.beta)
    assert got == pytest.approx(naive_adaptive_betas(0.15, 6.0, 10_000, kls, 512), rel=1e-12)


def test_adaptive_direction_and_clipping():
    # KL far above target: error clipped at +0.2, beta grows by exactly 1 + 0.2 * n / horizon.
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=1000)
    ctl.update(100.0, n_episodes=100)
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    # KL far below target: error clipped at -0.2, beta shrinks.
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=1000)
    ctl.update(0.0, n_episodes=100)
    assert ctl.beta == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    # Inside the clip range the error is proportional: KL 6.6 -> e = 0.1.
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=1000)
    ctl.update(6.6, n_episodes=100)
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    # On target: unchanged.
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=1000)
    ctl.update(6.0, n_episodes=100)
    assert ctl.beta == 0.1


def test_paper_form_equals_code_form_when_n_over_horizon_is_tenth():
    # Paper: beta <- beta * (1 + K_beta * e), K_beta = 0.1.
    ctl = AdaptiveKLController(init_beta=0.15, target=6.0, horizon=10_000)
    ctl.update(6.9, n_episodes=1000)
    e = (6.9 - 6.0) / 6.0
    assert ctl.beta == pytest.approx(0.15 * (1 + 0.1 * e))


def test_fixed_stays_fixed():
    ctl = FixedKLController(beta=0.03)
    for kl in [0.0, 6.0, 100.0, -3.0]:
        ctl.update(kl, n_episodes=32)
    assert ctl.beta == 0.03


def test_state_round_trip_through_json():
    ctl = AdaptiveKLController(init_beta=0.2, target=8.0, horizon=5000)
    for kl in [3.0, 9.0, 20.0]:
        ctl.update(kl, n_episodes=256)
    restored = AdaptiveKLController()
    restored.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert restored == ctl
    ctl.update(7.0, 256)
    restored.update(7.0, 256)
    assert restored.beta == ctl.beta

    fixed = FixedKLController(beta=0.01)
    restored_fixed = FixedKLController(beta=0.5)
    restored_fixed.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert restored_fixed.beta == 0.01
