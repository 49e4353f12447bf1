"""Activation checkpointing of the transformer blocks: same gradients, far fewer saved tensors, plain no-grad passes."""

import copy
import dataclasses
import json

import pytest
import torch

import labkit.speed.checkpointing
from labkit.speed.checkpointing import checkpoint_blocks
from labkit.models import load_lm
from labkit.rl import PPOConfig, PPOTrainer
from labkit.rl import checkpoint as ckpt
from labkit.sampling import forward_responses, pad_left
from labkit.tasks import SENTIMENT, TruncationRule


def _batch(tok):
    q_ids, q_len = pad_left([tok.encode(t, add_special_tokens=False) for t in ["Hello there, friend", "Hi"]],
                            tok.pad_token_id)
    return q_ids, q_len, torch.randint(0, len(tok), (2, 5), generator=torch.Generator().manual_seed(0))


def _loss(model, batch):
    out = forward_responses(model, *batch, 0.7, want_hidden=True)
    return out.logprobs.sum() + out.hidden.square().mean()


def _saved_bytes(model, fn) -> int:
    """Bytes of the activations autograd saves for backward while `fn` runs (tensors other than weights)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in weights:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_checkpointed_blocks_give_the_same_gradients_and_save_far_less():
    plain, tok = load_lm("tiny", device="cpu", seed=0)
    ckpt = copy.deepcopy(plain)
    assert checkpoint_blocks(ckpt) == plain.config.num_hidden_layers == checkpoint_blocks(ckpt)  # idempotent
    batch = _batch(tok)
    _loss(plain, batch).backward()
    _loss(ckpt, batch).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    # the blocks keep their inputs only (the head's (B, R, V) log-softmax buffer is left out: it is the same)
    def trunk(m):
        return lambda: forward_responses(m, *batch, 0.7, want_hidden=True, want_logprobs=False).hidden.sum()

    assert _saved_bytes(ckpt, trunk(ckpt)) < 0.3 * _saved_bytes(plain, trunk(plain))
    assert type(ckpt.model.layers[0]).__name__ == type(plain.model.layers[0]).__name__  # FSDP finds blocks by name


def test_no_grad_passes_and_frozen_blocks_run_plainly(monkeypatch):
    model, tok = load_lm("tiny", device="cpu", seed=0)
    checkpoint_blocks(model)
    calls = []
    real = labkit.speed.checkpointing.checkpoint
    monkeypatch.setattr(labkit.speed.checkpointing, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    batch = _batch(tok)
    with torch.no_grad():
        _loss(model, batch)
    frozen = copy.deepcopy(model).requires_grad_(False)  # rho: a copy keeps the class, and runs plainly
    _loss(frozen, batch)
    assert calls == []
    _loss(model, batch).backward()
    assert len(calls) == model.config.num_hidden_layers


def test_ppo_with_gradient_checkpointing_trains_the_policy_only():
    model, tok = load_lm("tiny", device="cpu", seed=0)
    task = SENTIMENT.with_(response_length=6, truncation=None)
    trainer = PPOTrainer(model, tok, task, lambda q, r: [s.count(".") + 0.1 * len(s) for s in r], ["It was late. The rain stopped."],
                         PPOConfig(batch_size=8, micro_batch_size=4, lr=1e-3, init_beta=0.1, kl_target=None,
                                   value_model="separate", gradient_checkpointing=True), verbose=False)
    assert getattr(type(trainer.policy.model.layers[0]), "_labkit_checkpointed", False)
    assert getattr(type(trainer.value_model.lm.model.layers[0]), "_labkit_checkpointed", False)
    assert not getattr(type(trainer.rho.model.layers[0]), "_labkit_checkpointed", False)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    m = trainer.step()
    assert all(torch.isfinite(torch.tensor(m[k])) for k in ("loss/policy_avg", "loss/value_avg", "objective/kl"))
    assert any(not torch.equal(p, b) for p, b in zip(trainer.policy.parameters(), before))


def test_a_checkpoint_saved_before_truncation_had_tokens_resumes_only_with_the_broad_set(tmp_path):
    """(A PPO-checkpoint test, not an activation-checkpointing one: it sits here until it moves next to the other
    resume tests in test_bad_input_training.py.) Before `TruncationRule.tokens`, labkit cut at every token
    containing the text: such a checkpoint resumes with tokens="contains" and is refused, saying so, with "exact"."""
    old_task = SENTIMENT.with_(response_length=6, truncation=TruncationRule(".", 2, tokens="contains"))
    cfg = PPOConfig(batch_size=4, minibatch_size=2, ppo_epochs=1, lr=1e-3, total_updates=4, kl_target=1.0,
                    init_beta=0.2, kl_horizon=100)

    def make(task):
        model, tok = load_lm("tiny", device="cpu", seed=0)
        return PPOTrainer(model, tok, task, lambda q, r: [s.count(".") + 0.1 * len(s) for s in r], ["It was late. The rain stopped."],
                          cfg, run_dir=tmp_path / "run", verbose=False)

    make(old_task).train(1, progress=False)
    folder = ckpt.latest(tmp_path / "run")
    meta = json.loads((folder / "trainer.json").read_text())
    del meta["task"]["truncation"]["tokens"]  # as a checkpoint written before the field existed
    (folder / "trainer.json").write_text(json.dumps(meta))
    done = json.loads((folder / "COMPLETE").read_text())
    done["sizes"]["trainer.json"] = (folder / "trainer.json").stat().st_size
    (folder / "COMPLETE").write_text(json.dumps(done))
    exact = old_task.with_(truncation=dataclasses.replace(old_task.truncation, tokens="exact"))
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)another task \(truncation: .*'contains'.*'exact'.*before "
                                                   r"TruncationRule had `tokens`.*tokens='contains'"):
        make(exact)
    assert make(old_task).step_count == 1  # the broad set: the old run's task, resumed
    with pytest.raises(ckpt.CheckpointError, match=r"another task \(truncation: .*\)\. Resume it with the same settings"):
        make(old_task.with_(truncation=TruncationRule(".", 3)))  # `after` differs too: no hint about `tokens`
