"""The label store: round trips, validation, undo, agreement, datasets, and above all that no acknowledged
label is ever lost (SIGKILL mid-write, two processes, four threads) and no foreign file is ever touched."""

import hashlib
import json
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import labkit.labeling.store
from labkit.labeling.store import AlreadyLabeledError, Comparison, Label, LabelStore, LabelStoreError

LABELS_PY = Path(labkit.labeling.store.__file__)

# A child process that records N labels and prints each id once record_label has returned, i.e. once the
# store says it is committed. It loads labels.py by path, so it starts fast whatever labkit/__init__ imports.
CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("labels_under_test", sys.argv[1])
labels = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = labels
spec.loader.exec_module(labels)
store = labels.LabelStore(sys.argv[2])
labeler, n = sys.argv[3], int(sys.argv[4])
for i in range(n):
    cid = store.add_comparison("durability", f"query {i}", ["a", "b", "c", "d"], sources="rho")
    label_id = store.record_label(cid, i % 4, labeler, permutation=[3, 2, 1, 0], shown_at=1.0)
    print(label_id, flush=True)
"""


@pytest.fixture
def store(tmp_path):
    with LabelStore(tmp_path / "labels.db") as s:
        yield s


def add(store, task="sentiment", k=4, kind="train", **kw):
    return store.add_comparison(task, f"query of {task}", [f"response {i}" for i in range(k)], kind=kind, **kw)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def child_script(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return script


# ---- round trips and validation ----

def test_comparison_round_trip(tmp_path):
    path = tmp_path / "new" / "dir" / "labels.db"  # parent folders are created
    with LabelStore(path) as store:
        cid = store.add_comparison(
            "tldr", "Post: ...\n\nTL;DR:", ["one", "two", "three"], query_tokens=[5, 6],
            response_tokens=[[1], [2, 3], []], sources=["rho", "rho", "policy@step12"], kind="validation",
            reference="the reference", extra={"seed": 3, "note": "ü"},
        )
    with LabelStore(path) as store:  # reopening keeps everything
        c = store.comparison(cid)
        assert c == Comparison(cid, "tldr", "validation", "Post: ...\n\nTL;DR:", [5, 6], ["one", "two", "three"],
                               [[1], [2, 3], []], ["rho", "rho", "policy@step12"], "the reference",
                               {"seed": 3, "note": "ü"}, c.created_at)
        assert c.k == 3 and abs(c.created_at - time.time()) < 60
        assert store.comparisons(task="tldr") == [c]
        assert store.comparisons(task="tldr", kind="train") == []
        assert store.comparisons(task="other") == []
        assert store.integrity_check() == "ok"


def test_defaults_and_batch_insert(store):
    ids = store.add_comparisons([
        dict(task="sentiment", query="q0", responses=["a", "b"]),
        dict(task="sentiment", query="q1", responses=["c", "d"], sources="policy@step3", kind="eval"),
    ])
    c0, c1 = store.comparison(ids[0]), store.comparison(ids[1])
    assert (c0.kind, c0.sources, c0.query_tokens, c0.response_tokens, c0.reference, c0.extra) == (
        "train", ["unknown", "unknown"], [], [[], []], None, {})
    assert c1.sources == ["policy@step3"] * 2 and c1.kind == "eval"
    # A bad item rejects the whole batch: nothing half-written.
    with pytest.raises(ValueError, match="item 1"):
        store.add_comparisons([dict(task="t", query="q", responses=["a", "b"]),
                               dict(task="t", query="q", responses=["a"])])
    assert len(store.comparisons()) == 2


def test_label_round_trip(store):
    cid = add(store)
    label_id = store.record_label(cid, 2, "alice", permutation=[2, 0, 3, 1], shown_at=100.0, note="close call")
    [label] = store.labels()
    assert label == Label(label_id, cid, 2, [2, 0, 3, 1], "alice", 100.0, label.submitted_at, "close call")
    assert abs(label.submitted_at - time.time()) < 60
    assert store.record_label(cid, 0, "bob") > label_id
    assert store.labels(labeler="bob")[0].permutation == [0, 1, 2, 3]  # default: shown in stored order
    assert store.seconds_per_label(labeler="alice") == [pytest.approx(label.submitted_at - 100.0)]
    assert store.seconds_per_label(labeler="bob") == []  # no shown_at, no timing


@pytest.mark.parametrize("kwargs, match", [
    (dict(responses=["only one"]), "at least 2 responses"),
    (dict(responses="ab"), "list of strings"),
    (dict(response_tokens=[[1], [2], [3]]), "3 entries but there are 2 responses"),
    (dict(response_tokens=[[1.5], [2]]), "token ids"),
    (dict(sources=["rho"]), "one per response"),
    (dict(task=""), "task must be"),
    (dict(extra={"x": object()}), "JSON"),
])
def test_add_comparison_rejects_bad_input(store, kwargs, match):
    args = dict(task="t", query="q", responses=["a", "b"]) | kwargs
    with pytest.raises(ValueError, match=match):
        store.add_comparison(args.pop("task"), args.pop("query"), args.pop("responses"), **args)
    assert store.comparisons() == []


def test_record_label_rejects_bad_input(store):
    cid = add(store, k=3)
    with pytest.raises(ValueError, match=r"best=3 is out of range.*3 responses"):
        store.record_label(cid, 3, "alice")
    with pytest.raises(ValueError, match="best must be an int"):
        store.record_label(cid, 1.0, "alice")
    with pytest.raises(ValueError, match="permutation"):
        store.record_label(cid, 0, "alice", permutation=[0, 0, 1])
    with pytest.raises(ValueError, match="permutation"):
        store.record_skip(cid, "alice", permutation=[0, 1])
    with pytest.raises(ValueError, match="labeler"):
        store.record_label(cid, 0, "")
    with pytest.raises(KeyError, match="no comparison with id 99"):
        store.record_label(99, 0, "alice")
    with pytest.raises(KeyError, match="no comparison with id 99"):
        store.comparison(99)
    assert store.labels(include_retracted=True) == [] and store.pending("alice") == [cid]


# ---- undo, retraction, pending ----

def test_undo_retracts_most_recent_actions_in_order(store):
    c1, c2, c3 = add(store), add(store), add(store)
    l1 = store.record_label(c1, 0, "alice")
    s2 = store.record_skip(c2, "alice", note="unreadable")
    l3 = store.record_label(c3, 1, "alice")
    store.record_label(c3, 2, "bob")
    assert store.pending("alice") == []

    assert store.undo("alice") == {"type": "label", "id": l3, "comparison_id": c3}
    assert store.undo("alice") == {"type": "skip", "id": s2, "comparison_id": c2}
    assert store.pending("alice") == [c2, c3]  # back in the queue, oldest first
    assert [lb.id for lb in store.labels(labeler="alice")] == [l1]
    assert [(lb.id, lb.retracted) for lb in store.labels(labeler="alice", include_retracted=True)] == [
        (l1, False), (l3, True)]
    assert [(c.id, lb.labeler) for c, lb in store.training_set()] == [(c1, "alice"), (c3, "bob")]
    assert store.counts() == [
        {"task": "sentiment", "labeler": "alice", "labels": 1, "skips": 0, "retracted": 2},
        {"task": "sentiment", "labeler": "bob", "labels": 1, "skips": 0, "retracted": 0},
    ]

    # Labeling again after an undo adds a new row; the retracted one stays in the file.
    l3b = store.record_label(c3, 3, "alice")
    assert [lb.best for c, lb in store.training_set() if lb.labeler == "alice"] == [0, 3]
    assert store.undo("alice")["id"] == l3b
    assert store.undo("alice")["id"] == l1
    assert store.undo("alice") is None  # nothing left
    assert store.undo("carol") is None
    assert len(store.labels(include_retracted=True)) == 4


def test_retract_label(store):
    cid = add(store)
    label_id = store.record_label(cid, 1, "alice")
    store.retract_label(label_id, "admin")
    assert store.labels() == [] and store.pending("alice") == [cid]
    with pytest.raises(ValueError, match="already retracted by 'admin'"):
        store.retract_label(label_id, "admin")
    with pytest.raises(KeyError, match="no label with id 42"):
        store.retract_label(42, "admin")


def test_pending_filters_by_task_and_kind(store):
    a = add(store, task="sentiment")
    b = add(store, task="sentiment", kind="validation")
    c = add(store, task="descriptiveness")
    assert store.pending("alice") == [a, b, c]
    assert store.pending("alice", task="sentiment") == [a, b]
    assert store.pending("alice", task="sentiment", kind="validation") == [b]
    store.record_label(b, 0, "alice")
    assert store.pending("alice", task="sentiment") == [a]
    assert store.pending("bob", task="sentiment") == [a, b]


def test_pending_can_leave_out_what_others_labeled_or_skipped(store):
    a, b, c, d = add(store), add(store), add(store), add(store, task="other")
    store.record_label(a, 0, "alice")
    store.record_skip(b, "bob")
    store.record_label(c, 1, "mock")
    assert store.pending("mock") == [a, b, d]
    assert store.pending("mock", exclude_labeled_by_others=True) == [d]
    assert store.pending("mock", task="sentiment", exclude_labeled_by_others=True) == []
    store.undo("alice")  # a retracted label no longer counts
    assert store.pending("mock", task="sentiment", exclude_labeled_by_others=True) == [a]


def test_if_pending_refuses_a_labelers_second_live_action(tmp_path):
    # Two connections to one file, as two widgets in two kernels (or one kernel) would have.
    with LabelStore(tmp_path / "labels.db") as first, LabelStore(tmp_path / "labels.db") as second:
        c1, c2 = add(first), add(first)
        label_id = second.record_label(c1, 2, "alice", if_pending=True)
        for write in (lambda: first.record_label(c1, 0, "alice", if_pending=True, note="stale view"),
                      lambda: first.record_skip(c1, "alice", if_pending=True)):
            with pytest.raises(AlreadyLabeledError, match=r"'alice' already has a live label .* comparison \d+") as e:
                write()
            assert e.value.comparison_id == c1 and e.value.labeler == "alice"
            assert e.value.existing == {"type": "label", "id": label_id}
            assert isinstance(e.value, LabelStoreError)
        assert [(lb.comparison_id, lb.best) for lb in first.labels(include_retracted=True)] == [(c1, 2)]
        assert first.counts()[0]["skips"] == 0  # nothing was written
        first.record_label(c1, 1, "bob", if_pending=True)  # another labeler is not affected

        # A skip blocks too; undo makes the comparison pending again, and then it can be labeled.
        skip_id = first.record_skip(c2, "alice", if_pending=True)
        with pytest.raises(AlreadyLabeledError) as e:
            second.record_label(c2, 0, "alice", if_pending=True)
        assert e.value.existing == {"type": "skip", "id": skip_id}
        assert second.undo("alice")["id"] == skip_id
        second.record_label(c2, 3, "alice", if_pending=True)

        # Without if_pending (the default) a newer label is appended, and training uses the latest one.
        first.record_label(c1, 0, "alice")
        assert [(c.id, lb.best) for c, lb in first.training_set() if lb.labeler == "alice"] == [(c1, 0), (c2, 3)]


def test_if_pending_lets_one_of_many_racing_writers_through(tmp_path):
    """The check runs inside the write transaction: of several connections racing to label one comparison for
    the same labeler, exactly one succeeds."""
    path = tmp_path / "labels.db"
    with LabelStore(path) as store:
        cid = add(store)
    stores = [LabelStore(path) for _ in range(4)]
    start, results = threading.Barrier(len(stores)), []

    def work(i):
        start.wait()
        try:
            results.append(stores[i].record_label(cid, i, "alice", if_pending=True))
        except AlreadyLabeledError:
            results.append("refused")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert sorted(results, key=str).count("refused") == 3
    with LabelStore(path) as store:
        assert len(store.labels(labeler="alice", include_retracted=True)) == 1


# ---- several labelers ----

def test_multiple_labelers_and_agreement(store):
    c1, c2, c3, c4 = add(store), add(store), add(store), add(store, task="other")
    store.record_label(c1, 0, "a"), store.record_label(c1, 0, "b"), store.record_label(c1, 1, "c")
    store.record_label(c2, 1, "a")
    store.record_label(c2, 2, "a")  # a changed their mind: the latest label counts
    store.record_label(c2, 2, "b")
    store.record_label(c3, 3, "a")  # only one labeler: not part of agreement
    store.record_label(c4, 0, "a"), store.record_label(c4, 1, "b")  # other task

    assert len(store.training_set(task="sentiment")) == 6  # (c1: a, b, c), (c2: a, b), (c3: a)
    # c1: a=b, a!=c, b!=c; c2: a=b. So 2 of 4 labeler pairs agree.
    assert store.agreement(task="sentiment") == {
        "n_comparisons": 2,
        "n_pairs": 4,
        "agreement": 0.5,
        "chance": 0.25,
        "pairs": [
            {"labeler_a": "a", "labeler_b": "b", "n": 2, "agreement": 1.0},
            {"labeler_a": "a", "labeler_b": "c", "n": 1, "agreement": 0.0},
            {"labeler_a": "b", "labeler_b": "c", "n": 1, "agreement": 0.0},
        ],
    }
    assert store.agreement()["n_comparisons"] == 3  # all tasks: c4 disagrees
    assert store.agreement()["agreement"] == pytest.approx(2 / 5)
    assert store.agreement(task="none")["agreement"] is None


# ---- datasets ----

def test_to_dataset_kway_and_pairwise(store):
    c1 = store.add_comparison("t", "q1", ["x0", "x1", "x2"])
    c2 = store.add_comparison("t", "q2", ["y0", "y1", "y2"])
    store.record_label(c1, 2, "alice", permutation=[2, 1, 0])
    store.record_label(c2, 0, "alice")
    store.record_label(c2, 1, "bob")
    unlabeled = store.add_comparison("t", "q3", ["z0", "z1", "z2"])

    kway = store.to_dataset(task="t")
    assert kway.column_names == ["query", "sample0", "sample1", "sample2", "best", "labeler", "comparison_id"]
    assert kway.to_dict() == {
        "query": ["q1", "q2", "q2"], "sample0": ["x0", "y0", "y0"], "sample1": ["x1", "y1", "y1"],
        "sample2": ["x2", "y2", "y2"], "best": [2, 0, 1], "labeler": ["alice", "alice", "bob"],
        "comparison_id": [c1, c2, c2],
    }
    assert unlabeled not in kway["comparison_id"]

    pairs = store.to_dataset(task="t", shape="pairwise")
    assert pairs.column_names == ["prompt", "chosen", "rejected", "labeler", "comparison_id"]
    assert len(pairs) == 3 * 2  # k - 1 rows per label
    rows = list(zip(pairs["prompt"], pairs["chosen"], pairs["rejected"], pairs["labeler"]))
    assert rows[:2] == [("q1", "x2", "x0", "alice"), ("q1", "x2", "x1", "alice")]
    assert ("q2", "y1", "y0", "bob") in rows and ("q2", "y1", "y2", "bob") in rows

    assert len(store.to_dataset(task="nothing here")) == 0
    with pytest.raises(ValueError, match="'kway' or 'pairwise'"):
        store.to_dataset(shape="triplets")
    store.record_label(store.add_comparison("t", "q", ["a", "b"]), 0, "alice")
    with pytest.raises(LabelStoreError, match="mix comparisons with k"):
        store.to_dataset(task="t")
    assert len(store.to_dataset(task="t", shape="pairwise")) == 7


class FakeTokenizer:
    """100 ids, each written <id>: encode(decode(ids)) == ids, as import_openai_labels checks."""

    def __len__(self):
        return 100

    def decode(self, ids, **kwargs):
        return " ".join(f"<{i}>" for i in ids)

    def encode(self, text, add_special_tokens=True):
        return [int(i) for i in re.findall(r"<(\d+)>", text)]


def test_import_openai_labels(store, tmp_path):
    rows = [
        {"query": [1, 2], "sample0": [3], "sample1": [4], "sample2": [5, 6], "sample3": [7], "best": 2},
        {"query": [8], "sample0": [9], "sample1": [10], "sample2": [11], "sample3": [12], "best": 0},
    ]
    path = tmp_path / "offline_5k.json"
    path.write_text(json.dumps(rows))
    assert store.import_openai_labels(path, FakeTokenizer(), task="sentiment") == 2

    [(c, label), (c2, label2)] = store.training_set(task="sentiment")
    assert (c.query, c.query_tokens, c.responses[2], c.response_tokens[2]) == ("<1> <2>", [1, 2], "<5> <6>", [5, 6])
    assert c.sources == ["openai"] * 4 and c.extra["row"] == 0
    assert (label.best, label.labeler, label2.best) == (2, "openai", 0)

    with pytest.warns(UserWarning, match="already imported"):  # re-running the cell adds nothing
        assert store.import_openai_labels(path, FakeTokenizer(), task="sentiment") == 0
    assert len(store.labels()) == 2

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"query": [1], "samples": [[1], [2]], "best": 0}]))
    with pytest.raises(LabelStoreError, match=r'row 0: expected .*"sample0".*"best"'):
        store.import_openai_labels(bad, FakeTokenizer(), task="descriptiveness")
    bad.write_text(json.dumps({"query": [1]}))
    with pytest.raises(LabelStoreError, match="expected a JSON list"):
        store.import_openai_labels(bad, FakeTokenizer(), task="descriptiveness")
    bad.write_text(json.dumps([dict(rows[0], best=4)]))
    with pytest.raises(LabelStoreError, match="best=4"):
        store.import_openai_labels(bad, FakeTokenizer(), task="descriptiveness")
    assert store.comparisons(task="descriptiveness") == []


# ---- durability and concurrency ----

def test_acknowledged_labels_survive_sigkill(tmp_path):
    db = tmp_path / "labels.db"  # created by the child, so the kill also lands before any checkpoint
    proc = subprocess.Popen([sys.executable, str(child_script(tmp_path)), str(LABELS_PY), str(db), "alice", "2000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_after = random.Random(0).randint(100, 150)  # N >= 100 acknowledged, of 2000: far from the end
    acknowledged = []
    try:
        while len(acknowledged) < kill_after:
            line = proc.stdout.readline()
            assert line, f"child died early: {proc.stderr.read()}"
            acknowledged.append(int(line))
        proc.send_signal(signal.SIGKILL)
        acknowledged += [int(line) for line in proc.stdout.read().split()]  # ids printed before it died
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close(), proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 100
    assert len(acknowledged) < 2000, "the child finished before it was killed; the test proved nothing"

    with LabelStore(db) as store:
        assert store.integrity_check() == "ok"
        stored = {label.id for label in store.labels()}
        assert set(acknowledged) <= stored
        assert len(stored) - len(acknowledged) <= 1  # at most the one committed as the signal landed


def test_two_processes_write_one_file(tmp_path):
    db = tmp_path / "labels.db"
    LabelStore(db).close()
    script = child_script(tmp_path)
    procs = [subprocess.Popen([sys.executable, str(script), str(LABELS_PY), str(db), f"p{i}", "100"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    printed = [int(x) for out, _ in outputs for x in out.split()]
    with LabelStore(db) as store:
        labels = store.labels()
        assert sorted(lb.id for lb in labels) == sorted(printed) and len(set(printed)) == 200
        assert {lb.labeler for lb in labels} == {"p0", "p1"}
        assert len(store.comparisons()) == 200
        assert store.integrity_check() == "ok"


def test_threads_share_one_store(store):
    cids = store.add_comparisons([dict(task="t", query=f"q{i}", responses=["a", "b"]) for i in range(50)])
    ids, errors = [], []

    def work(name):
        try:
            for cid in cids:
                ids.append(store.record_label(cid, cid % 2, name))
                store.pending(name)  # reads interleaved with the other threads' writes
        except Exception as e:  # surfaced below: an exception in a thread would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(f"thread{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(ids)) == 200 and sorted(ids) == [lb.id for lb in store.labels()]
    assert all(store.pending(f"thread{i}") == [] for i in range(4))


# ---- files that are not ours ----

def assert_refused_unchanged(path, match):
    before = sha256(path)
    with pytest.raises(LabelStoreError, match=match) as info:
        LabelStore(path)
    assert str(path) in str(info.value) and "was not changed" in str(info.value)
    assert sha256(path) == before


def test_refuses_random_bytes(tmp_path):
    path = tmp_path / "labels.db"
    path.write_bytes(random.Random(0).randbytes(8192))
    assert_refused_unchanged(path, "not an SQLite database")


def test_refuses_corrupt_sqlite(tmp_path):
    path = tmp_path / "labels.db"
    path.write_bytes(b"SQLite format 3\x00" + random.Random(1).randbytes(8192))
    assert_refused_unchanged(path, "cannot be read")


def test_refuses_another_applications_database(tmp_path):
    path = tmp_path / "notes.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.commit()
    conn.close()
    assert_refused_unchanged(path, "another application")
    assert not Path(f"{path}-wal").exists()


def test_refuses_newer_schema(tmp_path):
    path = tmp_path / "labels.db"
    LabelStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")  # as if a future labkit had migrated it
    conn.close()
    assert_refused_unchanged(path, "schema v99.*Upgrade labkit")


def test_empty_file_becomes_a_store(tmp_path):
    path = tmp_path / "labels.db"
    path.touch()
    with LabelStore(path) as store:
        assert store.integrity_check() == "ok"


def test_closed_store_says_so(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    store.close()
    store.close()
    with pytest.raises(LabelStoreError, match="closed"):
        store.labels()


def test_module_stays_light():
    code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('m', {str(LABELS_PY)!r}); "
            "m = importlib.util.module_from_spec(spec); sys.modules['m'] = m; spec.loader.exec_module(m); "
            "print(sorted({'torch', 'transformers', 'datasets', 'numpy'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_count_labels_counts_live_labels_since_a_time(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    ids = [store.add_comparison("sentiment", f"q{i}", ["a", "b"]) for i in range(3)]
    first = store.record_label(ids[0], 0, "ann")
    store.record_label(ids[1], 1, "ann")
    store.record_label(ids[2], 1, "bob")
    assert store.count_labels(labeler="ann") == 2 and store.count_labels(task="sentiment") == 3
    assert store.count_labels(labeler="ann", task="tldr") == 0
    later = max(label.submitted_at for label in store.labels()) + 1
    assert store.count_labels(since=later) == 0
    assert store.count_labels(labeler="ann", since=0) == 2
    store.retract_label(first, "ann")
    assert store.count_labels(labeler="ann") == 1  # a retracted label no longer counts
    assert store.count_labels(labeler="ann") == sum(1 for label in store.labels(labeler="ann"))
