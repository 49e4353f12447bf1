"""Labels that mix comparison sizes (2-way and 4-way) train in batches of one k each, all in one run."""

import math
import random

import torch

from labkit.labeling.store import LabelStore
from labkit.reward import KWayExample, RewardConfig, RewardTrainer, examples_from_store, reward_model_from_lm
from labkit.reward.train import batches_by_k

WORDS = ["table", "window", "river", "stone", "paper", "green", "seven"]


def _examples(n: int, k: int, offset: int = 0) -> list[KWayExample]:
    """The best response always says ' happy'; the others are neutral word pairs."""
    out = []
    for i in range(offset, offset + n):
        resp = [f" the {WORDS[(i + j) % 7]} {WORDS[(i * 3 + j) % 7]}" for j in range(k)]
        best = i % k
        resp[best] = " happy happy happy"
        out.append(KWayExample(f"Query {i}.", resp, best))
    return out


def test_batches_hold_one_k_each_and_cover_every_example_once():
    examples = _examples(13, 2) + _examples(9, 4, offset=100) + _examples(3, 3, offset=200)
    batches = batches_by_k(examples, 4, random.Random(0))
    assert all(len({len(ex.responses) for ex in b}) == 1 for b in batches)
    assert all(1 <= len(b) <= 4 for b in batches)
    flat = [id(ex) for b in batches for ex in b]
    assert sorted(flat) == sorted(id(ex) for ex in examples)
    # ceil(13/4) + ceil(9/4) + ceil(3/4) batches, and the sizes are interleaved, not trained one k after the other
    assert len(batches) == 4 + 3 + 1
    ks = [len(b[0].responses) for b in batches]
    assert ks != sorted(ks)


def test_one_k_is_a_plain_shuffle_cut_into_consecutive_batches():
    """The naive reference: what RewardTrainer did before labels could mix sizes (so runs reproduce)."""
    examples = _examples(23, 4)
    order = list(range(23))
    random.Random(5).shuffle(order)
    naive = [[examples[i] for i in order[s : s + 8]] for s in range(0, 23, 8)]
    assert batches_by_k(examples, 8, random.Random(5)) == naive


def test_training_on_mixed_2_and_4_way_labels_learns_and_reports_each_batch_chance(tiny):
    model, tok = tiny
    rm = reward_model_from_lm(model, tok)
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    examples = _examples(24, 4) + _examples(24, 2, offset=50)
    trainer = RewardTrainer(rm, RewardConfig(lr=1e-3, batch_size=8, epochs=3, heldout_fraction=0.25, eval_every=4))
    hist = trainer.fit(examples, progress=False)
    assert all(math.isfinite(m["rm/loss"]) for m in hist)
    assert {m["rm/chance_accuracy"] for m in hist} == {0.5, 0.25}
    assert {round(m["rm/chance_loss"], 6) for m in hist} == {round(math.log(2), 6), round(math.log(4), 6)}
    # the held-out set mixes both sizes too; the preference is easy, so it must be clearly above 2-way chance
    assert hist[-1]["rm/heldout_accuracy"] >= 0.75
    assert any(not torch.equal(p, before[n]) for n, p in rm.named_parameters())


def test_a_store_with_2_and_4_way_comparisons_trains_from_examples_from_store(tiny, tmp_path):
    model, tok = tiny
    with LabelStore(tmp_path / "labels.db") as store:
        for ex in _examples(6, 4) + _examples(6, 2, offset=50):
            cid = store.add_comparison("sentiment", ex.query, ex.responses)
            store.record_label(cid, ex.best, "alice")
        examples = examples_from_store(store, "sentiment")
    assert sorted(len(ex.responses) for ex in examples) == [2] * 6 + [4] * 6
    rm = reward_model_from_lm(model, tok)
    hist = RewardTrainer(rm, RewardConfig(lr=1e-4, batch_size=4, heldout_fraction=0.2)).fit(examples, progress=False)
    assert hist and all(math.isfinite(m["rm/loss"]) for m in hist)
    assert "rm/heldout_accuracy" in hist[-1]
