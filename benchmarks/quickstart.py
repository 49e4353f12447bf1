"""The newcomer's quickstart, timed and judged: executes notebooks/00_quickstart.ipynb headless from a fresh kernel
and a fresh lab folder, as a user running it top to bottom would (nobody clicks the labeler, so the mock labeler
labels every comparison), and prints one JSON line:

- total seconds, and seconds per section of the notebook (its "##" headings);
- the held-out effect the notebook reports: mean VADER of pi's and rho's samples on the same validation prompts and
  seeds, their paired difference with a 95% interval (labkit.evaluate.paired_difference), the last update's KL and
  beta, the KL target.

    python benchmarks/quickstart.py                                  # the notebook as committed
    python benchmarks/quickstart.py --set PPO_UPDATES=20 --set N_PROMPTS=96 --name more-updates   # one sweep point
    python benchmarks/quickstart.py --smoke                          # the tiny model, as CI runs it

`--set NAME=VALUE` runs the notebook with a constant of its first code cell changed (a cell is inserted after it;
VALUE is a Python literal): how the sweep in benchmarks/results/quickstart.jsonl was run, one point per call.

`--ppo NAME=VALUE` overrides a PPOConfig field wherever the notebook builds its PPO settings
(`recipe.ppo_config(...)`), over what the cell passes: a sweep over PPO settings the first cell does not name
(e.g. `--ppo seed=1`, `--ppo total_updates=11`) without editing the notebook. The line records them as
`ppo_settings`.

`--keep DIR` keeps the run's lab folder (labels, reward model, PPO checkpoints); `--reuse DIR` starts from such a
folder's labels and reward model (not its PPO run), as a user rerunning the notebook does: a sweep over the PPO
settings then costs only the PPO and evaluation sections. Its line says `"reused": DIR`, and its total is not the
fresh-kernel time. `--continue-ppo` also takes that folder's PPO run, which the training cell then continues to
`PPO_UPDATES` (`--set PPO_UPDATES=40` on a kept 20-update run: 20 more updates, not 40 from the start), as a user
raising PPO_UPDATES and rerunning the cell does; its line says `"continued_ppo": true`. A folder kept from another
notebook of the same task and model works (01_sentiment's, for the quickstart's PPO settings).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import emit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "00_quickstart.ipynb"
EFFECT_FILE = "effect.json"
"""What the notebook's last cell writes into its LAB_DIR: the numbers it shows, for this script to read."""


def _first_code(nb) -> str:
    """The notebook's configuration cell: its first code cell."""
    return next(c for c in nb.cells if c.cell_type == "code").source


def _assigned(source: str) -> list[str]:
    """The names a cell assigns at top level, in order."""
    return [t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)]


@contextlib.contextmanager
def _smoke_env(smoke: bool):
    """LABKIT_SMOKE set as the notebooks read it, restored afterwards."""
    before = os.environ.get("LABKIT_SMOKE")
    os.environ["LABKIT_SMOKE"] = "1" if smoke else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LABKIT_SMOKE", None)
        else:
            os.environ["LABKIT_SMOKE"] = before


def _literal_pairs(flag: str, pairs: list[str], known: set[str], what: str) -> dict:
    """NAME=VALUE pairs given to `flag`, each NAME in `known` and VALUE a Python literal; refused otherwise (a typo
    would silently run the default)."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in known:
            raise SystemExit(f"{flag} {pair!r}: expected NAME=VALUE with NAME {what}: {sorted(known)}.")
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f"{flag} {pair!r}: {value!r} is not a Python literal "
                             "(a number, string, True/False, None).")
    return out


def _overrides(pairs: list[str], nb) -> dict:
    """--set NAME=VALUE pairs, each NAME a constant the notebook's first code cell assigns."""
    return _literal_pairs("--set", pairs, set(_assigned(_first_code(nb))), "one of the first cell's constants")


def _ppo_overrides(pairs: list[str]) -> dict:
    """--ppo NAME=VALUE pairs, each NAME a PPOConfig field; checked by PPOConfig now, not after the notebook has run
    for minutes."""
    from labkit.rl import PPOConfig

    out = _literal_pairs("--ppo", pairs, {f.name for f in fields(PPOConfig)}, "a PPOConfig field")
    try:
        PPOConfig(**out)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--ppo: {e}")
    return out


def _ppo_patch(ppo: dict) -> str:
    """A cell that makes every `Recipe.ppo_config(...)` call of the kernel apply `ppo` over its arguments."""
    return ("import labkit.recipes as _recipes  # --ppo of benchmarks/quickstart.py or notebook_times.py\n"
            "_ppo_config = _recipes.Recipe.ppo_config\n"
            f"_recipes.Recipe.ppo_config = lambda self, **kw: _ppo_config(self, **{{**kw, **{ppo!r}}})")


def _constants(nb, overrides: dict, smoke: bool) -> dict:
    """The values the notebook's first code cell assigns, after `overrides`, as the run saw them: each result line
    says what it measured even when a default changes later."""
    source = _first_code(nb)
    namespace: dict = {}
    with _smoke_env(smoke):
        exec(source, namespace)  # constants only: the configuration cell a user edits first
    return {name: overrides.get(name, namespace[name]) for name in _assigned(source)}


def _sections(nb) -> list[str]:
    """Each cell's section: the latest "## " heading above it ("setup" before the first)."""
    section, out = "setup", []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            heads = [line[3:].strip() for line in cell.source.splitlines() if line.startswith("## ")]
            section = heads[-1].split(" (")[0] if heads else section  # "## PPO ... (live curves; ...)": the name
        out.append(section)
    return out


def lab_dir(smoke: bool) -> str:
    """The notebook's LAB_DIR, relative to where it runs."""
    return "runs/quickstart-smoke" if smoke else "runs/quickstart"


@contextlib.contextmanager
def executed(nb, smoke: bool, timeout: int, before=None):
    """Runs notebook `nb` (modified in place: its outputs) headless from a fresh kernel in a fresh temporary folder,
    LABKIT_SMOKE set for the kernel; `before(folder)` runs first (e.g. to copy a lab in). Yields (folder, total
    seconds, seconds per "##" section) while the folder still exists; a cell's error stops it with its message."""
    sections = _sections(nb)
    seconds: dict[str, float] = {}
    started: dict[int, float] = {}

    def on_start(cell, cell_index, **_):
        started[cell_index] = time.perf_counter()

    def on_complete(cell, cell_index, **_):
        name = sections[cell_index]
        took = time.perf_counter() - started[cell_index]
        seconds[name] = seconds.get(name, 0.0) + took
        print(f"cell {cell_index} ({name}): {took:.1f} s", file=sys.stderr, flush=True)  # progress of a long run

    with tempfile.TemporaryDirectory(prefix="labkit-notebook-") as work:
        if before is not None:
            before(Path(work))
        with _smoke_env(smoke):  # the kernel inherits it
            client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": work}},
                                    on_cell_start=on_start, on_cell_executed=on_complete)
            t0 = time.perf_counter()
            client.execute()
            total = time.perf_counter() - t0
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        if errors:
            raise SystemExit(f"the notebook failed: {errors[0].get('ename')}: {errors[0].get('evalue')}")
        yield Path(work), round(total, 1), {k: round(v, 1) for k, v in seconds.items()}


def effect_of(work: Path) -> dict | None:
    """What the notebook's last cell wrote to {LAB_DIR}/effect.json, if it wrote one."""
    found = list(work.glob(f"runs/*/{EFFECT_FILE}"))
    if len(found) > 1:
        raise SystemExit(f"the notebook wrote {len(found)} {EFFECT_FILE} files under runs/, expected one")
    return json.loads(found[0].read_text()) if found else None


def check_kept(folder: Path) -> None:
    """--reuse's folder must be one --keep wrote: refused now, not after the notebook has run for minutes."""
    if not (folder / "labels.db").exists():
        raise SystemExit(f"--reuse {folder}: no labels.db there; pass a folder written by --keep")


def copy_kept_lab(kept: Path, lab: Path, with_ppo: bool = False) -> None:
    """A kept lab folder copied to where a notebook keeps its lab (`lab`): its labels and reward model, its PPO run
    only `with_ppo`, never the effect file of its last evaluation."""
    skip = (EFFECT_FILE,) if with_ppo else ("ppo", EFFECT_FILE)
    shutil.copytree(kept, lab, ignore=shutil.ignore_patterns(*skip))


def run(overrides: dict, smoke: bool, timeout: int, keep: Path | None = None, reuse: Path | None = None,
        ppo: dict | None = None, continue_ppo: bool = False) -> dict:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    if ppo:
        nb.cells.insert(first + 1, nbformat.v4.new_code_cell(_ppo_patch(ppo)))
    if overrides:
        code = "\n".join(f"{k} = {v!r}  # benchmarks/quickstart.py --set" for k, v in overrides.items())
        nb.cells.insert(first + 1, nbformat.v4.new_code_cell(code))

    def copy_lab(work: Path):  # labels and reward model; PPO starts afresh unless continue_ppo
        if reuse is not None:
            copy_kept_lab(reuse, work / lab_dir(smoke), with_ppo=continue_ppo)

    with executed(nb, smoke, timeout, before=copy_lab) as (work, total, seconds):
        effect = effect_of(work)
        if effect is None:
            raise SystemExit(f"the notebook wrote no {EFFECT_FILE} under runs/: did its last cell change?")
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(work / lab_dir(smoke), keep)
    return {"total_s": total, "sections_s": seconds, **effect}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="change one constant of the notebook's first code cell (repeatable)")
    parser.add_argument("--ppo", action="append", default=[], metavar="NAME=VALUE",
                        help="override one PPOConfig field where the notebook builds its PPO settings (repeatable)")
    parser.add_argument("--name", default=None, help="a label for this sweep point in the result line")
    parser.add_argument("--smoke", action="store_true", help="the tiny random model and toy sizes (CI's path)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds one cell may run")
    parser.add_argument("--keep", type=Path, help="copy the run's lab folder here when it ends")
    parser.add_argument("--reuse", type=Path, help="start from this lab folder's labels and reward model (see above)")
    parser.add_argument("--continue-ppo", action="store_true",
                        help="with --reuse: continue that folder's PPO run to PPO_UPDATES instead of starting afresh")
    args = parser.parse_args(argv)
    if args.reuse is not None:
        check_kept(args.reuse)
    if args.continue_ppo and (args.reuse is None or not (args.reuse / "ppo").is_dir()):
        raise SystemExit(f"--continue-ppo needs --reuse DIR with a PPO run in DIR/ppo (got --reuse {args.reuse})")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    overrides = _overrides(args.set, nb)
    constants = _constants(nb, overrides, args.smoke)
    ppo = _ppo_overrides(args.ppo)
    result = run(overrides, args.smoke, args.timeout, keep=args.keep, reuse=args.reuse, ppo=ppo,
                 continue_ppo=args.continue_ppo)
    line = {"benchmark": "quickstart", "name": args.name or ("smoke" if args.smoke else "default"), "smoke": args.smoke,
            "settings": overrides, "ppo_settings": ppo, "constants": constants,
            "reused": str(args.reuse) if args.reuse else None, "continued_ppo": args.continue_ppo, **result}
    emit(line)
    return line


if __name__ == "__main__":
    main()
