import copy

import pytest
import torch
import torch.nn as nn

from labkit.speed.inplace_grads import InPlaceGradEmbedding, InPlaceGradLinear, accumulate_vocab_grads_in_place
from labkit.models import load_lm
from labkit.sampling import autocast_for, forward_responses


def _plain(model):
    """A copy with the stock nn.Embedding / nn.Linear classes: autograd's own gradient accumulation."""
    plain = copy.deepcopy(model)
    plain.get_input_embeddings().__class__ = nn.Embedding
    plain.get_output_embeddings().__class__ = nn.Linear
    return plain


def _micro_batch(tok, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(3, len(tok), (3, 7), generator=g)
    q[0, :3] = tok.pad_token_id  # left padding (with padding_idx set, its row gets no embedding gradient)
    return q, torch.tensor([4, 7, 7]), torch.randint(3, len(tok), (3, 5), generator=g)


def _backward(model, tok, seed):
    q, ql, r = _micro_batch(tok, seed)
    out = forward_responses(model, q, ql, r, temperature=0.7, want_hidden=True)
    # a different weight per token, and a path through the hidden states alone (as the value head's)
    w = torch.linspace(-1, 2, out.logprobs.numel()).view_as(out.logprobs)
    ((out.logprobs * w).sum() + out.hidden.square().mean()).backward()


@pytest.mark.parametrize("tied", [True, False])
def test_gradients_equal_autograds_over_accumulated_micro_batches(tiny, tied):
    model = copy.deepcopy(tiny[0]).double()
    tok = tiny[1]
    if not tied:  # a separate head matrix: both paths write their own weight's gradient
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
        model.config.tie_word_embeddings = False
        model.get_input_embeddings().padding_idx = tok.pad_token_id  # as a model whose config had the pad id
    assert isinstance(model.get_input_embeddings(), InPlaceGradEmbedding)  # load_lm swapped them
    assert isinstance(model.get_output_embeddings(), InPlaceGradLinear)
    plain = _plain(model)
    for m in (model, plain):
        m.requires_grad_(True)
        for seed in (0, 1):  # two micro-batches accumulate into .grad, as PPO's gradient accumulation
            _backward(m, tok, seed)
    grads, ref = dict(model.named_parameters()), dict(plain.named_parameters())
    assert set(grads) == set(ref)
    for name, p in grads.items():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    emb = model.get_input_embeddings()
    assert emb.weight.grad.abs().sum() > 0
    if not tied:  # the embedding alone leaves its padding row at zero, as F.embedding with padding_idx does
        assert emb.weight.grad[tok.pad_token_id].abs().max() == 0


def test_frozen_weights_and_no_grad_take_the_plain_path(tiny, monkeypatch):
    from labkit.speed import inplace_grads

    calls = []
    for fn in (inplace_grads._EmbeddingFn, inplace_grads._LinearFn):
        monkeypatch.setattr(fn, "apply", lambda *a, _f=fn.apply, _n=fn.__name__: calls.append(_n) or _f(*a))
    model = copy.deepcopy(tiny[0]).requires_grad_(False)  # rho, a reward model being scored
    q, ql, r = _micro_batch(tiny[1], 0)
    forward_responses(model, q, ql, r, temperature=0.7)
    model.requires_grad_(True)
    with torch.no_grad():  # a scoring pass of the trained policy
        forward_responses(model, q, ql, r, temperature=0.7)
    assert calls == []
    forward_responses(model, q, ql, r, temperature=0.7)  # training: both in-place functions
    assert sorted(calls) == ["_EmbeddingFn", "_LinearFn"]


def test_swap_is_idempotent_and_leaves_other_modules_alone(tiny):
    model = copy.deepcopy(tiny[0])
    assert accumulate_vocab_grads_in_place(model) == ["embedding", "head"]
    assert type(model.get_input_embeddings()) is InPlaceGradEmbedding
    model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    assert accumulate_vocab_grads_in_place(model) == ["embedding"]  # a head with a bias is not swapped
    assert type(model.lm_head) is nn.Linear


def test_bf16_autocast_gradients_close_to_autograds(tiny):
    model, tok = load_lm("tiny", device="cpu", bf16_autocast=True)
    plain = _plain(model)
    for m in (model, plain):
        m.requires_grad_(True)
        _backward(m, tok, 0)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.grad.dtype == torch.float32
        # bf16 rounding: autograd's head gradient is a bf16 matmul, ours accumulates in fp32 (closer to fp32's)
        assert (p.grad - q.grad).abs().max() <= 1e-2 * q.grad.abs().max(), name
    assert isinstance(autocast_for(model), torch.autocast)
