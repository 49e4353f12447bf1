"""Tokens the paper's setting never samples (released policy.py Policy.step_core slices the logits to the real
vocabulary in every pass): which ones, that the sampler never draws them, and that every log-prob pass leaves
them out of one consistent distribution."""

import copy

import pytest
import torch
from test_truncation_ids import byte_level_bpe

from labkit.models import document_separator_id, masked_token_report, never_sampled_ids
from labkit.sampling import MASKED_LOGIT, forward_responses, pad_left, sample, tempered_logprobs
from labkit.tasks import SENTIMENT


def test_smollm2_masks_every_special_token_but_the_document_separator(tokenizer):
    report = masked_token_report(tokenizer, len(tokenizer))
    by_id = {i: (token, reason) for i, token, reason in report}
    assert sorted(by_id) == list(range(1, 17)) and document_separator_id(tokenizer) == 0
    assert by_id[1] == ("<|im_start|>", "chat-template control token")
    assert by_id[2] == ("<|im_end|>", "chat-template control token")  # SmolLM2-Instruct's EOS
    assert by_id[13][0] == "<jupyter_code>" and "pretraining" in by_id[13][1]
    assert 0 not in by_id and tokenizer.pad_token_id == 0  # <|endoftext|>: also labkit's pad, still sampled
    assert never_sampled_ids(tokenizer, len(tokenizer)) == tuple(range(1, 17))
    padded = masked_token_report(tokenizer, len(tokenizer) + 3)  # a head padded past the tokenizer
    assert [(i, t) for i, t, _ in padded[16:]] == [(len(tokenizer) + k, None) for k in range(3)]


def test_gpt2_style_masks_only_the_pad_labkit_added():
    tok = byte_level_bpe()  # <|endoftext|> as GPT-2's EOS, and labkit's added <|pad|>
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert tok.pad_token == "<|pad|>" and pad == len(tok) - 1 and document_separator_id(tok) == eos
    assert masked_token_report(tok, len(tok)) == [(pad, "<|pad|>", "pad token added by labkit: untrained, in no text")]
    assert never_sampled_ids(tok, len(tok) + 2) == (pad, len(tok), len(tok) + 1)


def _favouring(model, ids_and_boosts):
    """A copy of `model` whose head adds boost to the logit of each id (a forward hook on the head's output)."""
    model = copy.deepcopy(model)

    def boost(module, args, out):
        out = out.clone()
        for i, b in ids_and_boosts:
            out[..., i] += b
        return out

    model.get_output_embeddings().register_forward_hook(boost)
    return model


def test_the_sampler_never_draws_a_masked_id(tiny):
    model, tok = tiny
    im_end, plain = 2, 500
    favoured = _favouring(model, [(im_end, 40.0), (plain, 30.0)])
    queries = [tok.encode("It was late. The rain", add_special_tokens=False)] * 4
    task = SENTIMENT.with_(response_length=6, truncation=None)
    whole = sample(favoured, tok, queries, task, generator=torch.Generator().manual_seed(0), masked_ids=None)
    assert (whole.response_ids == im_end).float().mean() > 0.9  # the boost works
    r = sample(favoured, tok, queries, task, generator=torch.Generator().manual_seed(0))  # masked by default
    assert r.masked_ids == never_sampled_ids(tok, len(tok)) and not torch.isin(r.response_ids, torch.tensor(r.masked_ids)).any()
    assert (r.response_ids == plain).float().mean() > 0.9
    again = forward_responses(favoured, r.query_ids, r.query_lengths, r.response_ids, task.temperature,
                              masked_ids=r.masked_ids)
    torch.testing.assert_close(r.logprobs, again.logprobs, atol=1e-4, rtol=0)  # one distribution for both


def _naive(logits, ids, temperature, masked):
    """log_softmax over the logits with the masked columns removed, at `ids` (none of them masked)."""
    keep = torch.tensor([v for v in range(logits.shape[-1]) if v not in set(masked)])
    logp = torch.log_softmax(logits[..., keep] / temperature, -1)  # (B, R, V - len(masked))
    position = torch.searchsorted(keep, ids)  # the column of each id among the kept ones
    assert torch.equal(keep[position], ids)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, position[..., None])[..., 0], entropy


@pytest.mark.parametrize("path", ["in place", "leaf", "bf16"])
def test_masked_tempered_logprobs_and_gradients_equal_the_reduced_softmax(path):
    g = torch.Generator().manual_seed(0)
    V, masked, T = 13, (0, 4, 5, 12), 0.5
    base = torch.randn(3, 4, V, generator=g, dtype=torch.float64) * 3
    base[..., 4] += 20.0  # a masked column that would dominate
    ids = torch.tensor([1, 2, 3, 6, 7, 8, 9, 10, 11])[torch.randint(0, 9, (3, 4), generator=g)]
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    if path == "bf16":
        base = base.bfloat16().double()  # the values a bf16 head can hold
    ref_in = base.clone().requires_grad_(True)
    ref_lp, ref_entropy = _naive(ref_in, ids, T, masked)
    (ref_lp * w).sum().backward()
    leaf = base.clone().to(torch.bfloat16 if path == "bf16" else torch.float64).requires_grad_(True)
    logits = leaf if path == "leaf" else leaf * 1.0  # an op's output: the in-place (or bf16) buffer path
    buffer = logits.data_ptr()
    lp, entropy = tempered_logprobs(logits, ids, T, want_entropy=True, masked_ids=masked)
    if path == "in place":  # still no new (B, R, V) buffer: the log-softmax is in the logits' own (until backward)
        assert logits.data_ptr() == buffer and (logits[..., list(masked)] < MASKED_LOGIT / 2).all()
    (lp * w).sum().backward()
    tol = {"atol": 1e-5, "rtol": 1e-5} if path == "bf16" else {}
    torch.testing.assert_close(lp.double(), ref_lp, **tol)
    torch.testing.assert_close(entropy.double(), ref_entropy, **tol)
    grad, kept = leaf.grad.double(), [v for v in range(V) if v not in masked]
    grad_tol = {"atol": 1e-2, "rtol": 1e-2} if path == "bf16" else {}  # the gradient of a bf16 input is rounded to bf16
    torch.testing.assert_close(grad[..., kept], ref_in.grad[..., kept], **grad_tol)
    assert (grad[..., list(masked)] == 0).all()


def test_masked_entropy_is_finite_even_near_greedy():
    logits = torch.randn(2, 3, 50)
    _, entropy = tempered_logprobs(logits * 1.0, torch.zeros(2, 3, dtype=torch.long) + 7, 0.01, want_entropy=True,
                                   masked_ids=(0, 1, 2, 49))
    assert torch.isfinite(entropy).all() and (entropy >= 0).all()


def test_a_masked_id_in_a_response_gets_a_finite_log_prob_and_no_gradient():
    x = torch.randn(1, 2, 6, requires_grad=True, dtype=torch.float64)
    lp, _ = tempered_logprobs(x * 1.0, torch.tensor([[3, 1]]), 1.0, masked_ids=(3,))
    assert torch.isfinite(lp).all() and lp[0, 0] < MASKED_LOGIT / 2
    lp.sum().backward()
    assert x.grad[0, 0, 3] == 0 and torch.isfinite(x.grad).all()


def test_forward_responses_with_the_mask_equals_the_reduced_softmax_with_gradients(tiny):
    model, tok = copy.deepcopy(tiny[0]).double(), tiny[1]
    masked = never_sampled_ids(tok, len(tok))
    queries = [tok.encode(t, add_special_tokens=False) for t in ("Hello there, my good friend", "The rain had stopped and")]
    queries = [q[:5] for q in queries]  # one length: no padding, so a plain forward is the reference
    q_ids, q_len = pad_left(queries, tok.pad_token_id)
    r = torch.randint(17, len(tok), (2, 4), generator=torch.Generator().manual_seed(0))
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.0, 1.0, 2.0, -0.5]], dtype=torch.float64)
    out = forward_responses(model, q_ids, q_len, r, 0.7, want_entropy=True, masked_ids=masked)
    (out.logprobs * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=torch.cat([q_ids, r[:, :-1]], 1)).logits[:, 4:]  # (2, 4, V): positions Q-1 .. Q+R-2
    ref_lp, ref_entropy = _naive(logits, r, 0.7, masked)
    (ref_lp * w).sum().backward()
    torch.testing.assert_close(out.logprobs, ref_lp, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.entropy, ref_entropy, atol=1e-10, rtol=1e-10)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-10, rtol=1e-8, msg=name)
    plain = forward_responses(model, q_ids, q_len, r, 0.7).logprobs  # no mask: the whole head, another distribution
    assert not torch.allclose(plain, out.logprobs)
