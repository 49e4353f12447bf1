"""Importing the label files released with lm-human-preferences, and exporting labkit's labels in their format.

The released files hold GPT-2 token ids: bare queries right-padded with the encoder's padding id (len(encoder) + 2 =
50259, language/encodings.py and language/datasets.py) and responses padded after their truncation token
(lm_tasks.py postprocess_fn_from_hparams). "Released-like" files are written here with a GPT-2-style byte-level BPE
trained on labkit's demo texts, padded the same way (its vocabulary size + 2), and with SmolLM2's tokenizer."""

import json
import random

import pytest

from labkit.data import load_prompts
from labkit.labeling.store import LabelStore, LabelStoreError
from labkit.models import _setup_tokenizer
from labkit.reward.model import query_format_ids, reward_query
from labkit.tasks import format_query, get_task

VOCAB = 1000
RESPONSE_LENGTH = 8


def demo_texts(source=None):
    tasks = ["sentiment", "tldr", "cnndm"] if source is None else [source]
    return [p.text for task in tasks for p in load_prompts(task, split="all")]


def gpt2_style_bpe(lowercase=False, add_pad=False):
    """A byte-level BPE as GPT-2's: its pre-tokenizer regex, <|endoftext|> its one special token. lowercase trains
    another tokenizer of the same size on the same texts lowercased: same-size ids, different tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = demo_texts()
    tok.train_from_iterator([t.lower() for t in texts] if lowercase else texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    if add_pad:
        assert _setup_tokenizer(fast)  # as load_lm does for gpt2: one more id, 50257 -> 50258
    return fast


@pytest.fixture(scope="module")
def bpe():
    tok = gpt2_style_bpe()
    assert len(tok) == tok.vocab_size == VOCAB
    return tok


def released_rows(tok, task, texts, k=4, seed=0):
    """Rows as the released code wrote them: the query as its query sampler made it (no prefix or suffix), padded to
    query_length, and k responses of RESPONSE_LENGTH tokens, padded after the point where they were cut."""
    task = get_task(task)
    pad = tok.vocab_size + 2
    rng = random.Random(seed)
    pieces = [tok.encode(t, add_special_tokens=False) for t in texts]
    rows = []
    for text in texts:
        query = reward_query(task, tok, format_query(task, text, tok))
        row = {"query": query + [pad] * (task.query_length - len(query))}
        for j in range(k):
            piece = rng.choice(pieces)
            start = rng.randrange(max(1, len(piece) - RESPONSE_LENGTH))
            cut = rng.randint(1, RESPONSE_LENGTH)
            row[f"sample{j}"] = piece[start : start + cut] + [pad] * (RESPONSE_LENGTH - cut)
        row["best"] = rng.randrange(k)
        rows.append(row)
    return rows


def write(path, rows):
    path.write_text(json.dumps(rows))
    return path


def unpadded(ids, pad):
    return [t for t in ids if t != pad]


def state(store):
    """What a refused import must leave as it was."""
    return store.comparisons(), store.labels(include_retracted=True)


def test_padding_is_removed_and_style_queries_stay_bare(bpe, tmp_path):
    rows = released_rows(bpe, "sentiment", demo_texts("sentiment")[:20])
    pad = VOCAB + 2
    assert any(pad in r["query"] for r in rows) and any(pad in r["sample0"] for r in rows)  # the test means something
    with LabelStore(tmp_path / "labels.db") as store:
        assert store.import_openai_labels(write(tmp_path / "offline_5k.json", rows), bpe, "sentiment") == 20
        pairs = store.training_set(task="sentiment")
    assert len(pairs) == 20
    for (c, label), row in zip(pairs, rows):
        assert c.query_tokens == unpadded(row["query"], pad)  # sentiment has no prefix or suffix
        assert c.response_tokens == [unpadded(row[f"sample{j}"], pad) for j in range(4)]
        assert c.query == bpe.decode(c.query_tokens, skip_special_tokens=True)
        assert c.responses == [bpe.decode(t, skip_special_tokens=True) for t in c.response_tokens]
        assert (label.best, label.labeler, c.sources, c.kind) == (row["best"], "openai", ["openai"] * 4, "train")
        assert c.extra["row"] == rows.index(row) and len(c.extra["import_sha256"]) == 64


@pytest.mark.parametrize("task", ["tldr", "cnndm"])
def test_summary_queries_get_the_task_prefix_and_suffix(bpe, tmp_path, task):
    spec = get_task(task)
    texts = demo_texts(task)[:8]
    rows = released_rows(bpe, task, texts)
    fmt = query_format_ids(spec, bpe)
    with LabelStore(tmp_path / "labels.db") as store:
        store.import_openai_labels(write(tmp_path / "online_45k.json", rows), bpe, spec)  # a Task works too
        comparisons = store.comparisons(task=task)
    for c, row, text in zip(comparisons, rows, texts):
        assert c.query_tokens == fmt["prefix"] + unpadded(row["query"], VOCAB + 2) + fmt["suffix"]
        # the same ids labkit's own sampling stores for this text: one query format per task
        assert c.query_tokens == format_query(spec, text, bpe)
        assert c.query.startswith(spec.query_prefix) and c.query.endswith(spec.query_suffix)
    assert fmt["suffix"] and (fmt["prefix"] != []) == (task == "cnndm")


def test_the_reward_trainer_reads_the_bare_released_query(tiny, tmp_path):
    from labkit.reward import RewardTrainer, examples_from_store, reward_model_from_lm

    model, tok = tiny
    pad = len(tok) + 2  # 49154: SmolLM2's 49152 ids + 2, the released encoder's rule
    rows = released_rows(tok, "tldr", demo_texts("tldr")[:3])
    with LabelStore(tmp_path / "labels.db") as store:
        store.import_openai_labels(write(tmp_path / "online_45k.json", rows), tok, "tldr")
        examples = examples_from_store(store, "tldr")
    trainer = RewardTrainer(reward_model_from_lm(model, tok, seed=0))
    for ex, row in zip(examples, rows):
        query, responses = trainer._tokens(ex)
        assert query == unpadded(row["query"], pad)  # as rewards.py reads it: concat(queries, responses)
        assert responses == [unpadded(row[f"sample{j}"], pad) for j in range(4)]
    trainer._check_query_formats(examples)  # one format: nothing refused


def test_a_pad_token_added_to_the_tokenizer_does_not_move_the_padding_id(bpe, tmp_path):
    tok = gpt2_style_bpe(add_pad=True)  # load_lm("gpt2") adds <|pad|>: len 50258, the files still pad with 50259
    assert len(tok) == VOCAB + 1
    rows = released_rows(bpe, "sentiment", demo_texts("sentiment")[:5])
    with LabelStore(tmp_path / "labels.db") as store:
        store.import_openai_labels(write(tmp_path / "f.json", rows), tok, "sentiment")
        assert all(VOCAB + 2 not in t for c in store.comparisons() for t in [c.query_tokens, *c.response_tokens])


def test_ids_outside_the_vocabulary_are_refused_and_nothing_is_written(tokenizer, tmp_path):
    rows = released_rows(tokenizer, "sentiment", demo_texts("sentiment")[:3])
    rows[1]["sample2"][0] = 50256  # GPT-2's <|endoftext|>: beyond SmolLM2's 49152 ids
    with LabelStore(tmp_path / "labels.db") as store:
        before = state(store)
        with pytest.raises(LabelStoreError, match=r'row 1: sample2 holds the token id 50256.*0\.\.49151.*GPT-2.*'
                                                   r'50257 ids.*AutoTokenizer\.from_pretrained\("gpt2"\)'):
            store.import_openai_labels(write(tmp_path / "f.json", rows), tokenizer, "sentiment")
        assert state(store) == before


def test_another_tokenizer_of_the_same_size_is_refused(bpe, tmp_path):
    other = gpt2_style_bpe(lowercase=True)
    assert len(other) == len(bpe) and other.get_vocab() != bpe.get_vocab()
    rows = released_rows(bpe, "tldr", demo_texts("tldr")[:30])
    with LabelStore(tmp_path / "labels.db") as store:
        before = state(store)
        with pytest.raises(LabelStoreError, match=r"do not look like this tokenizer's: \d+ of 30 sampled queries.*"
                                                   r'AutoTokenizer\.from_pretrained\("gpt2"\)'):
            store.import_openai_labels(write(tmp_path / "f.json", rows), other, "tldr")
        assert state(store) == before


@pytest.mark.parametrize("task", ["sentiment", "tldr", "cnndm"])
def test_the_round_trip_check_passes_nearly_every_real_query(bpe, tokenizer, task):
    """Decoding then encoding gives back the ids of real text, for the byte-level BPE and for SmolLM2's tokenizer:
    the check refuses only another tokenizer's ids."""
    for tok in (bpe, tokenizer):
        queries = [row["query"] for row in released_rows(tok, task, demo_texts(task))]
        queries = [unpadded(q, tok.vocab_size + 2) for q in queries]
        texts = [tok.decode(q, clean_up_tokenization_spaces=False) for q in queries]
        back = [tok.encode(text, add_special_tokens=False) for text in texts]
        assert sum(b == q for b, q in zip(back, queries)) >= 0.95 * len(queries)


def test_a_padding_id_that_is_a_real_token_is_refused(bpe, tmp_path):
    path = write(tmp_path / "f.json", released_rows(bpe, "sentiment", demo_texts("sentiment")[:2]))
    with LabelStore(tmp_path / "labels.db") as store:
        with pytest.raises(ValueError, match=r"padding_token=13 is a real token.*would delete text"):
            store.import_openai_labels(path, bpe, "sentiment", padding_token=13)
        assert store.comparisons() == []


def test_a_url_is_downloaded_once_into_the_cache(bpe, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path / "cache"))
    source = write(tmp_path / "offline_5k.json", released_rows(bpe, "sentiment", demo_texts("sentiment")[:4]))
    url = source.as_uri()  # file://: urllib's code path, no network
    with LabelStore(tmp_path / "labels.db") as store:
        assert store.import_openai_labels(url, bpe, "sentiment") == 4
        [cached] = (tmp_path / "cache" / "labels").iterdir()
        assert cached.name.endswith("-offline_5k.json") and cached.read_bytes() == source.read_bytes()
        assert store.comparisons()[0].extra["imported_from"] == url
        source.unlink()  # read from the cache from now on
        assert store.import_openai_labels(url, bpe, "descriptiveness") == 4

        missing = (tmp_path / "nowhere.json").as_uri()
        with pytest.raises(LabelStoreError, match=r"could not download .*nowhere\.json.*Download it by hand.*pass the "
                                                   r"file's path"):
            store.import_openai_labels(missing, bpe, "sentiment")
        with pytest.raises(LabelStoreError, match=r"only http, https, file URLs.*pass its path"):
            store.import_openai_labels("gs://bucket/labels.json", bpe, "sentiment")
        assert len(store.comparisons()) == 8
    assert [p.name for p in (tmp_path / "cache" / "labels").iterdir()] == [cached.name]  # no .part left behind


def test_importing_a_file_again_adds_nothing(bpe, tmp_path):
    path = write(tmp_path / "f.json", released_rows(bpe, "sentiment", demo_texts("sentiment")[:3]))
    with LabelStore(tmp_path / "labels.db") as store:
        assert store.import_openai_labels(path, bpe, "sentiment") == 3
        before = state(store)
        with pytest.warns(UserWarning, match="already imported into task 'sentiment' \\(3 comparisons\\)"):
            assert store.import_openai_labels(str(path), bpe, "sentiment") == 0
        assert state(store) == before


def labkit_comparisons(store, tok, task, texts):
    """Comparisons stored as labkit's sampling stores them (make_comparisons): the formatted query's ids, the
    responses' ids, both decoded; 4-way and 2-way, one response ending in <|endoftext|>; labels by two labelers,
    one of them changed (retracted and relabeled)."""
    spec = get_task(task)
    rng = random.Random(1)
    pieces = [tok.encode(t, add_special_tokens=False) for t in texts]
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    for i, text in enumerate(texts):
        query = format_query(spec, text, tok)
        k = 4 if i % 2 else 2
        responses = [rng.choice(pieces)[:rng.randint(1, 6)] for _ in range(k)]
        responses[0] = responses[0] + [eot]
        cid = store.add_comparison(task, tok.decode(query, skip_special_tokens=True),
                                   [tok.decode(r, skip_special_tokens=True) for r in responses],
                                   query_tokens=query, response_tokens=responses, sources="rho")
        store.record_label(cid, 0, "alice")
        if i % 3 == 0:
            store.undo("alice")
            store.record_label(cid, k - 1, "alice")
        if i == 1:
            store.record_label(cid, 2, "bob")


def as_released(pairs):
    return [(c.query_tokens, c.response_tokens, c.query, c.responses, label.best) for c, label in pairs]


@pytest.mark.parametrize("task", ["sentiment", "cnndm"])
def test_export_then_import_gives_the_same_comparisons(bpe, tmp_path, task):
    spec = get_task(task)
    with LabelStore(tmp_path / "a.db") as a, LabelStore(tmp_path / "b.db") as b:
        labkit_comparisons(a, bpe, task, demo_texts(task)[:9])
        path = tmp_path / "export.json"
        n = a.export_openai_labels(path, task, tokenizer=bpe)
        assert n == len(a.training_set(task=task)) == 10  # bob's label is a row of its own
        rows = json.loads(path.read_text())
        assert {len(r) - 2 for r in rows} == {2, 4}
        fmt = query_format_ids(spec, bpe)
        if spec.query_prefix:  # the file holds bare queries, as released
            assert all(r["query"][: len(fmt["prefix"])] != fmt["prefix"] for r in rows)
        assert b.import_openai_labels(path, bpe, task, labeler="alice") == 10
        assert as_released(b.training_set(task=task)) == as_released(a.training_set(task=task))


def test_export_refuses_what_the_format_cannot_hold(bpe, tmp_path):
    path = tmp_path / "export.json"
    with LabelStore(tmp_path / "a.db") as store:
        labkit_comparisons(store, bpe, "cnndm", demo_texts("cnndm")[:2])
        with pytest.raises(ValueError, match=r"'cnndm' puts 'Article:\\n\\n' / '\\n\\nTL;DR:'.*tokenizer="):
            store.export_openai_labels(path, "cnndm")
        with pytest.raises(LabelStoreError, match="no live labels for task 'tldr'"):
            store.export_openai_labels(path, "tldr", tokenizer=bpe)
        cid = store.add_comparison("cnndm", "Article:\n\nq\n\nTL;DR:", ["a", "b"])  # text only
        store.record_label(cid, 1, "alice")
        with pytest.raises(LabelStoreError, match=rf"1 labeled comparisons of task 'cnndm' have no stored token ids "
                                                  rf"\(ids {cid}\).*query_tokens="):
            store.export_openai_labels(path, "cnndm", tokenizer=bpe)
    assert not path.exists() and list(tmp_path.glob("*.part")) == []


def test_limit_imports_the_first_rows_as_the_released_trainer_reads_them(bpe, tmp_path):
    rows = released_rows(bpe, "sentiment", demo_texts("sentiment")[:8])
    path = write(tmp_path / "offline_5k.json", rows)
    with LabelStore(tmp_path / "labels.db") as store:
        with pytest.raises(LabelStoreError, match="holds 8 rows, fewer than limit=9"):
            store.import_openai_labels(path, bpe, "sentiment", limit=9)
        with pytest.raises(ValueError, match="limit must be a whole number >= 1"):
            store.import_openai_labels(path, bpe, "sentiment", limit=0)
        assert store.comparisons() == []
        assert store.import_openai_labels(path, bpe, "sentiment", limit=5) == 5
        got = [c.query_tokens for c, _ in store.training_set(task="sentiment")]
    assert got == [unpadded(r["query"], VOCAB + 2) for r in rows[:5]]
