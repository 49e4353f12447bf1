"""What the reward model's head reads (RewardModel's `pool` and `layer`): the last token's final hidden state as
released, or the mean of a layer's hidden states over the response, on every scoring path."""

import json
import math

import pytest
import torch

from labkit.reward import RewardConfig, RewardModel, RewardTrainer, reward_model_from_lm
from labkit.sampling import pad_left, unwrap
from test_reward import happy_examples  # noqa: I001 (a sibling test module)


def _batch(tok, g):
    """Two left-padded queries and k = 4 right-padded responses each: (q_ids, q_len, r_ids, r_len)."""
    q_ids, q_len = pad_left([torch.randint(3, 900, (n,), generator=g).tolist() for n in (5, 9)], tok.pad_token_id)
    r_len = torch.tensor([3, 6, 6, 1, 2, 6, 4, 3])
    r_ids = torch.randint(3, 900, (8, 6), generator=g).masked_fill(torch.arange(6)[None] >= r_len[:, None], tok.pad_token_id)
    return q_ids, q_len, r_ids, r_len


def test_mean_pool_is_the_response_mean_of_the_layer_and_ignores_pads(tiny):
    """Against a naive reference: each query + response alone, unpadded, through the LM with every hidden state
    kept, and the mean taken over the response's positions by hand."""
    model, tok = tiny
    n = model.config.num_hidden_layers
    q_ids, q_len, r_ids, r_len = _batch(tok, torch.Generator().manual_seed(0))
    q_rep, ql_rep = q_ids.repeat_interleave(4, 0), q_len.repeat_interleave(4)
    for layer in (0, 1, n):
        rm = reward_model_from_lm(model, tok, seed=0, pool="mean", layer=layer)
        with torch.no_grad():
            got = rm.hidden_features(q_rep, ql_rep, r_ids, r_len)  # (8, H)
            for i in range(8):
                query = q_rep[i, q_rep.shape[1] - int(ql_rep[i]):].tolist()
                response = r_ids[i, : int(r_len[i])].tolist()
                hidden = unwrap(model)(input_ids=torch.tensor([query + response]), output_hidden_states=True).hidden_states
                want = hidden[layer][0, len(query):].mean(0)
                torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5, msg=f"layer {layer}, row {i}")


def test_the_final_layer_is_the_released_reading(tiny):
    model, tok = tiny
    n = model.config.num_hidden_layers
    batch = _batch(tok, torch.Generator().manual_seed(1))
    q_rep, ql_rep = batch[0].repeat_interleave(4, 0), batch[1].repeat_interleave(4)
    released, final = (reward_model_from_lm(model, tok, seed=0, layer=layer) for layer in (None, n))
    with torch.no_grad():
        torch.testing.assert_close(released(q_rep, ql_rep, *batch[2:]), final(q_rep, ql_rep, *batch[2:]))
        middle = reward_model_from_lm(model, tok, seed=0, layer=1)
        assert not torch.allclose(released(q_rep, ql_rep, *batch[2:]), middle(q_rep, ql_rep, *batch[2:]))


@pytest.mark.parametrize("pool,layer", [("mean", 1), ("last", 1), ("mean", None)])
def test_kway_equals_scoring_each_pair_alone(tiny, pool, layer):
    """The shared-query pass (`kway`, what training uses) and the one-pass scoring (what PPO uses) read the same
    features: equal rewards and gradients."""
    model, tok = tiny
    rm = reward_model_from_lm(model, tok, seed=0, pool=pool, layer=layer).double()
    rm.requires_grad_(True)
    q_ids, q_len, r_ids, r_len = _batch(tok, torch.Generator().manual_seed(2))
    shared = rm.kway(q_ids, q_len, r_ids, r_len)  # (2, 4)
    shared.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}
    rm.zero_grad(set_to_none=True)
    alone = rm(q_ids.repeat_interleave(4, 0), q_len.repeat_interleave(4), r_ids, r_len).view(2, 4)
    alone.pow(2).sum().backward()
    torch.testing.assert_close(shared, alone, rtol=1e-6, atol=1e-6)  # the fused kernels round in float32
    assert grads.keys() == {n for n, p in rm.named_parameters() if p.grad is not None}
    for n, p in rm.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(), msg=n)


def test_save_and_load_keep_what_the_head_reads(tiny, tmp_path):
    model, tok = tiny
    rm = reward_model_from_lm(model, tok, seed=0, pool="mean", layer=1)
    rm.gain.fill_(1.5)
    rm.save(tmp_path / "rm")
    saved = json.loads((tmp_path / "rm" / "reward_config.json").read_text())
    assert saved["pool"] == "mean" and saved["layer"] == 1 and saved["version"] == 4
    loaded = RewardModel.load(tmp_path / "rm", device="cpu")
    assert (loaded.pool, loaded.layer) == ("mean", 1)
    q, r = ["A query."], [" a response of some words"]
    torch.testing.assert_close(rm.score_texts(q, r), loaded.score_texts(q, r))
    # a file from before version 4 read the last token's final state, as released
    del saved["pool"], saved["layer"]
    saved["version"] = 3
    (tmp_path / "rm" / "reward_config.json").write_text(json.dumps(saved))
    old = RewardModel.load(tmp_path / "rm", device="cpu")
    assert (old.pool, old.layer) == ("last", None)
    # a damaged file is refused with what to do, not loaded with another reading
    (tmp_path / "rm" / "reward_config.json").write_text(json.dumps({**saved, "version": 4, "pool": "mean", "layer": 7}))
    with pytest.raises(ValueError, match="reward_config.json is damaged: layer=7.*train and save the reward model again"):
        RewardModel.load(tmp_path / "rm", device="cpu")


@pytest.mark.parametrize("kwargs,match", [
    ({"pool": "max"}, "pool='max'"),
    ({"layer": 3}, "layer=3: .* hidden states 0 .* to 2"),
    ({"layer": -1}, "layer=-1"),
    ({"layer": 1.0}, "layer=1.0"),
])
def test_a_bad_pool_or_layer_is_refused(tiny, kwargs, match):
    model, tok = tiny
    with pytest.raises(ValueError, match=match):
        reward_model_from_lm(model, tok, **kwargs)


def test_a_head_fitted_on_mean_features_learns_and_says_what_it_reads(tiny):
    model, tok = tiny
    rm = reward_model_from_lm(model, tok, seed=0, pool="mean", layer=1)
    trunk = {n: p.detach().clone() for n, p in rm.lm.named_parameters()}
    examples = happy_examples(60)
    hist = RewardTrainer(rm, RewardConfig(head_l2=0.01, batch_size=16, heldout_fraction=0.2)).fit(examples, progress=False)
    assert all(math.isfinite(m["rm/loss"]) for m in hist) and hist[-1]["rm/heldout_accuracy"] >= 0.75
    assert all(torch.equal(p, trunk[n]) for n, p in rm.lm.named_parameters())
    assert rm.training_summary().startswith("head fitted on the frozen trunk (L2 0.01; reads the response mean of "
                                            "hidden state 1) on 48 comparisons (12 held out)")
    # the scores PPO reads are the fitted ones
    with torch.no_grad():
        r = rm.score_texts(["Query 0."] * 2, [" happy happy happy", " the table window"])
    assert r[0] > r[1]


def test_a_separate_value_model_does_not_start_from_a_head_that_reads_other_features(tiny):
    """The released reading gives a value head that is the reward model's on every position; a head fitted on a
    layer's response mean means nothing per position, so the value model starts from a zero head instead."""
    from labkit.rl import PPOConfig, PPOTrainer
    from labkit.tasks import SENTIMENT

    model, tok = tiny
    rm = reward_model_from_lm(model, tok, seed=0, pool="mean", layer=1)
    task = SENTIMENT.with_(response_length=4, query_length=8)
    cfg = PPOConfig(batch_size=2, minibatch_size=2, value_model="separate")
    trainer = PPOTrainer(model, tok, task, rm, ["One two three.", "Four five six."], cfg)
    assert torch.equal(trainer.value_model.head.weight, torch.zeros_like(trainer.value_model.head.weight))
    assert not any(p is q for p in trainer.value_model.parameters() for q in rm.parameters())
