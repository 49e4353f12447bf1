"""TFAdam against hand arithmetic and a naive numpy implementation; the linear-decay scheduler."""

import copy
import math

import numpy as np
import pytest
import torch

from labkit import optim
from labkit.optim import TFAdam, linear_decay_scheduler, make_optimizer


def set_grad(p: torch.Tensor, g) -> None:
    p.grad = torch.as_tensor(g, dtype=p.dtype).clone()


def test_single_step_by_hand():
    # lr = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-5, t = 1, p = [1, -2], g = [0.5, -0.1].
    #   m    = 0.1 * g             = [0.05, -0.01]
    #   v    = 0.001 * g^2         = [2.5e-4, 1e-5]
    #   sqrt(v)                    = [0.0158113883, 0.0031622777]
    #   lr_t = 0.1 * sqrt(0.001) / 0.1 = 0.0316227766
    #   step = lr_t * m / (sqrt(v) + 1e-5)
    #        = [0.0316227766 * 0.05 / 0.0158213883, 0.0316227766 * -0.01 / 0.0031722777]
    #        = [0.0999367944, -0.0996847691]
    #   (equivalently lr * g / (|g| + eps / sqrt(1 - b2)) = 0.1 * 0.5 / 0.5003162278, ...)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = TFAdam([p], lr=0.1, betas=(0.9, 0.999), eps=1e-5)
    set_grad(p, [0.5, -0.1])
    opt.step()
    expected = torch.tensor([1.0 - 0.0999367944215144, -2.0 + 0.09968476908167395], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


def test_defaults():
    opt = TFAdam([torch.nn.Parameter(torch.zeros(1))])
    assert opt.defaults == {"lr": 1e-5, "betas": (0.9, 0.999), "eps": 1e-5}


def naive_tf_adam(p0, grads, lrs, b1=0.9, b2=0.999, eps=1e-5):
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        lr_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        p = p - lr_t * m / (np.sqrt(v) + eps)
    return p


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "per-tensor-loop"])
def test_several_steps_match_numpy_with_groups_and_scheduler(fused, monkeypatch):
    # fused: PyTorch's fused Adam kernel with TF's eps rescaled (plain tensors); the loop: sharded parameters
    monkeypatch.setattr(optim, "_fusable", lambda p: fused)
    rng = np.random.default_rng(0)
    p0a, p0b = rng.normal(size=(3, 2)), rng.normal(size=4)
    grads_a = [rng.normal(size=(3, 2)) * 10.0 ** rng.integers(-6, 1) for _ in range(6)]
    grads_b = [rng.normal(size=4) * 1e-4 for _ in range(6)]
    a = torch.nn.Parameter(torch.tensor(p0a))
    b = torch.nn.Parameter(torch.tensor(p0b))
    opt = TFAdam([{"params": [a]}, {"params": [b], "lr": 3e-3}], lr=1e-2)
    sched = linear_decay_scheduler(opt, total_steps=6)
    for ga, gb in zip(grads_a, grads_b):
        set_grad(a, ga)
        set_grad(b, gb)
        opt.step()
        sched.step()
    lrs = [1 - s / 6 for s in range(6)]  # lr multiplier in effect at each step
    np.testing.assert_allclose(a.detach().numpy(), naive_tf_adam(p0a, grads_a, [1e-2 * f for f in lrs]), rtol=1e-12)
    np.testing.assert_allclose(b.detach().numpy(), naive_tf_adam(p0b, grads_b, [3e-3 * f for f in lrs]), rtol=1e-12)


def test_first_step_differs_from_torch_adam_exactly_as_formulas_say():
    # Step 1, m = (1-b1) g, sqrt(v) = sqrt(1-b2) |g|:
    #   TF:      lr * sqrt(1-b2)/(1-b1) * (1-b1) g / (sqrt(1-b2)|g| + eps) = lr * g / (|g| + eps / sqrt(1-b2))
    #   PyTorch: lr / (1-b1) * (1-b1) g / (sqrt(1-b2)|g| / sqrt(1-b2) + eps) = lr * g / (|g| + eps)
    # For a gradient comparable to eps the TF step is several times smaller.
    lr, eps, b2 = 1e-3, 1e-5, 0.999
    g = torch.tensor([1e-5, -1e-4, 1e-2, 1.0], dtype=torch.float64)
    steps = {}
    for kind in ["tf_adam", "adam"]:
        p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        opt = make_optimizer([p], lr=lr, kind=kind)
        set_grad(p, g)
        opt.step()
        steps[kind] = -p.detach()
    torch.testing.assert_close(steps["tf_adam"], lr * g / (g.abs() + eps / math.sqrt(1 - b2)), rtol=1e-12, atol=0)
    torch.testing.assert_close(steps["adam"], lr * g / (g.abs() + eps), rtol=1e-12, atol=0)
    # g = 1e-5 = eps: PyTorch moves lr/2, TF moves lr/(1 + 31.6) -> ~16x smaller.
    ratio = (steps["adam"] / steps["tf_adam"])[0].item()
    assert ratio == pytest.approx((1 + 1 / math.sqrt(1 - b2)) / 2)
    assert ratio > 10


def test_state_dict_round_trip_gives_identical_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = TFAdam(model.parameters(), lr=1e-2)
    x = torch.randn(8, 3)

    def train_step(m, o):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()

    for _ in range(3):
        train_step(model, opt)
    clone = copy.deepcopy(model)
    opt_clone = TFAdam(clone.parameters(), lr=1.0)  # lr comes back from the state dict
    opt_clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        train_step(model, opt)
        train_step(clone, opt_clone)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_params_without_grad_are_skipped_and_params_change():
    used = torch.nn.Parameter(torch.ones(2))
    unused = torch.nn.Parameter(torch.ones(2))
    opt = TFAdam([used, unused], lr=0.1)
    (used * 3).sum().backward()
    opt.step()
    assert not torch.equal(used.detach(), torch.ones(2))
    assert torch.equal(unused.detach(), torch.ones(2))
    assert len(opt.state[unused]) == 0 and opt.state[used]["step"] == 1


def test_make_optimizer_kinds():
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert isinstance(make_optimizer(p, 1e-5), TFAdam)
    adam = make_optimizer(p, 1e-5, kind="adam")
    assert type(adam) is torch.optim.Adam and adam.defaults["eps"] == 1e-5
    with pytest.raises(ValueError, match="tf_adam"):
        make_optimizer(p, 1e-5, kind="sgd")


def test_linear_decay_hits_zero_at_the_end():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = TFAdam([p], lr=2e-5)
    sched = linear_decay_scheduler(opt, total_steps=4)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(6):  # past the end: stays at 0
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([2e-5, 1.5e-5, 1e-5, 0.5e-5, 0.0, 0.0, 0.0], abs=1e-20)


def test_gradients_are_finite_against_a_naive_check():
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((3, 4), (5,), (2, 2, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: ignored
    naive = lambda: all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)  # noqa: E731
    assert optim.gradients_are_finite(params) and naive()
    for bad in (float("nan"), float("inf"), -float("inf")):
        params[1].grad[3] = bad
        assert not optim.gradients_are_finite(params) and not naive()
        params[1].grad[3] = 0.0
    assert optim.gradients_are_finite([torch.nn.Parameter(torch.zeros(1))])  # no gradients at all
