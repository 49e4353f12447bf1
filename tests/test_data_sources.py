"""labkit.data reads the real datasets' schemas: each one as a local file and through the hub / "paper" path, with
datasets.load_dataset (`_load_dataset`) and the downloads (`_download`) replaced by files written here in exactly
the dataset's layout. No network."""

import dataclasses
import hashlib
import io
import itertools
import json
import urllib.error

import pytest

import labkit.data as data
from labkit.data import Prompt, load_prompts
from labkit.tasks import get_task

SENTIMENT, TLDR, CNNDM = get_task("sentiment"), get_task("tldr"), get_task("cnndm")


# ---- helpers ----


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def write_parquet(path, rows):
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return str(path)


def pairs(prompts):
    return [(p.text, p.reference) for p in prompts]


class FakeHub:
    """Stands in for datasets.load_dataset: serves {split: rows} and records how it was called."""

    def __init__(self, tables):
        self.tables, self.calls = tables, []

    def __call__(self, path, **kwargs):
        self.calls.append((path, kwargs))
        return self.tables


@pytest.fixture
def hub(monkeypatch):
    def serve(tables):
        fake = FakeHub(tables)
        monkeypatch.setattr(data, "_load_dataset", fake)
        return fake
    return serve


@pytest.fixture
def downloads(monkeypatch):
    """Serve {url: local path} in place of the released files; other URLs fail as an offline machine would."""
    served, asked = {}, []

    def fake(url):
        asked.append(url)
        if url not in served:
            raise AssertionError(f"unexpected download {url}")
        return served[url]
    monkeypatch.setattr(data, "_download", fake)
    return served, asked


# ---- trl-lib/tldr ----
# Verified: https://huggingface.co/datasets/trl-lib/tldr (README: columns prompt, completion; splits train,
# validation, test) and its generation script huggingface/trl examples/datasets/tldr.py (to_prompt_completion:
# "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:", completion = " " + summary).

TRL_ROWS = [
    {"prompt": "SUBREDDIT: r/relationships\n\nTITLE: My title\n\nPOST: First line of my post.\nSecond line.\n\nTL;DR:",
     "completion": " we argued about dishes"},
    {"prompt": "SUBREDDIT: r/AskReddit\n\nTITLE: POST: a title that says POST:\n\nPOST: A post that quotes TL;DR: mid-"
               "way.\n\nTL;DR:", "completion": " quoting is fine "},
]
TRL_EXPECTED = [("First line of my post.\nSecond line.", "we argued about dishes"),
                ("A post that quotes TL;DR: mid-way.", "quoting is fine")]


@pytest.mark.parametrize("write", [write_jsonl, write_parquet])
def test_trl_tldr_file(tmp_path, write):
    path = write(tmp_path / ("t.jsonl" if write is write_jsonl else "t.parquet"), TRL_ROWS)
    assert pairs(load_prompts(TLDR, source=path)) == TRL_EXPECTED


def test_trl_tldr_hub_splits(hub):
    extra = {"prompt": "SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: test split post\n\nTL;DR:", "completion": " t"}
    fake = hub({"train": TRL_ROWS[:1], "validation": TRL_ROWS[1:], "test": [extra]})
    assert pairs(load_prompts(TLDR, "train", source="trl-lib/tldr")) == TRL_EXPECTED[:1]
    assert pairs(load_prompts(TLDR, "validation", source="hub")) == TRL_EXPECTED[1:]  # the tldr default
    # "all" is every split of the source, in its order (it used to be train only)
    assert pairs(load_prompts(TLDR, "all", source="hub")) == TRL_EXPECTED + [("test split post", "t")]
    assert fake.calls == [("trl-lib/tldr", {})] * 3


# ---- CarperAI/openai_summarize_tldr ----
# Verified: CarperAI/trlx examples/summarize_rlhf/trlx_gptj_text_summarization.py (load_dataset(
# "CarperAI/openai_summarize_tldr"), dataset["train"] / dataset["valid"], sample["prompt"], sample["label"]) and
# sft/summarize_dataset.py (layout "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR: ").

CARPER_ROWS = [{"prompt": "SUBREDDIT: r/dogs\nTITLE: Puppy\nPOST: My puppy chews shoes.\nTL;DR: ",
                "label": "puppy chews shoes"},
               {"prompt": "SUBREDDIT: r/cats\nTITLE: Cat\nPOST: My cat sleeps.\nTL;DR: ", "label": "cat sleeps"}]


@pytest.mark.parametrize("write", [write_jsonl, write_parquet])
def test_carper_tldr_file(tmp_path, write):
    path = write(tmp_path / ("c.jsonl" if write is write_jsonl else "c.parquet"), CARPER_ROWS)
    assert pairs(load_prompts(TLDR, source=path)) == [("My puppy chews shoes.", "puppy chews shoes"),
                                                      ("My cat sleeps.", "cat sleeps")]


def test_carper_tldr_hub_calls_its_validation_split_valid(hub):
    hub({"train": CARPER_ROWS[:1], "valid": CARPER_ROWS[1:], "test": []})
    assert pairs(load_prompts(TLDR, "validation", source="CarperAI/openai_summarize_tldr")) == [
        ("My cat sleeps.", "cat sleeps")]


def test_a_prompt_without_the_layout_is_refused_locally_and_dropped_from_the_hub(tmp_path, hub):
    rows = [*CARPER_ROWS, {"prompt": "just some text", "label": "x"}]
    with pytest.raises(ValueError, match=r"line 3: column 'prompt' does not have the layout 'SUBREDDIT: .*TL;DR:'"):
        load_prompts(TLDR, source=write_jsonl(tmp_path / "c.jsonl", rows))
    hub({"train": rows})
    assert len(load_prompts(TLDR, source="CarperAI/openai_summarize_tldr")) == 2


# ---- openai/summarize_from_feedback ("comparisons") ----
# Verified: https://huggingface.co/datasets/openai/summarize_from_feedback summarize_from_feedback.py (comparisons
# features: info {id, post, title, subreddit, site, article}, summaries [{text, policy, note}], choice, ...) and its
# parquet export refs/convert/parquet: comparisons/train/0000.parquet, comparisons/validation/... (the "axis" config
# sits beside it, hence data_dir="comparisons").


def comparison(id, post=None, article=None, site=None, subreddit="r/relationships"):
    info = {"id": id, "post": post, "title": "a title", "subreddit": subreddit if post else None, "site": site,
            "article": article}
    return {"info": info, "summaries": [{"text": "model summary A", "policy": "sup1", "note": None},
                                        {"text": "model summary B", "policy": "ppo", "note": None}],
            "choice": 0, "worker": "w", "batch": "b1", "split": "train", "extra": {"confidence": 7}}


SFF_ROWS = [comparison("t3_a", post="Post A."), comparison("t3_a", post="Post A."), comparison("t3_b", post="Post B."),
            comparison("dm_1", article="Article one.", site="dailymail"), comparison("t3_a", post="Post A.")]


@pytest.mark.parametrize("write", [write_jsonl, write_parquet])
def test_summarize_from_feedback_file_one_prompt_per_post_no_reference(tmp_path, write):
    path = write(tmp_path / ("s.jsonl" if write is write_jsonl else "s.parquet"), SFF_ROWS)
    # The same post is compared many times: one prompt each. The summaries are policy samples, not references.
    assert pairs(load_prompts(TLDR, source=path)) == [("Post A.", None), ("Post B.", None)]
    assert pairs(load_prompts(CNNDM, source=path)) == [("Article one.", None)]  # its CNN/DM rows serve cnndm


def test_summarize_from_feedback_hub_reads_the_parquet_export(hub):
    fake = hub({"train": SFF_ROWS[:3], "validation": SFF_ROWS[3:]})
    assert pairs(load_prompts(TLDR, "all", source="openai/summarize_from_feedback")) == [("Post A.", None),
                                                                                       ("Post B.", None)]
    assert pairs(load_prompts(CNNDM, "validation", source="openai/summarize_from_feedback")) == [("Article one.", None)]
    assert fake.calls[0] == ("openai/summarize_from_feedback",
                             {"revision": "refs/convert/parquet", "data_dir": "comparisons"})


# ---- webis/tldr-17 ----
# Verified: https://huggingface.co/datasets/webis/tldr-17 README (features author, body, normalizedBody, subreddit,
# subreddit_id, id, content, summary; one split, train, 3,848,330 rows) and tldr-17.py (a loading script, which
# datasets >= 4 refuses: "Dataset scripts are no longer supported"). Its parquet export holds default/partial-train
# (the first ~5 GB); datasets' split patterns (data_files.py, "**/*[-._ 0-9]train/**") read that directory as "train".


def webis_row(i):
    return {"author": f"u{i}", "body": f"raw body {i}", "normalizedBody": f"body {i}", "subreddit": "r/tifu",
            "subreddit_id": "t5_x", "id": f"c{i}", "content": f"content {i}", "summary": f"summary {i}"}


@pytest.mark.parametrize("write", [write_jsonl, write_parquet])
def test_webis_tldr17_file(tmp_path, write):
    path = write(tmp_path / ("w.jsonl" if write is write_jsonl else "w.parquet"), [webis_row(i) for i in range(3)])
    assert pairs(load_prompts(TLDR, source=path)) == [(f"content {i}", f"summary {i}") for i in range(3)]


def test_webis_tldr17_hub_streams_its_one_split_and_holds_out_every_7th(hub):
    fake = hub({"train": [webis_row(i) for i in range(8)]})
    train = load_prompts(TLDR, "train", source="webis/tldr-17")
    val = load_prompts(TLDR, "validation", source="webis/tldr-17")
    assert [p.text for p in val] == ["content 6"]
    assert [p.text for p in train] == [f"content {i}" for i in (0, 1, 2, 3, 4, 5, 7)]
    assert len(load_prompts(TLDR, "all", source="webis/tldr-17")) == 8
    assert fake.calls[0] == ("webis/tldr-17", {"revision": "refs/convert/parquet", "data_dir": "default",
                                               "streaming": True})


# ---- cnn_dailymail 3.0.0 ----
# Verified: https://huggingface.co/datasets/abisee/cnn_dailymail (configs 1.0.0/2.0.0/3.0.0, parquet; splits train,
# validation, test; card: "id: a string containing the heximal formated SHA1 hash of the url where the story was
# retrieved from") and the former loader huggingface/datasets datasets/cnn_dailymail/cnn_dailymail.py (features
# article, highlights, id; id = the story file name = sha1(url); 3.0.0 highlights joined with "\n").

CNN_ROWS = [{"article": "LONDON, England (CNN) -- The river rose.", "highlights": "River rose .\nTown wet .", "id": "a1"},
            {"article": "Second article.", "highlights": "Second .", "id": "b2"}]


@pytest.mark.parametrize("write", [write_jsonl, write_parquet])
def test_cnn_dailymail_file(tmp_path, write):
    path = write(tmp_path / ("n.jsonl" if write is write_jsonl else "n.parquet"), CNN_ROWS)
    assert pairs(load_prompts(CNNDM, source=path)) == [(r["article"], r["highlights"]) for r in CNN_ROWS]


def test_cnn_dailymail_hub(hub):
    fake = hub({"train": CNN_ROWS[:1], "validation": CNN_ROWS[1:], "test": []})
    assert [p.text for p in load_prompts(CNNDM, "all", source="hub")] == [r["article"] for r in CNN_ROWS]
    assert fake.calls[0] == ("abisee/cnn_dailymail", {"name": "3.0.0"})


# ---- bookcorpus ----
# Verified: the hub's `bookcorpus` README (one feature, text; 74,004,228 train rows, one sentence per row) and its
# bookcorpus.py loading script (refused by datasets >= 4). SamuelYang/bookcorpus holds the same rows
# (bookcorpus-train.arrow, dataset_info.json) and its parquet export refs/convert/parquet has default/train.

SENTENCES = [f"sentence {i} ." for i in range(13)]


def test_bookcorpus_file_needs_the_schema_to_join_lines(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [{"text": s} for s in SENTENCES])
    # Without schema=, {text} rows are labkit passages: one per row.
    assert len(load_prompts(SENTIMENT, source=path)) == 13
    joined = load_prompts(SENTIMENT, source=path, schema="bookcorpus")
    assert [p.text for p in joined] == [" ".join(SENTENCES[0:6]), " ".join(SENTENCES[6:12])]  # 13th: no full passage
    parquet = write_parquet(tmp_path / "b.parquet", [{"text": s} for s in SENTENCES])
    assert load_prompts(SENTIMENT, source=parquet, schema="bookcorpus") == joined


def test_bookcorpus_hub_reads_only_the_first_rows(hub, monkeypatch):
    monkeypatch.setitem(data.HUB_SOURCES, "bookcorpus", dataclasses.replace(data.HUB_SOURCES["bookcorpus"],
                                                                            stream_rows=48))
    read = []

    def endless():  # a streamed dataset: reading past what is needed would never end
        for i in itertools.count():
            read.append(i)
            yield {"text": f"line {i} ."}
    fake = hub({"train": endless()})
    prompts = load_prompts(SENTIMENT, "all", source="hub")  # the passages default
    assert len(read) == 48 and len(prompts) == 8
    assert prompts[0].text == " ".join(f"line {i} ." for i in range(6))
    assert fake.calls[0] == ("SamuelYang/bookcorpus", {"revision": "refs/convert/parquet", "data_dir": "default",
                                                       "streaming": True})


def test_bookcorpus_splits_hold_out_every_7th_passage(hub):
    hub({"train": [{"text": f"l{i}"} for i in range(6 * 8)]})
    train, val = (load_prompts(SENTIMENT, s, source="bookcorpus") for s in ("train", "validation"))
    assert len(train) == 7 and len(val) == 1 and val[0].text.startswith("l36 ")


def test_empty_hub_rows_are_dropped_not_refused(hub):
    hub({"train": [{"text": "a"}, {"text": None}, {"text": "  "}, *({"text": f"b{i}"} for i in range(5))]})
    assert load_prompts(SENTIMENT, "all", source="bookcorpus")[0].text == "a b0 b1 b2 b3 b4"


# ---- the 2019 paper's released files ----
# Verified: openai/lm-human-preferences lm_human_preferences/datasets/books.py (book_passages/{mode}.jsonl, each line
# json.loads'd: a JSON string; modes train/test), tldr.py (tldr/{mode}-subset.json, json.load'd list; text =
# data['content'], ftfy.fix_text, re.sub(r"\n{3,}", "\n\n"), strip; modes train/valid) and cnndm.py (url_lists/
# all_{mode}.txt, modes train/val/test; story files named by hashhex(url) = sha1; clean_up_start).

BOOK_TRAIN = ["The door creaked. She waited.", "Rain fell all night.\nNobody slept."]
BOOK_TEST = ["A held-out passage."]


def released_books(tmp_path, served):
    for mode, passages in (("train", BOOK_TRAIN), ("test", BOOK_TEST)):
        path = tmp_path / f"{mode}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in passages), encoding="utf-8")
        served[data.paper_url("passages", mode)] = path


def test_released_book_passages_paper_and_local(tmp_path, downloads):
    served, asked = downloads
    released_books(tmp_path, served)
    assert [p.text for p in load_prompts(SENTIMENT, "train", source="paper")] == BOOK_TRAIN
    assert [p.text for p in load_prompts(SENTIMENT, "validation", source="paper")] == BOOK_TEST
    assert [p.text for p in load_prompts(SENTIMENT, "all", source="paper")] == BOOK_TRAIN + BOOK_TEST
    assert asked[0] == ("https://openaipublic.blob.core.windows.net/lm-human-preferences/datasets/book_passages/"
                        "train.jsonl")
    # The same file passed by hand: JSON-string lines are detected as released passages.
    assert [p.text for p in load_prompts(SENTIMENT, source=str(served[data.paper_url("passages", "test")]))] == BOOK_TEST


TLDR_TRAIN = [{"content": "I was at the caf\u00c3\u00a9.\n\n\n\nIt was \u201cfine\u201d.  ", "summary": "cafe"},
              {"content": "Second post.", "title": "t"}]
TLDR_VALID = [{"content": "\n\nA valid post.\n"}]


def test_released_tldr_subset_is_cleaned_as_released(tmp_path, downloads):
    served, asked = downloads
    for mode, rows in (("train", TLDR_TRAIN), ("valid", TLDR_VALID)):
        served[data.paper_url("tldr", mode)] = tmp_path / f"{mode}-subset.json"
        served[data.paper_url("tldr", mode)].write_text(json.dumps(rows), encoding="utf-8")
    expected_train = [("I was at the caf\u00e9.\n\nIt was \"fine\".", "cafe"), ("Second post.", None)]
    assert pairs(load_prompts(TLDR, "train", source="paper")) == expected_train  # ftfy fixes mojibake and quotes
    assert pairs(load_prompts(TLDR, "all", source="paper")) == expected_train + [("A valid post.", None)]
    assert asked[-1] == "https://openaipublic.blob.core.windows.net/lm-human-preferences/tldr/valid-subset.json"
    local = load_prompts(TLDR, source=str(served[data.paper_url("tldr", "train")]))
    assert pairs(local) == expected_train  # a {content} file without the corpus' raw columns: the released subset


def sha1(url):
    return hashlib.sha1(url.encode("utf-8")).hexdigest()


def test_cnndm_paper_matches_urls_by_sha1_in_list_order(tmp_path, downloads, hub):
    served, _ = downloads
    urls = {"train": ["http://www.cnn.com/2012/b.html", "http://www.dailymail.co.uk/news/a.html",
                      "http://www.cnn.com/2013/missing.html"],
            "val": ["http://www.cnn.com/v.html"], "test": ["http://www.dailymail.co.uk/t.html"]}
    for mode, lines in urls.items():
        served[data.paper_url("cnndm", mode)] = tmp_path / f"all_{mode}.txt"
        served[data.paper_url("cnndm", mode)].write_text("\n".join(lines) + "\n")
    # Hub rows as its builder writes them: story lines joined by spaces, " ." after lines without final punctuation.
    dm = ("By . Daily Mail Reporter . PUBLISHED: . 11:41 EST, 4 January 2013 . | . UPDATED: . 11:42 EST, 4 January "
          "2013 . Scroll down for video . The mayor\u2019s dog won a prize. Judges cheered .")
    rows = {"train": [{"id": sha1(urls["train"][1]), "article": dm, "highlights": "Dog won ."},
                      {"id": sha1(urls["train"][0]), "article": "WASHINGTON (CNN) -- Congress met.", "highlights": "Met ."},
                      {"id": "not-in-any-list", "article": "x", "highlights": "y"}],
            "validation": [{"id": sha1(urls["val"][0]), "article": "(CNN) Val story.", "highlights": "V ."}],
            "test": [{"id": sha1(urls["test"][0]), "article": "Test story.", "highlights": "T ."}]}
    fake = hub(rows)
    with pytest.warns(UserWarning, match="1 CNN/DM URLs .* have no row"):
        train = load_prompts(CNNDM, "train", source="paper")
    # In the URL list's order (not the hub's), cleaned as the released cnndm.py cleans a story.
    assert pairs(train) == [("Congress met.", "Met ."),
                            ("Scroll down for video\nThe mayor's dog won a prize. Judges cheered", "Dog won .")]
    assert fake.calls[0] == ("abisee/cnn_dailymail", {"name": "3.0.0"})
    assert [p.text for p in load_prompts(CNNDM, "validation", source="paper")] == ["Val story."]
    with pytest.warns(UserWarning):
        assert len(load_prompts(CNNDM, "all", source="paper")) == 4


def test_clean_up_start_on_story_lines():
    # As a released story file has it, one line per line.
    assert data._clean_up_start("By\nJane Doe\nPUBLISHED: 10:00\n|\nUPDATED:\n10:05 EST, 2 May 2014\nBody.") == "Body."
    assert data._clean_up_start("and more\nBody.") == "Body."
    assert data._clean_up_start("Dateline (CNN) Body.") == "Body."  # a "(CNN)" in the first 100 characters
    assert data._clean_up_start("PARIS, France (CNN) -- It\u2018s on.") == "It's on."


# ---- labkit's own columns ----


@pytest.mark.parametrize("write", [write_jsonl, write_parquet])
def test_labkit_columns(tmp_path, write):
    path = write(tmp_path / ("l.jsonl" if write is write_jsonl else "l.parquet"),
                 [{"article": "An article.", "highlights": "Short."}, {"article": "Another.", "highlights": ""}])
    assert pairs(load_prompts(CNNDM, source=path)) == [("An article.", "Short."), ("Another.", None)]


# ---- columns= ----


def test_columns_maps_any_file(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("body,tldr,extra\nmy long post,my tldr,x\nsecond post,,y\n")
    prompts = load_prompts(TLDR, source=str(path), columns={"text": "body", "reference": "tldr"})
    assert pairs(prompts) == [("my long post", "my tldr"), ("second post", None)]
    assert pairs(load_prompts(SENTIMENT, source=str(path), columns={"text": "extra"})) == [("x", None), ("y", None)]


@pytest.mark.parametrize("columns, match", [
    (["body"], r"columns= must be a mapping like \{'text': 'my_text_col'"),
    ({"reference": "tldr"}, "columns= must name the text column"),
    ({"text": "body", "summary": "tldr"}, r"unknown keys \['summary'\]: it takes 'text' and optionally 'reference'"),
    ({"text": ""}, r"columns\['text'\] must be a column name"),
    ({"text": "nope"}, r"line 2 has columns \['body', 'tldr'\], but columns= names the text column 'nope'"),
    ({"text": "body", "reference": "summary"}, r"names the reference column 'summary', but no row has it"),
])
def test_bad_columns_mapping(tmp_path, columns, match):
    path = tmp_path / "mine.csv"
    path.write_text("body,tldr\nmy post,my tldr\n")
    with pytest.raises(ValueError, match=match):
        load_prompts(TLDR, source=str(path), columns=columns)


def test_columns_and_schema_are_for_local_files_only(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"post": "p"}])
    with pytest.raises(ValueError, match="not both"):
        load_prompts(TLDR, source=path, columns={"text": "post"}, schema="labkit")
    with pytest.raises(ValueError, match="source='hub' has a known schema"):
        load_prompts(TLDR, source="hub", columns={"text": "post"})
    with pytest.raises(ValueError, match=r"schema='reddit' is not a known schema; known: labkit, trl-lib/tldr"):
        load_prompts(TLDR, source=path, schema="reddit")


# ---- clear errors ----


def test_unknown_source_lists_the_named_sources(tmp_path):
    missing = tmp_path / "typo.jsonl"
    with pytest.raises(FileNotFoundError, match=r"'openai/summarize_from_feedback'.*the path .*typo.jsonl does not exist"):
        load_prompts(TLDR, source=str(missing))
    with pytest.raises(FileNotFoundError, match=r"not a named source \('demo', 'paper', 'hub', 'bookcorpus'"):
        load_prompts(TLDR, source="trl-lib/tldr-typo")


def test_unmatched_columns_name_what_was_found_and_what_is_known(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"body": "a", "tldr": "b"}, {"body": "c", "score": 1}])
    with pytest.raises(ValueError) as info:
        load_prompts(TLDR, source=path)
    message = str(info.value)
    for part in ("its rows have the columns ['body', 'score', 'tldr']", "need the column post (and optionally summary)",
                 "trl-lib/tldr (prompt, completion)", "CarperAI/openai_summarize_tldr (prompt, label)",
                 "webis/tldr-17 (content, summary", "columns={'text':"):
        assert part in message, part


def test_a_schema_that_does_not_fit_the_task_is_refused(tmp_path, hub):
    path = write_jsonl(tmp_path / "t.jsonl", TRL_ROWS)
    with pytest.raises(ValueError, match=r"in the trl-lib/tldr schema .*Reddit posts: not prompts for the 'sentiment' "
                                         r"task, whose prompts are 'passages'"):
        load_prompts(SENTIMENT, source=path)
    with pytest.raises(ValueError, match="bookcorpus schema .* not prompts for the 'tldr' task"):
        load_prompts(TLDR, source=write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}] * 6), schema="bookcorpus")
    with pytest.raises(ValueError, match="source 'cnn_dailymail' is in the cnn_dailymail schema"):
        load_prompts(TLDR, source="cnn_dailymail")  # refused before anything is loaded
    with pytest.raises(ValueError, match="lm-human-preferences/book_passages schema .* 'cnndm'"):
        load_prompts(CNNDM, source=write_jsonl(tmp_path / "s.jsonl", ["a passage"]))


def test_empty_text_in_a_local_file_is_refused_naming_the_row(tmp_path):
    rows = [comparison("t3_a", post="Post A."), comparison("t3_b", post="  ")]
    with pytest.raises(ValueError, match=r"line 2: info.post is only whitespace; every row needs text"):
        load_prompts(TLDR, source=write_jsonl(tmp_path / "s.jsonl", rows))
    with pytest.raises(ValueError, match=r"has 5 lines with text, but the bookcorpus schema joins 6"):
        load_prompts(SENTIMENT, source=write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}] * 5), schema="bookcorpus")


def test_hub_failure_says_what_to_do_offline(monkeypatch):
    def offline(path, **kwargs):
        raise ConnectionError("Couldn't reach 'trl-lib/tldr' on the Hub")
    monkeypatch.setattr(data, "_load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"Could not load the trl-lib/tldr dataset .*ConnectionError.*"
                                           r"Without internet use source='demo'"):
        load_prompts(TLDR, source="hub")


def test_a_missing_split_is_named(hub):
    hub({"train": SFF_ROWS})
    with pytest.raises(ValueError, match=r"has no validation split \(it has \['train'\]\)"):
        load_prompts(TLDR, "validation", source="openai/summarize_from_feedback")


# ---- _download ----


class Response(io.BytesIO):
    def __init__(self, body, length=None):
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body) if length is None else length)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_once_into_the_cache_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    opened = []
    monkeypatch.setattr(data.urllib.request, "urlopen",
                        lambda url, timeout: opened.append((url, timeout)) or Response(b'"a passage"\n'))
    url = data.paper_url("passages", "test")
    path = data._download(url)
    assert path == tmp_path / "lm-human-preferences/datasets/book_passages/test.jsonl"
    assert path.read_bytes() == b'"a passage"\n' and data._download(url) == path
    assert opened == [(url, data.DOWNLOAD_TIMEOUT_S)]  # once
    assert not list(tmp_path.rglob("*.part"))


@pytest.mark.parametrize("failure", ["offline", "truncated"])
def test_download_failure_says_to_fetch_it_by_hand(tmp_path, monkeypatch, failure):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))

    def urlopen(url, timeout):
        if failure == "offline":
            raise urllib.error.URLError("Name or service not known")
        return Response(b'"half', length=100)
    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    url = data.paper_url("tldr", "train")
    with pytest.raises(RuntimeError, match=rf"Could not download {url} .*Download it by hand .* save it as "
                                           rf".*tldr/train-subset.json"):
        load_prompts(TLDR, source="paper")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # neither a truncated file nor a .part is left


def test_prompt_is_unchanged():
    assert Prompt("x") == Prompt(text="x", reference=None)
