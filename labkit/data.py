"""Prompt sources: the embedded demo set, local files, and the paper's real datasets from the hub.

Every source yields `Prompt`s: the source text and, for summaries, a reference summary. Columns:

| task source  | local file columns          | hub dataset (needs internet)                         |
|--------------|-----------------------------|------------------------------------------------------|
| passages     | text                        | bookcorpus (consecutive lines joined into passages)  |
| tldr         | post, summary (optional)    | trl-lib/tldr (prompt/completion, post extracted)     |
| cnndm        | article, highlights (opt.)  | cnn_dailymail 3.0.0                                  |

The demo set under `labkit/demo_data/` was written for this project: short fiction passages in varied
moods, advice-forum posts with their authors' TL;DRs, and news-style articles about invented places with
highlights. It is demo data, small and synthetic, for trying the lab offline; not for paper numbers.
"""

from __future__ import annotations

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
    text_col, ref_col = _COLUMNS[source]
    prompts = []
    for i, row in enumerate(rows):
        if text_col not in row:
            expected = text_col + (f" (and optionally {ref_col})" if ref_col else "")
            raise ValueError(
                f"{where}: row {i} has columns {sorted(row)}, but prompts for {source!r} tasks need the "
                f"column {expected}. Rename your columns or pass a file in that format."
            )
        ref = row.get(ref_col) if ref_col else None
        prompts.append(Prompt(text=str(row[text_col]), reference=None if ref is None else str(ref)))
    return prompts


def _read_local(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"Prompt file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet", ".csv"):
        from datasets import load_dataset

        kind = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}[suffix[1:]]
        return list(load_dataset(kind, data_files=str(path), split="train"))
    raise ValueError(f"Prompt file {path}: unsupported format {suffix!r}; use .jsonl, .json, .parquet or .csv.")


def _demo_rows(source: str, split: str) -> list[dict]:
    path = DEMO_DIR / _DEMO_FILES[source]
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if split == "all":
        return rows
    is_val = [(i % VALIDATION_EVERY) == VALIDATION_EVERY - 1 for i in range(len(rows))]
    return [r for r, v in zip(rows, is_val) if v == (split == "validation")]


def _hub_rows(source: str, split: str) -> list[dict]:
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
        rows, where = _read_local(Path(source)), str(source)
    prompts = _rows_to_prompts(rows, task.prompt_source, where)
    return prompts[:limit] if limit is not None else prompts
