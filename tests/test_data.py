import json

import pytest

from labkit.data import load_prompts
from labkit.tasks import CNNDM, SENTIMENT, TLDR


def _words(s):
    return len(s.split())


def test_demo_set_sizes_and_shapes():
    passages = load_prompts(SENTIMENT, split="all")
    posts = load_prompts(TLDR, split="all")
    articles = load_prompts(CNNDM, split="all")
    assert len(passages) >= 300 and len(posts) >= 60 and len(articles) >= 40
    assert all(p.text.endswith(".") for p in passages)
    assert all(120 <= _words(p.text) <= 400 and p.reference for p in posts)
    assert all(250 <= _words(p.text) <= 600 and 2 <= len(p.reference.split("\n")) <= 4 for p in articles)
    assert len({p.text for p in passages}) == len(passages)


def test_demo_splits_are_disjoint_and_cover_everything():
    for task in (SENTIMENT, TLDR, CNNDM):
        train = load_prompts(task, "train")
        val = load_prompts(task, "validation")
        assert train and val and not ({p.text for p in train} & {p.text for p in val})
        assert len(train) + len(val) == len(load_prompts(task, "all"))


def test_local_file_with_the_same_columns(tmp_path):
    path = tmp_path / "posts.jsonl"
    path.write_text("\n".join(json.dumps({"post": f"post {i}", "summary": f"sum {i}"}) for i in range(3)))
    prompts = load_prompts(TLDR, source=str(path))
    assert [p.reference for p in prompts] == ["sum 0", "sum 1", "sum 2"]


def test_wrong_columns_name_the_expected_ones(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("body,tldr\nsome text,short\n")
    with pytest.raises(ValueError, match="post"):
        load_prompts(TLDR, source=str(path))
    with pytest.raises(ValueError, match="split"):
        load_prompts(TLDR, split="test")
