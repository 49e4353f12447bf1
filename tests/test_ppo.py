"""PPO on the tiny model: signs, KL mechanics, metrics, LoRA, value variants, checkpoints and resume."""

import math

import pytest
import torch

from labkit.data import Prompt
from labkit.models import load_lm
from labkit.rl import PPOConfig, PPOTrainer
from labkit.reward import reward_model_from_lm
from labkit.sampling import forward_responses, pad_left, sample, score_logprobs
from labkit.tasks import SENTIMENT, TruncationRule, format_query

PROMPTS = ["It was late. The rain stopped and she waited.", "One. Two words here. And more."]
TRL_METRICS = ["objective/kl", "objective/kl_coef", "objective/scores", "objective/rlhf_reward",
               "objective/non_score_reward", "objective/entropy", "policy/approxkl_avg", "policy/clipfrac_avg",
               "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio", "eps",
               "time/generation", "time/scoring", "time/optimization"]


def peaky_tiny(seed=0):
    """The tiny model with scaled embeddings: its samples repeat tokens ('.' ~7%), so a reward can act."""
    model, tok = load_lm("tiny", device="cpu", seed=seed)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(6.0)
    return model, tok


def task(length=8):
    return SENTIMENT.with_(response_length=length, truncation=None)


def dot_freq(model, tok, length=8):
    t = task(length)
    r = sample(model, tok, [format_query(t, PROMPTS[0], tok)] * 64, t, generator=torch.Generator().manual_seed(123))
    return (r.response_ids == tok.convert_tokens_to_ids(".")).float().mean().item()


def sequence_kl(trainer, length, n=128):
    """Monte-Carlo KL(pi || rho) of whole responses, with many samples (a low-noise reference)."""
    t = trainer.task
    q = [format_query(t, p, trainer.tokenizer) for p in PROMPTS] * (n // 2)
    r = sample(trainer.policy, trainer.tokenizer, q, t, generator=torch.Generator().manual_seed(7))
    ref = score_logprobs(trainer.rho, r.query_ids, r.query_lengths, r.response_ids, t.temperature, masked_ids=r.masked_ids)
    return (r.logprobs - ref).sum(-1).mean().item()


def config(**kw):
    base = dict(batch_size=16, lr=1e-3, total_updates=100, kl_target=None, init_beta=0.0)
    base.update(kw)
    return PPOConfig(**base)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_reward_for_one_token_moves_the_policy_in_the_right_direction(sign):
    model, tok = peaky_tiny()
    before = dot_freq(model, tok)
    trainer = PPOTrainer(model, tok, task(), lambda q, r: [sign * s.count(".") for s in r], PROMPTS, config())
    params0 = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    history = trainer.train(6, progress=False)
    after = dot_freq(trainer.policy, tok)
    assert all(math.isfinite(m["loss/policy_avg"]) and math.isfinite(m["loss/value_avg"]) for m in history)
    assert any(not torch.equal(p, params0[n]) for n, p in trainer.policy.named_parameters())
    if sign > 0:
        assert after > before + 0.15, (before, after)
        assert history[-1]["objective/scores"] > history[0]["objective/scores"]
    else:
        assert after < before / 2, (before, after)
    # rho never moves
    assert all(torch.equal(p, params0[n]) for n, p in trainer.rho.named_parameters())


@pytest.mark.parametrize("micro", [None, 4])  # 4: scoring passes and training in chunks of 4 rollouts
def test_huge_beta_with_zero_reward_keeps_the_policy_at_rho(micro):
    model, tok = peaky_tiny()
    trainer = PPOTrainer(model, tok, task(), lambda q, r: [0.0] * len(r), PROMPTS,
                         config(init_beta=1e3, micro_batch_size=micro))
    history = trainer.train(4, progress=False)
    # before the first step pi and rho are the same weights and their scoring passes the same kind of pass
    # (pi's continuing from the sampler's query prefix, rho's from its own): the KL is exactly zero
    assert history[0]["objective/kl"] == 0.0
    assert abs(sequence_kl(trainer, 8)) < 1e-4


def test_pis_scoring_pass_continues_from_the_samplers_query_prefix(monkeypatch):
    import labkit.rl.trainer

    model, tok = peaky_tiny()
    trainer = PPOTrainer(model, tok, task(), lambda q, r: [0.0] * len(r), PROMPTS, config(micro_batch_size=4))
    calls = []

    def spy(m, q_ids, *args, prefix=None, **kw):
        calls.append((m is trainer.policy, torch.is_grad_enabled(), prefix is not None))
        if prefix is not None:  # rows of the prefix match the rows scored
            assert all(k.shape[0] == q_ids.shape[0] and k.shape[2] == q_ids.shape[1] - 1 for k, _ in prefix)
        return forward_responses(m, q_ids, *args, prefix=prefix, **kw)

    monkeypatch.setattr(labkit.rl.trainer, "forward_responses", spy)
    trainer.step()
    no_grad = [c for c in calls if not c[1]]
    assert len(no_grad) == 8 and all(c[2] for c in no_grad)  # rho's 4 chunks and pi's 4, all over a prefix
    assert sum(c[0] for c in no_grad) == 4
    assert all(not c[2] for c in calls if c[1])  # training passes run whole sequences


def test_bf16_autocast_on_a_cpu_still_learns_and_still_keeps_rho_under_a_huge_beta():
    # fp32 weights, bf16 matmuls (load_lm(..., bf16_autocast=True)): the rollout's scoring passes and the
    # training passes must stay the same kind of pass, or rounding noise becomes a training signal
    model, tok = peaky_tiny()
    model.labkit_bf16_autocast = True
    trainer = PPOTrainer(model, tok, task(), lambda q, r: [0.0] * len(r), PROMPTS, config(init_beta=1e3))
    assert trainer.rho.labkit_bf16_autocast  # the frozen copy runs in the same precision
    trainer.train(4, progress=False)
    assert abs(sequence_kl(trainer, 8)) < 1e-3
    model, tok = peaky_tiny()
    model.labkit_bf16_autocast = True
    before = dot_freq(model, tok)
    trainer = PPOTrainer(model, tok, task(), lambda q, r: [s.count(".") for s in r], PROMPTS, config())
    history = trainer.train(6, progress=False)
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())  # master weights stay fp32
    assert all(math.isfinite(m["loss/policy_avg"]) for m in history)
    assert dot_freq(trainer.policy, tok) > before + 0.15


def test_the_kl_penalty_pulls_a_perturbed_policy_back_toward_rho():
    model, tok = peaky_tiny()
    trainer = PPOTrainer(model, tok, task(1), lambda q, r: [0.0] * len(r), PROMPTS, config(init_beta=1.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in trainer.policy.named_parameters():
            if "layers.1.mlp" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    before = sequence_kl(trainer, 1, n=256)
    trainer.train(6, progress=False)
    after = sequence_kl(trainer, 1, n=256)
    assert after < 0.8 * before, (before, after)


def test_metrics_use_trls_names_and_kl_is_summed_over_tokens():
    model, tok = peaky_tiny()
    trainer = PPOTrainer(model, tok, task(), lambda q, r: [1.0] * len(r), PROMPTS, config(init_beta=0.5))
    trainer.step()  # pi == rho: kl is exactly 0 in the first update
    m = trainer.step()
    for k in TRL_METRICS:
        assert k in m and math.isfinite(m[k]), k
    assert m["objective/kl_coef"] == 0.5
    assert abs(m["objective/non_score_reward"] + 0.5 * m["objective/kl"]) < 1e-5
    assert abs(m["objective/rlhf_reward"] - (m["objective/scores"] + m["objective/non_score_reward"])) < 1e-5
    assert m["objective/kl3"] >= 0


def test_truncation_penalty_replaces_the_score():
    model, tok = peaky_tiny()
    t = SENTIMENT.with_(response_length=4)  # '.' at index >= 16 is impossible in 4 tokens: always penalised
    trainer = PPOTrainer(model, tok, t, lambda q, r: [5.0] * len(r), PROMPTS, config())
    m = trainer.step()
    assert m["objective/scores"] == -1.0 and m["objective/truncated_frac"] == 0.0


def test_adaptive_controller_moves_beta():
    model, tok = peaky_tiny()
    trainer = PPOTrainer(model, tok, task(), lambda q, r: [s.count(".") for s in r], PROMPTS,
                         config(init_beta=0.1, kl_target=0.01, kl_horizon=100))
    trainer.train(3, progress=False)
    assert trainer.kl_ctl.beta != 0.1


def test_separate_value_model_from_the_reward_model():
    model, tok = peaky_tiny()
    rm = reward_model_from_lm(model, tok)
    trainer = PPOTrainer(model, tok, task(), rm, PROMPTS, config(value_model="separate"))
    # at the start its values are the reward model's normalised head on every response position (the
    # value model's trunk skips the vocabulary head: the hidden states must be the same)
    q_ids, q_len = pad_left([tok.encode("A calm"), tok.encode("Rain fell on the")], tok.pad_token_id)
    resp = torch.randint(0, len(tok), (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = forward_responses(rm.lm, q_ids, q_len, resp, 1.0, want_hidden=True).hidden  # (2, 5, H)
        torch.testing.assert_close(trainer.value_model(q_ids, q_len, resp), rm.gain * rm.head(h).squeeze(-1) + rm.bias)
    v0 = {n: p.detach().clone() for n, p in trainer.value_model.named_parameters()}
    m = trainer.step()
    assert math.isfinite(m["loss/value_avg"]) and trainer.value_head is None
    assert any(not torch.equal(p, v0[n]) for n, p in trainer.value_model.named_parameters())
    assert not any(p is q for p in trainer.value_model.parameters() for q in rm.parameters())


def test_lora_uses_the_policy_with_adapters_disabled_as_rho():
    model, tok = peaky_tiny()
    trainer = PPOTrainer(model, tok, task(), lambda q, r: [s.count(".") for s in r], PROMPTS, config(lora_r=4, lr=3e-3))
    assert trainer.rho is None  # no second copy of the weights
    base = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if "lora" not in n}
    lora0 = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if "lora" in n}
    trainer.train(3, progress=False)
    assert all(torch.equal(p, base[n]) for n, p in trainer.policy.named_parameters() if "lora" not in n)
    assert any(not torch.equal(p, lora0[n]) for n, p in trainer.policy.named_parameters() if "lora" in n)
    m = trainer.history[-1]
    assert m["objective/kl"] != 0.0  # adapters on vs off differ after training


def test_resumed_run_equals_the_uninterrupted_run(tmp_path):
    def make(run_dir):
        model, tok = peaky_tiny()
        return PPOTrainer(model, tok, task(), lambda q, r: [s.count(".") for s in r], PROMPTS,
                          config(init_beta=0.2, kl_target=1.0, kl_horizon=100, total_updates=5), run_dir=run_dir, verbose=False)

    straight = make(None)
    straight.train(3, progress=False)

    first = make(tmp_path / "run")
    first.train(2, progress=False)  # checkpoints after every update
    del first
    resumed = make(tmp_path / "run")  # a new process would do exactly this
    assert resumed.step_count == 2 and len(resumed.history) == 2
    resumed.train(1, progress=False)
    for (n, a), (_, b) in zip(straight.policy.named_parameters(), resumed.policy.named_parameters()):
        assert torch.equal(a, b), n
    assert straight.kl_ctl.beta == resumed.kl_ctl.beta
    assert straight.history[-1]["objective/scores"] == resumed.history[-1]["objective/scores"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 3
    assert not list((tmp_path / "run").glob("*.pt"))


def test_updates_past_total_updates_are_refused_and_a_larger_horizon_resumes(tmp_path):
    """At update total_updates the learning rate is 0: more updates would move nothing while their curves go on.
    They are refused before any runs; built again with a larger total_updates, the run continues its decay."""
    def make(total):
        model, tok = peaky_tiny()
        return PPOTrainer(model, tok, task(), lambda q, r: [s.count(".") for s in r], PROMPTS,
                          config(batch_size=4, total_updates=total), run_dir=tmp_path / "run", verbose=False)

    trainer = make(2)
    with pytest.raises(ValueError, match=r"3 more PPO update\(s\) asked for at update 0.*2 left"):
        trainer.train(3, progress=False)
    assert trainer.step_count == 0 and not trainer.history   # refused whole: not two updates, then an error
    trainer.train(2, progress=False)
    assert trainer.updates_left() == 0 and trainer.history[-1]["lr"] > 0
    weights = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    for more in (lambda: trainer.step(), lambda: trainer.train(1, progress=False),
                 lambda: trainer.train_in_background(1)):
        with pytest.raises(ValueError, match="larger total_updates on the same run_dir"):
            more()
    assert trainer.step_count == 2 and all(torch.equal(p, weights[n]) for n, p in trainer.policy.named_parameters())

    resumed = make(4)   # the same run, a longer horizon: lr 1 - 2/4 of the peak at update 3, as a 4-update run's
    assert resumed.step_count == 2 and resumed.updates_left() == 2
    resumed.train(2, progress=False)
    assert [m["lr"] for m in resumed.history[2:]] == pytest.approx([1e-3 * 2 / 4, 1e-3 * 1 / 4])


def test_a_resumed_trainers_dashboard_shows_the_runs_earlier_updates(tmp_path):
    from labkit.widgets import Dashboard

    def make():
        model, tok = peaky_tiny()
        return PPOTrainer(model, tok, task(), lambda q, r: [s.count(".") for s in r], PROMPTS,
                          config(batch_size=4, total_updates=5), run_dir=tmp_path / "run", verbose=False)

    make().train(2, progress=False)
    resumed = make()  # a new kernel: the notebook builds a fresh dashboard
    dash = Dashboard(max_fps=1e9)
    resumed.train(1, dashboard=dash, progress=False)
    assert [m["step"] for m in dash.history] == [1, 2, 3]  # not just the update run after the resume
    assert list(dash.figure.data[0].x) == [1, 2, 3]
    resumed.train(1, dashboard=dash, progress=False)  # rerunning the cell continues the same curves
    assert [m["step"] for m in dash.history] == [1, 2, 3, 4]


def test_lora_construction_hides_only_peft_s_deprecation_warning():
    import warnings

    model, tok = peaky_tiny()
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PPOTrainer(model, tok, task(), lambda q, r: [0.0] * len(r), PROMPTS, config(lora_r=4))
        warnings.warn("`is_gradient_checkpointing` is deprecated (elsewhere)", FutureWarning)
    messages = [str(w.message) for w in caught]
    assert messages == ["`is_gradient_checkpointing` is deprecated (elsewhere)"], messages  # outside: still shown
    assert warnings.filters == filters


def test_training_shows_a_bar_with_the_time_left_in_the_main_thread_only(capsys):
    model, tok = peaky_tiny()
    trainer = PPOTrainer(model, tok, task(), lambda q, r: [0.0] * len(r), PROMPTS, config(batch_size=4))
    trainer.train(2)
    err = capsys.readouterr().err
    assert "PPO updates" in err and "2/2" in err and "<" in err  # "elapsed<remaining"
    thread = trainer.train_in_background(1)
    thread.join(60)
    import threading

    worker = threading.Thread(target=trainer.train, args=(1,))  # progress left on: a thread still draws nothing
    worker.start()
    worker.join(60)
    assert trainer.step_count == 4 and capsys.readouterr().err == ""


def test_an_interrupt_during_rollouts_leaves_the_trainer_consistent(monkeypatch):
    model, tok = peaky_tiny()
    trainer = PPOTrainer(model, tok, task(), lambda q, r: [s.count(".") for s in r], PROMPTS, config())
    trainer.step()
    params = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    import labkit.rl.trainer as ppo

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ppo, "sample", boom)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(3, progress=False)
    assert trainer.step_count == 1 and len(trainer.history) == 1
    assert all(torch.equal(p, params[n]) for n, p in trainer.policy.named_parameters())
    monkeypatch.undo()
    trainer.train(1, progress=False)  # rerunning the cell continues
    assert trainer.step_count == 2


def test_background_training_stops_cleanly_after_the_current_update():
    model, tok = peaky_tiny()
    trainer = PPOTrainer(model, tok, task(), lambda q, r: [s.count(".") for s in r], PROMPTS, config())
    thread = trainer.train_in_background(50)
    while trainer.step_count < 1:
        thread.join(0.05)
    trainer.stop()
    thread.join(30)
    assert not thread.is_alive() and 1 <= trainer.step_count < 50
    assert len(trainer.history) == trainer.step_count
    roll = trainer.sample_policy(PROMPTS, n=2, seed=0)  # sampling between updates works from any thread
    assert len(roll) == 4


def test_gradient_accumulation_matches_one_minibatch():
    def run(micro):
        model, tok = peaky_tiny()
        tr = PPOTrainer(model, tok, task(), lambda q, r: [s.count(".") for s in r], PROMPTS,
                        config(micro_batch_size=micro, ppo_epochs=1))
        tr.step()
        return [p.detach().clone() for p in tr.params]

    for a, b in zip(run(None), run(4)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_gradients_live_in_one_buffer_during_an_update_and_the_update_equals_autograds_own():
    def run(own_buffer):
        model, tok = peaky_tiny()
        tr = PPOTrainer(model, tok, task(), lambda q, r: [s.count(".") for s in r], PROMPTS,
                        config(micro_batch_size=4, ppo_epochs=2))
        if not own_buffer:
            tr._zero_gradients = lambda: tr.optimizer.zero_grad(set_to_none=True)
        storages = []  # per optimiser step: the storages holding the gradients
        tr.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: storages.append({p.grad.untyped_storage().data_ptr() for p in tr.params}))
        tr.step()
        assert all(p.grad is None for p in tr.params)  # freed after the update
        return [p.detach().clone() for p in tr.params], storages

    a, storages = run(True)
    b, own = run(False)
    assert len(storages) == 2 and all(len(s) == 1 for s in storages)  # one buffer, at both optimiser steps
    assert all(len(s) > 10 for s in own)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("micro", [None, 4])
def test_a_separate_value_model_takes_its_old_values_from_its_first_epoch(micro):
    """One minibatch: the value model's epoch-1 forward gives the old values, with no scoring pass of its own,
    and the update equals the one with that scoring pass."""
    def run(from_first_epoch):
        model, tok = peaky_tiny()
        torch.manual_seed(0)  # the reward model's head
        rm = reward_model_from_lm(model, tok)
        tr = PPOTrainer(model, tok, task(), rm, PROMPTS, config(value_model="separate", micro_batch_size=micro, ppo_epochs=2,
                                                                 separate_value_first_epoch=from_first_epoch))
        grad_modes, forward = [], tr.value_model.forward

        def spy(*a, **k):
            grad_modes.append(torch.is_grad_enabled())
            return forward(*a, **k)

        tr.value_model.forward = spy
        m = tr.step()
        return [p.detach().clone() for p in tr.params], m, grad_modes

    chunks = 16 // (micro or 16)
    a, ma, modes_a = run(True)
    b, mb, modes_b = run(False)
    assert modes_a == [True] * 2 * chunks  # two training epochs, no no-grad pass
    assert modes_b == [False] * chunks + [True] * 2 * chunks
    for k in ("val/mean", "loss/value_avg", "loss/policy_avg", "objective/kl", "val/clipfrac_avg"):
        assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-7), k
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_a_nan_reward_stops_the_update_before_any_weight_changes():
    model, tok = peaky_tiny()
    trainer = PPOTrainer(model, tok, task(), lambda q, r: [float("nan")] * len(r), PROMPTS, config(batch_size=8))
    params0 = [p.detach().clone() for p in trainer.params]
    with pytest.raises(FloatingPointError, match="returned nan for rollout 0.*not applied"):
        trainer.step()
    assert trainer.step_count == 0
    assert all(torch.equal(p, p0) for p, p0 in zip(trainer.params, params0))


def test_score_gives_any_rollout_the_reward_ppo_maximises_with_the_penalty_where_nothing_was_found():
    model, tok = peaky_tiny()
    t = SENTIMENT.with_(response_length=8, truncation=TruncationRule(".", after=2), penalty=-3.0)
    trainer = PPOTrainer(model, tok, t, lambda q, r: [float(len(s)) for s in r], PROMPTS, config())
    roll = trainer.sample_rho(PROMPTS * 16, seed=0)
    assert 0 < roll.found.sum() < len(roll)  # both cases occur
    expected = [float(len(s)) if ok else -3.0 for s, ok in zip(roll.response_texts, roll.found.tolist())]
    assert trainer.score(roll).tolist() == expected


def test_score_asks_for_references_when_the_reward_takes_them():
    model, tok = peaky_tiny()

    def overlap(queries, responses, references):
        return [float(len(set(r) & set(ref))) for r, ref in zip(responses, references)]

    prompts = [Prompt(text, reference) for text, reference in zip(PROMPTS, ["abc", "xyz"])]
    trainer = PPOTrainer(model, tok, task(), overlap, prompts, config())
    roll = trainer.sample_rho(PROMPTS, seed=0)
    with pytest.raises(ValueError, match="takes references"):
        trainer.score(roll)
    assert trainer.score(roll, references=["abc", "xyz"]).tolist() == overlap(None, roll.response_texts, ["abc", "xyz"])
