"""Bad input and damaged files: each is refused with a message that says what is wrong and what to do, and a
refused input changes nothing on disk (the label store's rows and bytes, the prompt file)."""

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from labkit.data import load_prompts
from labkit.labeling.store import LabelStore, LabelStoreError
from labkit.tasks import SENTIMENT, TLDR

N_LABELS = 300


def sha256(*paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes() if Path(p).exists() else b"<missing>")
    return h.hexdigest()


def build_store(path, n=N_LABELS):
    with LabelStore(path) as store:
        ids = store.add_comparisons([dict(task="sentiment", query=f"query {i} " * 20,
                                          responses=[f"response {j} " * 8 for j in range(4)]) for i in range(n)])
        store.record_labels([dict(comparison_id=c, best=i % 4, labeler="ann") for i, c in enumerate(ids)])
    return ids


@pytest.fixture(scope="module")
def store_bytes(tmp_path_factory):
    """The bytes of a closed store of N_LABELS labels (built once: each test writes its own copy)."""
    path = tmp_path_factory.mktemp("built") / "labels.db"
    build_store(path)
    assert not Path(f"{path}-wal").exists()  # closed cleanly: everything is in the file
    return path.read_bytes()


# ---- damaged files are refused before anything is written ----

def _garbage_mid_page(raw):
    mid = len(raw) // 2 // 4096 * 4096  # a page boundary in the middle (pages are 4 KiB)
    return raw[:mid] + bytes(range(256)) * 16 + raw[mid + 4096:]


DAMAGE = {
    "4 KiB of garbage mid-file": (_garbage_mid_page, "is damaged"),
    "truncated to half": (lambda raw: raw[: len(raw) // 2], "is damaged"),
    "last page cut off": (lambda raw: raw[:-4096], "is damaged"),
    "last 100 bytes cut off": (lambda raw: raw[:-100], "is damaged"),
    "only the 100-byte header left": (lambda raw: raw[:100], "is damaged"),
    "a CSV renamed .db": (lambda raw: b"post,summary\nhello,world\n", "is not an SQLite database"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_file_is_refused_unchanged(tmp_path, store_bytes, damage):
    make, match = DAMAGE[damage]
    path = tmp_path / "labels.db"
    path.write_bytes(make(store_bytes))
    before = sha256(path)
    with pytest.raises(LabelStoreError, match=match) as info:
        LabelStore(path)
    message = str(info.value)
    assert str(path) in message and "not changed" in message
    if match == "is damaged":
        assert "nothing was written" in message.lower() and "backup" in message
        assert ".recover" in message
    assert sha256(path) == before
    # SQLite's read-only open may leave an empty -wal (and a -shm) beside it: neither can change the file
    assert not Path(f"{path}-journal").exists()
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    with pytest.raises(LabelStoreError, match=match):  # and it stays refused
        LabelStore(path, read_only=True)
    assert sha256(path) == before


def test_healthy_copy_opens_after_the_check(tmp_path, store_bytes):
    path = tmp_path / "labels.db"
    path.write_bytes(store_bytes)
    with LabelStore(path) as store:
        assert store.count_labels() == N_LABELS and store.integrity_check() == "ok"


def test_zero_length_file_with_a_wal_beside_it_is_refused(tmp_path):
    # SQLite would delete a log it finds beside an empty file; that log may hold every label.
    path, wal = tmp_path / "labels.db", tmp_path / "labels.db-wal"
    path.touch()
    wal.write_bytes(b"\x37\x7f\x06\x82" + bytes(4000))
    before = sha256(path, wal)
    with pytest.raises(LabelStoreError, match=r"is empty, but its write-ahead log labels.db-wal holds 4,004 bytes"):
        LabelStore(path)
    assert sha256(path, wal) == before


def test_zero_length_file_becomes_a_store_but_has_nothing_to_read(tmp_path):
    # A zero-length file (tempfile.mkstemp makes them) holds nothing to lose, so it becomes a new store;
    # read-only, there is nothing to read.
    path = tmp_path / "labels.db"
    path.touch()
    with pytest.raises(LabelStoreError, match="is empty: it holds no labels to read"):
        LabelStore(path, read_only=True)
    assert path.stat().st_size == 0
    with LabelStore(path) as store:
        assert store.integrity_check() == "ok" and store.count_labels() == 0


def test_integrity_check_on_a_store_damaged_while_open(tmp_path, store_bytes):
    path = tmp_path / "labels.db"
    path.write_bytes(store_bytes)
    store = LabelStore(path)
    path.write_bytes(_garbage_mid_page(store_bytes))  # e.g. a failing disk, or a sync tool overwriting it
    with pytest.raises(LabelStoreError, match=r"is damaged.*Restore it from a backup"):
        store.integrity_check()
    store.close()


def test_crashed_transaction_is_rolled_back_then_checked(tmp_path):
    """A store in rollback-journal mode (a first session can stay in it) left mid-transaction by a crash: the
    read-only check cannot roll the journal back, so SQLite's own recovery runs on the writable open, and the
    file is checked after it."""
    path = tmp_path / "labels.db"
    build_store(path, n=20)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    conn.close()
    crash = (f"import sqlite3, os\nc = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
             "c.execute('PRAGMA cache_size=1'); c.execute('BEGIN')\n"
             "for i in range(500): c.execute(\"INSERT INTO comparisons (task, query, query_tokens, k, responses, "
             "response_tokens, sources, created_at) VALUES ('t', ?, '[]', 2, '[]', '[]', '[]', 0)\", ('q' * 900,))\n"
             "os._exit(0)\n")  # dies holding an unfinished transaction, part of it already in the file
    subprocess.run([sys.executable, "-c", crash], check=True)
    assert Path(f"{path}-journal").stat().st_size > 0
    before = sha256(path)
    with pytest.raises(LabelStoreError, match=r"unfinished.*Open it once with LabelStore\(path\)"):
        LabelStore(path, read_only=True)
    assert sha256(path) == before
    with LabelStore(path) as store:
        assert store.count_labels() == 20 and len(store.comparisons()) == 20
        assert store.integrity_check() == "ok"


# ---- read-only files and folders ----

@pytest.fixture
def shared_dir():
    """A folder another user can reach (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="labkit-ro-"))
    d.chmod(0o755)
    if any(not p.stat().st_mode & 0o001 for p in d.parents):
        shutil.rmtree(d)
        pytest.skip(f"another user cannot reach {d} (TMPDIR is private)")
    yield d
    d.chmod(0o755)
    shutil.rmtree(d)


def as_unprivileged(fn):
    """fn() where permission bits apply. Tests usually run as root, which ignores them: then fn runs in a
    forked child that has become user nobody. fn returns something JSON can carry back."""
    if os.geteuid() != 0:
        return fn()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = fn()
        except BaseException as e:  # noqa: BLE001 - the parent's assertions say what went wrong
            out = f"child failed: {type(e).__name__}: {e}"
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def _attempts(path):
    """What a user without write permission sees: opening for writing, the same with the permission pre-check
    fooled (so SQLite's own refusal is what gets explained), and reading with read_only=True."""
    out = {}
    try:
        LabelStore(path).close()
        out["open"] = "opened"
    except LabelStoreError as e:
        out["open"] = str(e)
    real_access = os.access
    os.access = lambda *a, **k: True  # as where access() is wrong (e.g. NFS with root squash)
    try:
        with LabelStore(path) as store:  # in a writable folder SQLite opens the file read-only, silently
            store.record_label(1, 0, "bob")
        out["sqlite"] = "wrote"
    except LabelStoreError as e:
        out["sqlite"] = str(e)
    finally:
        os.access = real_access
    with LabelStore(path, read_only=True) as store:
        out["labels"] = store.count_labels()
        try:
            store.record_label(1, 0, "bob")
        except LabelStoreError as e:
            out["write"] = str(e)
    return out


@pytest.mark.parametrize("what", ["folder and file read-only", "file read-only, folder writable"])
def test_read_only_store(shared_dir, what):
    path = shared_dir / "labels.db"
    build_store(path, n=5)
    path.chmod(0o444)
    if what.startswith("folder"):
        shared_dir.chmod(0o555)
    elif os.geteuid() == 0:
        os.chown(shared_dir, 65534, 65534)  # nobody may create the -wal and -shm beside the file
    before, files = sha256(path), sorted(os.listdir(shared_dir))
    out = as_unprivileged(lambda: _attempts(path))
    assert isinstance(out, dict), out
    assert out["open"] == f"{path} is read-only: the file or its folder cannot be written. Nothing was written " \
                          "to it. To add labels, copy it (with its -wal file, if any) somewhere writable and open " \
                          "the copy; to only read it, open it with LabelStore(path, read_only=True)."
    assert out["sqlite"].startswith(f"{path} is read-only: SQLite says attempt to write a readonly database")
    assert out["labels"] == 5
    assert "is open read-only (read_only=True)" in out["write"]
    assert sha256(path) == before
    if what.startswith("folder"):
        assert sorted(os.listdir(shared_dir)) == files  # read as immutable: not even a -shm
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0


def test_read_only_needs_an_existing_file(tmp_path):
    with pytest.raises(LabelStoreError, match="does not exist; read_only=True opens an existing label store"):
        LabelStore(tmp_path / "nope" / "labels.db", read_only=True)
    assert list(tmp_path.iterdir()) == []


WRITES = {
    "add_comparison": lambda s: s.add_comparison("t", "q", ["a", "b"]),
    "add_comparisons": lambda s: s.add_comparisons([dict(task="t", query="q", responses=["a", "b"])]),
    "record_label": lambda s: s.record_label(1, 0, "bob"),
    "record_labels": lambda s: s.record_labels([dict(comparison_id=1, best=0, labeler="bob")]),
    "record_skip": lambda s: s.record_skip(1, "bob"),
    "undo": lambda s: s.undo("ann"),
    "retract_label": lambda s: s.retract_label(2, "ann"),
}


@pytest.mark.parametrize("write", WRITES)
def test_read_only_mode_refuses_every_write(tmp_path, store_bytes, write):
    path = tmp_path / "labels.db"
    path.write_bytes(store_bytes)
    with LabelStore(path, read_only=True) as store:
        assert store.count_labels() == N_LABELS  # reads work
        with pytest.raises(LabelStoreError, match=r"open read-only \(read_only=True\).*LabelStore\(path\) to add"):
            WRITES[write](store)
        assert store.count_labels() == N_LABELS
    assert path.read_bytes() == store_bytes


# ---- durability settings ----

@pytest.mark.parametrize("read_only", [False, True])
def test_every_connection_syncs_at_each_commit(tmp_path, store_bytes, read_only):
    # FULL (2) or EXTRA (3): a commit is on disk when it returns. A SIGKILL test cannot tell this from OFF
    # (the OS still holds the page), a power cut can: so it is asserted here, on the read and the write path.
    path = tmp_path / "labels.db"
    path.write_bytes(store_bytes)
    with LabelStore(path, read_only=read_only) as store:
        with store._read() as db:
            assert db.execute("PRAGMA synchronous").fetchone()[0] in (2, 3)
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        if not read_only:
            with store._write() as db:
                assert db.execute("PRAGMA synchronous").fetchone()[0] == 3


# ---- record-time validation: refused before any write ----

@pytest.fixture
def small_store(tmp_path):
    with LabelStore(tmp_path / "labels.db") as store:
        store.add_comparison("sentiment", "a query", ["r0", "r1", "r2", "r3"])  # id 1, k = 4
        store.record_label(1, 2, "ann")
        yield store


def snapshot(store):
    """Every row count, and the bytes of the file and its log: a committed write changes the log."""
    with store._read() as db:
        counts = [db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("comparisons", "labels", "skips", "retractions")]
    return counts, sha256(store.path, f"{store.path}-wal")


def _comparison(**kw):
    return dict(task="sentiment", query="a query", responses=["r0", "r1"]) | kw


BAD_CALLS = {
    "empty query": (lambda s: s.add_comparison("t", "", ["a", "b"]), ValueError, r"query is empty \(''\)"),
    "whitespace query": (lambda s: s.add_comparison("t", " \n\t", ["a", "b"]), ValueError,
                         "query is only whitespace"),
    "empty response": (lambda s: s.add_comparison("t", "q", ["a", ""]), ValueError,
                       r"responses\[1\] is empty and has no tokens"),
    "empty query_tokens": (lambda s: s.add_comparison("t", "q", ["a", "b"], query_tokens=[]), ValueError,
                           "query_tokens is an empty list"),
    "blank task": (lambda s: s.add_comparison("  ", "q", ["a", "b"]), ValueError, "task must be a non-empty"),
    "NaN in extra": (lambda s: s.add_comparison("t", "q", ["a", "b"], extra={"x": float("nan")}), ValueError,
                     "JSON-serialisable"),
    "best=True": (lambda s: s.record_label(1, True, "bob"), ValueError, r"best must be an int .*got True \(bool\)"),
    "best=1.0": (lambda s: s.record_label(1, 1.0, "bob"), ValueError, r"best must be an int .*got 1.0 \(float\)"),
    "best='1'": (lambda s: s.record_label(1, "1", "bob"), ValueError, r"best must be an int .*got '1' \(str\)"),
    "best=4 of k=4": (lambda s: s.record_label(1, 4, "bob"), ValueError, r"best=4 is out of range.*0\.\.3"),
    "best=-1": (lambda s: s.record_label(1, -1, "bob"), ValueError, "best=-1 is out of range"),
    "numpy bool best": (lambda s: s.record_label(1, np.bool_(True), "bob"), ValueError, "best must be an int"),
    "empty labeler": (lambda s: s.record_label(1, 0, ""), ValueError, "labeler must be a non-empty string"),
    "blank labeler": (lambda s: s.record_label(1, 0, "  "), ValueError, "labeler must be a non-empty string"),
    "unknown comparison": (lambda s: s.record_label(99, 0, "bob"), KeyError, "no comparison with id 99"),
    "comparison id as str": (lambda s: s.record_label("1", 0, "bob"), ValueError,
                             r"comparison_id must be an int id .*got '1'"),
    "shown_at as str": (lambda s: s.record_label(1, 0, "bob", shown_at="yesterday"), ValueError,
                        "shown_at must be a unix time"),
    "permutation as str": (lambda s: s.record_label(1, 0, "bob", permutation="0123"), ValueError,
                           "permutation must be a list of ints"),
    "skip: empty labeler": (lambda s: s.record_skip(1, ""), ValueError, "labeler must be a non-empty string"),
    "skip: unknown comparison": (lambda s: s.record_skip(7, "bob"), KeyError, "no comparison with id 7"),
    "retract: empty labeler": (lambda s: s.retract_label(2, ""), ValueError, "labeler must be a non-empty"),
    "batch: bad best at item 2": (
        lambda s: s.record_labels([dict(comparison_id=1, best=b, labeler="bob") for b in (0, 1, 9, 3)]),
        ValueError, "^item 2: best=9 is out of range"),
    "batch: unknown id at item 1": (
        lambda s: s.record_labels([dict(comparison_id=c, best=0, labeler="bob") for c in (1, 5)]),
        KeyError, "item 1: no comparison with id 5"),
    "batch: unknown key at item 1": (
        lambda s: s.record_labels([dict(comparison_id=1, best=0, labeler="bob"),
                                   dict(comparison_id=1, bset=0, labeler="bob")]),
        TypeError, "item 1: .*'bset'.*expected keys comparison_id, best, labeler"),
    "batch: empty labeler at item 1": (
        lambda s: s.record_labels([dict(comparison_id=1, best=0, labeler=x) for x in ("bob", "")]),
        ValueError, "item 1: labeler must be"),
    "comparisons batch: empty query at item 2": (
        lambda s: s.add_comparisons([_comparison(), _comparison(), _comparison(query="")]),
        ValueError, "item 2: query is empty"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_record_arguments_change_nothing(small_store, case):
    call, error, match = BAD_CALLS[case]
    before = snapshot(small_store)
    with pytest.raises(error, match=match):
        call(small_store)
    assert snapshot(small_store) == before


def test_numpy_ints_and_token_only_responses_are_accepted(small_store):
    cid = small_store.add_comparison("t", "q", ["a", ""], response_tokens=[[1], [50256]])  # decodes to nothing
    [lid] = small_store.record_labels([dict(comparison_id=np.int64(cid), best=np.int32(1), labeler="bob",
                                            permutation=np.array([1, 0]))])
    label = small_store.labels(labeler="bob")[0]
    assert (label.id, label.comparison_id, label.best, label.permutation) == (lid, cid, 1, [1, 0])
    assert type(label.best) is int


class Tok:
    """100 ids, each written <id>: encode(decode(ids)) == ids, as import_openai_labels checks."""

    def __len__(self):
        return 100

    def decode(self, ids, **kwargs):
        return " ".join(f"<{i}>" for i in ids)

    def encode(self, text, add_special_tokens=True):
        return [int(i) for i in re.findall(r"<(\d+)>", text)]


OPENAI_ROW = {"query": [1, 2], "sample0": [3], "sample1": [4], "sample2": [5], "sample3": [6], "best": 1}
BAD_IMPORTS = {
    "empty query tokens": ([OPENAI_ROW, dict(OPENAI_ROW, query=[])], {}, r"row 1: query is an empty token list"),
    "empty sample": ([dict(OPENAI_ROW, sample2=[])], {}, r"row 0: sample2 is an empty token list"),
    "best=True": ([OPENAI_ROW, dict(OPENAI_ROW, best=True)], {}, r"row 1: best=True must be an int in 0\.\.3"),
    "best=1.0": ([dict(OPENAI_ROW, best=1.0)], {}, r"row 0: best=1.0 must be an int"),
    "empty list": ([], {}, "holds an empty list: no labels to import"),
    "empty labeler": ([OPENAI_ROW], {"labeler": ""}, "labeler must be a non-empty string"),
}


@pytest.mark.parametrize("case", BAD_IMPORTS)
def test_bad_openai_import_changes_nothing(small_store, tmp_path, case):
    rows, kwargs, match = BAD_IMPORTS[case]
    path = tmp_path / "offline.json"
    path.write_text(json.dumps(rows))
    before = snapshot(small_store)
    with pytest.raises((LabelStoreError, ValueError), match=match):
        small_store.import_openai_labels(path, Tok(), task="sentiment", **kwargs)
    assert snapshot(small_store) == before


# ---- prompt files ----

def _parquet(rows):
    import pyarrow
    import pyarrow.parquet

    def write(path):
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return write


BAD_PROMPT_FILES = {
    "empty .jsonl": ("p.jsonl", b"", TLDR, r"p.jsonl has no rows \(it is empty"),
    "blank lines only": ("p.jsonl", b"\n  \n\t\n", TLDR, "has no rows"),
    "empty .csv": ("p.csv", b"", TLDR, "has no rows"),
    "header-only .csv": ("p.csv", b"post,summary\n", TLDR, r"has no rows \(it is empty, or only a header line\)"),
    "empty JSON list": ("p.json", b"[]", TLDR, "has no rows"),
    "malformed JSON line": ("p.jsonl", b'{"post": "a"}\n\n{"post": "b",}\n', TLDR,
                            r"p.jsonl, line 3: not valid JSON \(Expecting property name.*column 14\)"),
    "malformed .json list": ("p.json", b'[\n{"post": "a"},\n{"post" "b"}\n]', TLDR,
                             r"p.json, line 3: not valid JSON \(Expecting ':' delimiter"),
    "latin-1 .jsonl": ("p.jsonl", '{"post": "ok"}\n{"post": "café"}\n'.encode("latin-1"), TLDR,
                       r"is not UTF-8 text: line 2 \(byte offset 28\) has the byte b'\\xe9'.*Save it as UTF-8"),
    "latin-1 .csv": ("p.csv", "post\nok\nna\xefve\n".encode("latin-1"), TLDR,
                     r"is not UTF-8 text: line 3 .*Save it as UTF-8"),
    "empty CSV cell": ("p.csv", b"post,summary\nfine,s\n,s2\n", TLDR,
                       r"p.csv, line 3: column 'post' is empty; every row needs a post"),
    "JSON null text": ("p.jsonl", b'{"post": "a"}\n{"post": null, "summary": "s"}\n', TLDR,
                       r"line 2: column 'post' is empty \(null\)"),
    "whitespace-only text": ("p.jsonl", b'{"text": "fine."}\n{"text": "  \\n "}\n', SENTIMENT,
                             "line 2: column 'text' is only whitespace"),
    "missing text column": ("p.csv", b"body,tldr\nsome text,short\n", TLDR,
                            (r"line 2 has columns \['body', 'tldr'\], but prompts for 'tldr' tasks need the column "
                             r"post \(and optionally summary\)")),
    "a JSON line that is a list": ("p.jsonl", b'["a post"]\n', TLDR, r"line 1: expected an object with the column"),
    "CSV row with an extra cell": ("p.csv", b"post,summary\na, b, c\n", TLDR,
                                   r"line 2 has 3 cells but the header has 2"),
    "text holding a list": ("p.jsonl", b'{"post": ["a", "b"]}\n', TLDR, "column 'post' holds a list, expected text"),
    "JSON list item without the column": ("p.json", b'[{"post": "a"}, {"summary": "b"}]', TLDR,
                                          r"item 1 of the list has columns \['summary'\]"),
    "parquet null": ("p.parquet", _parquet([{"post": "a"}, {"post": None}]), TLDR,
                     r"row 1: column 'post' is empty \(null\)"),
    "not parquet": ("p.parquet", b"post,summary\na,b\n", TLDR, "cannot be read as Parquet"),
}


@pytest.mark.parametrize("case", BAD_PROMPT_FILES)
def test_bad_prompt_file_names_the_problem(tmp_path, case):
    name, content, task, match = BAD_PROMPT_FILES[case]
    path = tmp_path / name
    content(path) if callable(content) else path.write_bytes(content)
    before = sha256(path)
    with pytest.raises(ValueError, match=match) as info:
        load_prompts(task, source=str(path))
    assert str(path) in str(info.value)
    assert sha256(path) == before


def test_valid_csv_keeps_text_verbatim_and_blank_references_are_none(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes('\ufeffpost,summary\n"a post, with a comma\nand a newline",\n007,NA\n'.encode())
    prompts = load_prompts(TLDR, source=str(path))
    assert [(p.text, p.reference) for p in prompts] == [("a post, with a comma\nand a newline", None), ("007", "NA")]
