"""Prompt sources: the embedded demo set, local files, and the paper's real datasets from the hub.

Every source yields `Prompt`s: the source text and, for summaries, a reference summary. Columns:

| task source  | local file columns          | hub dataset (needs internet)                         |
|--------------|-----------------------------|------------------------------------------------------|
| passages     | text                        | bookcorpus (consecutive lines joined into passages)  |
| tldr         | post, summary (optional)    | trl-lib/tldr (prompt/completion, post extracted)     |
| cnndm        | article, highlights (opt.)  | cnn_dailymail 3.0.0                                  |

A local file is read as UTF-8: .jsonl (one JSON object per line), .json (a JSON list of objects, or one
object per line), .csv (a header line, then one row per line) or .parquet. Every row must have a non-empty
text column; a file that breaks this is refused with its line or row number, never half-read.

The demo set under `labkit/demo_data/` was written for this project: short fiction passages in varied
moods, advice-forum posts with their authors' TL;DRs, and news-style articles about invented places with
highlights. It is demo data, small and synthetic, for trying the lab offline; not for paper numbers.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from labkit.tasks import Task, get_task

DEMO_DIR = Path(__file__).parent / "demo_data"
_DEMO_FILES = {"passages": "passages.jsonl", "tldr": "tldr.jsonl", "cnndm": "cnndm.jsonl"}
_COLUMNS = {"passages": ("text", None), "tldr": ("post", "summary"), "cnndm": ("article", "highlights")}
VALIDATION_EVERY = 7  # demo split: every 7th item is validation (about 14%), the rest train


@dataclass(frozen=True)
class Prompt:
    """One source text to build a query from, with its reference summary when there is one."""

    text: str
    reference: str | None = None


def _rows_to_prompts(rows, source: str, where: str) -> list[Prompt]:
    """Prompts from (place, row) pairs; `place` says where the row is ("line 3", "row 0"), for the errors."""
    text_col, ref_col = _COLUMNS[source]
    expected = text_col + (f" (and optionally {ref_col})" if ref_col else "")
    prompts = []
    for place, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}, {place}: expected an object with the column {expected}, got a "
                             f"{type(row).__name__} ({str(row)[:60]!r}).")
        if text_col not in row:
            raise ValueError(
                f"{where}, {place} has columns {sorted(row)}, but prompts for {source!r} tasks need the "
                f"column {expected}. Rename your columns or pass a file in that format."
            )
        text = _cell(row, text_col, where, place)
        if text is None or not text.strip():
            what = "empty (null)" if text is None else "empty" if not text else "only whitespace"
            raise ValueError(f"{where}, {place}: column {text_col!r} is {what}; every row needs a {text_col}. "
                             "Fill it in or delete the row.")
        ref = _cell(row, ref_col, where, place) if ref_col else None
        prompts.append(Prompt(text=text, reference=ref if ref and ref.strip() else None))  # blank: no reference
    return prompts


def _cell(row: dict, col: str, where: str, place: str) -> str | None:
    value = row.get(col)
    if isinstance(value, (dict, list)):
        raise ValueError(f"{where}, {place}: column {col!r} holds a {type(value).__name__}, expected text.")
    return None if value is None else str(value)


def _read_local(path: Path) -> list[tuple[str, dict]]:
    """A local file's rows, each with where it is in the file. Refuses an empty file and any line or row that
    cannot be read, naming it."""
    if not path.exists():
        raise FileNotFoundError(f"Prompt file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _parquet_rows(path)
    elif suffix in (".jsonl", ".json", ".csv"):
        text = _utf8(path)
        if suffix == ".csv":
            rows = _csv_rows(text, path)
        elif suffix == ".json" and text.lstrip().startswith("["):
            rows = _json_list_rows(text, path)
        else:
            rows = _jsonl_rows(text, path)
    else:
        raise ValueError(f"Prompt file {path}: unsupported format {suffix!r}; use .jsonl, .json, .parquet or .csv.")
    if not rows:
        header = ", or only a header line" if suffix == ".csv" else ""
        raise ValueError(f"Prompt file {path} has no rows (it is empty{header}). Pass a file with at least one prompt.")
    return rows


def _utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"Prompt file {path} is not UTF-8 text: line {line} (byte offset {e.start}) has the byte "
            f"{raw[e.start:e.start + 1]!r}, which is not UTF-8 ({e.reason}). Save it as UTF-8 (e.g. Excel's "
            "'CSV UTF-8', or pandas' to_csv(..., encoding='utf-8'))."
        ) from e
    return text.removeprefix("\ufeff")  # a byte-order mark, as Excel writes


def _jsonl_rows(text: str, path: Path) -> list[tuple[str, dict]]:
    rows = []
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and the like, which splitlines() splits on.
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"Prompt file {path}, line {n}: not valid JSON ({e.msg} at column {e.colno}). "
                                 "Each line must be one JSON object, e.g. {\"text\": \"...\"}.") from e
    return rows


def _json_list_rows(text: str, path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"Prompt file {path}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}). "
                         "A .json file must be a JSON list of objects, or one object per line.") from e
    return [(f"item {i} of the list", row) for i, row in enumerate(data)]


def _csv_rows(text: str, path: Path) -> list[tuple[str, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, header, line = [], None, 1  # line: where the next record starts (a quoted cell can span lines)
    try:
        for record in reader:
            place, line = f"line {line}", reader.line_num + 1
            if not record:  # a blank line
                continue
            if header is None:
                header = record
            elif len(record) > len(header):
                raise ValueError(f"Prompt file {path}, {place} has {len(record)} cells but the header has "
                                 f"{len(header)} ({header}). Quote cells that contain commas.")
            else:  # a short row lacks its last columns: they count as missing
                rows.append((place, dict(zip(header, record))))
    except csv.Error as e:
        raise ValueError(f"Prompt file {path}, line {reader.line_num}: not valid CSV ({e}).") from e
    return rows


def _parquet_rows(path: Path) -> list[tuple[str, dict]]:
    import pyarrow  # here, not at the top: only .parquet files need it (it comes with datasets)
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise ValueError(f"Prompt file {path} cannot be read as Parquet ({e}). Check that it is a complete "
                         ".parquet file, or save the prompts as .jsonl or .csv.") from e
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]


def _demo_rows(source: str, split: str) -> list[tuple[str, dict]]:
    path = DEMO_DIR / _DEMO_FILES[source]
    rows = _jsonl_rows(path.read_text(encoding="utf-8"), path)
    if split == "all":
        return rows
    is_val = [(i % VALIDATION_EVERY) == VALIDATION_EVERY - 1 for i in range(len(rows))]
    return [r for r, v in zip(rows, is_val) if v == (split == "validation")]


def _hub_rows(source: str, split: str) -> list[tuple[str, dict]]:
    text_col = _COLUMNS[source][0]
    # The paper's datasets are not ours to fix: a row with no text is dropped there, not refused.
    return [(f"row {i}", r) for i, r in enumerate(_hub_dicts(source, split)) if (r[text_col] or "").strip()]


def _hub_dicts(source: str, split: str) -> list[dict]:
    from datasets import load_dataset

    hub_split = {"train": "train", "validation": "validation"}[split]
    try:
        if source == "passages":
            lines = load_dataset("bookcorpus", split=hub_split if split == "train" else "train[-1%:]")
            # BookCorpus rows are single sentences: join 6 consecutive ones into a passage window.
            texts = [r["text"] for r in lines.select(range(min(len(lines), 60_000)))]
            return [{"text": " ".join(texts[i : i + 6])} for i in range(0, len(texts) - 6, 6)]
        if source == "tldr":
            ds = load_dataset("trl-lib/tldr", split=hub_split)
            rows = []
            for r in ds:
                post = r["prompt"].split("POST:", 1)[-1].rsplit("TL;DR:", 1)[0].strip()
                rows.append({"post": post, "summary": r["completion"].strip()})
            return rows
        ds = load_dataset("cnn_dailymail", "3.0.0", split=hub_split)
        return [{"article": r["article"], "highlights": r["highlights"]} for r in ds]
    except Exception as err:  # noqa: BLE001 - any hub failure gets the same advice
        raise RuntimeError(
            f"Could not load the {source!r} dataset from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''}). Without internet use source='demo' "
            "(the embedded demo set) or a local .jsonl/.parquet/.csv file with the same columns."
        ) from err


def load_prompts(task: str | Task, split: str = "train", source: str = "demo", limit: int | None = None) -> list[Prompt]:
    """Prompts for a task.

    source: "demo" (embedded, offline), "hub" (the paper's datasets, needs internet), or a path to a local
    .jsonl/.json/.parquet/.csv file with the columns in the module docstring (used as given, no split).
    split: "train", "validation" or "all" (demo and hub only).
    """
    task = get_task(task)
    if split not in ("train", "validation", "all"):
        raise ValueError(f"split must be 'train', 'validation' or 'all', not {split!r}.")
    if source == "demo":
        rows, where = _demo_rows(task.prompt_source, split), f"demo set {_DEMO_FILES[task.prompt_source]}"
    elif source == "hub":
        rows, where = _hub_rows(task.prompt_source, "train" if split == "all" else split), "hub dataset"
    else:
        rows, where = _read_local(Path(source)), f"Prompt file {source}"
    prompts = _rows_to_prompts(rows, task.prompt_source, where)
    return prompts[:limit] if limit is not None else prompts
