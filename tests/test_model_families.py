"""Model families whose attention or logits go beyond what labkit's speed layer computes, built tiny in code:
Gemma-2 (soft-capped attention scores and logits, a query scale of its own, alternating sliding-window layers)
keeps its own eager attention, and Mistral's sliding window reaches labkit's grouped attention through its mask.
Every log-prob labkit computes must equal log_softmax(model(ids).logits / T) of the plain model."""

import copy
import math

import pytest
import torch

from labkit.models import prepare_lm
from labkit.reward import KWayExample, RewardConfig, RewardTrainer, reward_model_from_lm
from labkit.rl import PPOConfig, PPOTrainer
from labkit.sampling import forward_responses, masked_ids_for, sample
from labkit.speed import attention
from labkit.tasks import SENTIMENT, format_query

WINDOW = 4  # sliding window, shorter than every query + response below
TASK = SENTIMENT.with_(response_length=6, truncation=None)
PROMPTS = ["It was late. The rain stopped and she waited.", "One. Two words here.", "A"]


def gemma2_config(vocab_size, attn_cap=2.0, logit_cap=0.5):
    """Caps far below the usual 50 / 30: a tiny random model's scores and logits are small (logits ~0.1), and the
    caps must change them for the tests to see whether they are applied (`..._the_caps_matter`)."""
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=16,
                        attn_logit_softcapping=attn_cap, final_logit_softcapping=logit_cap, sliding_window=WINDOW,
                        max_position_embeddings=128)  # layer_types: sliding, full


def mistral_config(vocab_size, window=WINDOW):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, sliding_window=window, max_position_embeddings=128)


def build(config, tokenizer, qk_scale=1.0):
    """(plain, prepared): one random model as transformers runs it with its eager attention, and a copy
    prepared as `load_lm` prepares every model (speed layer on). `qk_scale` multiplies the query and key
    projections: attention scores large enough for a soft-cap to change them."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk_scale)
    plain.config.pad_token_id = tokenizer.pad_token_id
    prepared = prepare_lm(copy.deepcopy(plain), tokenizer, device="cpu", speedups=True)
    return plain, prepared


@pytest.fixture(scope="module")
def gemma2(tokenizer):
    return build(gemma2_config(len(tokenizer)), tokenizer, qk_scale=8.0)


def queries(tokenizer):
    return [format_query(TASK, p, tokenizer) for p in PROMPTS]  # different lengths: left padding


def reference_logprobs(plain, rollout, temperature, masked_ids):
    """(B, R) log_softmax(plain(ids).logits / T) at each response token, each row alone and unpadded, with the
    masked columns out of the normalisation."""
    out = []
    for b in range(len(rollout)):
        q = rollout.query_ids[b, rollout.query_ids.shape[1] - int(rollout.query_lengths[b]):]  # the unpadded query
        ids = torch.cat([q, rollout.response_ids[b]])[None]  # (1, Q_b + R)
        with torch.no_grad():
            scaled = plain(ids).logits[0, len(q) - 1 : -1].float() / temperature  # (R, V): positions predicting the response
        scaled[:, list(masked_ids)] = float("-inf")
        out.append(scaled.log_softmax(-1).gather(-1, rollout.response_ids[b][:, None])[:, 0])
    return torch.stack(out)


def test_gemma2_keeps_its_own_attention_and_the_caps_matter(gemma2, tokenizer):
    plain, prepared = gemma2
    assert attention.needs_own_attention(prepared) and prepared.config._attn_implementation == "eager"
    assert prepared.labkit_speedups
    ids = torch.tensor([tokenizer.encode("The rain stopped and she waited by the door.")])
    uncapped = copy.deepcopy(plain)
    with torch.no_grad():
        logits = plain(ids).logits
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            setattr(uncapped.config, key, None)
            for m in uncapped.modules():  # the attention modules copy the attention cap at construction
                if hasattr(m, key):
                    setattr(m, key, None)
            assert not torch.allclose(uncapped(ids).logits, logits, atol=1e-3), key
            uncapped = copy.deepcopy(plain)
    assert logits.abs().max() <= plain.config.final_logit_softcapping


def test_gemma2_prepared_forward_and_gradients_equal_the_plain_eager_model(gemma2, tokenizer):
    plain, prepared = gemma2
    r = sample(prepared, tokenizer, queries(tokenizer), TASK, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, m in (("plain", plain), ("prepared", prepared)):
        m.zero_grad(set_to_none=True)
        res = forward_responses(m, r.query_ids, r.query_lengths, r.response_ids, TASK.temperature, want_hidden=True,
                                masked_ids=r.masked_ids)
        (res.logprobs.sum() + res.hidden.square().mean()).backward()
        out[name] = res.logprobs.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        m.zero_grad(set_to_none=True)
    torch.testing.assert_close(out["prepared"][0], out["plain"][0], rtol=1e-5, atol=1e-5)
    assert out["prepared"][1].keys() == out["plain"][1].keys() and len(out["plain"][1]) > 10
    for n, g in out["plain"][1].items():
        torch.testing.assert_close(out["prepared"][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_gemma2_sampler_and_scoring_logprobs_equal_the_models_own_logits(gemma2, tokenizer):
    plain, prepared = gemma2
    r = sample(prepared, tokenizer, queries(tokenizer), TASK, generator=torch.Generator().manual_seed(1))
    assert r.masked_ids == masked_ids_for(prepared, tokenizer) and len(r.masked_ids) > 0
    ref = reference_logprobs(plain, r, TASK.temperature, r.masked_ids)
    with torch.no_grad():
        scored = forward_responses(prepared, r.query_ids, r.query_lengths, r.response_ids, TASK.temperature,
                                   masked_ids=r.masked_ids).logprobs
    assert r.response_ids.shape == (3, TASK.response_length) and r.query_lengths.max() + TASK.response_length > WINDOW
    torch.testing.assert_close(r.logprobs, ref, rtol=1e-5, atol=1e-5)  # the sampler's, through its KV cache
    torch.testing.assert_close(scored, ref, rtol=1e-5, atol=1e-5)


def test_soft_capping_that_reaches_grouped_attention_runs_the_models_own_eager_attention(gemma2, tokenizer):
    """Switched by force (as if a config check missed it): no SDPA error, and the model's own results, with and
    without a padding mask (SDPA's mask is skipped then) and while decoding."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    plain, prepared = gemma2
    forced = copy.deepcopy(prepared)
    AttentionInterface.register(attention.NAME, attention.grouped_attention)
    AttentionMaskInterface.register(attention.NAME, sdpa_mask)
    forced.set_attn_implementation(attention.NAME)
    r = sample(forced, tokenizer, queries(tokenizer), TASK, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(r.logprobs, reference_logprobs(plain, r, TASK.temperature, r.masked_ids),
                               rtol=1e-5, atol=1e-5)
    ids = torch.tensor([tokenizer.encode("No padding at all: one row of nine words or so.")])
    with torch.no_grad():
        torch.testing.assert_close(forced(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_gemma2_reward_model_scores_finitely_and_trains(gemma2, tokenizer):
    _, prepared = gemma2
    rm = reward_model_from_lm(prepared, tokenizer, seed=0)
    scores = rm.score_texts(["A quiet day.", "Rain."], [" It was fine.", " Then the sun came out and stayed."])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    examples = [KWayExample(f"Query {i}.", [" a happy day", " the stone table"], i % 2) for i in range(2)]
    hist = RewardTrainer(rm, RewardConfig(lr=1e-3, batch_size=2, heldout_fraction=0.0)).fit(examples, progress=False)
    assert hist and all(math.isfinite(m["rm/loss"]) for m in hist)
    assert any(not torch.equal(p, before[n]) for n, p in rm.named_parameters() if "lm." in n)


def test_gemma2_ppo_update_is_finite_and_moves_the_policy(gemma2, tokenizer):
    _, prepared = gemma2
    policy = copy.deepcopy(prepared)
    trainer = PPOTrainer(policy, tokenizer, TASK, lambda q, r: [float(s.count("e")) for s in r], PROMPTS[:2],
                         PPOConfig(batch_size=4, ppo_epochs=1, lr=1e-3, total_updates=2, kl_target=None, init_beta=0.1),
                         verbose=False)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    m = trainer.step()
    assert all(math.isfinite(m[k]) for k in ("loss/policy_avg", "loss/value_avg", "objective/kl", "objective/entropy"))
    assert any(not torch.equal(p, before[n]) for n, p in trainer.policy.named_parameters())


def test_mistral_sliding_window_reaches_grouped_attention_through_the_mask(tokenizer, monkeypatch):
    plain, prepared = build(mistral_config(len(tokenizer)), tokenizer)
    assert prepared.config._attn_implementation == attention.NAME  # SDPA-compatible: switched
    ran = []
    apply = attention._GroupedAttention.apply
    monkeypatch.setattr(attention._GroupedAttention, "apply", lambda *a: ran.append(1) or apply(*a))
    r = sample(prepared, tokenizer, queries(tokenizer), TASK, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        scored = forward_responses(prepared, r.query_ids, r.query_lengths, r.response_ids, TASK.temperature,
                                   masked_ids=r.masked_ids).logprobs
    assert ran, "the grouped kernel did not run"
    ref = reference_logprobs(plain, r, TASK.temperature, r.masked_ids)  # the model's own eager attention
    torch.testing.assert_close(scored, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.logprobs, ref, rtol=1e-5, atol=1e-5)
    # the window changes these log-probs: without it the reference differs
    unwindowed, _ = build(mistral_config(len(tokenizer), window=None), tokenizer)
    assert not torch.allclose(reference_logprobs(unwindowed, r, TASK.temperature, r.masked_ids), ref, atol=1e-4)
