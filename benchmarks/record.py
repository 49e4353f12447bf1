"""Every benchmark's result line: printed, and appended to benchmarks/results/<name>.jsonl.

The README and benchmarks/README.md quote numbers from those files only (tests/test_readme_numbers.py checks
that). Each record is tagged with when and where it was measured: the time, the host's CPU model and core
count, the GPU if one is used, and the git commit. LABKIT_BENCH_RESULTS=<folder> writes elsewhere (the
test suite points it at a temporary folder); LABKIT_BENCH_RESULTS=none writes nothing. Standard library
only: TRL's own environment imports this too.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def results_dir() -> Path | None:
    where = os.environ.get("LABKIT_BENCH_RESULTS")
    if where is None:
        return ROOT / "benchmarks" / "results"
    return None if where.lower() == "none" else Path(where)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str | None:
    """HEAD's short hash, with "-dirty" when tracked files other than the results differ from it: the number was
    then measured on code that commit does not hold."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
        return (commit + ("-dirty" if dirty.stdout.strip() else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


# When the benchmark started (this module is imported first): a long run's code is the one it loaded, whatever
# is committed by the time it ends.
COMMIT_AT_START = _commit()


def emit(result: dict, name: str | None = None) -> dict:
    """Print `result` as one JSON line and append it, tagged, to results/<name or result['benchmark']>.jsonl."""
    print(json.dumps(result), flush=True)
    folder = results_dir()
    if folder is None:
        return result
    tagged = {"recorded": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": _cpu_model(),
              "cores": os.cpu_count(), "commit": COMMIT_AT_START, **result}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name or result['benchmark']}.jsonl", "a") as f:
        f.write(json.dumps(tagged) + "\n")
    return tagged
