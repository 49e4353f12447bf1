"""Grouped attention (labkit/speed/attention.py) against PyTorch's SDPA: outputs and gradients, masks, fallbacks."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from labkit.speed import attention
from labkit.speed.attention import grouped_attention, use_grouped_attention
from labkit.sampling import forward_responses, left_pad_mask


def reference(q, k, v, allowed):
    """SDPA on the key/value heads repeated out to the query heads (transformers' repeat_kv)."""
    n = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(n, 1), v.repeat_interleave(n, 1), attn_mask=allowed)


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)], ids=["grouped-query", "multi-head"])
@pytest.mark.parametrize("q_len", [9, 4], ids=["whole", "continuation"])
def test_equals_sdpa_with_left_padding_outputs_and_gradients(heads, kv_heads, q_len):
    torch.manual_seed(0)
    B, S, D = 3, 9, 8
    q = torch.randn(B, heads, q_len, D, requires_grad=True)
    k = torch.randn(B, kv_heads, S, D, requires_grad=True)
    v = torch.randn(B, kv_heads, S, D, requires_grad=True)
    pads = torch.tensor([0, 2, 5])  # row 2's first query positions see no key at all (only padding)
    real_key = torch.arange(S)[None] >= pads[:, None]  # (B, S)
    causal = torch.ones(q_len, S, dtype=torch.bool).tril(S - q_len)  # the q_len last positions
    allowed = (causal[None] & real_key[:, None]).unsqueeze(1)  # (B, 1, q_len, S), as transformers' SDPA mask
    module = SimpleNamespace(is_causal=True, num_key_value_groups=heads // kv_heads)

    out, _ = grouped_attention(module, q, k, v, allowed, scaling=D**-0.5)  # (B, q_len, H, D)
    ref = reference(q, k, v, allowed).transpose(1, 2)
    real_row = allowed.squeeze(1).any(-1)  # (B, q_len): rows that attend to something
    torch.testing.assert_close(out[real_row], ref[real_row], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out).all()  # rows with nothing to attend give finite numbers (never read), not NaN
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, -1e9)  # a float mask is added as it is
    torch.testing.assert_close(grouped_attention(module, q, k, v, additive)[0][real_row], out[real_row])

    g = torch.randn_like(ref) * real_row[:, :, None, None]  # downstream of a padding row nothing reads it
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-4, atol=1e-5)
        assert torch.isfinite(a).all()


def test_cases_it_does_not_cover_go_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **kw: calls.append(kw) or ("sdpa", None))
    module = SimpleNamespace(is_causal=True, num_key_value_groups=2)

    def mask(q, S):
        return torch.ones(q, S, dtype=torch.bool).tril(S - q)[None, None]

    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    assert grouped_attention(module, q, k, k, None)[0] == "sdpa"  # no mask: SDPA's causal kernel is as fast
    assert grouped_attention(module, q[:, :, -1:], k, k, mask(1, 6))[0] == "sdpa"  # decoding
    long_keys = torch.randn(1, 2, attention.MAX_KEYS[False] + 1, 8)
    with torch.no_grad():
        assert grouped_attention(module, q, long_keys, long_keys, mask(6, long_keys.shape[2]))[0] == "sdpa"
    assert grouped_attention(module, q, k, k, mask(6, 6), dropout=0.1)[0] == "sdpa"
    assert grouped_attention(module, q.bfloat16(), k.bfloat16(), k.bfloat16(), mask(6, 6))[0] == "sdpa"
    assert len(calls) == 5
    out, _ = grouped_attention(module, q, k, k, mask(6, 6))  # the case it covers
    assert out.shape == (1, 6, 4, 8) and len(calls) == 5


def test_a_model_with_grouped_attention_matches_sdpa_and_runs_the_grouped_kernel(tiny, monkeypatch):
    model, tok = tiny
    assert model.config._attn_implementation == attention.NAME  # load_lm switched it
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    ran = []
    apply = attention._GroupedAttention.apply
    monkeypatch.setattr(attention._GroupedAttention, "apply", lambda *a: ran.append(1) or apply(*a))

    torch.manual_seed(0)
    q_len = torch.tensor([6, 3, 1])
    q_ids = torch.randint(5, 200, (3, 6)) * left_pad_mask(q_len, 6)
    r_ids = torch.randint(5, 200, (3, 4))
    out = {}
    for name, m in (("grouped", model), ("sdpa", sdpa)):
        m.zero_grad(set_to_none=True)
        res = forward_responses(m, q_ids, q_len, r_ids, 0.7, want_hidden=True)
        (res.logprobs.sum() + res.hidden.pow(2).mean()).backward()
        out[name] = (res.logprobs.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)  # the session's shared tiny model
    assert ran, "the grouped kernel did not run"
    torch.testing.assert_close(out["grouped"][0], out["sdpa"][0], rtol=1e-5, atol=1e-5)
    assert out["grouped"][1].keys() == out["sdpa"][1].keys() and len(out["sdpa"][1]) > 10
    for n, g in out["sdpa"][1].items():
        torch.testing.assert_close(out["grouped"][1][n], g, rtol=1e-4, atol=1e-6)


def test_use_grouped_attention_leaves_models_without_the_interface_alone():
    model = torch.nn.Linear(2, 2)
    use_grouped_attention(model)  # no error, nothing to set
    assert not hasattr(model, "config")
