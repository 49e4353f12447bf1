"""The online loop on the tiny model: comparisons from the current policy, refits, background training
with labeling on the main thread, and the validation win rate."""

import math
import re
import time

import numpy as np
import pytest
import torch

import labkit.labeling.online
import labkit.rl.trainer
import labkit.sampling
from labkit.evaluate import win_rate
from labkit.labeling.comparisons import policy_source
from labkit.labeling.labelers import label_pending
from labkit.labeling.store import LabelStore
from labkit.models import load_lm
from labkit.labeling.online import OnlineConfig, OnlineLoop, stop_button
from labkit.rl import PPOConfig, PPOTrainer
from labkit.rl.trainer import reward_name
from labkit.reward import RewardConfig, RewardModel
from labkit.tasks import SENTIMENT
from labkit.widgets import Dashboard

PROMPTS = ["It was late. The rain stopped and she waited.", "One. Two words here. And more."]
TASK = SENTIMENT.with_(response_length=8, truncation=None)


class DotLabeler:
    """A mock human that prefers the response with the most '.' (the tiny model's samples have some)."""

    labeler_id = "mock:dots"

    def choose(self, comparison):
        return int(np.argmax([r.count(".") for r in comparison.responses]))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Training and sampling run in two Python threads here: one intra-op thread each fits 2 shared cores
    (two each oversubscribe them, and OpenMP's spin-waiting then makes everything many times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_loop(tmp_path, total_updates=1000, **overrides):
    """A trainer on the peaky tiny model (see tests/test_ppo.py) and an online loop around it. total_updates: the
    background runs below ask for up to 200 updates, and stop long before."""
    model, tok = load_lm("tiny", device="cpu", seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(6.0)  # peaky: samples repeat tokens, '.' ~7%
    trainer = PPOTrainer(model, tok, TASK, lambda q, r: [s.count(".") for s in r], PROMPTS,
                         PPOConfig(batch_size=8, ppo_epochs=1, lr=1e-3, kl_target=None, init_beta=0.0,
                                   total_updates=total_updates))
    settings = dict(comparisons_per_round=2, validation_per_round=1, refit_every_labels=3, ppo_updates_per_round=1,
                    reward_config=RewardConfig(batch_size=4, normalize_samples=8))
    settings.update(overrides)
    store = LabelStore(tmp_path / "labels.db")
    return OnlineLoop(trainer, store, trainer.rho, tok, PROMPTS, OnlineConfig(**settings))


def wait_for(condition, thread, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_new_comparisons_come_from_the_current_policy_and_rho(tmp_path):
    loop = make_loop(tmp_path)
    ids = loop.new_comparisons()
    assert len(ids) == 2 + 1
    train = loop.store.comparisons(task=TASK.name, kind="train")
    val = loop.store.comparisons(task=TASK.name, kind="validation")
    assert [c.id for c in train + val] == ids
    # the policy's name: its update count and its weights (policy_source), the same on every response
    policy = policy_source(loop.trainer)
    assert re.fullmatch(r"policy@0:[0-9a-f]{8}", policy)
    assert all(c.sources == [policy] * 4 for c in train)
    assert all(c.sources == ["rho", "rho", policy, policy] for c in val)
    for c in train + val:
        assert c.query and c.query_tokens
        assert all(len(t) == TASK.response_length for t in c.response_tokens)
        assert len(c.extra["full_responses"]) == 4 and c.extra["found"] == [True] * 4
    loop.trainer.step()
    assert all(c.sources[-1] == policy_source(loop.trainer) != policy and c.sources[-1].startswith("policy@1:")
               for c in map(loop.store.comparison, loop.new_comparisons(n=1)))
    assert loop.pending("mock:dots") == 3 + 1 + 1


def test_rounds_refit_when_enough_labels_arrived(tmp_path):
    loop = make_loop(tmp_path)
    trainer, labeler = loop.trainer, DotLabeler()
    loop.new_comparisons()
    assert label_pending(loop.store, labeler, TASK.name) == 3 and loop.labels_since_fit() == 3

    ppo_dash, rm_dash = Dashboard("PPO"), Dashboard("reward model")
    first = loop.round(dashboard=ppo_dash, reward_dashboard=rm_dash)
    assert [m["step"] for m in ppo_dash.history] == [1] and all("rm/loss" in m for m in rm_dash.history)
    assert first["refit"] is not None and first["refit"]["online/labels"] == 3
    assert isinstance(trainer.reward, RewardModel) and trainer.step_count == 1
    assert math.isfinite(first["refit"]["rm/loss"]) and loop.labels_since_fit() == 0
    assert len(first["new_comparisons"]) == 3 and loop.pending(labeler.labeler_id) == 3
    assert not any(p is q for p in trainer.reward.parameters() for q in trainer.rho.parameters())

    reward = trainer.reward
    assert loop.maybe_refit() is None and trainer.reward is reward  # nothing labeled since: no refit
    label_pending(loop.store, labeler, TASK.name)
    second = loop.round()
    assert second["refit"]["online/labels"] == 6 and second["refit"]["online/refits"] == 2
    assert trainer.reward is not reward and isinstance(trainer.reward, RewardModel)
    assert trainer.step_count == 2 and len(trainer.history) == 2
    # each update names the r that scored it (the dashboard marks where it changes): the first refit's, the second's
    names = [m["reward/model"] for m in trainer.history]
    assert names == [reward_name(reward), reward_name(trainer.reward)] and names[0] != names[1]
    assert all(re.fullmatch(r"r:[0-9a-f]{8}", n) for n in names)
    assert reward_name(lambda q, r: r) == "fn:test_rounds_refit_when_enough_labels_arrived.<locals>.<lambda>"


def test_refits_read_what_the_config_says_and_a_layer_rho_lacks_is_refused(tmp_path):
    loop = make_loop(tmp_path, reward_pool="mean", reward_layer=1)
    loop.new_comparisons()
    label_pending(loop.store, DotLabeler(), TASK.name)
    assert loop.maybe_refit() is not None
    assert (loop.trainer.reward.pool, loop.trainer.reward.layer) == ("mean", 1)
    blocks = loop.rho_lm.config.num_hidden_layers
    with pytest.raises(ValueError, match=rf"OnlineConfig\.reward_layer = {blocks + 1}: rho has hidden states 0 "
                                         rf"\(the embeddings\) to {blocks}"):
        make_loop(tmp_path, reward_layer=blocks + 1)


def test_background_loop_trains_while_the_main_thread_labels(tmp_path):
    loop = make_loop(tmp_path)
    labeler = DotLabeler()
    loop.new_comparisons()
    label_pending(loop.store, labeler, TASK.name)  # the initial labels: r is fitted before the first update
    updates = []

    t0 = time.monotonic()
    thread = loop.start(200, on_update=updates.append, labeler=labeler.labeler_id)
    assert time.monotonic() - t0 < 1.0 and thread.is_alive()
    pending_seen = []

    def label_and_check():  # what a human in the widget does meanwhile
        pending_seen.append(loop.pending(labeler.labeler_id))
        label_pending(loop.store, labeler, TASK.name)
        return len(loop.fits) >= 2 and loop.trainer.step_count >= 2

    assert wait_for(label_and_check, thread), (loop.error, loop.fits, loop.trainer.step_count)
    loop.stop()
    thread.join(30)
    assert not thread.is_alive() and loop.error is None
    trainer = loop.trainer
    assert 2 <= trainer.step_count < 200 and len(trainer.history) == trainer.step_count == len(updates)
    assert isinstance(trainer.reward, RewardModel) and loop.fits[1]["online/labels"] > loop.fits[0]["online/labels"]
    assert any(n > 0 for n in pending_seen)  # the thread kept the queue topped up
    sources = {s for c in loop.store.comparisons(task=TASK.name, kind="train") for s in c.sources}
    assert len(sources) >= 2  # comparisons from policies at different updates


def test_sampling_on_the_main_thread_never_sees_weights_mid_update(tmp_path, monkeypatch):
    loop = make_loop(tmp_path, refit_every_labels=10**6)
    trainer = loop.trainer
    real_sample, checks = labkit.sampling.sample, []

    def fingerprint():
        return [p.detach().double().sum().item() for p in trainer.params]

    def checked_sample(model, *args, **kwargs):
        before = fingerprint()
        roll = real_sample(model, *args, **kwargs)
        if model is trainer.policy:  # weights must not change while pi is being sampled
            checks.append(before == fingerprint())
        return roll

    monkeypatch.setattr(labkit.rl.trainer, "sample", checked_sample)
    monkeypatch.setattr(labkit.labeling.online, "sample", checked_sample)
    thread = loop.start(200, labeler="nobody")
    n_main = 0
    while trainer.step_count < 3 and thread.is_alive():
        roll = trainer.sample_policy(PROMPTS, n=2)
        assert torch.isfinite(roll.logprobs).all() and len(roll) == 4
        loop.new_comparisons(n=1)
        n_main += 1
    loop.stop()
    thread.join(30)
    assert not thread.is_alive() and loop.error is None
    assert n_main >= 2 and len(checks) >= 2 * n_main  # sample_policy and new_comparisons, per iteration
    assert all(checks), checks
    assert len(trainer.history) == trainer.step_count


def test_policy_win_rate_on_labeled_validation_comparisons(tmp_path):
    loop = make_loop(tmp_path, validation_per_round=5)
    with pytest.raises(ValueError, match="validation"):
        loop.policy_win_rate()  # nothing labeled yet
    loop.new_comparisons(n=0)
    label_pending(loop.store, DotLabeler(), TASK.name, kind="validation", limit=4)
    result = loop.policy_win_rate()
    labels = loop.store.training_set(task=TASK.name, kind="validation")
    assert result["n"] == 4 and 0 <= result["low"] <= result["rate"] <= result["high"] <= 1
    assert result["rate"] == sum(lab.best >= 2 for _, lab in labels) / 4  # y2, y3 are pi's
    assert result["chance"] == 0.5 and result["policies"] == 1 and result["updates"] == (0, 0)
    assert loop.policy_win_rate("mock:dots")["n"] == 4
    with pytest.raises(ValueError, match="'nobody'"):
        loop.policy_win_rate("nobody")


def test_validation_win_rate_per_policy(tmp_path):
    """The validation stream judges a different pi after every update: a rate per policy, and pooled ones that say
    which updates they cover. Labels are set by hand (pi's response wins or loses) so every count is known."""
    loop = make_loop(tmp_path, validation_per_round=3)
    store = loop.store
    first = loop.new_comparisons(n=0)                  # pi at update 0 (= rho): 3 comparisons
    names = [policy_source(loop.trainer)]
    loop.trainer.step()
    second = loop.new_comparisons(n=0)                 # pi at update 1: 3 more
    names.append(policy_source(loop.trainer))
    # update 0: pi loses twice, wins once; update 1: pi wins 3 of 3 (one labeler), and a second labeler once
    picks = [(first[0], 0), (first[1], 1), (first[2], 2), (second[0], 3), (second[1], 2), (second[2], 3)]
    store.record_labels([dict(comparison_id=i, best=best, labeler="alice") for i, best in picks])
    store.record_labels([dict(comparison_id=second[0], best=0, labeler="bob")])

    rows = loop.policy_win_rates()
    assert [(r["policy"], r["update"], r["n"], r["rate"]) for r in rows] == [(names[0], 0, 3, 1 / 3),
                                                                            (names[1], 1, 4, 3 / 4)]
    assert all(r["low"] <= r["rate"] <= r["high"] and r["chance"] == 0.5 for r in rows)
    assert [r["rate"] for r in loop.policy_win_rates("alice")] == [1 / 3, 1.0]
    assert [r["n"] for r in loop.policy_win_rates("bob")] == [1] and loop.policy_win_rates("bob")[0]["rate"] == 0

    pooled = loop.policy_win_rate()                    # every policy: 1 + 3 wins of 7
    assert (pooled["n"], pooled["rate"], pooled["policies"], pooled["updates"]) == (7, 4 / 7, 2, (0, 1))
    assert pooled == {**win_rate(4, 7), "chance": 0.5, "policies": 2, "updates": (0, 1)}
    later = loop.policy_win_rate(since_update=1)       # only pi after its update
    assert (later["n"], later["rate"], later["policies"], later["updates"]) == (4, 3 / 4, 1, (1, 1))
    with pytest.raises(ValueError, match=r"since_update.*\[0, 1\]"):
        loop.policy_win_rate(since_update=2)
    # a validation comparison made elsewhere, its policy named some other way: said, not misread
    (odd,) = store.add_comparisons([dict(task=TASK.name, query="q", responses=["a", "b"], kind="validation",
                                         sources=["rho", "policy@step12"])])
    store.record_labels([dict(comparison_id=odd, best=1, labeler="alice")])
    with pytest.raises(ValueError, match="'policy@step12'.*policy@<update>:<weights>"):
        loop.policy_win_rates()


def test_rounds_and_background_runs_past_total_updates_are_refused_before_they_start(tmp_path):
    loop = make_loop(tmp_path, total_updates=3, ppo_updates_per_round=2)
    loop.round()
    labeled = len(loop.store.comparisons())
    with pytest.raises(ValueError, match="1 left"):
        loop.round()          # two more updates, one left: no refit, no update, no comparisons
    with pytest.raises(ValueError, match="1 left"):
        loop.start(5, labeler="nobody")
    assert loop.trainer.step_count == 2 and loop.thread is None and len(loop.store.comparisons()) == labeled


def test_stop_button_stops_the_loop(tmp_path):
    loop = make_loop(tmp_path)
    button = stop_button(loop)
    assert button.description == "Stop training" and "labkit-stop" in button._dom_classes
    thread = loop.start(200, labeler="nobody")
    button.click()
    thread.join(30)
    assert not thread.is_alive() and button.disabled and loop.error is None
    assert loop.trainer.step_count < 200


def test_rho_must_not_share_weights_with_the_policy(tmp_path):
    loop = make_loop(tmp_path)
    with pytest.raises(ValueError, match="shares weights"):
        OnlineLoop(loop.trainer, loop.store, loop.trainer.policy, loop.tokenizer, PROMPTS)
