"""How long each notebook takes from a fresh kernel to its last cell, as a user running it top to bottom would see
it (nobody clicks the labeler, so the mock labeler labels everything): one JSON line per notebook with the total
and the seconds of each "##" section, and the numbers the notebook's last cell wrote to {LAB_DIR}/effect.json
when it writes one. The first cell of each notebook states the time measured here.

    python benchmarks/notebook_times.py notebooks/01_sentiment.ipynb notebooks/02_descriptiveness.ipynb
    python benchmarks/notebook_times.py --smoke notebooks/00_hello.ipynb     # the tiny model, as CI runs it
    python benchmarks/notebook_times.py notebooks/01_sentiment.ipynb --keep /tmp/sentiment-lab   # its lab folder kept
    python benchmarks/notebook_times.py notebooks/02_descriptiveness.ipynb --ppo seed=1   # the same labels, PPO seed 1
    python benchmarks/notebook_times.py notebooks/02_descriptiveness.ipynb --reuse /tmp/d02 --ppo seed=2

`--ppo NAME=VALUE` overrides a PPOConfig field where the notebook builds its PPO settings, as quickstart.py's does:
the notebooks' sampling and reward model are seeded, so `--ppo seed=S` repeats a run's labels and reward model and
measures PPO's own luck. The line records them as `ppo_settings`. `--reuse DIR` starts from the labels and reward
model of a lab folder kept with `--keep` (not its PPO run), as a user rerunning the notebook does: another PPO seed
then costs only the PPO and evaluation sections. The line says `"reused": DIR`, and its total is not the fresh-kernel
time.

00_quickstart has its own script with sweep options (benchmarks/quickstart.py); this one runs the same executor.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import _constants, _ppo_overrides, _ppo_patch, check_kept, copy_kept_lab, effect_of, executed  # noqa: E402
from record import emit  # noqa: E402


def keep_lab(work: Path, keep: Path, notebook: str) -> None:
    """Copy the one lab folder a notebook wrote under `work`/runs/ (labels, reward model, PPO checkpoints) to `keep`,
    replacing what is there: e.g. for benchmarks/quickstart_eval.py."""
    labs = sorted(p for p in (work / "runs").glob("*") if p.is_dir())
    if len(labs) != 1:
        raise SystemExit(f"--keep: {notebook} wrote {len(labs)} lab folders under runs/, not one: nothing kept")
    shutil.rmtree(keep, ignore_errors=True)
    shutil.copytree(labs[0], keep)


def time_notebook(path: Path, smoke: bool, timeout: int, keep: Path | None = None, ppo: dict | None = None,
                  reuse: Path | None = None) -> dict:
    nb = nbformat.read(path, as_version=4)
    if reuse is not None:   # the notebook's LAB_DIR (its first code cell assigns it), relative to where it runs
        lab = _constants(nb, {}, smoke).get("LAB_DIR")
        if lab is None:
            raise SystemExit(f"--reuse: {path.name} sets no LAB_DIR in its first code cell: it keeps no lab to reuse")
    if ppo:
        first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
        nb.cells.insert(first + 1, nbformat.v4.new_code_cell(_ppo_patch(ppo)))

    def copy_lab(work: Path):  # labels and reward model: the notebook loads them; its PPO run starts afresh
        if reuse is not None:
            copy_kept_lab(reuse, work / lab)

    with executed(nb, smoke, timeout, before=copy_lab) as (work, total, seconds):
        effect = effect_of(work)
        if keep is not None:
            keep_lab(work, keep, path.name)
    return {"benchmark": "notebook_times", "notebook": path.name, "smoke": smoke, "total_s": total,
            "sections_s": seconds, **({"ppo_settings": ppo} if ppo else {}),
            **({"reused": str(reuse)} if reuse else {}), **({"effect": effect} if effect else {})}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--smoke", action="store_true", help="the tiny random model and toy sizes (CI's path)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds one cell may run")
    parser.add_argument("--keep", type=Path, help="copy the run's lab folder here when it ends (one notebook only)")
    parser.add_argument("--ppo", action="append", default=[], metavar="NAME=VALUE",
                        help="override one PPOConfig field where the notebook builds its PPO settings (repeatable)")
    parser.add_argument("--reuse", type=Path, help="start from this kept lab's labels and reward model (see above)")
    args = parser.parse_args(argv)
    ppo = _ppo_overrides(args.ppo)
    if args.keep is not None and len(args.notebooks) != 1:
        raise SystemExit("--keep keeps one notebook's lab folder: pass one notebook")
    if args.reuse is not None and len(args.notebooks) != 1:
        raise SystemExit("--reuse starts one notebook from a kept lab folder: pass one notebook")
    if args.reuse is not None:
        check_kept(args.reuse)
    missing = [str(p) for p in args.notebooks if not p.is_file()]
    if missing:
        raise SystemExit(f"no such notebook: {', '.join(missing)}")
    return [emit(time_notebook(p, args.smoke, args.timeout, args.keep, ppo, args.reuse)) for p in args.notebooks]


if __name__ == "__main__":
    main()
