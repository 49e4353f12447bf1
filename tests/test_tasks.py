import pytest

from labkit.tasks import CNNDM, DESCRIPTIVENESS, SENTIMENT, TASKS, TLDR, TruncationRule, format_query, get_task, token_ids_matching, truncation_index


def test_task_defaults_equal_the_papers_table():
    for style in (SENTIMENT, DESCRIPTIVENESS):
        assert (style.query_length, style.response_length, style.temperature) == (64, 24, 0.7)
        assert style.truncation == TruncationRule(".", 16) and style.penalty == -1.0
        assert (style.start_after, style.end_at) == (".", ".")
        assert (style.init_beta, style.kl_target) == (0.15, 6.0)
    assert (TLDR.query_length, TLDR.response_length, TLDR.temperature) == (500, 75, 0.7)
    assert TLDR.truncation == TruncationRule("\n", 55) and TLDR.query_suffix == "\n\nTL;DR:"
    assert (CNNDM.query_length, CNNDM.response_length, CNNDM.temperature) == (500, 75, 0.5)
    assert CNNDM.query_prefix == "Article:\n\n" and CNNDM.query_suffix == "\n\nTL;DR:" and CNNDM.end_at == "\n"
    assert (TLDR.kl_target, CNNDM.kl_target) == (None, None)  # the code's fixed beta for summaries
    assert set(TASKS) == {"sentiment", "descriptiveness", "tldr", "cnndm"}
    assert all(t.instructions for t in TASKS.values())


def test_get_task_errors_name_the_known_tasks():
    assert get_task("tldr") is TLDR
    with pytest.raises(KeyError, match="sentiment"):
        get_task("sentimnet")


def test_truncation_index_hand_cases():
    rule = TruncationRule(".", 3)
    dot = frozenset({9})
    assert truncation_index([9, 1, 2, 3, 9, 9], rule, dot) == 4  # a '.' before index 3 does not count
    assert truncation_index([1, 2, 3, 9], rule, dot) == 3  # exactly at `after` counts
    assert truncation_index([1, 2, 3, 4, 5], rule, dot) is None  # none found: penalty later
    assert truncation_index([9, 9, 9], rule, dot) is None


def test_matching_tokens(tokenizer):
    dots = token_ids_matching(tokenizer, ".", "contains")
    assert tokenizer.convert_tokens_to_ids(".") in dots
    com = tokenizer.encode(".com", add_special_tokens=False)
    assert not (len(com) == 1 and com[0] in dots)  # '.com' does not end a sentence
    newlines = token_ids_matching(tokenizer, "\n", "contains")
    assert tokenizer.encode("\n", add_special_tokens=False)[0] in newlines
    assert tokenizer.encode("\n\n", add_special_tokens=False)[0] in newlines
    # as released: the one token that is exactly the text (tests/test_truncation_ids.py has the rest)
    assert token_ids_matching(tokenizer, ".") == {tokenizer.convert_tokens_to_ids(".")}
    assert token_ids_matching(tokenizer, "\n") == set(tokenizer.encode("\n", add_special_tokens=False))


def test_truncation_rule_refuses_an_unknown_matching():
    assert TruncationRule(".", 16).tokens == "exact"
    with pytest.raises(ValueError, match="TruncationRule.tokens = 'broad': must be one of 'exact', 'contains'"):
        TruncationRule(".", 16, tokens="broad")


def test_style_query_starts_after_first_period_and_ends_at_last(tokenizer):
    text = "It was late. The rain had stopped and the street was quiet. She opened the door and"
    q = tokenizer.decode(format_query(SENTIMENT, text, tokenizer))
    assert q.strip() == "The rain had stopped and the street was quiet."


def test_style_query_is_at_most_query_length_tokens(tokenizer):
    text = "Start. " + "A short sentence here. " * 60
    ids = format_query(SENTIMENT, text, tokenizer)
    assert len(ids) <= 64 and tokenizer.decode(ids).endswith(".")


def test_summary_queries_have_prefix_and_suffix(tokenizer):
    post = "word " * 1000
    ids = format_query(TLDR, post, tokenizer)
    suffix = tokenizer.encode("\n\nTL;DR:", add_special_tokens=False)
    assert ids[-len(suffix):] == suffix and len(ids) == 500 + len(suffix)
    article = "First paragraph.\nSecond paragraph.\nA third that is cut"
    q = tokenizer.decode(format_query(CNNDM, article, tokenizer))
    assert q == "Article:\n\nFirst paragraph.\nSecond paragraph.\n\n\nTL;DR:"
