"""Prompt sources: the embedded demo set, the paper's released datasets, hub datasets and local files.

Every source yields `Prompt`s: the source text and, for summaries, a reference summary.

| source                           | what it is (and which paper it comes from)                                      |
|----------------------------------|---------------------------------------------------------------------------------|
| "demo"                           | the embedded demo set (below): small, synthetic, offline; no paper              |
| "paper"                          | the 2019 paper's own data (Ziegler et al., lm-human-preferences), as released    |
| "hub"                            | the task's default hub dataset: "bookcorpus", "trl-lib/tldr" or "cnn_dailymail" |
| "bookcorpus"                     | BookCorpus sentences (SamuelYang/bookcorpus parquet export), 6 lines a passage  |
| "trl-lib/tldr"                   | the 2020 "Learning to summarize" paper's filtered TL;DR set, prompt/completion   |
| "CarperAI/openai_summarize_tldr" | the same 2020 filtered TL;DR set, prompt/label                                  |
| "openai/summarize_from_feedback" | the 2020 paper's comparisons: their posts (or CNN/DM articles), no reference    |
| "webis/tldr-17"                  | Webis-TLDR-17: the unfiltered Reddit corpus the 2019 paper's TL;DR subset is from |
| "cnn_dailymail"                  | CNN/Daily Mail 3.0.0, the standard release (abisee/cnn_dailymail)               |
| a file path                      | a local .jsonl/.json/.csv/.parquet file in one of the schemas below             |

"paper" downloads each released file once into `$LABKIT_CACHE` (default ~/.cache/labkit): book passages, the TL;DR
subset, and for CNN/DM the released URL lists. The released code read the CNN/DM stories from a Google Cloud Storage
bucket (gs://), not from that web address, so their articles come from the hub's cnn_dailymail 3.0.0 rows whose `id` is the SHA1 of the URL. Those differ
from the released stories: the hub's builder joined each story's lines with spaces, adding " ." to lines without final
punctuation. Those joins are turned back into line breaks before the released cleanup (cnndm.py clean_up_start), but
paragraph breaks between punctuated lines are lost, and stories the hub dropped (no article or no highlights) are
missing (with a warning).

For the style tasks "paper" is the faithful source: bookcorpus text is lowercased and space-tokenised
("he said , `` no . ''"), unlike the released book passages. The hub's own `bookcorpus` is a loading script, which
datasets >= 4 refuses, and would download 74M rows to use 60,000; SamuelYang/bookcorpus holds the same rows, and its
parquet export (revision "refs/convert/parquet") is streamed: only its first 60,000 lines are read. webis/tldr-17 is
likewise a script dataset, read from its parquet export (the first 60,000 posts).

Hub datasets need internet. Rows with no text there are dropped (not ours to fix). `split` is "train", "validation"
or "all" (every split of the source, concatenated). A source with a single split (bookcorpus, webis/tldr-17) holds out
every 7th item as validation, as the demo set does. Local files are used as given.

Schemas. A local file's schema is detected from its rows' columns; `schema=` names one (needed for "bookcorpus", whose
{text} rows are otherwise read as one passage per row), and `columns={"text": ..., "reference": ...}` maps any other
columns (reference optional). A schema that does not hold the task's kind of text is refused.

| schema                             | columns                                  | text / reference                     |
|------------------------------------|------------------------------------------|--------------------------------------|
| labkit                             | text; post, summary; article, highlights | per task: passages; tldr; cnndm      |
| trl-lib/tldr                       | prompt, completion                       | the post inside prompt / completion  |
| CarperAI/openai_summarize_tldr     | prompt, label                            | the post inside prompt / label       |
| openai/summarize_from_feedback     | info {id, post, article, ...}, summaries | info.post (cnndm: info.article) / -, one per info.id |
| webis/tldr-17                      | content, summary (and body, ...)         | content / summary                    |
| lm-human-preferences/tldr          | content (and optionally summary)         | content, cleaned as released / summary |
| cnn_dailymail                      | article, highlights, id                  | article / highlights                 |
| bookcorpus                         | text, one sentence per row               | 6 rows joined into a passage / -     |
| lm-human-preferences/book_passages | one JSON string per line                 | the passage / -                      |

A local file is read as UTF-8: .jsonl (one JSON value per line), .json (a JSON list, or one value per line), .csv (a
header line, then one row per line) or .parquet. Every row must have non-empty text; a file that breaks this is
refused with its line or row number, never half-read.

The demo set under `labkit/demo_data/` was written for this project: short fiction passages in varied
moods, advice-forum posts with their authors' TL;DRs, and news-style articles about invented places with
highlights. It is demo data, small and synthetic, for trying the lab offline; not for paper numbers.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from urllib.parse import urlparse

from labkit.tasks import Task, get_task

DEMO_DIR = Path(__file__).parent / "demo_data"
_DEMO_FILES = {"passages": "passages.jsonl", "tldr": "tldr.jsonl", "cnndm": "cnndm.jsonl"}
_COLUMNS = {"passages": ("text", None), "tldr": ("post", "summary"), "cnndm": ("article", "highlights")}
VALIDATION_EVERY = 7  # demo and single-split sources: every 7th item is validation (about 14%), the rest train
SPLITS = ("train", "validation", "all")
BOOKCORPUS_LINES_PER_PASSAGE = 6  # BookCorpus rows are single sentences; 6 (~80 words) fill a 64-token query
STREAM_ROWS = 60_000  # rows read from the start of a streamed hub dataset (bookcorpus: 74M rows; tldr-17: 3.8M)
DOWNLOAD_TIMEOUT_S = 60
PAPER_URL = "https://openaipublic.blob.core.windows.net/lm-human-preferences"


@dataclass(frozen=True)
class Prompt:
    """One source text to build a query from, with its reference summary when there is one."""

    text: str
    reference: str | None = None


# ---- schemas: how a row in some dataset's layout becomes (text, reference) ----


class _Skip(Exception):
    """A row that belongs to another task (summarize_from_feedback mixes TL;DR posts and CNN/DM articles)."""


class _BadText(Exception):
    """A row whose text cannot be taken out of it: refused in a local file, dropped from hub or released data."""


@dataclass(frozen=True)
class _Schema:
    name: str
    columns: str
    """The columns, as named in messages."""
    kinds: tuple[str, ...]
    """The task prompt sources (Task.prompt_source) its text can serve."""
    holds: str
    """What its text is, for the message when it does not fit a task."""


SCHEMAS = {s.name: s for s in (
    _Schema("labkit", "text; post, summary; article, highlights", ("passages", "tldr", "cnndm"), "labkit's own columns"),
    _Schema("trl-lib/tldr", "prompt, completion", ("tldr",), "Reddit posts"),
    _Schema("CarperAI/openai_summarize_tldr", "prompt, label", ("tldr",), "Reddit posts"),
    _Schema("openai/summarize_from_feedback", "info, summaries, choice", ("tldr", "cnndm"), "Reddit posts and news articles"),
    _Schema("webis/tldr-17", "content, summary, body, normalizedBody, ...", ("tldr",), "Reddit posts"),
    _Schema("lm-human-preferences/tldr", "content (and optionally summary)", ("tldr",), "Reddit posts"),
    _Schema("cnn_dailymail", "article, highlights, id", ("cnndm",), "news articles"),
    _Schema("bookcorpus", "text, one sentence per row", ("passages",), "book sentences"),
    _Schema("lm-human-preferences/book_passages", "one JSON string per line", ("passages",), "book passages"),
)}
_COLUMNS_SCHEMA = _Schema("columns=", "as mapped", ("passages", "tldr", "cnndm"), "your columns")
# Raw-corpus columns: a {content} file with one of them is read as webis/tldr-17, one without as the released
# subset (cleaned as released); schema= decides otherwise.
_WEBIS_ONLY = ("body", "normalizedBody", "subreddit_id")


def _expected(kind: str) -> str:
    text_col, ref_col = _COLUMNS[kind]
    return text_col + (f" (and optionally {ref_col})" if ref_col else "")


def _need_object(row, place: str, where: str, expected: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}, {place}: expected an object with the column {expected}, got a "
                         f"{type(row).__name__} ({str(row)[:60]!r}).")
    return row


def _need_columns(row: dict, cols: tuple[str, ...], schema: str, place: str, where: str) -> None:
    missing = [c for c in cols if c not in row]
    if missing:
        raise ValueError(f"{where}, {place} has columns {sorted(row)}, but the {schema} schema needs the column(s) "
                         f"{', '.join(cols)}; it lacks {', '.join(missing)}.")


def _cell(row: dict, col: str, where: str, place: str) -> str | None:
    value = row.get(col)
    if isinstance(value, (dict, list)):
        raise ValueError(f"{where}, {place}: column {col!r} holds a {type(value).__name__}, expected text.")
    return None if value is None else str(value)


def _post_in_prompt(prompt: str | None) -> str | None:
    """The post inside a "SUBREDDIT: ...\\nTITLE: ...\\nPOST: ...\\nTL;DR:" prompt (one or two newlines between the
    parts); None when the prompt does not have that layout. A title is one line, so the first "\\nPOST:" starts the
    post; a post may itself say "TL;DR:", so the last one ends it."""
    if prompt is None or "\nPOST:" not in prompt or "\nTL;DR:" not in prompt:
        return None
    return prompt.split("\nPOST:", 1)[1].rsplit("\nTL;DR:", 1)[0].strip()


def _released_tldr_text(content: str) -> str:
    """The released tldr_generator's cleanup (lm_human_preferences/datasets/tldr.py): ftfy, at most one blank line."""
    return re.sub(r"\n{3,}", "\n\n", _ftfy(content)).strip()


def _ftfy(text: str) -> str:
    try:
        import ftfy  # here: only the released TL;DR and CNN/DM texts need it
    except ImportError as e:
        raise ImportError("The paper's TL;DR and CNN/DM texts are cleaned with ftfy, which is not installed: "
                          "pip install 'ftfy>=6'.") from e
    return ftfy.fix_text(text)


def _convert(schema: _Schema, kind: str, row, place: str, where: str, columns: dict | None):
    """(text, reference, dedup key) of one row; raises ValueError naming the row when it is not in the schema."""
    name = schema.name
    if name == "lm-human-preferences/book_passages":
        if not isinstance(row, str):  # books_generator json.loads each line: every line is one JSON string
            raise ValueError(f"{where}, {place}: expected a JSON string (one released book passage per line), got a "
                             f"{type(row).__name__} ({str(row)[:60]!r}).")
        return row, None, None
    if name == "columns=":
        row = _need_object(row, place, where, f"{columns['text']!r} (columns=)")
        if columns["text"] not in row:
            raise ValueError(f"{where}, {place} has columns {sorted(row)}, but columns= names the text column "
                             f"{columns['text']!r}, which it lacks. Fix the mapping or the file.")
        ref = columns.get("reference")
        return _cell(row, columns["text"], where, place), (_cell(row, ref, where, place) if ref else None), None
    if name in ("labkit", "cnn_dailymail", "bookcorpus"):
        text_col, ref_col = ("text", None) if name == "bookcorpus" else _COLUMNS[kind]
        expected = _expected("passages" if name == "bookcorpus" else kind)
        row = _need_object(row, place, where, expected)
        if text_col not in row:
            raise ValueError(f"{where}, {place} has columns {sorted(row)}, but prompts for {kind!r} tasks need the "
                             f"column {expected}. Rename your columns, pass a file in that format, or name your "
                             "columns with columns={'text': ..., 'reference': ...}.")
        return _cell(row, text_col, where, place), (_cell(row, ref_col, where, place) if ref_col else None), None
    row = _need_object(row, place, where, f"columns {schema.columns}")
    if name in ("trl-lib/tldr", "CarperAI/openai_summarize_tldr"):
        ref_col = "completion" if name == "trl-lib/tldr" else "label"
        _need_columns(row, ("prompt", ref_col), name, place, where)
        prompt = _cell(row, "prompt", where, place)
        post = _post_in_prompt(prompt)
        if post is None and prompt is not None and prompt.strip():
            raise _BadText(f"column 'prompt' does not have the layout 'SUBREDDIT: ... TITLE: ... POST: ... TL;DR:' "
                           f"of the {name} schema ({prompt[:60]!r}). Fix the row or delete it.")
        ref = _cell(row, ref_col, where, place)
        return post, (ref.strip() if ref is not None and name == "trl-lib/tldr" else ref), None
    if name == "openai/summarize_from_feedback":
        _need_columns(row, ("info",), name, place, where)
        info = row["info"]
        if not isinstance(info, dict):
            raise ValueError(f"{where}, {place}: column 'info' holds a {type(info).__name__}, expected an object with "
                             "id, post, title, subreddit, site, article.")
        # The comparisons hold TL;DR posts (info.post) and, in validation, CNN/DM articles (info.article).
        mine, other = ("article", "post") if kind == "cnndm" else ("post", "article")
        text, theirs = _cell(info, mine, where, place), _cell(info, other, where, place)
        if not (text or "").strip() and (theirs or "").strip():
            raise _Skip
        return text, None, info.get("id")  # the summaries are model samples being compared, not references
    if name in ("webis/tldr-17", "lm-human-preferences/tldr"):
        _need_columns(row, ("content",), name, place, where)
        text = _cell(row, "content", where, place)
        if name == "lm-human-preferences/tldr" and text is not None:
            text = _released_tldr_text(text)
        return text, _cell(row, "summary", where, place), None
    raise AssertionError(f"no converter for schema {name!r}")


def _empty_message(schema: _Schema, kind: str, columns: dict | None, what: str) -> str:
    if schema.name == "columns=":
        return f"column {columns['text']!r} is {what}; every row needs text there."
    if schema.name in ("labkit", "cnn_dailymail", "bookcorpus"):
        col = "text" if schema.name == "bookcorpus" else _COLUMNS[kind][0]
        return f"column {col!r} is {what}; every row needs a {col}."
    where_text = {"trl-lib/tldr": "the post in column 'prompt'",
                  "CarperAI/openai_summarize_tldr": "the post in column 'prompt'",
                  "openai/summarize_from_feedback": f"info.{'article' if kind == 'cnndm' else 'post'}",
                  "lm-human-preferences/book_passages": "the passage"}.get(schema.name, "column 'content'")
    return f"{where_text} is {what}; every row needs text."


def _to_prompts(rows, schema: _Schema, kind: str, where: str, strict: bool, columns: dict | None = None) -> list[Prompt]:
    """Prompts from (place, row) pairs. strict (local files): a row with no text is refused, naming it; otherwise (hub
    and released data, not ours to fix) it is dropped."""
    prompts, seen = [], set()
    for place, row in rows:
        try:
            text, ref, key = _convert(schema, kind, row, place, where, columns)
        except _Skip:
            continue
        except _BadText as bad:
            if strict:
                raise ValueError(f"{where}, {place}: {bad}") from None
            continue
        if text is None or not text.strip():
            if strict:
                what = "empty (null)" if text is None else "empty" if not text else "only whitespace"
                raise ValueError(f"{where}, {place}: {_empty_message(schema, kind, columns, what)} "
                                 "Fill it in or delete the row.")
            continue
        if key is not None:  # summarize_from_feedback: one post appears in many comparisons
            if key in seen:
                continue
            seen.add(key)
        prompts.append(Prompt(text=text, reference=ref if ref and ref.strip() else None))  # blank: no reference
    if schema.name == "bookcorpus":
        if len(prompts) < BOOKCORPUS_LINES_PER_PASSAGE:
            raise ValueError(f"{where} has {len(prompts)} lines with text, but the bookcorpus schema joins "
                             f"{BOOKCORPUS_LINES_PER_PASSAGE} lines into each passage. Pass at least that many.")
        prompts = _join_lines(prompts)
    if not prompts:
        raise ValueError(f"{where} has no prompts for {kind!r} tasks (in the {schema.name} schema). "
                         "Pass a source that holds them.")
    return prompts


def _join_lines(lines: list[Prompt]) -> list[Prompt]:
    """BookCorpus sentences joined n at a time; an incomplete last group is dropped (a short passage would be unlike
    the others)."""
    n = BOOKCORPUS_LINES_PER_PASSAGE
    return [Prompt(" ".join(p.text for p in lines[i : i + n])) for i in range(0, len(lines) - n + 1, n)]


def _detect_schema(rows, kind: str, where: str) -> _Schema:
    """The schema of a local file, from its rows: JSON strings are released book passages; objects by their columns."""
    if isinstance(rows[0][1], str):
        return SCHEMAS["lm-human-preferences/book_passages"]
    dicts = [(place, row) for place, row in rows if isinstance(row, dict)]
    if not dicts:
        return SCHEMAS["labkit"]  # each row is then refused as not an object, naming it
    cols = set().union(*(row.keys() for _, row in dicts))
    if {"info", "summaries"} <= cols:
        return SCHEMAS["openai/summarize_from_feedback"]
    if {"prompt", "completion"} <= cols:
        return SCHEMAS["trl-lib/tldr"]
    if {"prompt", "label"} <= cols:
        return SCHEMAS["CarperAI/openai_summarize_tldr"]
    if "content" in cols:  # both have content/summary; the corpus also has the raw body columns
        return SCHEMAS["webis/tldr-17" if cols & set(_WEBIS_ONLY) else "lm-human-preferences/tldr"]
    if {"article", "highlights", "id"} <= cols:
        return SCHEMAS["cnn_dailymail"]
    if cols & {"text", "post", "article"}:
        return SCHEMAS["labkit"]
    same = all(set(row) == cols for _, row in dicts)
    found = f"{dicts[0][0]} has columns {sorted(cols)}" if same else f"its rows have the columns {sorted(cols)}"
    others = "; ".join(f"{s.name} ({s.columns})" for s in SCHEMAS.values() if kind in s.kinds and s.name != "labkit")
    raise ValueError(f"{where}, {found}, but prompts for {kind!r} tasks need the column {_expected(kind)}, or the "
                     f"columns of another known schema: {others}. Or name your columns with "
                     "columns={'text': <text column>, 'reference': <reference column>} (reference optional).")


def _check_fits(schema: _Schema, kind: str, task: Task, where: str) -> None:
    if kind not in schema.kinds:
        fits = ", ".join(s.name for s in SCHEMAS.values() if kind in s.kinds)
        raise ValueError(f"{where} is in the {schema.name} schema ({schema.columns}), which holds {schema.holds}: not "
                         f"prompts for the {task.name!r} task, whose prompts are {kind!r}. Use a source for {kind!r} "
                         f"prompts (schemas: {fits}).")


def _check_columns(columns) -> dict:
    if not isinstance(columns, dict):
        raise ValueError("columns= must be a mapping like {'text': 'my_text_col', 'reference': 'my_ref_col'} "
                         f"(reference optional), not a {type(columns).__name__}.")
    unknown = sorted(set(columns) - {"text", "reference"}, key=str)
    if unknown:
        raise ValueError(f"columns= has unknown keys {unknown}: it takes 'text' and optionally 'reference', e.g. "
                         "{'text': 'my_text_col', 'reference': 'my_ref_col'}.")
    if "text" not in columns:
        raise ValueError("columns= must name the text column: {'text': 'my_text_col'} (and optionally 'reference').")
    for key, value in columns.items():
        if not (isinstance(value, str) and value) and not (key == "reference" and value is None):
            raise ValueError(f"columns[{key!r}] must be a column name (a non-empty string), not {value!r}.")
    return dict(columns)


# ---- local files ----


def _read_local(path: Path) -> list[tuple[str, object]]:
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


def _jsonl_rows(text: str, path: Path) -> list[tuple[str, object]]:
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


def _json_list_rows(text: str, path: Path) -> list[tuple[str, object]]:
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


def _local_prompts(path: Path, task: Task, schema_name: str | None, columns: dict | None) -> list[Prompt]:
    kind, where = task.prompt_source, f"Prompt file {path}"
    rows = _read_local(path)
    if columns is not None:
        schema = _COLUMNS_SCHEMA
        ref = columns.get("reference")
        found = set().union(*(row.keys() for _, row in rows if isinstance(row, dict)))
        if ref and ref not in found:  # named but in no row: a typo, not a file without references
            raise ValueError(f"{where}: columns= names the reference column {ref!r}, but no row has it (columns "
                             f"found: {sorted(found)}). Fix the name, or leave 'reference' out.")
    elif schema_name is not None:
        schema = SCHEMAS[schema_name]
    else:
        schema = _detect_schema(rows, kind, where)
    _check_fits(schema, kind, task, where)
    return _to_prompts(rows, schema, kind, where, strict=True, columns=columns)


# ---- the demo set ----


def _holdout(items: list, split: str) -> list:
    """A fixed split of a source with one split: every VALIDATION_EVERY-th item is validation."""
    if split == "all":
        return items
    return [x for i, x in enumerate(items) if ((i % VALIDATION_EVERY) == VALIDATION_EVERY - 1) == (split == "validation")]


def _demo_rows(source: str, split: str) -> list[tuple[str, dict]]:
    path = DEMO_DIR / _DEMO_FILES[source]
    return _holdout(_jsonl_rows(path.read_text(encoding="utf-8"), path), split)


# ---- hub datasets ----


@dataclass(frozen=True)
class _HubSource:
    path: str
    """The repository load_dataset reads."""
    schema: str
    kwargs: tuple[tuple[str, object], ...] = ()
    """More load_dataset arguments (config name, revision, data_dir, streaming)."""
    stream_rows: int | None = None
    """Streamed: only this many rows are read from the start of its train split, and every 7th item is validation."""


# Verified against the dataset cards / loaders (see tests/test_data_sources.py for the citations):
# - datasets >= 4 refuses loading scripts, so script-only repositories are read from their parquet export
#   (revision="refs/convert/parquet"), where the hub's converter writes {config}/{split}/NNNN.parquet; data_dir picks
#   the config (summarize_from_feedback's export also holds the "axis" config, with its own validation split). A big
#   dataset is exported only in part, as {config}/partial-{split}: "partial-train" still resolves to the train split.
# - bookcorpus: the hub's `bookcorpus` is a script dataset that would download all 74M rows; SamuelYang/bookcorpus
#   holds the same 74,004,228 rows (one `text` column) and has a full parquet export, which streaming reads from its
#   start.
HUB_SOURCES = {
    "bookcorpus": _HubSource("SamuelYang/bookcorpus", "bookcorpus",
                             (("revision", "refs/convert/parquet"), ("data_dir", "default"), ("streaming", True)),
                             stream_rows=STREAM_ROWS),
    "trl-lib/tldr": _HubSource("trl-lib/tldr", "trl-lib/tldr"),
    "CarperAI/openai_summarize_tldr": _HubSource("CarperAI/openai_summarize_tldr", "CarperAI/openai_summarize_tldr"),
    "openai/summarize_from_feedback": _HubSource(
        "openai/summarize_from_feedback", "openai/summarize_from_feedback",
        (("revision", "refs/convert/parquet"), ("data_dir", "comparisons"))),
    "webis/tldr-17": _HubSource("webis/tldr-17", "webis/tldr-17",
                                (("revision", "refs/convert/parquet"), ("data_dir", "default"), ("streaming", True)),
                                stream_rows=STREAM_ROWS),
    "cnn_dailymail": _HubSource("abisee/cnn_dailymail", "cnn_dailymail", (("name", "3.0.0"),)),
}
_DEFAULT_HUB = {"passages": "bookcorpus", "tldr": "trl-lib/tldr", "cnndm": "cnn_dailymail"}
NAMED_SOURCES = ("demo", "paper", "hub", *HUB_SOURCES)
_VALIDATION_NAMES = ("validation", "valid", "val", "dev")  # CarperAI calls it "valid"


class _NoSuchSplit(ValueError):
    """A hub dataset without the split asked for: our own message, not a hub failure."""


def _load_dataset(path: str, **kwargs):
    """The one call to datasets.load_dataset (tests replace this function to serve rows without a network)."""
    from datasets import load_dataset

    return load_dataset(path, **kwargs)


def _pick_splits(available: list[str], split: str, what: str) -> list[str]:
    if split == "all":
        return list(available)
    for name in ("train",) if split == "train" else _VALIDATION_NAMES:
        if name in available:
            return [name]
    raise _NoSuchSplit(f"{what} has no {split} split (it has {available}). Use split='train' or 'all'.")


def _hub_tables(spec: _HubSource, pick) -> dict[str, list]:
    """{split name: rows} of a hub dataset, for the splits pick(available names) returns. Any hub failure gets the same
    advice: without internet, use the demo set or a local file."""
    try:
        loaded = _load_dataset(spec.path, **dict(spec.kwargs))
        names = pick(list(loaded.keys()))
        # Reading happens inside the try: a streamed dataset fetches its rows only as they are read.
        return {name: list(islice(loaded[name], spec.stream_rows)) for name in names}
    except _NoSuchSplit:
        raise
    except Exception as err:  # noqa: BLE001 - any hub failure gets the same advice
        raise _hub_error(spec, err) from err


def _hub_error(spec: _HubSource, err: Exception) -> RuntimeError:
    first = str(err).splitlines()[0][:200] if str(err) else ""
    return RuntimeError(
        f"Could not load the {spec.path} dataset from the Hugging Face hub ({type(err).__name__}: {first}). "
        "Without internet use source='demo' (the embedded demo set) or a local .jsonl/.parquet/.csv file with the "
        "same columns."
    )


def _hub_prompts(name: str, task: Task, split: str) -> list[Prompt]:
    spec, kind = HUB_SOURCES[name], task.prompt_source
    schema, what = SCHEMAS[spec.schema], f"hub dataset {spec.path}"
    _check_fits(schema, kind, task, f"source {name!r}")
    if spec.stream_rows:  # one split on the hub (whatever its name): read it, hold out every 7th prompt below
        tables = _hub_tables(spec, lambda names: names if len(names) == 1 else _pick_splits(names, "train", what))
    else:
        tables = _hub_tables(spec, lambda names: _pick_splits(names, split, what))
    rows = [(f"{s} row {i}", row) for s, table in tables.items() for i, row in enumerate(table)]
    prompts = _to_prompts(rows, schema, kind, what, strict=False)
    return _holdout(prompts, split) if spec.stream_rows else prompts


# ---- the 2019 paper's released datasets ----

# Released modes per labkit split (books.py: train/test; tldr.py: train/valid; cnndm.py: train/val/test).
_PAPER_MODES = {
    "passages": {"train": ("train",), "validation": ("test",), "all": ("train", "test")},
    "tldr": {"train": ("train",), "validation": ("valid",), "all": ("train", "valid")},
    "cnndm": {"train": ("train",), "validation": ("val",), "all": ("train", "val", "test")},
}
_HUB_SPLIT_OF_CNNDM_MODE = {"train": "train", "val": "validation", "test": "test"}  # both from abisee's URL lists


def paper_url(kind: str, mode: str) -> str:
    """Where the released code reads a dataset (the CNN/DM URL list, for cnndm)."""
    return {"passages": f"{PAPER_URL}/datasets/book_passages/{mode}.jsonl",
            "tldr": f"{PAPER_URL}/tldr/{mode}-subset.json",
            "cnndm": f"{PAPER_URL}/datasets/cnndm/url_lists/all_{mode}.txt"}[kind]


def _cache_dir() -> Path:
    return Path(os.environ.get("LABKIT_CACHE") or Path.home() / ".cache" / "labkit")


def _download(url: str) -> Path:
    """The cached copy of url, downloaded once. Written to a .part file and renamed, so an interrupted download never
    leaves a truncated file that a later call would take as complete."""
    target = _cache_dir() / urlparse(url).path.lstrip("/")
    if target.exists():
        return target
    part = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A unique .part name: two processes downloading at once do not write into the same file.
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=target.name + ".", suffix=".part", delete=False) as out:
            part = Path(out.name)
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                shutil.copyfileobj(response, out, 1 << 20)
                expected = response.headers.get("Content-Length")
            if expected is not None and out.tell() != int(expected):  # the connection closed early
                raise OSError(f"got {out.tell()} of {expected} bytes")
        os.replace(part, target)
    except (OSError, ValueError, http.client.HTTPException) as err:  # URLError, HTTPError, timeouts: OSErrors
        if part is not None:
            part.unlink(missing_ok=True)
        raise RuntimeError(
            f"Could not download {url} ({type(err).__name__}: {err}). Download it by hand (browser or curl) and save "
            f"it as {target}, where labkit looks first; a book-passage or TL;DR file can also be passed as "
            "source='path/to/the/file'. Without internet use source='demo'."
        ) from err
    return target


def _paper_prompts(task: Task, split: str) -> list[Prompt]:
    kind = task.prompt_source
    if kind == "cnndm":
        return _paper_cnndm_prompts(_PAPER_MODES[kind][split])
    prompts = []
    for mode in _PAPER_MODES[kind][split]:
        url = paper_url(kind, mode)
        path = _download(url)
        where = f"released file {url} (cached at {path})"
        text = _utf8(path)
        if kind == "passages":
            rows, schema = _jsonl_rows(text, path), SCHEMAS["lm-human-preferences/book_passages"]
        else:
            rows, schema = _json_list_rows(text, path), SCHEMAS["lm-human-preferences/tldr"]
        prompts += _to_prompts(rows, schema, kind, where, strict=False)
    return prompts


def _paper_cnndm_prompts(modes: tuple[str, ...]) -> list[Prompt]:
    """The released CNN/DM URL lists, in their order, with each story's article from the hub's cnn_dailymail 3.0.0 row
    whose id is the SHA1 of its URL (the card: "id: ... SHA1 hash of the url"; released cnndm.py hashhex does the same
    to name its story files)."""
    spec = HUB_SOURCES["cnn_dailymail"]
    wanted = [_HUB_SPLIT_OF_CNNDM_MODE[m] for m in modes]

    def pick(names: list[str]) -> list[str]:  # the hub split built from the same URL list; all of them if renamed
        return [n for n in wanted if n in names] or names

    tables = _hub_tables(spec, pick)
    by_id = {row["id"]: row for table in tables.values() for row in table}
    rows, missing = [], 0
    for mode in modes:
        url_list = paper_url("cnndm", mode)
        urls = [u.strip() for u in _utf8(_download(url_list)).split("\n") if u.strip()]
        for n, url in enumerate(urls, 1):
            row = by_id.get(hashlib.sha1(url.encode("utf-8")).hexdigest())
            if row is None:
                missing += 1
                continue
            rows.append((f"{mode} URL {n}", {"article": _released_cnndm_text(row["article"]),
                                              "highlights": row["highlights"]}))
    if missing:
        warnings.warn(f"{missing} CNN/DM URLs of the released lists have no row in {spec.path} 3.0.0 (the hub drops "
                      "stories without an article or highlights); they are left out.", stacklevel=3)
    if not rows:
        raise ValueError(f"None of the released CNN/DM URLs ({', '.join(modes)}) matched a row id of {spec.path}: "
                         "the hub copy may have changed. Use source='cnn_dailymail' or a local file.")
    return _to_prompts(rows, SCHEMAS["cnn_dailymail"], "cnndm", "CNN/DM from the released URL lists", strict=False)


def _released_cnndm_text(hub_article: str) -> str:
    """A hub article cleaned as the released cnndm_generator cleans a story file: clean_up_start, ftfy, at most one
    blank line, nothing from '@highlight' on."""
    text = _clean_up_start(_hub_article_lines(hub_article))
    return re.sub(r"\n{3,}", "\n\n", _ftfy(text)).split("@highlight")[0].strip()


def _hub_article_lines(article: str) -> str:
    """The hub's builder (its cnn_dailymail.py _get_art_abs) gave every story line without final punctuation a " ."
    and joined the lines with spaces. Turning those " . " joins back into line breaks restores the header lines (byline,
    PUBLISHED/UPDATED stamps) that the released cleanup removes line by line; without this its byline rule would cut
    the whole one-line article."""
    text = article[:-2] if article.endswith(" .") else article
    return text.replace(" . ", "\n")


_CNN_DASH = re.compile(r"\(CNN\) +--")
_CNN_TAG = re.compile(r"\(CNN\)")
_AND_WORD_LINE = re.compile(r"^and \w+\n")
# The release writes the year as [2011|2012|2013|2014|2015], which is a character class (any one of 0-5 and '|'), not a
# list of years; the same class is kept here so the same text is cut.
_UPDATED_STAMP = re.compile(r".*UPDATED:\s+[0-9]{2}:[0-9]{2}.*[0-5|]")


def _clean_up_start(text: str) -> str:
    """Our equivalent of the released clean_up_start (lm_human_preferences/datasets/cnndm.py): drop a byline and the
    line after it, everything up to "(CNN) --" (or a "(CNN)" in the first 100 characters), a leading "and <word>" line
    and everything up to a Daily Mail "UPDATED: hh:mm ... <year>" stamp; make curly single quotes straight."""
    if text.startswith("By"):
        text = "\n".join(text.split("\n")[2:])
    text = _CNN_DASH.split(text)[-1]
    text = _CNN_TAG.split(text[:100])[-1] + text[100:]
    text = _AND_WORD_LINE.sub("", text)
    text = _UPDATED_STAMP.split(text)[-1]
    return text.replace("\u2019", "'").replace("\u2018", "'").strip()


# ---- the entry point ----


def load_prompts(task: str | Task, split: str = "train", source: str = "demo", limit: int | None = None,
                 columns: dict | None = None, schema: str | None = None) -> list[Prompt]:
    """Prompts for a task.

    source: "demo" (embedded, offline), "paper" (the 2019 paper's released data, downloaded once), "hub" (the task's
    default hub dataset), a named hub dataset ("bookcorpus", "trl-lib/tldr", "CarperAI/openai_summarize_tldr",
    "openai/summarize_from_feedback", "webis/tldr-17", "cnn_dailymail"), or a local .jsonl/.json/.parquet/.csv file
    (used as given, no split) in one of the schemas of the module docstring.
    split: "train", "validation" or "all" (all of the source's splits).
    columns: for a local file in no known schema, {"text": <column>, "reference": <column>} (reference optional).
    schema: for a local file, the schema to read it in (e.g. "bookcorpus"), instead of detecting it.
    """
    task = get_task(task)
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'validation' or 'all', not {split!r}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a whole number >= 0 or None, not {limit!r}.")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be a source name or a file path, not a {type(source).__name__}.")
    source = os.fspath(source)
    local = source not in NAMED_SOURCES
    if columns is not None or schema is not None:
        if columns is not None and schema is not None:
            raise ValueError("Pass columns= or schema=, not both: columns= maps your own columns, schema= names a "
                             "known layout.")
        if not local:
            raise ValueError(f"columns= and schema= describe a local file's columns; source={source!r} has a known "
                             "schema. Leave them out, or pass a local file.")
        if schema is not None and schema not in SCHEMAS:
            raise ValueError(f"schema={schema!r} is not a known schema; known: {', '.join(SCHEMAS)}.")
        if columns is not None:
            columns = _check_columns(columns)
    if source == "demo":
        where = f"demo set {_DEMO_FILES[task.prompt_source]}"
        prompts = _to_prompts(_demo_rows(task.prompt_source, split), SCHEMAS["labkit"], task.prompt_source, where, True)
    elif source == "paper":
        prompts = _paper_prompts(task, split)
    elif not local:
        prompts = _hub_prompts(_DEFAULT_HUB[task.prompt_source] if source == "hub" else source, task, split)
    elif not Path(source).exists():
        raise FileNotFoundError(f"source={source!r} is not a named source ({', '.join(map(repr, NAMED_SOURCES))}), "
                                f"and the path {source} does not exist. Check the spelling, or pass an existing file.")
    else:
        prompts = _local_prompts(Path(source), task, schema, columns)
    return prompts[:limit] if limit is not None else prompts
