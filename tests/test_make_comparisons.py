"""make_comparisons and responses without a truncation point: by default labelers only see responses that have
one (as released: lm_tasks.py filter_fn_from_hparams), so those without are sampled again, a bounded number of
times, and prompts still short of k good responses are left out, with a count; a progress bar meanwhile."""

import pytest
import torch

import labkit.labeling.comparisons as comparisons
from labkit.labeling.comparisons import make_comparisons
from labkit.labeling.store import LabelStore
from labkit.tasks import SENTIMENT, TruncationRule, token_ids_matching, truncation_index

PROMPTS = [f"Intro. Prompt number {i} about the lake." for i in range(4)]
K = 3


def cut_task(after):
    """The random tiny model almost never samples '.': a cut after any token with "e" not followed by a letter,
    at response index >= after. After 10 of 20 tokens, about 40% of the samples have no cut point."""
    return SENTIMENT.with_(response_length=20, truncation=TruncationRule(text="e", after=after, tokens="contains"))


@pytest.fixture
def store(tmp_path):
    with LabelStore(tmp_path / "labels.db") as s:
        yield s


@pytest.fixture
def calls(monkeypatch):
    """Every `sample` call make_comparisons makes: (queries, generator)."""
    seen, real = [], comparisons.sample

    def recording(model, tokenizer, queries, task, **kwargs):
        seen.append((list(queries), kwargs.get("generator")))
        return real(model, tokenizer, queries, task, **kwargs)

    monkeypatch.setattr(comparisons, "sample", recording)
    return seen


def test_responses_without_a_cut_point_are_sampled_again(store, tiny, calls, capsys):
    model, tok = tiny
    task = cut_task(after=10)
    raw = make_comparisons(store, model, tok, task, PROMPTS, k=K, generator=torch.Generator().manual_seed(3),
                           require_truncation=False, progress=False)
    raw_found = [f for i in raw for f in store.comparison(i).extra["found"]]
    assert len(raw) == len(PROMPTS) and not all(raw_found)  # the raw samples keep their failures
    assert sum(len(q) for q, _ in calls) == len(PROMPTS) * K  # and are sampled once
    calls.clear()

    generator = torch.Generator().manual_seed(3)
    ids = make_comparisons(store, model, tok, task, PROMPTS, k=K, generator=generator, progress=False)
    stored = [store.comparison(i) for i in ids]
    assert len(ids) + len(ids.left_out) == len(PROMPTS) and len(ids) >= 2
    assert all(c.extra["found"] == [True] * K for c in stored)
    match = token_ids_matching(tok, task.truncation.text, task.truncation.tokens)
    assert all(truncation_index(t, task.truncation, match) == len(t) - 1  # every response ends at its cut point
               for c in stored for t in c.response_tokens)
    # Rounds after the first sample only the failed responses, of the same prompts, with the same generator.
    assert len(calls) >= 2 and all(g is generator for _, g in calls)
    assert len(calls[0][0]) == len(PROMPTS) * K and len(calls[1][0]) < len(PROMPTS) * K
    assert {tuple(q) for qs, _ in calls for q in qs} <= {tuple(q) for q in calls[0][0]}
    kept = [p for i, p in enumerate(PROMPTS) if i not in ids.left_out]
    assert [c.query.strip() for c in stored] == [p.split(". ", 1)[1] for p in kept]  # prompt order
    assert ("left out" in capsys.readouterr().out) == bool(ids.left_out)


def test_slots_are_resampled_until_they_pass_and_failing_prompts_are_left_out(store, tiny, monkeypatch, capsys):
    """With `found` scripted: prompt 1 never passes, prompt 0's first two responses fail once."""
    model, tok = tiny
    real, rows_per_call, seen = comparisons.sample, [], {}
    queries = {}

    def scripted(model, tokenizer, qs, task, **kwargs):
        roll = real(model, tokenizer, qs, task, **kwargs)
        found = []
        for q in qs:
            prompt = queries.setdefault(tuple(q), len(queries))  # prompts first appear in order
            seen[tuple(q)] = seen.get(tuple(q), 0) + 1
            found.append(prompt == 2 or (prompt == 0 and seen[tuple(q)] > 2))
        roll.found = torch.tensor(found)
        rows_per_call.append(len(qs))
        return roll

    monkeypatch.setattr(comparisons, "sample", scripted)
    prompts = ["Intro. The first prompt.", "Intro. The second one here.", "Intro. A third, longer prompt here."]
    ids = make_comparisons(store, model, tok, cut_task(after=0), prompts, k=K, resample_rounds=3, progress=False)
    # Round 1: all 9; round 2: prompt 0's two failures and prompt 1's three; rounds 3 and 4: prompt 1's three.
    assert rows_per_call == [9, 5, 3, 3]
    assert ids.left_out == [1] and len(ids) == 2
    assert [store.comparison(i).query.strip() for i in ids] == ["The first prompt.", "A third, longer prompt here."]
    assert all(store.comparison(i).extra["found"] == [True] * K for i in ids)
    out = capsys.readouterr().out
    assert "left out 1 of 3 prompts" in out and "require_truncation=False" in out


def never_found(monkeypatch):
    """`sample` as make_comparisons sees it, with no response ever having a cut point."""
    real = comparisons.sample

    def failing(*args, **kwargs):
        roll = real(*args, **kwargs)
        roll.found = torch.zeros(len(roll), dtype=torch.bool)
        return roll

    monkeypatch.setattr(comparisons, "sample", failing)


def test_bounded_when_no_response_passes(store, tiny, calls, monkeypatch, capsys):
    model, tok = tiny
    never_found(monkeypatch)
    ids = make_comparisons(store, model, tok, cut_task(after=10), PROMPTS[:2], k=K, resample_rounds=2, progress=False)
    assert ids == [] and ids.left_out == [0, 1] and store.comparisons() == []
    assert [len(q) for q, _ in calls] == [2 * K] * 3  # the first round and two more, then it stops
    assert "left out 2 of 2 prompts" in capsys.readouterr().out
    with pytest.raises(ValueError, match="resample_rounds must be a whole number >= 0"):
        make_comparisons(store, model, tok, cut_task(after=10), PROMPTS, resample_rounds=-1)


def test_a_rule_that_cannot_be_met_keeps_the_raw_samples_and_says_so(store, tiny, calls, capsys):
    """truncation.after >= response_length (a smoke run's short responses): filtering would store nothing."""
    model, tok = tiny
    ids = make_comparisons(store, model, tok, cut_task(after=20), PROMPTS[:2], k=K, progress=False)
    assert len(ids) == 2 and ids.left_out == [] and len(calls) == 1
    assert all(store.comparison(i).extra["found"] == [False] * K for i in ids)
    assert "no response can have a truncation point" in capsys.readouterr().out
    make_comparisons(store, model, tok, cut_task(after=20), PROMPTS[:1], k=K, progress=False, require_truncation=False)
    assert capsys.readouterr().out == ""  # asked for the raw samples: nothing to say


def test_a_task_without_truncation_samples_once(store, tiny, calls, capsys):
    model, tok = tiny
    task = SENTIMENT.with_(response_length=6, truncation=None)
    ids = make_comparisons(store, model, tok, task, PROMPTS[:2], k=2, batch_size=3)
    assert len(ids) == 2 and ids.left_out == []
    assert [len(q) for q, _ in calls] == [3, 1]  # batch_size bounds each call
    captured = capsys.readouterr()
    assert "left out" not in captured.out
    assert "sampling responses" in captured.err and "4/4" in captured.err  # the progress bar (default on)


def test_no_extra_rounds_still_keeps_failures_out(store, tiny, calls, monkeypatch, capsys):
    model, tok = tiny
    never_found(monkeypatch)
    ids = make_comparisons(store, model, tok, cut_task(after=10), PROMPTS[:2], k=K, resample_rounds=0, progress=False)
    assert ids == [] and ids.left_out == [0, 1] and len(calls) == 1
    assert "after 0 extra sampling round(s)" in capsys.readouterr().out
