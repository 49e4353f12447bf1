import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from labkit.speed import fused
from labkit.sampling import forward_responses


def _naive_rms_norm(x, w, eps):
    """x / sqrt(mean(x^2) + eps) * w, written out row by row (in fp32, as transformers' for any input dtype)."""
    rows = x.float().reshape(-1, x.shape[-1])
    out = torch.stack([r / torch.sqrt((r * r).sum() / r.numel() + eps) for r in rows]).reshape(x.shape)
    return w * out.to(x.dtype)


def _naive_swiglu(g, u):
    return g / (1 + torch.exp(-g)) * u


@pytest.mark.parametrize("shape", [(3, 7, 16), (1, 1, 16), (2, 5, 16)])
def test_compiled_kernels_equal_naive_formulas_in_values_and_gradients(shape):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(shape, generator=gen), torch.randn(shape[-1], generator=gen)
    g, u = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    cases = [(fused.rms_norm, _naive_rms_norm, (x, w, 1e-5)), (fused.swiglu, _naive_swiglu, (g, u))]
    for fn, naive, args in cases:
        leaves = [a.clone().requires_grad_(True) if torch.is_tensor(a) else a for a in args]
        naive_leaves = [a.clone().requires_grad_(True) if torch.is_tensor(a) else a for a in args]
        out, ref = fused._COMPILED[fn](*leaves), naive(*naive_leaves)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        dout = torch.randn(shape, generator=gen)
        out.backward(dout)
        ref.backward(dout)
        for a, b in zip(leaves, naive_leaves):
            if torch.is_tensor(a):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_load_lm_fuses_llama_blocks_and_gradients_match_eager(tiny, monkeypatch):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]  # a copy keeps the swapped classes
    n_layers = model.config.num_hidden_layers
    norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    mlps = [m for m in model.modules() if isinstance(m, LlamaMLP)]
    assert len(norms) == 2 * n_layers + 1 and all(type(m) is fused.FusedRMSNorm for m in norms)
    assert len(mlps) == n_layers and all(type(m) is fused.FusedSwiGLUMLP for m in mlps)
    assert set(model.state_dict()) == set(tiny[0].state_dict())

    calls = {fn.__name__: 0 for fn in fused._COMPILED}
    for fn, compiled in list(fused._COMPILED.items()):
        def counting(*args, _c=compiled, _n=fn.__name__):
            calls[_n] += 1
            return _c(*args)
        monkeypatch.setitem(fused._COMPILED, fn, counting)

    gen = torch.Generator().manual_seed(1)
    q = torch.randint(3, len(tok), (3, 6), generator=gen)
    q[0, :2] = tok.pad_token_id
    q_len, r = torch.tensor([4, 6, 6]), torch.randint(3, len(tok), (3, 4), generator=gen)
    model.requires_grad_(True)
    results = []
    for ctx in (fused.eager, lambda: torch.enable_grad()):
        with ctx():
            out = forward_responses(model, q, q_len, r, temperature=0.7, want_hidden=True)
            (out.logprobs.sum() + out.hidden.square().mean()).backward()
        results.append((out.logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
        if ctx is fused.eager:
            assert calls == {"rms_norm": 0, "swiglu": 0}  # eager() really ran the eager formulas
    assert calls["rms_norm"] == 2 * n_layers + 1 and calls["swiglu"] == n_layers  # and the fused run the kernels
    (lp_eager, g_eager), (lp_fused, g_fused) = results
    torch.testing.assert_close(lp_fused, lp_eager, rtol=1e-5, atol=1e-5)
    for name, grad in g_eager.items():
        torch.testing.assert_close(g_fused[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        assert grad.abs().sum() > 0, name


def test_a_failing_compiler_falls_back_to_eager_once_with_a_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(fused._state, "failed", None)
    monkeypatch.setitem(fused._COMPILED, fused.swiglu, broken)
    g, u = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    with pytest.warns(RuntimeWarning, match="compiling the fused swiglu kernel failed"):
        out = fused._run(fused.swiglu, g, u)
    torch.testing.assert_close(out, F.silu(g) * u)
    assert isinstance(fused._state["failed"], RuntimeError)
    torch.testing.assert_close(fused._run(fused.swiglu, g, u), F.silu(g) * u)  # eager from then on, no raise


def test_bad_input_raises_its_own_error_and_keeps_the_kernels(monkeypatch):
    monkeypatch.setitem(fused._state, "failed", None)
    with pytest.raises(RuntimeError, match="size"):
        fused._run(fused.swiglu, torch.randn(2, 3, 8), torch.randn(2, 3, 5))
    assert fused._state["failed"] is None


def test_kernels_compile_in_a_background_thread(monkeypatch):
    # PPOTrainer.train_in_background runs the first forward (and so the first compile) in a thread
    monkeypatch.setitem(fused._state, "failed", None)
    x = torch.randn(36, 24, dtype=torch.float64)  # 2-D fp64: a graph no other test compiles, so it compiles here
    w = torch.randn(24, dtype=torch.float64)
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("out", fused._run(fused.rms_norm, x, w, 1e-6)))
    th.start()
    th.join()
    assert fused._state["failed"] is None
    torch.testing.assert_close(box["out"], _naive_rms_norm(x, w, 1e-6), rtol=1e-6, atol=1e-7)
