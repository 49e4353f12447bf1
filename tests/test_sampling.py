import torch

import pytest

from labkit.sampling import (forward_responses, pad_left, prefix_rows, query_prefix, sample, sample_categorical, score_logprobs,
                             tempered_logprobs)
from labkit.tasks import SENTIMENT, TruncationRule


def _queries(tok):
    texts = ["Hello there, friend", "A much longer prompt that has quite a few more tokens in it than the first", "Hi"]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def test_pad_left():
    ids, lengths = pad_left([[1, 2], [3], [4, 5, 6]], pad_id=0)
    assert ids.tolist() == [[0, 1, 2], [0, 0, 3], [4, 5, 6]] and lengths.tolist() == [2, 1, 3]


def test_left_padded_batch_logprobs_equal_each_sequence_alone(tiny):
    model, tok = tiny
    queries = _queries(tok)
    g = torch.Generator().manual_seed(0)
    responses = torch.randint(0, len(tok), (len(queries), 7), generator=g)
    q_ids, q_len = pad_left(queries, tok.pad_token_id)
    batch = score_logprobs(model, q_ids, q_len, responses, temperature=0.7)
    for i, q in enumerate(queries):
        one_ids, one_len = pad_left([q], tok.pad_token_id)
        alone = score_logprobs(model, one_ids, one_len, responses[i : i + 1], temperature=0.7)
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-4, rtol=0)


def test_generation_logprobs_equal_a_scoring_pass_and_lengths_are_exact(tiny):
    model, tok = tiny
    task = SENTIMENT.with_(response_length=9)
    r = sample(model, tok, _queries(tok), task, generator=torch.Generator().manual_seed(1))
    assert r.response_ids.shape == (3, 9) and r.logprobs.shape == (3, 9)
    assert r.masked_ids == tuple(range(1, 17))  # SmolLM2's special ids but <|endoftext|> (tests/test_token_mask.py)
    again = score_logprobs(model, r.query_ids, r.query_lengths, r.response_ids, task.temperature, masked_ids=r.masked_ids)
    torch.testing.assert_close(r.logprobs, again, atol=1e-4, rtol=0)
    assert (r.logprobs <= 0).all()


def test_temperature_scales_logprobs(tiny):
    model, tok = tiny
    q_ids, q_len = pad_left(_queries(tok), tok.pad_token_id)
    resp = torch.randint(0, len(tok), (3, 4), generator=torch.Generator().manual_seed(2))
    hot = score_logprobs(model, q_ids, q_len, resp, temperature=1.0)
    logits = model(input_ids=torch.cat([q_ids[2:], resp[2:]], 1)[:, -5:-1]).logits  # row 2 has no padding
    manual = torch.log_softmax(logits / 0.5, -1).gather(-1, resp[2:, :, None])[..., 0]
    cold = score_logprobs(model, q_ids[2:], q_len[2:], resp[2:], temperature=0.5)
    torch.testing.assert_close(cold, manual, atol=1e-4, rtol=0)
    assert not torch.allclose(hot[2:], cold)


def test_sampling_is_reproducible_with_a_generator(tiny):
    model, tok = tiny
    task = SENTIMENT.with_(response_length=5)
    a = sample(model, tok, _queries(tok), task, generator=torch.Generator().manual_seed(3))
    b = sample(model, tok, _queries(tok), task, generator=torch.Generator().manual_seed(3))
    c = sample(model, tok, _queries(tok), task, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)
    chunked = sample(model, tok, _queries(tok), task, batch_size=2)
    assert chunked.response_ids.shape == a.response_ids.shape and chunked.query_ids.shape == a.query_ids.shape


def test_truncation_flags_and_padding(tiny):
    model, tok = tiny
    dot = tok.convert_tokens_to_ids(".")
    task = SENTIMENT.with_(response_length=6, truncation=TruncationRule(".", 2))
    from labkit.sampling import truncate

    resp = torch.tensor([[5, dot, 7, dot, 8, 9], [5, 6, 7, 8, 9, 10]])
    out, lengths, found = truncate(resp, task, tok)
    assert lengths.tolist() == [4, 6] and found.tolist() == [True, False]
    assert out[0].tolist() == [5, dot, 7, dot, tok.pad_token_id, tok.pad_token_id]
    assert torch.equal(out[1], resp[1])


def test_forward_responses_entropy_and_hidden(tiny):
    model, tok = tiny
    q_ids, q_len = pad_left(_queries(tok), tok.pad_token_id)
    resp = torch.randint(0, len(tok), (3, 4))
    out = forward_responses(model, q_ids, q_len, resp, 0.7, want_entropy=True, want_hidden=True)
    assert out.entropy.shape == (3, 4) and (out.entropy > 0).all()
    assert out.hidden.shape == (3, 4, model.config.hidden_size)


def test_a_pass_over_the_query_prefix_equals_the_whole_pass(tiny):
    model, tok = tiny
    task = SENTIMENT.with_(response_length=6)
    r = sample(model, tok, _queries(tok), task, generator=torch.Generator().manual_seed(1), batch_size=2,
               keep_query_prefix=True)
    Q = r.query_ids.shape[1]
    assert sample(model, tok, _queries(tok), task, batch_size=2).query_prefix is None  # only when asked for
    # the sampler's prefix is what query_prefix computes for the same model and chunks, bit for bit
    again = query_prefix(model, r.query_ids, r.query_lengths, batch_size=2)
    assert len(again) == model.config.num_hidden_layers == len(r.query_prefix)
    for (k, v), (k2, v2) in zip(r.query_prefix, again):
        assert k.shape[0] == 3 and k.shape[2] == Q - 1 and torch.equal(k, k2) and torch.equal(v, v2)
    kept = [(k.clone(), v.clone()) for k, v in r.query_prefix]
    whole = forward_responses(model, r.query_ids, r.query_lengths, r.response_ids, 0.7, want_hidden=True)
    for rows in (slice(0, 3), slice(0, 1), slice(1, 3)):  # the whole batch, and rows of it (left padding differs)
        part = forward_responses(model, r.query_ids[rows], r.query_lengths[rows], r.response_ids[rows], 0.7,
                                 want_hidden=True, prefix=prefix_rows(r.query_prefix, rows))
        torch.testing.assert_close(part.logprobs, whole.logprobs[rows], atol=1e-4, rtol=0)
        torch.testing.assert_close(part.hidden, whole.hidden[rows], atol=1e-4, rtol=1e-4)
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(r.query_prefix, kept))


def test_tempered_logprobs_and_gradient_equal_the_plain_chain():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 11, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (3, 4), generator=g)
    weights = torch.randn(3, 4, generator=g, dtype=torch.float64)  # a loss that weights every token differently
    naive_in = logits.clone().requires_grad_(True)
    naive_lp = torch.log_softmax(naive_in / 0.7, -1).gather(-1, ids[..., None])[..., 0]
    (naive_lp * weights).sum().backward()
    fused_in = logits.clone().requires_grad_(True)
    lp, entropy = tempered_logprobs(fused_in, ids, 0.7, want_entropy=True)
    (lp * weights).sum().backward()
    torch.testing.assert_close(lp, naive_lp)
    torch.testing.assert_close(fused_in.grad, naive_in.grad)
    p = torch.softmax(logits / 0.7, -1)
    torch.testing.assert_close(entropy, -(p * p.log()).sum(-1))
    # logits computed by an op (the head's output, as in a real pass) are divided and log-softmaxed in place;
    # the gradient reaching the op's input is still the plain chain's
    head_in = logits.clone().requires_grad_(True)
    head_out = head_in * 1.0
    buffer = head_out.data_ptr()
    lp2, entropy2 = tempered_logprobs(head_out, ids, 0.7, want_entropy=True)
    torch.testing.assert_close(head_out, torch.log_softmax(logits / 0.7, -1))  # the logits' buffer holds it now
    assert head_out.data_ptr() == buffer
    (lp2 * weights).sum().backward()
    torch.testing.assert_close(lp2, naive_lp)
    torch.testing.assert_close(head_in.grad, naive_in.grad)
    torch.testing.assert_close(entropy2, entropy)


def test_tempered_logprobs_refuse_a_second_backward():
    x = torch.randn(2, 3, 5, requires_grad=True)
    lp, _ = tempered_logprobs(x, torch.zeros(2, 3, dtype=torch.long), 1.0)
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        lp.sum().backward()


@pytest.mark.parametrize("block", [1024, 2, 3])  # one block; blocks of 2 and 3 (the last one padded, some empty)
def test_sample_categorical_draws_each_index_with_its_probability(block):
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [1e-3, 0.0, 0.0, 0.999, 0.0]])
    g = torch.Generator().manual_seed(0)
    n = 100_000
    draws = torch.stack([sample_categorical(row.expand(n, 5), g, block)[:, 0] for row in probs])  # (3, n)
    freq = torch.stack([torch.bincount(d, minlength=5).double() / n for d in draws])  # (3, 5)
    # binomial standard error is at most 0.0016 at n = 100,000: 0.006 is about 4 of them
    torch.testing.assert_close(freq, probs.double(), atol=0.006, rtol=0)
    assert (freq[probs == 0] == 0).all()  # an entry with no mass is never drawn
    assert freq[2, 0] > 0  # a small mass is drawn at all
    again = sample_categorical(probs, torch.Generator().manual_seed(7))
    assert torch.equal(again, sample_categorical(probs, torch.Generator().manual_seed(7)))


def _unpruned_copy(model):
    """A copy of `model` without `prune_last_mlp`'s hooks: the last block's MLP runs at every position."""
    import copy

    from labkit.speed.blocks import transformer_blocks

    plain = copy.deepcopy(model)
    mlp = transformer_blocks(plain)[-1].mlp
    mlp._forward_pre_hooks.clear()
    mlp._forward_hooks.clear()
    return plain


def test_last_mlp_runs_at_read_positions_only_and_changes_nothing(tiny):
    import copy

    from labkit.speed.blocks import transformer_blocks
    from labkit.speed.checkpointing import checkpoint_blocks

    model, tok = copy.deepcopy(tiny[0]).double(), tiny[1]
    plain = _unpruned_copy(model)
    ckpt = copy.deepcopy(model)
    checkpoint_blocks(ckpt)
    seen = {id(m): [] for m in (model, plain, ckpt)}
    for m in (model, plain, ckpt):
        transformer_blocks(m)[-1].mlp.register_forward_hook(lambda mod, a, o, _s=seen[id(m)]: _s.append(a[0].shape[1]))
        m.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(3, len(tok), (3, 7), generator=g)
    q[0, :3] = tok.pad_token_id
    ql, r = torch.tensor([4, 7, 7]), torch.randint(3, len(tok), (3, 5), generator=g)
    outs = []
    for m in (model, plain, ckpt):
        o = forward_responses(m, q, ql, r, 0.7, want_hidden=True)
        ((o.logprobs * torch.linspace(-1, 2, 15).view(3, 5)).sum() + o.hidden.square().mean()).backward()
        outs.append((o, {n: p.grad for n, p in m.named_parameters()}))
    assert seen[id(model)] == [5]  # the 5 positions that predict response tokens, of 7 + 4
    assert seen[id(plain)] == [11] and seen[id(ckpt)][0] == 11  # checkpointed blocks: no pruning (recomputed later)
    (o, grads) = outs[0]
    for o_ref, g_ref in outs[1:]:
        torch.testing.assert_close(o.logprobs, o_ref.logprobs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(o.hidden, o_ref.hidden, rtol=1e-12, atol=1e-12)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, g_ref[name], rtol=1e-10, atol=1e-12, msg=name)
    assert all(p.grad.abs().sum() > 0 for p in transformer_blocks(model)[-1].mlp.parameters())
    with torch.no_grad():  # a value model's pass: hidden states only
        a = forward_responses(model, q, ql, r, 0.7, want_hidden=True, want_logprobs=False).hidden
        b = forward_responses(plain, q, ql, r, 0.7, want_hidden=True, want_logprobs=False).hidden
    assert a.shape == (3, 5, model.config.hidden_size) and seen[id(model)][-1] == 5
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_pruned_prefill_samples_what_the_full_prefill_samples(tiny):
    import copy

    from labkit.speed.blocks import transformer_blocks

    model, tok = copy.deepcopy(tiny[0]).double(), tiny[1]
    plain = _unpruned_copy(model)
    seen = []
    transformer_blocks(model)[-1].mlp.register_forward_hook(lambda mod, a, o: seen.append(a[0].shape[1]))
    task = SENTIMENT.with_(response_length=6)
    queries = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    a = sample(model, tok, queries, task, generator=torch.Generator().manual_seed(1), keep_query_prefix=True)
    b = sample(plain, tok, queries, task, generator=torch.Generator().manual_seed(1), keep_query_prefix=True)
    assert seen[0] == 1  # the prefill's last block ran its MLP at the one position that predicts token 0
    assert torch.equal(a.response_ids, b.response_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-12, atol=1e-12)
    for (ka, va), (kb, vb) in zip(a.query_prefix, b.query_prefix):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_rows_with_the_same_query_share_one_prefill(tiny):
    import copy

    from labkit.sampling import lm_forward, left_pad_mask, positions, prefill

    model, tok = copy.deepcopy(tiny[0]).double(), tiny[1]
    a, b = _queries(tok)[:2]
    queries = [a, a, b, a, b, a]  # a 4-way comparison's rows and a 2-way one's, interleaved
    q_ids, q_len = pad_left(queries, tok.pad_token_id)
    Q = q_ids.shape[1]
    rows = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, i, o: rows.append(o.shape[0]))
    logits, cache = prefill(model, q_ids, q_len)
    hook.remove()
    assert rows == [2]  # two distinct queries ran, not six
    # the naive reference: every row through the model
    mask = left_pad_mask(q_len, Q)
    ref_logits, _, ref_cache = lm_forward(model, q_ids, mask, positions(mask), keep=1, use_cache=True,
                                          only=mask.new_tensor([Q - 1]))
    assert logits.shape == ref_logits.shape == (6, 1, model.config.vocab_size)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=1e-12)
    for got, ref in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(got.keys, ref.keys, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.values, ref.values, rtol=1e-12, atol=1e-12)
    # the sampler draws each row on its own, and query_prefix still equals the sampler's prefix bit for bit
    task = SENTIMENT.with_(response_length=6)
    r = sample(model, tok, queries, task, generator=torch.Generator().manual_seed(1), batch_size=4,
               keep_query_prefix=True)
    assert len({tuple(r.response_ids[i].tolist()) for i in (0, 1, 3, 5)}) > 1
    again = query_prefix(model, r.query_ids, r.query_lengths, batch_size=4)
    for (k, v), (k2, v2) in zip(r.query_prefix, again):
        assert k.shape[0] == 6 and torch.equal(k, k2) and torch.equal(v, v2)
    whole = score_logprobs(model, r.query_ids, r.query_lengths, r.response_ids, task.temperature, masked_ids=r.masked_ids)
    torch.testing.assert_close(r.logprobs, whole.float(), rtol=0, atol=1e-6)  # the sampler keeps fp32 log-probs
