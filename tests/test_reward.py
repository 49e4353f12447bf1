import math

import pytest
import torch

from labkit.reward import KWayExample, RewardConfig, RewardModel, RewardTrainer, kway_loss, reward_model_from_lm
from labkit.sampling import pad_left
from labkit.tasks import SENTIMENT


def happy_examples(n: int) -> list[KWayExample]:
    """n 4-way comparisons whose best response (index i % 4) always says ' happy'; the others are two plain words."""
    words = ["table", "window", "river", "stone", "paper", "green", "seven"]
    examples = []
    for i in range(n):
        resp = [f" the {words[(i + j) % 7]} {words[(i * 3 + j) % 7]}" for j in range(4)]
        resp[i % 4] = " happy happy happy"
        examples.append(KWayExample(f"Query {i}.", resp, i % 4))
    return examples


def test_head_init_and_gain_bias(tiny):
    model, tok = tiny
    rm = reward_model_from_lm(model, tok)
    d = model.config.hidden_size
    std = rm.head.weight.std().item()
    assert abs(std - 1 / math.sqrt(d + 1)) < 0.05 and rm.head.bias.item() == 0
    assert rm.gain.item() == 1 and rm.bias.item() == 0
    assert not any(n in ("gain", "bias") for n, _ in rm.named_parameters())  # set by normalisation only


def test_a_seeded_head_is_reproducible_and_leaves_the_global_rng_alone(tiny):
    model, tok = tiny
    state = torch.random.get_rng_state()
    a, b, c = (reward_model_from_lm(model, tok, seed=s) for s in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)
    # unseeded calls (the notebooks') draw seed 0 whatever the global RNG's state: a rerun from scratch is the same run
    torch.manual_seed(123)
    first = reward_model_from_lm(model, tok)
    torch.manual_seed(456)
    assert torch.equal(first.head.weight, reward_model_from_lm(model, tok).head.weight)
    assert not torch.equal(first.head.weight, reward_model_from_lm(model, tok, seed=None).head.weight)
    d = model.config.hidden_size
    assert abs(a.head.weight.std().item() - 1 / math.sqrt(d + 1)) < 0.5 / math.sqrt(d + 1)


def test_score_is_read_at_the_last_real_token(tiny):
    """Trailing pads after the response must not change the reward; the last real token must."""
    model, tok = tiny
    rm = reward_model_from_lm(model, tok)
    q_ids, q_len = pad_left([[5, 6, 7]], tok.pad_token_id)
    resp = torch.tensor([[8, 9, tok.pad_token_id, tok.pad_token_id]])
    short = rm(q_ids, q_len, resp[:, :2], torch.tensor([2]))
    padded = rm(q_ids, q_len, resp, torch.tensor([2]))
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=0)
    other = rm(q_ids, q_len, torch.tensor([[8, 10]]), torch.tensor([2]))
    assert not torch.allclose(short, other)


def test_kway_loss_matches_naive_reference():
    r = torch.tensor([[0.1, 2.0, -1.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    best = torch.tensor([1, 3])
    loss, correct = kway_loss(r, best)
    naive = sum(-math.log(math.exp(r[i, b]) / sum(math.exp(x) for x in r[i])) for i, b in enumerate(best.tolist())) / 2
    assert abs(loss.item() - naive) < 1e-6
    assert correct.tolist() == [1.0, 0.0]
    assert abs(kway_loss(torch.zeros(1, 4), torch.tensor([0]))[0].item() - math.log(4)) < 1e-6  # chance


def test_normalize_gives_mean_0_std_1_on_rho_samples(tiny):
    model, tok = tiny
    rm = reward_model_from_lm(model, tok)
    task = SENTIMENT.with_(response_length=6)
    prompts = ["It was late. The rain stopped. She waited.", "One. Two words here. And more."]
    rm.normalize(model, task, prompts, n_samples=16, seed=0)
    from labkit.sampling import sample
    from labkit.tasks import format_query

    gen = torch.Generator().manual_seed(0)
    import random

    rng = random.Random(0)
    texts = [prompts[rng.randrange(2)] for _ in range(16)]
    roll = sample(model, tok, [format_query(task, t, tok) for t in texts], task, generator=gen)
    r = rm.score_rollout(roll)
    assert abs(r.mean().item()) < 1e-4 and abs(r.std(unbiased=False).item() - 1) < 1e-3


def test_training_learns_a_preference_and_reports_metrics(tiny):
    """The best response always contains ' happy': a few epochs must beat chance clearly."""
    model, tok = tiny
    rm = reward_model_from_lm(model, tok)
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    examples = happy_examples(40)
    trainer = RewardTrainer(rm, RewardConfig(lr=1e-3, batch_size=8, epochs=4, heldout_fraction=0.2, eval_every=5))
    hist = trainer.fit(examples, progress=False)
    assert all(math.isfinite(m["rm/loss"]) for m in hist)
    assert hist[-1]["rm/heldout_accuracy"] >= 0.75 and hist[-1]["rm/lr"] < hist[0]["rm/lr"]
    assert any(not torch.equal(p, before[n]) for n, p in rm.named_parameters())


def test_save_and_load_round_trip(tiny, tmp_path):
    model, tok = tiny
    rm = reward_model_from_lm(model, tok)
    rm.gain.fill_(2.5)
    rm.bias.fill_(-0.5)
    rm.save(tmp_path / "rm")
    assert not list((tmp_path / "rm").glob("*.pt")) and not list((tmp_path / "rm").glob("*.bin"))
    loaded = RewardModel.load(tmp_path / "rm", device="cpu")
    q = ["A query."]
    r = [" a response"]
    torch.testing.assert_close(rm.score_texts(q, r), loaded.score_texts(q, r))
    with pytest.raises(FileNotFoundError, match="not a saved labkit reward model"):
        RewardModel.load(tmp_path)


def test_kway_shares_each_query_and_equals_scoring_each_pair_alone(tiny):
    """The shared-query pass gives the rewards and the gradients of scoring query + response one by one."""
    model, tok = tiny
    rm = reward_model_from_lm(model, tok, seed=0)
    rm.gain.fill_(1.7)
    rm.bias.fill_(-0.3)
    g = torch.Generator().manual_seed(0)
    queries = [torch.randint(3, 900, (n,), generator=g).tolist() for n in (5, 9, 1)]  # left padding of 4, 0, 8
    lengths = [3, 6, 1, 6, 2, 4, 5, 6, 1, 2, 3, 6]  # k = 4 responses per query, right-padded to 6
    q_ids, q_len = pad_left(queries, tok.pad_token_id)
    r_len = torch.tensor(lengths)
    r_ids = torch.randint(3, 900, (12, 6), generator=g).masked_fill(torch.arange(6)[None] >= r_len[:, None], tok.pad_token_id)

    shared = rm.kway(q_ids, q_len, r_ids, r_len)  # (3, 4)
    shared.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in rm.named_parameters()}
    rm.zero_grad(set_to_none=True)
    alone = torch.stack([rm(q_ids[b : b + 1], q_len[b : b + 1], r_ids[b * 4 + j : b * 4 + j + 1], r_len[b * 4 + j : b * 4 + j + 1])[0]
                         for b in range(3) for j in range(4)]).view(3, 4)
    alone.pow(2).sum().backward()
    assert shared.shape == (3, 4)
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-5)
    for n, p in rm.named_parameters():  # equal only if the gradient flows back through the shared keys/values
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(), msg=n)
    rm.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="expected k per query"):
        rm.kway(q_ids, q_len, r_ids[:11], r_len[:11])


def test_scores_and_gradients_equal_a_model_whose_last_mlp_runs_everywhere(tiny):
    """The reward model reads one position per row: its last block's MLP runs at those positions only
    (`labkit/speed/last_mlp.py`), which changes neither the scores nor the gradients."""
    import copy

    from labkit.speed.blocks import transformer_blocks

    model, tok = tiny
    rm = reward_model_from_lm(model, tok, seed=0).double()
    plain = copy.deepcopy(rm)
    mlp = transformer_blocks(plain.lm)[-1].mlp
    mlp._forward_pre_hooks.clear()
    mlp._forward_hooks.clear()
    seen = []
    transformer_blocks(rm.lm)[-1].mlp.register_forward_hook(lambda mod, a, o: seen.append(a[0].shape[1]))
    g = torch.Generator().manual_seed(0)
    q_ids, q_len = pad_left([torch.randint(3, 900, (n,), generator=g).tolist() for n in (5, 9)], tok.pad_token_id)
    r_len = torch.tensor([3, 6, 6, 1, 2, 6, 4, 3])  # k = 4 responses per query, right-padded to 6
    r_ids = torch.randint(3, 900, (8, 6), generator=g).masked_fill(torch.arange(6)[None] >= r_len[:, None], tok.pad_token_id)
    q_rep, ql_rep = q_ids.repeat_interleave(4, 0), q_len.repeat_interleave(4)
    results = []
    for m in (rm, plain):
        m.requires_grad_(True)
        out = [m(q_rep, ql_rep, r_ids, r_len), m.kway(q_ids, q_len, r_ids, r_len)]
        (out[0].pow(2).sum() + out[1].sum()).backward()
        results.append((out, {n: p.grad for n, p in m.named_parameters()}))
    assert seen == [5, 0, 5]  # (positions 9+2, 9+5, 9+0, 9+1, 9+3 of 15), none in the query pass, 5 distinct lengths
    (out, grads), (out_ref, grads_ref) = results
    for a, b in zip(out, out_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for n, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[n], rtol=1e-10, atol=1e-12, msg=n)


def test_a_non_finite_gradient_stops_training_before_the_step_is_applied(tiny):
    model, tok = tiny
    rm = reward_model_from_lm(model, tok)
    rm.lm.requires_grad_(True)
    with torch.no_grad():
        next(p for n, p in rm.lm.named_parameters() if "layers.1.mlp" in n).view(-1)[0] = float("nan")
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    examples = [KWayExample(f"Query {i}.", [" a b", " c d", " e f", " g h"], i % 4) for i in range(8)]
    trainer = RewardTrainer(rm, RewardConfig(lr=1e-3, batch_size=4, epochs=1, heldout_fraction=0.0))
    with pytest.raises(FloatingPointError, match="not applied"):
        trainer.fit(examples, progress=False)
    assert trainer.step == 0 and trainer.history == []
    assert all(torch.equal(p, before[n]) or torch.isnan(before[n]).any() for n, p in rm.named_parameters())


def test_save_keeps_the_training_metrics_and_load_shows_them(tiny, tmp_path):
    """A notebook that loads the reward model instead of training it can still show its curves and results."""
    from labkit.widgets import Dashboard

    model, tok = tiny
    rm = reward_model_from_lm(model, tok)
    trainer = RewardTrainer(rm, RewardConfig(lr=1e-3, batch_size=4, heldout_fraction=0.25, eval_every=2))
    run = trainer.fit(happy_examples(12), progress=False)
    assert rm.history == run and rm.trained_on == {"comparisons": 9, "heldout": 3}
    rm.save(tmp_path / "rm")

    loaded = RewardModel.load(tmp_path / "rm", device="cpu")
    assert loaded.history == run and loaded.trained_on == rm.trained_on
    summary = loaded.training_summary()
    accuracy = run[-1]["rm/heldout_accuracy"]
    assert summary.startswith("trained on 9 comparisons (3 held out) in 3 steps")
    assert f"held-out accuracy {accuracy:.2f} (chance 0.25)" in summary
    dash = Dashboard("reward model", max_fps=1e9)
    dash.load_history(loaded.history)
    assert "waiting" not in dash._status.value and f"held-out acc {accuracy:.3g}" in dash._status.value
    assert Dashboard.from_jsonl(tmp_path / "rm" / "metrics.jsonl").history == run  # the CLI's way to watch it

    # a model saved untrained over it leaves no stale curves; a folder without metrics loads with none
    reward_model_from_lm(model, tok).save(tmp_path / "rm")
    assert not (tmp_path / "rm" / "metrics.jsonl").exists()
    bare = RewardModel.load(tmp_path / "rm", device="cpu")
    assert bare.history == [] and bare.trained_on is None and "no training metrics" in bare.training_summary()


def test_damaged_metrics_cost_only_the_curves(tiny, tmp_path):
    model, tok = tiny
    rm = reward_model_from_lm(model, tok)
    rm.save(tmp_path / "rm")
    (tmp_path / "rm" / "metrics.jsonl").write_text('{"step": 1, "rm/lo')
    with pytest.warns(UserWarning, match="without its training metrics"):
        loaded = RewardModel.load(tmp_path / "rm", device="cpu")
    assert loaded.history == []


def test_normalize_and_fit_show_progress_with_the_time_left(tiny, capsys):
    model, tok = tiny
    rm = reward_model_from_lm(model, tok)
    task = SENTIMENT.with_(response_length=4)
    rm.normalize(model, task, ["A prompt."], n_samples=8, batch_size=4)
    err = capsys.readouterr().err
    assert "normalizing r on rho's samples" in err and "8/8" in err and "<" in err  # "elapsed<remaining"
    rm.normalize(model, task, ["A prompt."], n_samples=8, batch_size=4, progress=False)
    RewardTrainer(rm, RewardConfig(batch_size=4, heldout_fraction=0.0)).fit(happy_examples(4), progress=False)
    assert capsys.readouterr().err == ""


def _tiny_gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    from labkit.models import prepare_lm

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=2, n_positions=128,
                        pad_token_id=tok.pad_token_id)
    return prepare_lm(GPT2LMHeadModel(config), tok)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_train_layers_trains_only_the_top_blocks_the_final_norm_and_the_head(tiny, family):
    model, tok = tiny
    lm = model if family == "llama" else _tiny_gpt2(tok)
    blocks, norm = ("model.layers", "model.norm") if family == "llama" else ("transformer.h", "transformer.ln_f")
    n_blocks = lm.config.num_hidden_layers if family == "llama" else lm.config.n_layer
    top = f"{blocks}.{n_blocks - 1}."
    rm = reward_model_from_lm(lm, tok)
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    RewardTrainer(rm, RewardConfig(lr=1e-2, batch_size=4, heldout_fraction=0.0, train_layers=1)).fit(
        happy_examples(8), progress=False)
    changed = {n for n, p in rm.named_parameters() if not torch.equal(p, before[n])}
    assert "head.weight" in changed
    assert any(n.startswith(f"lm.{top}") for n in changed) and any(n.startswith(f"lm.{norm}.") for n in changed)
    # lower blocks and embeddings kept rho's weights, and had no gradient computed at all
    assert all(n.startswith((f"lm.{top}", f"lm.{norm}.", "head.")) for n in changed), sorted(changed)
    assert all(p.grad is None for n, p in rm.named_parameters() if n.startswith(f"lm.{blocks}.0."))

    # None (the default, as released) trains every block again, also after a partial fit
    RewardTrainer(rm, RewardConfig(lr=1e-2, batch_size=4, heldout_fraction=0.0)).fit(happy_examples(8), progress=False)
    assert all(not torch.equal(p, before[n]) for n, p in rm.named_parameters() if n.startswith(f"lm.{blocks}.0."))


def test_train_layers_is_refused_when_out_of_range(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="train_layers"):
        RewardConfig(train_layers=-1)
    rm = reward_model_from_lm(model, tok)
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    with pytest.raises(ValueError, match="transformer blocks"):
        RewardTrainer(rm, RewardConfig(batch_size=4, train_layers=99)).fit(happy_examples(8), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in rm.named_parameters())


def test_fit_linear_head_reaches_the_penalised_optimum_of_a_naive_reference():
    """L-BFGS on standardised features equals plain gradient descent on the same convex objective, written out
    longhand; mixed k is one objective over all comparisons."""
    from labkit.reward.train import fit_linear_head

    g = torch.Generator().manual_seed(0)
    H = 6
    true_w = torch.randn(H, generator=g)
    feats = {4: torch.randn(40, 4, H, generator=g) * 3 + 1, 2: torch.randn(20, 2, H, generator=g)}
    best = {k: (f @ true_w).argmax(-1) for k, f in feats.items()}
    l2 = 0.05
    w_raw, b_raw = fit_linear_head(feats, best, l2)

    flat = torch.cat([f.reshape(-1, H) for f in feats.values()])
    mean, std = flat.mean(0), flat.std(0)
    w = torch.zeros(H, dtype=torch.float64, requires_grad=True)
    for _ in range(3000):  # gradient descent to convergence, in float64
        total = 0
        for k, f in feats.items():
            z = ((f - mean) / std).double()
            for i in range(len(f)):
                s = z[i] @ w
                total = total - (s[best[k][i]] - torch.logsumexp(s, 0))
        loss = total / 60 + l2 * (w * w).sum()
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= 0.5 * grad
        if grad.abs().max() < 1e-7:
            break
    expected = (w.detach() / std.double()).float()
    torch.testing.assert_close(w_raw, expected, atol=1e-4, rtol=1e-3)
    # the offset makes s = z @ w exactly: the mean response scores 0
    torch.testing.assert_close(mean @ w_raw + b_raw, torch.tensor(0.0), atol=1e-5, rtol=0)
    # and the fit picks the preferred responses it was given
    assert ((feats[4] @ w_raw).argmax(-1) == best[4]).float().mean() > 0.8


def test_head_fit_learns_a_preference_and_leaves_the_trunk_alone(tiny):
    """head_l2: only the head changes, r equals the fitted scores at the current gain and bias, and the held-out
    comparisons are judged well above chance (the best response always says ' happy')."""
    model, tok = tiny
    rm = reward_model_from_lm(model, tok, seed=0)
    rm.gain.fill_(0.5)  # as after a normalisation: the fit must account for it
    rm.bias.fill_(0.3)
    trunk = {n: p.detach().clone() for n, p in rm.lm.named_parameters()}
    head = rm.head.weight.detach().clone()
    examples = happy_examples(60)
    trainer = RewardTrainer(rm, RewardConfig(head_l2=0.01, batch_size=16, heldout_fraction=0.2))
    hist = trainer.fit(examples, progress=False)
    assert hist and all(math.isfinite(m["rm/loss"]) and "rm/heldout_accuracy" in m for m in hist)
    assert hist[-1]["rm/loss"] < hist[0]["rm/chance_loss"] and hist[-1]["rm/heldout_accuracy"] >= 0.75
    assert rm.trained_on == {"comparisons": 48, "heldout": 12} and rm.history[-1] == hist[-1]
    assert rm.training_summary().startswith(f"head fitted on the frozen trunk (L2 0.01) on 48 comparisons (12 held out) "
                                            f"in {len(hist)} L-BFGS round")
    assert all(torch.equal(p, trunk[n]) for n, p in rm.lm.named_parameters())
    assert not torch.equal(rm.head.weight, head)
    # the logged held-out numbers are those of r itself, as `evaluate` measures them
    _, held = trainer.split(examples)
    ev = trainer.evaluate(held)
    assert abs(ev["rm/heldout_loss"] - hist[-1]["rm/heldout_loss"]) < 1e-4
    assert abs(ev["rm/heldout_accuracy"] - hist[-1]["rm/heldout_accuracy"]) < 1e-9


def test_head_l2_is_refused_with_train_layers_or_when_not_positive():
    with pytest.raises(ValueError, match="train_layers=4 would be ignored"):
        RewardConfig(head_l2=1.0, train_layers=4)
    with pytest.raises(ValueError, match="head_l2"):
        RewardConfig(head_l2=0.0)
    assert RewardConfig(head_l2=1.0, train_layers=0).head_l2 == 1.0
