"""The reward model reads what the released code's reads: stored token ids, bare queries, untruncated normalisation.

Released code (openai/lm-human-preferences): train_policy.py PPOTrainer.step scores `score_fn(queries, responses)`
on the unformatted queries (only the policy formats them: lm_tasks.query_formatter); train_reward.py
RewardModelTrainer.normalize samples ceil(normalize_samples / rollout_batch_size) whole batches with
`policy.respond_op`, which does not truncate.
"""

import json

import pytest
import torch

from labkit.labeling.comparisons import comparison_item, rollout_rows
from labkit.labeling.store import LabelStore
from labkit.reward import KWayExample, RewardConfig, RewardModel, RewardTrainer, examples_from_store, reward_model_from_lm
from labkit.reward.model import query_format_ids, reward_query, strip_query_format
from labkit.sampling import decode_responses, pad_left, sample
from labkit.tasks import SENTIMENT, TLDR, TruncationRule, format_query

POSTS = ["My landlord kept the deposit. I asked twice and he ignored me. What can I do?",
         "I started running last month. My knees hurt after five miles. Should I stop?"]


def _store_rollout(store, task, roll, tok, k):
    """Store a rollout whose rows i*k .. i*k+k-1 answer query i, as make_comparisons does; label each best = 0."""
    rows = rollout_rows(roll, tok)
    n = len(roll) // k
    ids = store.add_comparisons([comparison_item(task.name, "src", rows[i * k:(i + 1) * k], ["rho"] * k, "train")
                                 for i in range(n)])
    store.record_labels([{"comparison_id": c, "best": 0, "labeler": "t"} for c in ids])
    return ids


def test_strip_query_format_removes_only_what_is_there():
    fmt = {"prefix": [1, 2], "suffix": [8, 9]}
    assert strip_query_format([1, 2, 5, 6, 8, 9], fmt) == [5, 6]
    assert strip_query_format([5, 6], fmt) == [5, 6]  # a bare query (the released label files) stays as it is
    assert strip_query_format([1, 2, 5], fmt) == [5]
    assert strip_query_format([5, 8, 9], fmt) == [5]
    assert strip_query_format([5, 6], None) == [5, 6]


def test_the_reward_model_reads_summary_queries_without_prefix_and_suffix(tiny):
    model, tok = tiny
    task = TLDR.with_(query_length=24, response_length=6)
    formatted = [format_query(task, p, tok) for p in POSTS]
    suffix = tok.encode(task.query_suffix, add_special_tokens=False)
    assert all(q[-len(suffix):] == suffix for q in formatted)
    bare = [reward_query(task, tok, q) for q in formatted]
    assert all(b == q[: -len(suffix)] for b, q in zip(bare, formatted))

    rm = reward_model_from_lm(model, tok, seed=0)
    rm.normalize(model, task, POSTS, n_samples=4, batch_size=4)
    assert rm.query_format == query_format_ids(task, tok)
    roll = sample(model, tok, formatted, task, generator=torch.Generator().manual_seed(1))
    scored = rm.score_rollout(roll)
    q_ids, q_len = pad_left(bare, tok.pad_token_id)
    by_hand = rm(q_ids, q_len, roll.truncated_ids, roll.truncated_lengths.clamp(min=1))
    torch.testing.assert_close(scored, by_hand, atol=1e-5, rtol=0)
    q_full, ql_full = pad_left(formatted, tok.pad_token_id)
    with_suffix = rm(q_full, ql_full, roll.truncated_ids, roll.truncated_lengths.clamp(min=1))
    assert not torch.allclose(scored, with_suffix, atol=1e-4)  # the suffix would change what r reads


def test_training_reads_the_stored_ids_that_ppo_scores(tiny, tmp_path):
    """Each example's rewards in training equal score_rollout's for the same sampled rows, even where the decoded
    text does not encode back to the sampled ids (a random model's samples often do not)."""
    model, tok = tiny
    task = TLDR.with_(query_length=24, response_length=8, truncation=None)
    k = 4
    queries = [format_query(task, p, tok) for p in POSTS for _ in range(k)]
    roll = sample(model, tok, queries, task, generator=torch.Generator().manual_seed(3))
    # a sample of the tiny model whose decoded text encodes to other ids (found by sampling it)
    odd = torch.tensor([1684, 19901, 5650, 21670, 211, 27189, 14649, 16824])
    roll.response_ids[1] = roll.truncated_ids[1] = odd
    roll.response_texts = decode_responses(tok, roll.truncated_ids, roll.truncated_lengths)
    rm = reward_model_from_lm(model, tok, seed=0)
    rm.normalize(model, task, POSTS, n_samples=4, batch_size=4)
    with LabelStore(tmp_path / "labels.db") as store:
        _store_rollout(store, task, roll, tok, k)
        examples = examples_from_store(store, task)
    texts_round_trip = [tok.encode(r, add_special_tokens=False) == list(t)
                        for ex in examples for r, t in zip(ex.responses, ex.response_tokens)]
    assert not texts_round_trip[1], "the test needs a sample whose text does not round-trip"
    trainer = RewardTrainer(rm, RewardConfig(batch_size=2))
    with torch.no_grad():
        trained_on = trainer._batch_rewards(examples).flatten()
        ppo_scores = rm.score_rollout(roll)
    torch.testing.assert_close(trained_on, ppo_scores, atol=1e-5, rtol=0)


def test_text_only_examples_are_encoded(tiny):
    model, tok = tiny
    rm = reward_model_from_lm(model, tok, seed=0)
    examples = [KWayExample("Query one.", [" a b", " c"], 0), KWayExample("Query two.", [" d", " e f"], 1)]
    with torch.no_grad():
        r = RewardTrainer(rm)._batch_rewards(examples)
        direct = rm.score_texts(["Query one.", "Query one.", "Query two.", "Query two."], [" a b", " c", " d", " e f"])
    torch.testing.assert_close(r.flatten(), direct, atol=1e-5, rtol=0)


def test_a_store_of_a_custom_task_needs_its_task(tiny, tmp_path):
    model, tok = tiny
    task = SENTIMENT.with_(name="my-task", response_length=4)
    roll = sample(model, tok, [format_query(task, "One. Two three.", tok)] * 2, task)
    with LabelStore(tmp_path / "labels.db") as store:
        _store_rollout(store, task, roll, tok, 2)
        with pytest.raises(ValueError, match="not one of the paper's: pass its Task"):
            examples_from_store(store)
        assert len(examples_from_store(store, task)) == 1


def test_normalisation_is_on_whole_batches_of_untruncated_responses(tiny, monkeypatch):
    model, tok = tiny
    task = SENTIMENT.with_(response_length=6, truncation=TruncationRule(text=".", after=0))
    rm = reward_model_from_lm(model, tok, seed=0)
    seen = []
    raw = rm.raw

    def spy(q_ids, q_len, r_ids, r_len):
        seen.append(r_len.clone())
        return raw(q_ids, q_len, r_ids, r_len)

    monkeypatch.setattr(rm, "raw", spy)
    out = rm.normalize(model, task, ["One. Two three. Four."], n_samples=10, batch_size=4)
    assert out["samples"] == 12 and sum(len(s) for s in seen) == 12  # 10 requested, 3 whole batches of 4
    assert all((s == 6).all() for s in seen)  # untruncated: every response whole
    seen.clear()
    rm.normalize(model, task, ["One. Two three. Four."], n_samples=4, batch_size=4, truncated=True)
    assert sum(len(s) for s in seen) == 4


def test_normalised_rewards_are_standard_on_the_untruncated_samples(tiny):
    model, tok = tiny
    task = SENTIMENT.with_(response_length=6)
    prompts = ["It was late. The rain stopped. She waited.", "One. Two words here. And more."]
    rm = reward_model_from_lm(model, tok, seed=0)
    rm.normalize(model, task, prompts, n_samples=16, seed=0, batch_size=8)
    import random

    rng = random.Random(0)
    texts = [prompts[rng.randrange(2)] for _ in range(16)]
    queries = [format_query(task, t, tok) for t in texts]
    r = []
    for c in range(2):  # chunk c is drawn with seed + c
        roll = sample(model, tok, queries[c * 8:(c + 1) * 8], task, generator=torch.Generator().manual_seed(c))
        r.append(rm(roll.query_ids, roll.query_lengths, roll.response_ids, torch.full((8,), 6)))
    r = torch.cat(r)
    assert abs(r.mean().item()) < 1e-4 and abs(r.std(unbiased=False).item() - 1) < 1e-3


def test_query_format_is_saved_and_checked(tiny, tmp_path):
    model, tok = tiny
    task = TLDR.with_(query_length=24, response_length=4)
    rm = reward_model_from_lm(model, tok, seed=0)
    rm.normalize(model, task, POSTS, n_samples=2, batch_size=2)
    rm.save(tmp_path / "rm")
    saved = json.loads((tmp_path / "rm" / "reward_config.json").read_text())
    assert saved["version"] == 4 and saved["query_format"] == query_format_ids(task, tok)
    loaded = RewardModel.load(tmp_path / "rm")
    assert loaded.query_format == rm.query_format
    loaded.check_fits(task, tok, model)
    with pytest.raises(ValueError, match="another prefix/suffix"):
        loaded.check_fits(task.with_(query_suffix="\n\nSummary:"), tok, model)


def test_labels_of_two_query_formats_are_refused_before_any_step(tiny):
    model, tok = tiny
    rm = reward_model_from_lm(model, tok, seed=0)
    before = [p.clone() for p in rm.parameters()]
    tldr = TLDR.with_(query_length=24, response_length=4)
    cnn = tldr.with_(name="cnndm-like", query_prefix="Article:\n\n")
    examples = [KWayExample(f"Post {i}.", [" a", " b"], 0, task=t) for i, t in enumerate([tldr] * 4 + [cnn])]
    with pytest.raises(ValueError, match="train one reward model per task"):
        RewardTrainer(rm, RewardConfig(batch_size=2, heldout_fraction=0)).fit(examples, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, rm.parameters()))
    assert rm.query_format is None  # refused whole: nothing recorded either


def test_a_text_only_example_drops_the_shown_suffix(tiny):
    model, tok = tiny
    rm = reward_model_from_lm(model, tok, seed=0)
    task = TLDR.with_(query_length=24, response_length=4)
    shown = KWayExample("My post." + task.query_suffix, [" a", " b"], 0, task=task)
    bare = KWayExample("My post.", [" a", " b"], 0)
    with torch.no_grad():
        torch.testing.assert_close(RewardTrainer(rm)._batch_rewards([shown]), RewardTrainer(rm)._batch_rewards([bare]))


def test_a_reward_model_from_a_newer_labkit_is_refused(tiny, tmp_path):
    model, tok = tiny
    rm = reward_model_from_lm(model, tok, seed=0)
    rm.save(tmp_path / "rm")
    meta = tmp_path / "rm" / "reward_config.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 99}))
    with pytest.raises(ValueError, match="saved by a newer labkit"):
        RewardModel.load(tmp_path / "rm")
