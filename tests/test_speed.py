"""The speed layer changes no result: for each supported model family, log-probs, rewards and their gradients
with `speed.apply` on equal those of the plain transformers modules; and the switch turns it off."""

import copy
import os
import subprocess
import sys

import pytest
import torch

from labkit import speed
from labkit.reward import RewardModel
from labkit.sampling import forward_responses, sample
from labkit.tasks import SENTIMENT

V = 300


def _config(family: str):
    import transformers as tf

    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=128)
    if family == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common, rotary_pct=0.5, use_parallel_residual=True)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0)
    raise ValueError(family)


def _pair(family: str, dtype):
    """(plain, sped-up) copies of one random model, in eval mode, trainable."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(_config(family)).to(dtype).eval()
    fast = copy.deepcopy(plain)
    assert speed.apply(plain, enabled=False) == {} and plain.labkit_speedups is False
    applied = speed.apply(fast, enabled=True)
    assert applied["last_mlp"] and applied["grouped_attention"] and "embedding" in applied["inplace_grads"]
    return plain, fast


def _batch():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(3, V, (3, 9), generator=g)
    q[0, :4] = 0  # left padding: every call carries a padding mask
    ql = torch.tensor([5, 9, 9])
    r = torch.randint(3, V, (3, 6), generator=g)
    return q, ql, r


def _logprob_grads(model, q, ql, r):
    model.zero_grad(set_to_none=True)
    out = forward_responses(model, q, ql, r, 0.7, want_hidden=True)
    ((out.logprobs * torch.linspace(-1, 2, out.logprobs.numel()).view_as(out.logprobs)).sum()
     + out.hidden.square().mean()).backward()
    return out.logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reward_grads(model, q, ql, r):
    rm = RewardModel(model, tokenizer=None, seed=3).to(next(model.parameters()).dtype)
    rm.zero_grad(set_to_none=True)
    lengths = torch.tensor([6, 3, 1, 6, 2, 5])
    responses = torch.cat([r, r.flip(0)])  # k = 2 responses per query
    rewards = rm.kway(q, ql, responses, lengths)  # (3, 2)
    (rewards * torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 1.5]], dtype=rewards.dtype)).sum().backward()
    return rewards.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}


FAMILIES = ["llama", "gpt2", "gpt_neox", "qwen2"]


def _assert_close(x, ref, tol, what):
    """Largest difference relative to the reference's largest entry: one scale per tensor."""
    err = ((x - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
    assert err <= tol, f"{what}: relative difference {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_speedups_on_and_off_give_the_same_logprobs_rewards_and_gradients(family, dtype):
    """float64: equal to float64 rounding, except Llama's RMSNorm, which transformers computes in float32 whatever
    the weights' dtype (the compiled kernel reorders that float32 sum). float32 also runs the grouped-attention
    kernel (fp32 only): equal to float32 rounding. Rewards leave the reward model as float32."""
    tol = {torch.float64: 1e-6 if family == "llama" else 1e-12, torch.float32: 5e-6}[dtype]
    plain, fast = _pair(family, dtype)
    q, ql, r = _batch()
    for fn in (_logprob_grads, _reward_grads):
        (a, ga), (b, gb) = fn(plain, q, ql, r), fn(fast, q, ql, r)
        _assert_close(b, a, max(tol, 1e-6) if fn is _reward_grads else tol, f"{family} {fn.__name__}")
        assert set(ga) == set(gb) and len(ga) > 10
        for name in ga:
            _assert_close(gb[name], ga[name], tol, f"{family} {fn.__name__} {name}")
    with torch.no_grad():  # sampling: the same tokens from the same generator
        task = SENTIMENT.with_(response_length=5, truncation=None)

        class Tok:
            pad_token_id = 0

            def batch_decode(self, rows, skip_special_tokens=True):
                return [" ".join(map(str, row)) for row in rows]

        queries = [[5, 6, 7], [8, 9, 10, 11, 12]]
        sa = sample(plain, Tok(), queries, task, generator=torch.Generator().manual_seed(4), masked_ids=None)
        sb = sample(fast, Tok(), queries, task, generator=torch.Generator().manual_seed(4), masked_ids=None)
    assert torch.equal(sa.response_ids, sb.response_ids)


def test_the_environment_switch_gives_plain_transformers_modules():
    code = ("from labkit.models import load_lm; m, _ = load_lm('tiny'); "
            "print(m.labkit_speedups, m.config._attn_implementation, type(m.model.norm).__name__, "
            "type(m.get_input_embeddings()).__name__)")
    env = {**os.environ, speed.ENV: "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert out == ["False", "sdpa", "LlamaRMSNorm", "Embedding"]
    env[speed.ENV] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert out == ["True", "labkit_grouped", "FusedRMSNorm", "InPlaceGradEmbedding"]
