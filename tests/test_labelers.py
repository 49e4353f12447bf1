"""Mock labelers: each prefers what it claims to, temperature gives softmax-distributed picks, and
label_pending files labels under the labeler's id."""

import numpy as np
import pytest

from labkit.labeling.labelers import (DescriptivenessLabeler, RougeLabeler, VaderLabeler, descriptiveness, label_pending,
                             pick)
from labkit.labeling.store import Comparison, LabelStore

HAPPY, SAD = "I love this wonderful happy day.", "This is awful and sad."
VIVID = "The crimson sun sank behind jagged peaks, casting long violet shadows across the silent, misty valley."
BLAND = "The sun went down behind the mountains and then it was night in the place."
ABSTRACT = "It was what it was, and then it was over for all of us at that point in time."


def comparison(responses, reference=None, id=1):
    return Comparison(id, "t", "train", "q", [], list(responses), [[] for _ in responses], ["rho"] * len(responses),
                      reference, {}, 0.0)


def test_vader_prefers_happy():
    labeler = VaderLabeler()
    assert labeler.labeler_id == "mock:vader"
    assert labeler.choose(comparison([SAD, HAPPY])) == 1
    happy, sad = labeler([HAPPY, SAD])  # also a reward function
    assert happy > 0.5 and sad < -0.5


def test_descriptiveness_prefers_vivid():
    labeler = DescriptivenessLabeler()
    assert labeler.labeler_id == "mock:descriptive"
    assert labeler.choose(comparison([BLAND, VIVID])) == 1
    assert descriptiveness(VIVID) > 1.0 and descriptiveness(ABSTRACT) == 0.0
    # Concrete things (sun, mountains) count, at half a sensory word each: plain but picturable beats abstract.
    assert descriptiveness(BLAND) == 10 * 0.5 * 2 / 15   # two things in 15 words
    assert descriptiveness(VIVID) > descriptiveness(BLAND) > descriptiveness(ABSTRACT)
    # Repetition is penalised, and a two-word fragment does not beat a vivid sentence.
    assert descriptiveness("dark dark dark dark night") < descriptiveness("dark night")
    assert descriptiveness("the door, the door, the door and the hall") == 10 * (0.5 - 2) / 10   # door: once a thing
    # ...but not the function words plain English repeats: no vivid word and no counted repeat here
    assert descriptiveness("They said that they would come with us, and they came with the others.") == 0.0
    assert descriptiveness("crimson.") < descriptiveness(VIVID)
    assert descriptiveness("") == 0.0


def test_rouge_prefers_text_closer_to_reference():
    labeler = RougeLabeler()
    reference = "the council approved the new park budget on monday"
    close, far = "council approves new park budget monday", "a dog barked at the mailman"
    assert labeler.choose(comparison([far, close], reference=reference)) == 1
    scores = labeler.score([close, far], [reference, reference])
    assert scores[0] > scores[1] >= 0.0
    with pytest.raises(ValueError, match="comparison 7 .* no reference"):
        labeler.choose(comparison([far, close], id=7))
    with pytest.raises(ValueError, match="needs references"):
        labeler.score([close])


def test_temperature_samples_softmax():
    texts = [HAPPY, SAD, "It is a day.", "Good."]
    labeler = VaderLabeler(temperature=0.5, seed=0)
    scores = np.array(labeler.score(texts))
    expected = np.exp(scores / 0.5) / np.exp(scores / 0.5).sum()
    c = comparison(texts)
    n = 3000
    picks = [labeler.choose(c) for _ in range(n)]
    freq = np.bincount(picks, minlength=4) / n
    assert np.abs(freq - expected).max() < 0.04  # ~4 standard errors at n = 3000
    # Seeded: the same seed gives the same sequence of picks.
    again = VaderLabeler(temperature=0.5, seed=0)
    assert [again.choose(c) for _ in range(50)] == picks[:50]


def test_pick():
    rng = np.random.default_rng(0)
    assert pick([0.1, 0.9, 0.9], 0.0, rng) == 1  # argmax, first on ties
    assert pick([0.0, 1000.0], 1e-3, rng) == 1  # tiny temperatures do not overflow
    freq = np.bincount([pick([0.0, np.log(3.0)], 1.0, rng) for _ in range(4000)], minlength=2) / 4000
    assert freq[1] == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        VaderLabeler(temperature=-1.0)


def test_label_pending_stores_under_labeler_ids(tmp_path):
    with LabelStore(tmp_path / "labels.db") as store:
        cids = store.add_comparisons([dict(task="sentiment", query="q", responses=[SAD, HAPPY])] * 3)
        store.add_comparison("other", "q", [HAPPY, SAD])
        assert label_pending(store, VaderLabeler(), task="sentiment", limit=2) == 2
        assert label_pending(store, VaderLabeler(), task="sentiment") == 1
        assert label_pending(store, VaderLabeler(), task="sentiment") == 0  # nothing left
        # Other mocks on the same comparisons (to study agreement) must ask for it: by default a mock
        # labels only what nobody has labeled.
        assert label_pending(store, DescriptivenessLabeler(), task="sentiment") == 0
        assert label_pending(store, DescriptivenessLabeler(), task="sentiment", also_labeled_by_others=True) == 3
        noisy = VaderLabeler(temperature=0.3, seed=1, labeler_id="mock:vader@T0.3")
        assert label_pending(store, noisy, task="sentiment", also_labeled_by_others=True) == 3

        vader = store.labels(labeler="mock:vader")
        assert [lb.comparison_id for lb in vader] == cids and all(lb.best == 1 for lb in vader)
        assert len(store.labels(labeler="mock:descriptive")) == 3
        assert len(store.labels(labeler="mock:vader@T0.3")) == 3
        assert store.pending("mock:vader") == [cids[-1] + 1]  # the other task is untouched


def test_skip_ties_skips_a_shared_top_and_stores_the_skip(tmp_path):
    neutral = "It is a table."  # VADER compound exactly 0.0, as for any text without a sentiment word
    tied, decisive = [SAD, neutral, neutral], [SAD, neutral, HAPPY]
    labeler = VaderLabeler(skip_ties=True)
    assert labeler.choose(comparison(tied)) is None
    assert labeler.choose(comparison(decisive)) == 2
    assert VaderLabeler().choose(comparison(tied)) == 1  # without skip_ties: the first of the tied best
    with LabelStore(tmp_path / "labels.db") as store:
        cids = store.add_comparisons([dict(task="sentiment", query="q", responses=r) for r in (tied, decisive, tied)])
        assert label_pending(store, labeler, task="sentiment") == 3
        assert [(c.id, lb.best) for c, lb in store.training_set(task="sentiment")] == [(cids[1], 2)]
        assert store.pending("mock:vader") == []  # skips count as handled: not offered again
        assert label_pending(store, labeler, task="sentiment") == 0


def test_a_mock_labels_only_what_no_person_labeled_or_skipped(tmp_path, capsys):
    with LabelStore(tmp_path / "labels.db") as store:
        cids = store.add_comparisons([dict(task="sentiment", query=f"q{i}", responses=[SAD, HAPPY]) for i in range(6)])
        store.record_label(cids[0], 0, "alice")  # the person prefers the sad one here
        store.record_skip(cids[1], "alice")  # and found this one not worth labeling
        store.record_label(cids[2], 0, "bob")
        store.undo("bob")  # retracted: free for the mock again

        assert label_pending(store, VaderLabeler(), task="sentiment") == 4
        assert [lb.comparison_id for lb in store.labels(labeler="mock:vader")] == cids[2:]
        # training_set: one label per (comparison, labeler), so a mock label beside alice's would count as much.
        assert [(c.id, lb.labeler) for c, lb in store.training_set() if c.id in cids[:2]] == [(cids[0], "alice")]
        assert "labeling as mock:vader" in capsys.readouterr().err  # the progress bar

        # The old behaviour, on request: everything the mock itself has not handled.
        n = label_pending(store, VaderLabeler(), task="sentiment", also_labeled_by_others=True, progress=False)
        assert n == 2 and capsys.readouterr().err == ""
        assert sorted(lb.comparison_id for lb in store.labels(labeler="mock:vader")) == cids
