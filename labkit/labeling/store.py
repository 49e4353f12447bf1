"""The label store: every comparison shown to a labeler and every choice they made, in one SQLite file.

Losing or corrupting a label is the worst thing this project can do, so the store is built around that:

- SQLite in WAL mode with ``synchronous=EXTRA`` (in WAL mode the same as FULL): a write call returns only
  after its transaction is on disk, so a label whose id you were given survives a kernel crash, a SIGKILL
  or a power cut.
- Append only. Nothing is ever updated or deleted; "undo" appends a row to ``retractions``.
- One transaction per write (``BEGIN IMMEDIATE``, so concurrent writers queue on the busy timeout
  instead of failing), one connection guarded by a lock so the notebook thread and a training thread
  can share a store, and several processes can write the same file at once.
- A file that is not ours (not SQLite, damaged, or another application's database) is refused with
  ``LabelStoreError`` before anything is written to it: opening an existing file first runs SQLite's
  integrity_check on a read-only connection (it reads the whole file once). Arguments are checked before
  anything is written, and a batch is all or nothing.
- ``LabelStore(path, read_only=True)`` reads a store it must not change, e.g. a colleague's on a read-only share.

Layout (schema v1):

    comparisons  id, task, kind, query, query_tokens, k, responses, response_tokens, sources,
                 reference, extra, created_at          (lists and dicts are JSON text)
    labels       id, comparison_id, best, permutation, labeler, shown_at, submitted_at, note
    skips        the same without ``best``
    retractions  id, label_id | skip_id, labeler, created_at
    live_labels, live_skips   views: the rows with no retraction

``best`` is an index into the comparison's responses in STORED order. ``permutation[j]`` is the stored
index of the response the labeler saw at display position j, so a click on display position j is
``best = permutation[j]``.

Labels and skips share one id space (each new row takes 1 + the largest id in either table), so "this
labeler's most recent action" is simply the largest id, whatever the clock did.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import shutil
import sqlite3
import threading
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from http.client import HTTPException
from itertools import combinations
from pathlib import Path
from urllib.parse import urlsplit

# Written to the SQLite header (PRAGMA application_id) so that `file` and this module can tell a labkit
# store from any other SQLite database. The bytes spell "lbkt".
APPLICATION_ID = 0x6C626B74

# Seconds a writer waits for another process or thread holding the write lock before giving up.
BUSY_TIMEOUT_S = 60.0

_SQLITE_MAGIC = b"SQLite format 3\x00"
# sqlite3.Error.sqlite_errorcode values (extended codes; `& 0xFF` gives the primary one)
_SQLITE_READONLY, _SQLITE_CORRUPT, _SQLITE_NOTADB, _SQLITE_READONLY_ROLLBACK = 8, 11, 26, 776
_RECORD_KEYS = "comparison_id, best, labeler and optionally permutation, shown_at, note"

# MIGRATIONS[i] takes the schema from version i to version i + 1 (PRAGMA user_version).
# To change the schema, append a script; never edit one that has shipped: files in the wild were made by it.
MIGRATIONS = [
    """
    CREATE TABLE comparisons (
        id              INTEGER PRIMARY KEY,
        task            TEXT NOT NULL,
        kind            TEXT NOT NULL DEFAULT 'train',
        query           TEXT NOT NULL,
        query_tokens    TEXT NOT NULL,              -- JSON list of ints
        k               INTEGER NOT NULL CHECK (k >= 2),
        responses       TEXT NOT NULL,              -- JSON list of k strings
        response_tokens TEXT NOT NULL,              -- JSON list of k lists of ints
        sources         TEXT NOT NULL,              -- JSON list of k strings: which model made each response
        reference       TEXT,                       -- e.g. the reference summary, for ROUGE
        extra           TEXT NOT NULL DEFAULT '{}', -- JSON dict
        created_at      REAL NOT NULL
    );
    CREATE INDEX comparisons_task_kind ON comparisons (task, kind);

    CREATE TABLE labels (
        id            INTEGER PRIMARY KEY,          -- shared id space with skips, see module docstring
        comparison_id INTEGER NOT NULL REFERENCES comparisons (id),
        best          INTEGER NOT NULL CHECK (best >= 0),
        permutation   TEXT NOT NULL,                -- JSON list: display position -> stored index
        labeler       TEXT NOT NULL,
        shown_at      REAL,
        submitted_at  REAL NOT NULL,
        note          TEXT
    );
    CREATE INDEX labels_comparison ON labels (comparison_id);
    CREATE INDEX labels_labeler ON labels (labeler);

    CREATE TABLE skips (
        id            INTEGER PRIMARY KEY,
        comparison_id INTEGER NOT NULL REFERENCES comparisons (id),
        permutation   TEXT NOT NULL,
        labeler       TEXT NOT NULL,
        shown_at      REAL,
        submitted_at  REAL NOT NULL,
        note          TEXT
    );
    CREATE INDEX skips_comparison ON skips (comparison_id);
    CREATE INDEX skips_labeler ON skips (labeler);

    CREATE TABLE retractions (
        id         INTEGER PRIMARY KEY,
        label_id   INTEGER UNIQUE REFERENCES labels (id),
        skip_id    INTEGER UNIQUE REFERENCES skips (id),
        labeler    TEXT NOT NULL,                   -- who retracted it
        created_at REAL NOT NULL,
        CHECK ((label_id IS NULL) != (skip_id IS NULL))
    );

    CREATE VIEW live_labels AS
        SELECT * FROM labels WHERE id NOT IN (SELECT label_id FROM retractions WHERE label_id IS NOT NULL);
    CREATE VIEW live_skips AS
        SELECT * FROM skips WHERE id NOT IN (SELECT skip_id FROM retractions WHERE skip_id IS NOT NULL);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

_NEXT_ACTION_ID = (
    "SELECT 1 + coalesce(max(id), 0) FROM (SELECT max(id) AS id FROM labels UNION ALL SELECT max(id) FROM skips)"
)


class LabelStoreError(Exception):
    """The label file cannot be used as asked; the message says what is wrong and what to do."""


class AlreadyLabeledError(LabelStoreError):
    """`record_label` / `record_skip` with ``if_pending=True`` refused: the labeler already has a live label or
    skip on that comparison (made elsewhere, e.g. in another widget of the same store). Nothing was written."""

    def __init__(self, message, comparison_id, labeler, existing):
        super().__init__(message)
        self.comparison_id = comparison_id
        self.labeler = labeler
        self.existing = existing  # {"type": "label" | "skip", "id": its id}


@dataclass(frozen=True)
class Comparison:
    """A query and k responses shown together to a labeler."""

    id: int
    task: str
    kind: str  # "train", "validation", "eval", ...: which use the labels are meant for
    query: str
    query_tokens: list[int]
    responses: list[str]
    response_tokens: list[list[int]]
    sources: list[str]  # which model or checkpoint produced each response, e.g. "rho", "policy@step12"
    reference: str | None
    extra: dict
    created_at: float

    @property
    def k(self) -> int:
        return len(self.responses)


@dataclass(frozen=True)
class Label:
    """One labeler's pick of the best response of one comparison."""

    id: int
    comparison_id: int
    best: int  # index into Comparison.responses (stored order, not display order)
    permutation: list[int]  # display position -> stored index
    labeler: str
    shown_at: float | None
    submitted_at: float
    note: str | None
    retracted: bool = False  # only ever True in labels(include_retracted=True)


class LabelStore:
    """Append-only, crash-safe store of comparisons and labels in one SQLite file.

    Safe to share between threads (one connection behind a lock) and between processes (SQLite's own
    locking; writers queue for up to BUSY_TIMEOUT_S). Use ``with LabelStore(path) as store:`` or call
    ``close()``. ``read_only=True`` opens an existing store for reading only: nothing can be written to it.
    """

    def __init__(self, path, read_only=False):
        self.path = Path(path).expanduser().resolve()
        self.read_only = read_only
        self._lock = threading.RLock()
        self._conn = None
        if not read_only and self.path.exists() and not (os.access(self.path, os.W_OK)
                                                         and os.access(self.path.parent, os.W_OK)):
            # WAL needs to create PATH-wal and PATH-shm next to the file, so the folder must be writable too.
            raise LabelStoreError(_read_only_message(self.path, "the file or its folder cannot be written"))
        recover = _check_existing_file(self.path, read_only)  # before anything can write to the file
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = _connect(self.path, read_only)
            if recover:  # the first read rolled back the crashed transaction: now check what is left
                _inspect(self._conn, self.path, read_only)
            if not read_only:
                # WAL: readers never block the writer. (If another process holds the file while it is being
                # created, this can stay in rollback-journal mode for this session: just as durable, only slower.)
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._migrate()
        except sqlite3.Error as e:
            self.close()
            raise LabelStoreError(_explain(e, self.path, "open the label store")) from e
        except BaseException:
            self.close()
            raise

    # ---- opening, closing, schema ----

    def _migrate(self):
        with self._write() as db:
            # Re-read inside the write lock: another process may have created or migrated the file meanwhile.
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LabelStoreError(_too_new(self.path, version))
            for v in range(version, SCHEMA_VERSION):
                db.executescript_in_transaction(MIGRATIONS[v])
            if version < SCHEMA_VERSION:
                # PRAGMAs cannot take parameters; both values are ints we control.
                db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self):
        """Close the file. Safe to call twice; the store cannot be used afterwards."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"LabelStore({str(self.path)!r})"

    @contextmanager
    def _write(self):
        """One write transaction. IMMEDIATE takes the write lock up front, so concurrent writers wait on the
        busy timeout instead of failing halfway; nothing is visible to anyone until COMMIT returns."""
        with self._lock:
            conn = self._connection()
            if self.read_only:
                raise LabelStoreError(f"{self.path} is open read-only (read_only=True), so nothing can be "
                                      "written to it; open it with LabelStore(path) to add or change labels")
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield _Tx(conn)
                conn.execute("COMMIT")
            except BaseException as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                # A file SQLite opened read-only behind our back (os.access can be wrong, e.g. NFS root
                # squash), or damage found mid-way: say so instead of a bare sqlite3 error.
                if isinstance(e, sqlite3.Error) and _file_problem(e, self.path):
                    raise LabelStoreError(_file_problem(e, self.path)) from e
                raise

    @contextmanager
    def _read(self):
        """One read transaction, so multi-query reads see one consistent snapshot."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN")
            try:
                yield _Tx(conn)
            except BaseException as e:
                with suppress(sqlite3.Error):  # a read has nothing to undo: only end the transaction
                    conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error) and _file_problem(e, self.path):
                    raise LabelStoreError(_file_problem(e, self.path)) from e
                raise
            conn.execute("COMMIT")

    def _connection(self):
        if self._conn is None:
            raise LabelStoreError(f"the label store {self.path} is closed; open it again with LabelStore(path)")
        return self._conn

    # ---- comparisons ----

    def add_comparison(
        self,
        task,
        query,
        responses,
        *,
        query_tokens=None,
        response_tokens=None,
        sources="unknown",
        kind="train",
        reference=None,
        extra=None,
    ) -> int:
        """Store one query with k >= 2 responses and return its id."""
        row = _comparison_row(task, query, responses, query_tokens, response_tokens, sources, kind, reference, extra)
        with self._write() as db:
            return db.insert_comparison(row, time.time())

    def add_comparisons(self, items) -> list[int]:
        """Store many comparisons in one transaction (all or none). Each item is a dict of
        add_comparison's arguments: task, query, responses and optionally the keyword ones."""
        rows = []
        for i, item in enumerate(items):
            try:
                rows.append(_comparison_row(**item))
            except TypeError as e:
                raise TypeError(f"item {i}: {e}; expected keys task, query, responses and optionally "
                                "query_tokens, response_tokens, sources, kind, reference, extra") from e
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from e
        now = time.time()
        with self._write() as db:
            return [db.insert_comparison(row, now) for row in rows]

    def comparison(self, id) -> Comparison:
        with self._read() as db:
            row = db.execute("SELECT * FROM comparisons WHERE id = ?", (id,)).fetchone()
            if row is None:
                n = db.execute("SELECT count(*) FROM comparisons").fetchone()[0]
        if row is None:
            raise KeyError(f"no comparison with id {id} in {self.path} (it holds {n} comparisons)")
        return _comparison(row)

    def comparisons(self, task=None, kind=None) -> list[Comparison]:
        where, args = _filters(task=task, kind=kind)
        with self._read() as db:
            rows = db.execute(f"SELECT * FROM comparisons c {where} ORDER BY c.id", args).fetchall()
        return [_comparison(r) for r in rows]

    # ---- labels, skips, undo ----

    def record_label(self, comparison_id, best, labeler, *, permutation=None, shown_at=None, note=None,
                     if_pending=False) -> int:
        """Store that `labeler` picked response `best` (stored order) of a comparison. The returned id means
        the label is committed to disk.

        if_pending=True: store it only if `labeler` has no live label or skip on that comparison yet, checked
        inside the write transaction (so two views, threads or processes cannot both pass the check); else
        raise AlreadyLabeledError and write nothing. The default (False) appends a new label whatever is
        there, and `training_set` then uses the labeler's latest one.
        """
        item = {"comparison_id": comparison_id, "best": best, "labeler": labeler, "permutation": permutation,
                "shown_at": shown_at, "note": note}
        return self._record("labels", [item], batch=False, if_pending=if_pending)[0]

    def record_labels(self, items) -> list[int]:
        """Store many labels in one transaction (all or none); each item is a dict of record_label's arguments.
        For programmatic labelers, where one fsync per label would dominate."""
        return self._record("labels", items, batch=True)

    def record_skip(self, comparison_id, labeler, *, permutation=None, shown_at=None, note=None,
                    if_pending=False) -> int:
        """Store that `labeler` saw a comparison and declined to pick (e.g. all responses equally bad).
        if_pending: as for record_label."""
        item = {"comparison_id": comparison_id, "best": None, "labeler": labeler, "permutation": permutation,
                "shown_at": shown_at, "note": note}
        return self._record("skips", [item], batch=False, if_pending=if_pending)[0]

    def _record(self, table, items, batch, if_pending=False) -> list[int]:
        """Check every item, then insert them all in one transaction: one bad item refuses the batch, and the
        error names its index."""
        rows = []
        for i, item in enumerate(items):
            where = f"item {i}: " if batch else ""
            try:
                rows.append(_action_row(**item, is_label=table == "labels"))
            except TypeError as e:
                raise TypeError(f"{where}{e}; expected keys {_RECORD_KEYS}") from e
            except ValueError as e:
                raise ValueError(f"{where}{e}") from e
        now = time.time()
        with self._write() as db:
            # The checks that need the file (does the comparison exist, how many responses), still before any write.
            ks = dict(db.execute("SELECT id, k FROM comparisons WHERE id IN (SELECT value FROM json_each(?))",
                                 (json.dumps([r[0] for r in rows]),)))
            for i, row in enumerate(rows):
                where = f"item {i}: " if batch else ""
                try:
                    rows[i] = _fit_action(row, ks)
                except KeyError as e:
                    raise KeyError(f"{where}{e.args[0]}") from None
                except ValueError as e:
                    raise ValueError(f"{where}{e}") from None
            if if_pending:
                for comparison_id, _, _, labeler, *_ in rows:
                    _refuse_if_done(db, comparison_id, labeler)
            return db.insert_actions(table, rows, now)

    def undo(self, labeler) -> dict | None:
        """Retract `labeler`'s most recent label or skip that is not yet retracted. Calling it again undoes
        the action before that. Returns {"type": "label" | "skip", "id", "comparison_id"}, or None if there is
        nothing left to undo."""
        with self._write() as db:
            row = db.execute(
                """SELECT 'label', id, comparison_id FROM live_labels WHERE labeler = ?
                   UNION ALL SELECT 'skip', id, comparison_id FROM live_skips WHERE labeler = ?
                   ORDER BY 2 DESC LIMIT 1""",
                (labeler, labeler),
            ).fetchone()
            if row is None:
                return None
            kind, action_id, comparison_id = row
            column = "label_id" if kind == "label" else "skip_id"
            db.execute(
                f"INSERT INTO retractions ({column}, labeler, created_at) VALUES (?, ?, ?)",
                (action_id, labeler, time.time()),
            )
        return {"type": kind, "id": action_id, "comparison_id": comparison_id}

    def retract_label(self, label_id, labeler) -> None:
        """Retract one label, recording `labeler` as who retracted it. The row stays in the file."""
        _check_labeler(labeler)
        with self._write() as db:
            if db.execute("SELECT 1 FROM labels WHERE id = ?", (label_id,)).fetchone() is None:
                raise KeyError(f"no label with id {label_id} in {self.path}")
            done = db.execute("SELECT labeler FROM retractions WHERE label_id = ?", (label_id,)).fetchone()
            if done is not None:
                raise ValueError(f"label {label_id} was already retracted by {done[0]!r}; nothing to do")
            db.execute(
                "INSERT INTO retractions (label_id, labeler, created_at) VALUES (?, ?, ?)",
                (label_id, labeler, time.time()),
            )

    # ---- queries ----

    def pending(self, labeler, task=None, kind=None, *, source=None, exclude_labeled_by_others=False) -> list[int]:
        """Ids of comparisons `labeler` has neither labeled nor skipped (retracted ones count as not done),
        oldest first. source: only comparisons with a response from that source (e.g. one policy's blind
        evaluation, "policy@40:3f9a0c1e"). exclude_labeled_by_others=True also leaves out every comparison that
        any other labeler has labeled or skipped (live): what a mock labeler fills in around people
        (labelers.label_pending)."""
        if exclude_labeled_by_others:  # nobody's live label or skip, this labeler's included
            done = ["c.id NOT IN (SELECT comparison_id FROM live_labels)",
                    "c.id NOT IN (SELECT comparison_id FROM live_skips)"]
            labelers = ()
        else:
            done = ["c.id NOT IN (SELECT comparison_id FROM live_labels WHERE labeler = ?)",
                    "c.id NOT IN (SELECT comparison_id FROM live_skips WHERE labeler = ?)"]
            labelers = (labeler, labeler)
        where, args = _filters(*done, task=task, kind=kind, source=source)
        with self._read() as db:
            rows = db.execute(f"SELECT c.id FROM comparisons c {where} ORDER BY c.id", (*labelers, *args))
            return [r[0] for r in rows]

    def count_labels(self, task=None, kind=None, labeler=None, since: float | None = None, *, source=None) -> int:
        """How many live labels match (of comparisons with a response from `source`, if given), submitted at or
        after `since` if given: one COUNT query (the labeling widget's counter asks on every click)."""
        extra = ["r.id IS NULL"] + (["l.submitted_at >= ?"] if since is not None else [])
        where, args = _filters(*extra, task=task, kind=kind, labeler=labeler, source=source)
        with self._read() as db:
            return db.execute(
                f"""SELECT count(*) FROM labels l JOIN comparisons c ON c.id = l.comparison_id
                    LEFT JOIN retractions r ON r.label_id = l.id {where}""",
                ([since] if since is not None else []) + args,
            ).fetchone()[0]

    def labels(self, task=None, kind=None, labeler=None, include_retracted=False) -> list[Label]:
        live_only = [] if include_retracted else ["r.id IS NULL"]
        where, args = _filters(*live_only, task=task, kind=kind, labeler=labeler)
        with self._read() as db:
            rows = db.execute(
                f"""SELECT l.*, r.id IS NOT NULL FROM labels l
                    JOIN comparisons c ON c.id = l.comparison_id
                    LEFT JOIN retractions r ON r.label_id = l.id
                    {where} ORDER BY l.id""",
                args,
            ).fetchall()
        return [_label(r) for r in rows]

    def training_set(self, task=None, kind=None) -> list[tuple[Comparison, Label]]:
        """One row per (comparison, labeler): that labeler's latest label that is not retracted."""
        where, args = _filters(task=task, kind=kind)
        with self._read() as db:
            label_rows = db.execute(
                f"""SELECT l.*, 0 FROM live_labels l WHERE l.id IN (
                        SELECT max(l.id) FROM live_labels l JOIN comparisons c ON c.id = l.comparison_id
                        {where} GROUP BY l.comparison_id, l.labeler)
                    ORDER BY l.comparison_id, l.id""",
                args,
            ).fetchall()
            where, args = _filters("c.id IN (SELECT comparison_id FROM live_labels)", task=task, kind=kind)
            comparison_rows = db.execute(f"SELECT * FROM comparisons c {where}", args).fetchall()
        by_id = {r[0]: _comparison(r) for r in comparison_rows}
        return [(by_id[r[1]], _label(r)) for r in label_rows]

    def counts(self) -> list[dict]:
        """Per task and labeler: live labels, live skips, and retracted labels + skips."""
        with self._read() as db:
            rows = db.execute(
                """SELECT c.task, a.labeler, sum(a.is_label AND NOT a.retracted),
                          sum(NOT a.is_label AND NOT a.retracted), sum(a.retracted)
                   FROM (SELECT comparison_id, labeler, 1 AS is_label, id NOT IN (SELECT id FROM live_labels)
                                AS retracted FROM labels
                         UNION ALL
                         SELECT comparison_id, labeler, 0, id NOT IN (SELECT id FROM live_skips) FROM skips) a
                   JOIN comparisons c ON c.id = a.comparison_id
                   GROUP BY c.task, a.labeler ORDER BY c.task, a.labeler"""
            ).fetchall()
        return [dict(task=t, labeler=lb, labels=n, skips=s, retracted=x) for t, lb, n, s, x in rows]

    def seconds_per_label(self, labeler=None, task=None) -> list[float]:
        """submitted_at - shown_at of each live label that has a shown_at, oldest first."""
        where, args = _filters("l.shown_at IS NOT NULL", task=task, labeler=labeler)
        with self._read() as db:
            rows = db.execute(
                f"""SELECT l.submitted_at - l.shown_at FROM live_labels l
                    JOIN comparisons c ON c.id = l.comparison_id {where} ORDER BY l.id""",
                args,
            )
            return [r[0] for r in rows]

    def agreement(self, task=None) -> dict:
        """How often labelers pick the same response, over comparisons with live labels from >= 2 labelers.

        Returns n_comparisons, n_pairs (labeler pairs summed over comparisons), agreement (fraction of those
        pairs that agree; None if there are none), chance (mean 1/k: the agreement of random pickers) and
        pairs: [{labeler_a, labeler_b, n, agreement}] per pair of labelers.
        """
        picks = defaultdict(dict)  # comparison id -> {labeler: best}
        k_of = {}
        for comparison, label in self.training_set(task=task):
            picks[comparison.id][label.labeler] = label.best
            k_of[comparison.id] = comparison.k
        shared = {cid: p for cid, p in picks.items() if len(p) >= 2}
        per_pair = defaultdict(lambda: [0, 0])  # (a, b) -> [agreeing, total]
        for by_labeler in shared.values():
            for a, b in combinations(sorted(by_labeler), 2):
                per_pair[a, b][0] += by_labeler[a] == by_labeler[b]
                per_pair[a, b][1] += 1
        agree = sum(v[0] for v in per_pair.values())
        total = sum(v[1] for v in per_pair.values())
        return {
            "n_comparisons": len(shared),
            "n_pairs": total,
            "agreement": agree / total if total else None,
            "chance": sum(1 / k_of[cid] for cid in shared) / len(shared) if shared else None,
            "pairs": [
                {"labeler_a": a, "labeler_b": b, "n": n, "agreement": same / n}
                for (a, b), (same, n) in sorted(per_pair.items())
            ],
        }

    def to_dataset(self, task=None, shape="kway", kind=None):
        """The training set as a datasets.Dataset.

        shape="kway": columns query, sample0..sample{k-1}, best, labeler, comparison_id (the paper's format).
        shape="pairwise": columns prompt, chosen, rejected, labeler, comparison_id: the best response against
        each other response, k-1 rows per label (TRL's reward-trainer format).
        """
        if shape not in ("kway", "pairwise"):
            raise ValueError(f"shape must be 'kway' or 'pairwise', got {shape!r}")
        import datasets  # here, not at the top: the store is used where datasets is not needed

        rows = self.training_set(task=task, kind=kind)
        if shape == "pairwise":
            columns = {"prompt": [], "chosen": [], "rejected": [], "labeler": [], "comparison_id": []}
            for c, label in rows:
                for j, response in enumerate(c.responses):
                    if j != label.best:
                        columns["prompt"].append(c.query)
                        columns["chosen"].append(c.responses[label.best])
                        columns["rejected"].append(response)
                        columns["labeler"].append(label.labeler)
                        columns["comparison_id"].append(c.id)
            return datasets.Dataset.from_dict(columns)

        ks = sorted({c.k for c, _ in rows})
        if len(ks) > 1:
            raise LabelStoreError(
                f"the selected labels mix comparisons with k = {ks} responses, which do not fit one k-way table; "
                "pass task= (and kind=) to select comparisons of one size, or use shape='pairwise'"
            )
        k = ks[0] if ks else 0
        columns = {"query": [c.query for c, _ in rows]}
        for i in range(k):
            columns[f"sample{i}"] = [c.responses[i] for c, _ in rows]
        columns["best"] = [label.best for _, label in rows]
        columns["labeler"] = [label.labeler for _, label in rows]
        columns["comparison_id"] = [c.id for c, _ in rows]
        return datasets.Dataset.from_dict(columns)

    def import_openai_labels(self, source, tokenizer, task, labeler="openai", padding_token=None, limit=None) -> int:
        """Import a label file released with lm-human-preferences (e.g. labels/sentiment/offline_5k.json).

        source: the file's path, or its URL (http, https or file): downloaded once into $LABKIT_CACHE/labels
        (default ~/.cache/labkit/labels) and read from there afterwards.
        The file is a JSON list of {"query": [token ids], "sample0".."sample{k-1}": [token ids], "best": int}.
        The released files use GPT-2's tokenizer: pass AutoTokenizer.from_pretrained("gpt2").
        task: a Task or a paper task's name. Stored as labkit stores its own comparisons: the query with the task's
        prefix and suffix around it (released lm_tasks.py query_formatter; the files hold bare queries) and the
        responses, as token ids and decoded text, without the file's padding.
        padding_token: the id the file pads queries and responses with, removed wherever it occurs. None: the
        released encoder's rule, the tokenizer's base vocabulary size + 2 (language/encodings.py: 50259 for GPT-2).
        limit: import only the file's first `limit` rows, as the released trainer reads the first `labels.num_train`
        (train_reward.py download_labels; launch.py: 4,992 for the style tasks). None: every row.

        Refused whole, before anything is written: a malformed row, an id outside the tokenizer's vocabulary, or
        ids that do not look like the tokenizer's (most sampled queries do not decode and encode back to the same
        ids). Stores one comparison (sources "openai") and one label per row in one transaction and returns the
        number of labels added. Importing the same file into the same task again adds nothing and returns 0.
        """
        # Here, not at the top: the store loads without the rest of labkit (and labkit.reward.model loads torch).
        # query_format_ids is the reward model's rule, so that it finds and removes exactly these prefix ids.
        from labkit.reward.model import query_format_ids
        from labkit.tasks import get_task

        _check_labeler(labeler)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a whole number >= 1 (the first rows to import) or None, not {limit!r}.")
        task = get_task(task)
        n_vocab = _vocabulary_size(tokenizer)
        pad = _file_padding(tokenizer, n_vocab, padding_token)
        path, origin = _label_file(source)
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        expected = 'a JSON list of {"query": [ints], "sample0": [ints], ..., "best": int}'
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise LabelStoreError(f"{origin} is not JSON ({e}); expected {expected}") from e
        if not isinstance(data, list):
            raise LabelStoreError(f"{origin} holds a JSON {type(data).__name__}; expected {expected}")
        if not data:
            raise LabelStoreError(f"{origin} holds an empty list: no labels to import; expected {expected}")
        # Check and decode everything before taking the write lock: a tokenizer can be slow, other writers
        # should not wait, and one bad row refuses the whole file.
        if limit is not None and limit > len(data):  # the released trainer asserts the same (len(results) >= total)
            raise LabelStoreError(f"{origin} holds {len(data)} rows, fewer than limit={limit}. Nothing was imported.")
        data = data if limit is None else data[:limit]
        parsed = [_parse_openai_row(row, i, origin, expected, pad, n_vocab) for i, row in enumerate(data)]
        _check_ids_are_the_tokenizers(tokenizer, [query for query, _, _ in parsed], origin)
        fmt = query_format_ids(task, tokenizer)
        queries = [fmt["prefix"] + query + fmt["suffix"] for query, _, _ in parsed]
        query_texts = _decode(tokenizer, queries)
        sample_texts = iter(_decode(tokenizer, [s for _, samples, _ in parsed for s in samples]))
        rows = []
        for i, (query, query_text, (_, samples, best)) in enumerate(zip(queries, query_texts, parsed)):
            try:
                comparison = _comparison_row(
                    task.name, query_text, [next(sample_texts) for _ in samples],
                    query_tokens=query, response_tokens=samples, sources="openai",
                    extra={"imported_from": origin, "import_sha256": digest, "row": i},
                )
            except ValueError as e:
                raise LabelStoreError(f"{origin} row {i}: {e}. Nothing was imported.") from e
            rows.append((comparison, best))
        now = time.time()
        with self._write() as db:
            already = db.execute(
                "SELECT count(*) FROM comparisons WHERE task = ? AND json_extract(extra, '$.import_sha256') = ?",
                (task.name, digest),
            ).fetchone()[0]
            if not already:
                cids = [db.insert_comparison(comparison, now) for comparison, _ in rows]
                k = operator.itemgetter(4)  # the comparison row's k
                db.insert_actions("labels", [(cid, best, list(range(k(c))), labeler, None, None)
                                             for cid, (c, best) in zip(cids, rows)], now)
        if already:
            # Re-running a notebook cell must not double every label.
            warnings.warn(f"{origin} was already imported into task {task.name!r} ({already} comparisons); "
                          "nothing was added", stacklevel=2)
            return 0
        return len(rows)

    def export_openai_labels(self, path, task, kind=None, *, tokenizer=None) -> int:
        """Write the training set of `task` in the released label format, from the stored token ids; returns the
        number of rows written.

        One row per (comparison, labeler), as `training_set`: {"query": [ids], "sample0".."sample{k-1}": [ids],
        "best": that labeler's live label}. The query is written without the task's prefix and suffix, as the
        released files hold it; for a task that has them (tldr, cnndm) pass the tokenizer the comparisons were
        made with, which gives their ids. `import_openai_labels` reads the file back into the same comparisons.
        Comparisons stored without token ids are refused (the format holds ids only); nothing is written then.
        The file is replaced atomically: a crash leaves the old one or the new one, never half of it.
        """
        from labkit.tasks import get_task  # here: the store loads without the rest of labkit

        task = get_task(task)
        strip = list  # a task without prefix or suffix stores its queries bare already
        if task.query_prefix or task.query_suffix:
            if tokenizer is None:
                raise ValueError(
                    f"task {task.name!r} puts {task.query_prefix!r} / {task.query_suffix!r} around its queries, which "
                    "the released format leaves out: pass the tokenizer the comparisons were made with "
                    "(tokenizer=...) so that their ids can be removed. Nothing was written.")
            # The reward model's own rule (it loads torch: only for tasks that need it), so that the file's queries
            # are exactly the ids the reward model reads.
            from labkit.reward.model import query_format_ids, strip_query_format

            fmt = query_format_ids(task, tokenizer)
            strip = lambda query: strip_query_format(query, fmt)  # noqa: E731
        pairs = self.training_set(task=task.name, kind=kind)
        where = f"task {task.name!r}" + (f", kind {kind!r}" if kind is not None else "")
        if not pairs:
            raise LabelStoreError(f"{self.path} holds no live labels for {where}: nothing to export. Check the task "
                                  "and kind (store.counts() lists what is there). Nothing was written.")
        missing = sorted({c.id for c, _ in pairs if not c.query_tokens or not all(c.response_tokens)})
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise LabelStoreError(
                f"{len(missing)} labeled comparisons of {where} have no stored token ids (ids {shown}): they were "
                "added as text only, and the released format holds token ids only. Add them again with "
                "query_tokens= and response_tokens=, or select others with kind=. Nothing was written.")
        out = []
        for c, label in pairs:
            query = strip(c.query_tokens)
            if not query:
                raise LabelStoreError(f"comparison {c.id}'s query holds only the task's prefix and suffix, no text: "
                                      "the released format cannot hold an empty query. Nothing was written.")
            out.append({"query": query, **{f"sample{j}": t for j, t in enumerate(c.response_tokens)},
                        "best": label.best})
        _write_atomically(Path(path).expanduser(), json.dumps(out, separators=(",", ":")).encode())
        return len(out)

    def integrity_check(self) -> str:
        """SQLite's full consistency check plus the foreign keys: "ok" when the file is healthy."""
        with self._read() as db:  # damage SQLite cannot walk past raises LabelStoreError
            result = "\n".join(r[0] for r in db.execute("PRAGMA integrity_check"))
            broken = db.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            result += f"\nforeign key violations: {broken}"
        return result


class _Tx:
    """The connection as seen inside one transaction, with the inserts that need several statements."""

    def __init__(self, conn):
        self.conn = conn
        self.execute = conn.execute

    def executescript_in_transaction(self, script):
        # sqlite3's executescript() would COMMIT first; run the statements one by one instead so a
        # migration and its version bump land in the same transaction.
        for statement in _split_sql(script):
            self.conn.execute(statement)

    def insert_comparison(self, row, now) -> int:
        cur = self.conn.execute(
            """INSERT INTO comparisons (task, kind, query, query_tokens, k, responses, response_tokens,
                                        sources, reference, extra, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (*row, now),
        )
        return cur.lastrowid

    def insert_actions(self, table, rows, now) -> list[int]:
        """Insert checked label rows (table "labels") or skip rows ("skips"); returns their ids."""
        first = self.conn.execute(_NEXT_ACTION_ID).fetchone()[0]
        ids = list(range(first, first + len(rows)))
        if table == "labels":
            self.conn.executemany(
                """INSERT INTO labels (id, comparison_id, best, permutation, labeler, shown_at, submitted_at, note)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                [(i, cid, best, json.dumps(perm), who, shown, now, note)
                 for i, (cid, best, perm, who, shown, note) in zip(ids, rows)],
            )
        else:
            self.conn.executemany(
                """INSERT INTO skips (id, comparison_id, permutation, labeler, shown_at, submitted_at, note)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [(i, cid, json.dumps(perm), who, shown, now, note)
                 for i, (cid, _, perm, who, shown, note) in zip(ids, rows)],
            )
        return ids


def _refuse_if_done(db, comparison_id, labeler):
    """Inside a write transaction: raise AlreadyLabeledError if `labeler` has a live label or skip on the comparison."""
    row = db.execute(
        """SELECT 'label', id FROM live_labels WHERE comparison_id = ? AND labeler = ?
           UNION ALL SELECT 'skip', id FROM live_skips WHERE comparison_id = ? AND labeler = ?
           ORDER BY 2 DESC LIMIT 1""",
        (comparison_id, labeler, comparison_id, labeler),
    ).fetchone()
    if row is not None:
        kind, action_id = row
        raise AlreadyLabeledError(
            f"{labeler!r} already has a live {kind} (id {action_id}) on comparison {comparison_id}: nothing was "
            "written. To replace it, retract it first (undo, or retract_label), or call without if_pending=True "
            "to append a newer label.",
            comparison_id, labeler, {"type": kind, "id": action_id})


def _action_row(comparison_id, best, labeler, permutation=None, shown_at=None, note=None, *, is_label) -> tuple:
    """Check a label's (is_label) or skip's arguments as far as possible without the file; return
    (comparison_id, best, permutation, labeler, shown_at, note)."""
    comparison_id = _index(comparison_id, "comparison_id", "an int id returned by add_comparison")
    if is_label:
        best = _index(best, "best", "an int index into the comparison's responses (0..k-1, stored order)")
    _check_labeler(labeler)
    if permutation is not None:
        if isinstance(permutation, (str, bytes)):
            raise ValueError(f"permutation must be a list of ints (display position -> stored index), got {permutation!r}")
        permutation = [_index(p, "permutation", "a list of ints (display position -> stored index)")
                       for p in permutation]
    if shown_at is not None and (isinstance(shown_at, bool) or not isinstance(shown_at, (int, float))
                                 or not math.isfinite(shown_at)):
        raise ValueError(f"shown_at must be a unix time in seconds (e.g. time.time()) or None, got {shown_at!r}")
    if note is not None and not isinstance(note, str):
        raise ValueError(f"note must be a string or None, got {type(note).__name__}")
    return comparison_id, best, permutation, labeler, shown_at, note


def _fit_action(row, ks) -> tuple:
    """Check an _action_row against its comparison's k (ks: comparison id -> k); fill in the default permutation."""
    comparison_id, best, permutation, *rest = row
    if comparison_id not in ks:
        raise KeyError(f"no comparison with id {comparison_id}; add it with add_comparison() first")
    k = ks[comparison_id]
    if best is not None and not 0 <= best < k:
        raise ValueError(f"best={best} is out of range: comparison {comparison_id} has {k} responses "
                         f"(0..{k - 1}, stored order)")
    permutation = list(range(k)) if permutation is None else permutation
    if sorted(permutation) != list(range(k)):
        raise ValueError(f"permutation must list each of 0..{k - 1} once (display position -> stored "
                         f"index) for comparison {comparison_id}, got {permutation}")
    return comparison_id, best, permutation, *rest


def _index(value, name, expected) -> int:
    """An int from an int, numpy or torch integer; refuses bools (True is not response 1), floats and strings."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise ValueError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def _check_labeler(labeler):
    if not isinstance(labeler, str) or not labeler.strip():
        raise ValueError(f"labeler must be a non-empty string naming who labeled, got {labeler!r}")


def _ro_uri(path: Path) -> str:
    """A read-only URI for `path`. In a folder we cannot write, SQLite cannot create the PATH-shm index a WAL
    reader needs; when there is no PATH-wal either, every committed row is in the file itself, so it is read
    as immutable (no locks, no side files)."""
    uri = f"{path.as_uri()}?mode=ro"
    if not os.access(path.parent, os.W_OK) and not Path(f"{path}-wal").exists():
        uri += "&immutable=1"
    return uri


def _connect(path: Path, read_only: bool):
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so each write is exactly one transaction.
    conn = sqlite3.connect(_ro_uri(path) if read_only else path, uri=read_only, timeout=BUSY_TIMEOUT_S,
                           isolation_level=None, check_same_thread=False)
    # fsync at every commit, not only at checkpoints: a label whose id was returned survives a power cut (a
    # SIGKILL cannot tell this from OFF: the OS still has the page; a power cut can). EXTRA is FULL in WAL mode,
    # and in the rare rollback-journal session it also syncs the folder after the journal is deleted, without
    # which a power cut can bring the journal back and roll back a commit.
    conn.execute("PRAGMA synchronous=EXTRA")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _check_existing_file(path: Path, read_only: bool) -> bool:
    """Raise LabelStoreError unless `path` is missing, empty, an empty SQLite db, or a healthy labkit store.
    Reads only: a file that is refused comes out of this byte-for-byte unchanged. (SQLite's read-only open of a
    WAL-mode file may leave an empty PATH-wal and a PATH-shm beside it, which change nothing; only SQLite's
    last writer can know that deleting them is safe.)

    Returns True when SQLite must first roll back a transaction a crashed program left unfinished (a hot
    PATH-journal): only a writable connection can, on its first read, so the caller checks the file then."""
    if not path.exists():
        if read_only:
            raise LabelStoreError(f"{path} does not exist; read_only=True opens an existing label store. "
                                  "Check the path, or drop read_only=True to create a new store there.")
        return False
    what_to_do = "Pass a new path to LabelStore (it creates the file), or restore this file from a backup."
    if not path.is_file():
        raise LabelStoreError(f"{path} is not a regular file. {what_to_do}")
    with open(path, "rb") as f:
        header = f.read(100)
    if len(header) == 0:
        wal = Path(f"{path}-wal")
        if wal.exists() and wal.stat().st_size:
            # SQLite would delete that log on open (it cannot belong to an empty file): it may hold the labels.
            raise LabelStoreError(
                f"{path} is empty, but its write-ahead log {wal.name} holds {wal.stat().st_size:,} bytes: the "
                "store was probably cut short (an interrupted copy, a full disk). It is damaged; nothing was "
                "written to it and the file was not changed. Restore the store from a backup, and keep both files "
                "as they are until then: any SQLite program that opens the empty file deletes the log."
            )
        if read_only:
            raise LabelStoreError(f"{path} is empty: it holds no labels to read (read_only=True)")
        return False  # a zero-length file (e.g. from tempfile.mkstemp) holds nothing to lose: it becomes a store
    if not header.startswith(_SQLITE_MAGIC):
        raise LabelStoreError(f"{path} is not an SQLite database (its first bytes are {header[:16]!r}), so it "
                              f"is not a labkit label store. The file was not changed. {what_to_do}")
    # Ask SQLite itself, read-only: after a crash the newest header may still sit in the -wal file.
    try:
        conn = sqlite3.connect(_ro_uri(path), uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            _inspect(conn, path, read_only)
        finally:
            conn.close()
    except sqlite3.Error as e:
        ours = int.from_bytes(header[68:72], "big") == APPLICATION_ID  # PRAGMA application_id, from the header
        if getattr(e, "sqlite_errorcode", None) == _SQLITE_READONLY_ROLLBACK:  # Python >= 3.11
            if ours and not read_only:
                return True  # our own store, left mid-transaction by a crash: SQLite's recovery is safe
            raise LabelStoreError(
                f"{path} holds a transaction a crashed program left unfinished ({path.name}-journal), which only "
                "a writable open can roll back. The file was not changed. "
                + ("Open it once with LabelStore(path) (without read_only=True), or read a copy."
                   if ours else "Open it with the program that made it.")
            ) from e
        raise LabelStoreError(_explain(e, path, "read")) from e
    return False


def _inspect(conn, path: Path, read_only: bool):
    """Refuse a database that is not a labkit store or that SQLite finds damaged (sqlite3.Error for damage
    SQLite cannot read past). The application id comes first, so another program's large database is not
    scanned."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    if app_id == APPLICATION_ID and version > SCHEMA_VERSION:
        raise LabelStoreError(_too_new(path, version))
    if not (app_id == APPLICATION_ID or (app_id == 0 and not tables)):
        raise LabelStoreError(
            f"{path} is an SQLite database of another application (application_id={app_id:#x}, tables "
            f"{tables[:5]}), not a labkit label store. The file was not changed. Pass a new path to LabelStore "
            "(it creates the file), or restore this file from a backup."
        )
    # integrity_check rather than quick_check: it also checks that each index matches its table (pending()
    # and labels(labeler=) read through them), for a little more time; both read the whole file once.
    problems = [r[0] for r in conn.execute("PRAGMA integrity_check(5)")]
    if problems != ["ok"]:
        raise LabelStoreError(_damaged(path, "; ".join(problems).replace("\n", " ")))
    if read_only and version < SCHEMA_VERSION:
        raise LabelStoreError(f"{path} is an empty SQLite database: it holds no labels to read (read_only=True)")


def _file_problem(e: sqlite3.Error, path: Path) -> str | None:
    """The message for an SQLite error that means the file is damaged or read-only; None for other errors."""
    code = getattr(e, "sqlite_errorcode", 0) & 0xFF  # Python >= 3.11; before that, SQLite's wording
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "malformed" in str(e) or "not a database" in str(e):
        return _damaged(path, str(e))
    if code == _SQLITE_READONLY or "readonly database" in str(e):
        return _read_only_message(path, f"SQLite says {e}")
    return None


def _explain(e: sqlite3.Error, path: Path, doing: str) -> str:
    """LabelStoreError's message for an error SQLite raised while we tried to `doing` the file."""
    return _file_problem(e, path) or (
        f"could not {doing} {path}: {e}. Nothing was written to it. If another program holds the file, close "
        "it and retry; if the disk is full or the folder read-only, free space or pick another path.")


def _damaged(path, detail):
    return (f"{path} is damaged and cannot be read as a label store (SQLite: {detail}). The file was not changed: "
            "nothing was written to it. Restore it from a backup or a copy. To salvage the rows that are still "
            f"readable: `sqlite3 '{path}' .recover | sqlite3 salvaged.db` (the sqlite3 command-line tool; "
            ".recover keeps the labkit header), then check it with LabelStore('salvaged.db', read_only=True).")


def _read_only_message(path, why):
    return (f"{path} is read-only: {why}. Nothing was written to it. To add labels, copy it (with its -wal "
            "file, if any) somewhere writable and open the copy; to only read it, open it with "
            "LabelStore(path, read_only=True).")


def _too_new(path, version):
    return (f"{path} has label schema v{version}, but this labkit only knows up to v{SCHEMA_VERSION}. "
            "Upgrade labkit to open it. The file was not changed.")


def _comparison_row(task, query, responses, query_tokens=None, response_tokens=None, sources="unknown",
                    kind="train", reference=None, extra=None) -> tuple:
    """Validate add_comparison's arguments; return the column values in insert order."""
    if not isinstance(task, str) or not task.strip():
        raise ValueError(f"task must be a non-empty string such as 'sentiment', got {task!r}")
    if not isinstance(kind, str) or not kind.strip():
        raise ValueError(f"kind must be a non-empty string such as 'train' or 'validation', got {kind!r}")
    if not isinstance(query, str):
        raise ValueError(f"query must be the query text (a str), got {type(query).__name__}")
    if not query.strip():
        raise ValueError(f"query is {'empty' if not query else 'only whitespace'} ({query!r}): a labeler needs "
                         "the text the responses answer")
    if query_tokens is not None:  # not given: stored as []
        query_tokens = _token_list(query_tokens, "query_tokens")
        if not query_tokens:
            raise ValueError("query_tokens is an empty list: pass the query's token ids, or leave it out")
    if isinstance(responses, str):
        raise ValueError("responses must be a list of strings (the response texts), got one string")
    responses = list(responses)
    if not all(isinstance(r, str) for r in responses):
        raise ValueError("responses must be a list of strings (the response texts)")
    k = len(responses)
    if k < 2:
        raise ValueError(f"a comparison needs at least 2 responses to choose between, got {k}")
    if response_tokens is None:
        response_tokens = [[] for _ in responses]
    response_tokens = [_token_list(t, f"response_tokens[{i}]") for i, t in enumerate(response_tokens)]
    if len(response_tokens) != k:
        raise ValueError(f"response_tokens has {len(response_tokens)} entries but there are {k} responses")
    for i, (text, tokens) in enumerate(zip(responses, response_tokens)):
        # A sample whose tokens all decode to nothing (e.g. only end-of-text tokens) is a real, judgeable
        # response; an empty text with no tokens is a bug upstream. Whitespace is kept: "\n" can be a sample.
        if not text and not tokens:
            raise ValueError(f"responses[{i}] is empty and has no tokens: pass the response text (or, for a "
                             "sample that decodes to no text, its response_tokens)")
    sources = [sources] * k if isinstance(sources, str) else list(sources)
    if len(sources) != k or not all(isinstance(s, str) for s in sources):
        raise ValueError(f"sources must be one string or a list of {k} strings (one per response), got {sources!r}")
    if reference is not None and not isinstance(reference, str):
        raise ValueError(f"reference must be a string or None, got {type(reference).__name__}")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
    try:
        # allow_nan=False: SQLite's JSON functions (import_openai_labels' duplicate check) reject NaN
        extra_json = json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must be JSON-serialisable (str, numbers, lists, dicts): {e}") from e
    return (task, kind, query, json.dumps(query_tokens or []), k, json.dumps(responses),
            json.dumps(response_tokens), json.dumps(sources), reference, extra_json)


def _token_list(tokens, name) -> list[int]:
    if isinstance(tokens, (str, bytes)):
        raise ValueError(f"{name} must be a list of token ids (ints), got a {type(tokens).__name__}")
    try:
        return [operator.index(t) for t in tokens]
    except TypeError as e:
        raise ValueError(f"{name} must be a list of token ids (ints): {e}. For a tensor, pass tensor.tolist()") from e


def _parse_openai_row(row, i, origin, expected, pad, n_vocab):
    """One row of a released label file: (query, samples, best), the padding id removed from every list and each
    remaining id checked against the tokenizer's vocabulary."""
    if not isinstance(row, dict) or not {"query", "sample0", "sample1", "best"} <= row.keys():
        got = f"keys {sorted(row)}" if isinstance(row, dict) else f"a {type(row).__name__}"
        raise LabelStoreError(f"{origin} row {i}: expected {expected}, got {got}")
    k = 0
    while f"sample{k}" in row:
        k += 1
    names = ["query", *(f"sample{j}" for j in range(k))]
    try:
        lists = [_token_list(row[name], name) for name in names]
    except ValueError as e:
        raise LabelStoreError(f"{origin} row {i}: {e}; expected {expected}") from e
    if pad is not None:
        # The released code pads queries to query_length and responses after their truncation token with this id
        # (language/datasets.py, lm_tasks.py postprocess_fn_from_hparams); it is no token, so it leaves no text.
        lists = [[t for t in ids if t != pad] for ids in lists]
    empty = [name for name, ids in zip(names, lists) if not ids]
    if empty:
        padding = f" (once the padding id {pad} is removed)" if pad is not None else ""
        raise LabelStoreError(f"{origin} row {i}: {', '.join(empty)} is an empty token list{padding}; "
                              f"expected {expected}")
    for name, ids in zip(names, lists):
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise LabelStoreError(
                f"{origin} row {i}: {name} holds the token id {bad}, which this tokenizer does not have (its ids are "
                f"0..{n_vocab - 1}): the file was made with another tokenizer. The released files use GPT-2's "
                "(50257 ids): pass AutoTokenizer.from_pretrained(\"gpt2\"). Nothing was imported.")
    best = row["best"]
    if isinstance(best, bool) or not isinstance(best, int) or not 0 <= best < k:
        raise LabelStoreError(f"{origin} row {i}: best={best!r} must be an int in 0..{k - 1}; expected {expected}")
    return lists[0], lists[1:], best


# Rows whose queries are decoded and encoded again to tell whether the ids are the tokenizer's: enough to tell
# a tokenizer from another, a fraction of a second.
_ROUND_TRIP_ROWS = 200


def _check_ids_are_the_tokenizers(tokenizer, queries, origin):
    """Refuse ids that another tokenizer made. A bigger vocabulary passes the id range check, and any ids decode
    to some text; but a tokenizer's own encoding of real text decodes and encodes back to the same ids (all but a
    few, e.g. a query cut inside a multi-byte character), while another's seldom does."""
    step = max(1, len(queries) // _ROUND_TRIP_ROWS)
    picked = list(range(0, len(queries), step))[:_ROUND_TRIP_ROWS]  # spread over the file, not only its head
    texts = _decode(tokenizer, [queries[i] for i in picked], skip_special_tokens=False,
                    clean_up_tokenization_spaces=False)  # the clean-up would change spacing: no round trip
    failed = [i for i, text in zip(picked, texts) if tokenizer.encode(text, add_special_tokens=False) != queries[i]]
    if 2 * len(failed) > len(picked):
        raise LabelStoreError(
            f"{origin}: the ids do not look like this tokenizer's: {len(failed)} of {len(picked)} sampled queries "
            f"(e.g. row {failed[0]}) do not encode back to the same ids once decoded. The released files use "
            "GPT-2's tokenizer: pass AutoTokenizer.from_pretrained(\"gpt2\"). Nothing was imported.")


def _decode(tokenizer, seqs, **kwargs) -> list[str]:
    """Texts of many id lists. By default as labkit decodes its own samples (labkit.sampling: special tokens
    dropped), so that imported comparisons read like sampled ones."""
    kwargs = {"skip_special_tokens": True, **kwargs}
    if hasattr(tokenizer, "batch_decode"):  # a fast tokenizer decodes a batch in parallel
        return list(tokenizer.batch_decode(seqs, **kwargs))
    return [tokenizer.decode(s, **kwargs) for s in seqs]


def _vocabulary_size(tokenizer) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer (len(), encode(), decode()), got "
                        f"{type(tokenizer).__name__}; for the released files: AutoTokenizer.from_pretrained(\"gpt2\")"
                        ) from None


def _file_padding(tokenizer, n_vocab, padding_token) -> int | None:
    """The id to remove from a label file's token lists; None: remove nothing."""
    if padding_token is None:
        # The released encoder pads with len(encoder) + 2 (language/encodings.py), its vocabulary without added
        # tokens: a Hugging Face tokenizer's vocab_size. So gpt2 with a pad token added (load_lm adds one, which
        # makes len() 50258) still gets the files' 50259.
        base = getattr(tokenizer, "vocab_size", None)
        base = base if isinstance(base, int) and not isinstance(base, bool) else n_vocab
        # A tokenizer with more added tokens than that has a real token at that id: files made for it cannot hold
        # that padding, so nothing is removed rather than real text.
        return base + 2 if base + 2 >= n_vocab else None
    pad = _index(padding_token, "padding_token",
                 "the id the file pads with (the released files: 50259, GPT-2's 50257 ids + 2), or None")
    if pad < n_vocab:
        raise ValueError(f"padding_token={pad} is a real token of this tokenizer (its ids are 0..{n_vocab - 1}): "
                         "removing it would delete text. The released files pad with an id outside the vocabulary "
                         "(50259 for GPT-2); leave padding_token=None for that.")
    return pad


_URL_SCHEMES = ("http", "https", "file")
# Seconds without data before a download gives up (a stalled connection; not the whole download's time).
_DOWNLOAD_TIMEOUT_S = 60


def _label_file(source) -> tuple[Path, str]:
    """(the local file to read, how messages name it) for a path or an http/https/file URL."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source must be a label file's path or URL (a str or Path), got {source!r}")
    if "://" in source:
        scheme = urlsplit(source).scheme.lower()
        if scheme not in _URL_SCHEMES:
            raise LabelStoreError(f"{source}: only {', '.join(_URL_SCHEMES)} URLs can be downloaded here. Download "
                                  "the file by hand and pass its path. Nothing was imported.")
        return _download_once(source), source
    path = Path(source).expanduser()
    if not path.is_file():
        raise LabelStoreError(f"{path} {'is not a file' if path.exists() else 'does not exist'}: pass the path of a "
                              "label file, or its URL (https://...). Nothing was imported.")
    return path, str(path)


def _download_once(url) -> Path:
    """The file at `url`, downloaded into $LABKIT_CACHE/labels the first time and read from there afterwards."""
    from urllib.request import urlopen

    from labkit.models import cache_dir  # labkit's one cache folder rule ($LABKIT_CACHE)

    # The URL's hash keeps apart files of one name (sentiment/ and descriptiveness/ both hold offline_5k.json).
    name = Path(urlsplit(url).path).name or "labels.json"
    target = cache_dir() / "labels" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"
    if target.is_file():
        return target
    # A download cut short must never be taken for the file: write beside it and rename when complete. The pid
    # keeps two processes fetching at once out of each other's way; the rename makes the last one win, whole.
    part = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
            size = out.tell()
            out.flush()
            os.fsync(out.fileno())
            announced = response.headers.get("Content-Length")
        if announced is not None and announced.isdigit() and size != int(announced):
            raise OSError(f"the connection closed after {size:,} of {int(announced):,} bytes")
        os.replace(part, target)
    except (OSError, ValueError, HTTPException) as e:  # URLError and timeouts are OSErrors
        with suppress(OSError):
            part.unlink()
        raise LabelStoreError(
            f"could not download {url} ({e}). Download it by hand, e.g. `curl -L -o labels.json '{url}'`, and "
            "pass the file's path instead. Nothing was imported.") from e
    return target


def _write_atomically(path: Path, data: bytes):
    """Write `path` so that a crash leaves either its old content or all of `data`."""
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        with open(part, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except BaseException:
        with suppress(OSError):
            part.unlink()
        raise


def _filters(*clauses, task=None, kind=None, labeler=None, source=None):
    """A WHERE clause over comparisons `c` (and labels `l` for labeler) with its parameters; `clauses` are
    extra conditions ANDed in. source: some response of the comparison comes from it (an element of the
    JSON list `c.sources`)."""
    clauses, args = list(clauses), []
    for column, value in (("c.task", task), ("c.kind", kind), ("l.labeler", labeler)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if source is not None:
        clauses.append("EXISTS (SELECT 1 FROM json_each(c.sources) WHERE json_each.value = ?)")
        args.append(source)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), args


def _comparison(row) -> Comparison:
    id, task, kind, query, query_tokens, _k, responses, response_tokens, sources, reference, extra, created = row
    return Comparison(id, task, kind, query, json.loads(query_tokens), json.loads(responses),
                      json.loads(response_tokens), json.loads(sources), reference, json.loads(extra), created)


def _label(row) -> Label:
    id, comparison_id, best, permutation, labeler, shown_at, submitted_at, note, retracted = row
    return Label(id, comparison_id, best, json.loads(permutation), labeler, shown_at, submitted_at, note,
                 bool(retracted))


def _split_sql(script):
    """Split a migration script into statements (sqlite3.complete_statement knows where each one ends)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement in migration: {current.strip()[:80]}")
    return statements
