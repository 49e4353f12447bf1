"""Truncation and query trimming at exact token ids, as released (lm_tasks.py postprocess_fn_from_hparams and
filter_fn_from_hparams: one truncate_token id), and the broad "contains" set kept as an option; on SmolLM2's
tokenizer and on GPT-2-style and SentencePiece-style tokenizers trained here."""

import pytest
import torch

from labkit.models import _setup_tokenizer
from labkit.sampling import truncate
from labkit.tasks import SENTIMENT, TruncationRule, format_query, special_token_ids, token_ids_matching

SENTENCES = ['She said "Go home." Then she left... Nobody followed.', 'It was late.\nThe rain stopped.\n\nNobody came.',
             'Wait... what? "Yes." He nodded (slowly.)\n\nThe end.\n', 'Visit example.com for 3.5 more. Done.\n',
             'Chapter one\n\nChapter two\n\nThe list\n']


def byte_level_bpe():
    """A GPT-2-style byte-level BPE (<|endoftext|> its only special token, then labkit's added <|pad|>), trained
    on SENTENCES. Pre-tokens are words and runs of punctuation with the whitespace after them, so that merged
    tokens such as '."', '...', '.\\n' and '\\n\\n' exist (GPT-2's own vocabulary has '."', '...' and '\\n\\n')."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?[A-Za-z0-9]+| ?[^\sA-Za-z0-9]+\n*|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    assert _setup_tokenizer(fast)  # adds <|pad|>, as load_lm does for gpt2
    return fast


def metaspace_bpe():
    """A SentencePiece-style (Llama) BPE: '▁' marks a space, and decoding drops the first token's leading '▁'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([s.replace(". ", " . ") for s in SENTENCES] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>")


def _ids(tok, *pieces):
    """The single id of each (byte-level) token string; fails if one is not a token."""
    ids = [tok.convert_tokens_to_ids(p) for p in pieces]
    assert all(i is not None and i != tok.unk_token_id for i in ids), dict(zip(pieces, ids))
    return ids


@pytest.fixture(params=["smollm2", "gpt2-style"])
def tok(request, tokenizer):
    return tokenizer if request.param == "smollm2" else byte_level_bpe()


def test_exact_ids_are_the_one_token_of_the_text(tok):
    dot, nl = _ids(tok, ".", "Ċ")
    assert token_ids_matching(tok, ".") == {dot} and token_ids_matching(tok, "\n") == {nl}
    # they exist, and only the broad set holds them (SmolLM2 has no '.\n' token but ' \n' and ' .')
    merged = _ids(tok, '."', "...", "ĊĊ", *((".Ċ",) if tok.convert_tokens_to_ids(".Ċ") != tok.unk_token_id else ("ĠĊ", "Ġ.")))
    broad = token_ids_matching(tok, ".", "contains") | token_ids_matching(tok, "\n", "contains")
    assert set(merged) <= broad
    assert not set(merged) & (token_ids_matching(tok, ".") | token_ids_matching(tok, "\n"))


def test_merged_punctuation_cuts_only_under_contains(tok):
    dot, nl, quote, dots, nl_nl = _ids(tok, ".", "Ċ", '."', "...", "ĊĊ")
    w = tok.encode(" the", add_special_tokens=False)[0]
    exact, broad = TruncationRule(".", 2), TruncationRule(".", 2, tokens="contains")
    rows = torch.tensor([[w, w, quote, w, dot, w],  # '."' at index 2 >= after: exact goes on to the '.' at 4
                         [w, w, dots, quote, w, w],  # merged tokens only: exact finds nothing -> penalty
                         [dot, dot, w, w, w, w]])  # '.' only before index 2: ignored
    for rule, lengths, found in ((exact, [5, 6, 6], [True, False, False]), (broad, [3, 3, 6], [True, True, False])):
        out, n, f = truncate(rows, SENTIMENT.with_(response_length=6, truncation=rule), tok)
        assert n.tolist() == lengths and f.tolist() == found
        assert all((row[k:] == tok.pad_token_id).all() for row, k in zip(out, lengths))  # the cut token is kept
    summary = [w, w, nl_nl, nl_nl, nl, w]
    for tokens, length in (("exact", 5), ("contains", 3)):
        _, n, f = truncate(torch.tensor([summary]), SENTIMENT.with_(truncation=TruncationRule("\n", 2, tokens=tokens)), tok)
        assert n.tolist() == [length] and f.tolist() == [True]


def test_query_trimming_uses_exact_ids(tokenizer):
    text = 'He said "Go." It was late... The rain stopped. She waited. Then she opened the door and'
    exact = tokenizer.decode(format_query(SENTIMENT, text, tokenizer))
    assert exact == " She waited."  # starts after the first '.' token, ends at the last: '."' and '...' are not marks
    broad = SENTIMENT.with_(truncation=TruncationRule(".", 16, tokens="contains"))
    assert tokenizer.decode(format_query(broad, text, tokenizer)) == " It was late... The rain stopped. She waited."
    no_rule = SENTIMENT.with_(truncation=None)  # no truncation rule: exact
    assert tokenizer.decode(format_query(no_rule, text, tokenizer)) == exact


def test_query_trimming_on_a_gpt2_style_tokenizer():
    tok = byte_level_bpe()
    (dot,) = _ids(tok, ".")
    text = SENTENCES[0] + " And then it rained. More text"  # 'She said "Go home." Then she left... Nobody followed.'
    ids = format_query(SENTIMENT, text, tok)
    assert ids[-1] == dot and tok.decode(ids) == " And then it rained."  # '."' and '...' are not the first '.'
    broad = SENTIMENT.with_(truncation=TruncationRule(".", 16, tokens="contains"))
    assert tok.decode(format_query(broad, text, tok)) == " Then she left... Nobody followed. And then it rained."


def test_exact_matching_survives_a_sentencepiece_leading_space():
    tok = metaspace_bpe()
    dot, space_dot = _ids(tok, ".", "▁.")
    assert tok.decode([space_dot]) == "."  # alone, ' .' reads '.': the trap the anchor token avoids
    assert token_ids_matching(tok, ".") == {dot}
    assert space_dot in token_ids_matching(tok, ".", "contains")


def test_no_exact_token_is_a_clear_error():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "end.": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    with pytest.raises(ValueError, match=r"No token of the tokenizer .* is exactly '\.'.*tokens='contains'"):
        token_ids_matching(tok, ".")
    assert token_ids_matching(tok, ".", "contains") == {2}
    with pytest.raises(ValueError, match="tokens = 'broad'"):
        token_ids_matching(tok, ".", "broad")


@pytest.mark.parametrize("text", [".", "\n"])
def test_exact_ids_equal_a_naive_loop_over_the_smollm2_vocabulary(tokenizer, text):
    special = special_token_ids(tokenizer)
    naive = {i for i in range(len(tokenizer)) if i not in special and tokenizer.decode([i]) == text}
    assert token_ids_matching(tokenizer, text) == naive and len(naive) == 1
    assert len(token_ids_matching(tokenizer, text, "contains")) > 100  # the broad set: 141 for '.', 129 for '\n'
