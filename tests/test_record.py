"""benchmarks/record.py: each result is tagged with the commit whose code produced it."""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import record  # noqa: E402


def git(repo, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_the_commit_tag_says_dirty_when_code_differs_but_not_for_new_results(tmp_path, monkeypatch):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "b.jsonl").write_text("{}\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "first")
    head = git(tmp_path, "rev-parse", "--short", "HEAD")
    monkeypatch.setattr(record, "ROOT", tmp_path)
    assert record._commit() == head
    with open(tmp_path / "benchmarks" / "results" / "b.jsonl", "a") as f:  # a benchmark appending its line
        f.write("{}\n")
    assert record._commit() == head
    (tmp_path / "code.py").write_text("x = 2\n")  # measured on code the commit does not hold
    assert record._commit() == head + "-dirty"
