"""Every notebook executes top to bottom in smoke mode (tiny model, toy sizes), as CI does."""

import json
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from labkit.rl.checkpoint import latest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata.get("kernelspec", {}).get("name") == "python3", path.name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


def execute(path: Path, workdir: Path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_SMOKE", "1")
    shutil.copy(path, tmp_path / path.name)
    nb = execute(tmp_path / path.name, tmp_path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    if path.name == "00_quickstart.ipynb":
        # rerunning the notebook continues: labels, reward model and PPO checkpoint are reused, not redone
        saved = json.loads((latest(tmp_path / "runs/quickstart-smoke/ppo") / "trainer.json").read_text())
        assert saved["config"]["lora_r"] > 0  # smoke mode runs the notebook's own path: LoRA, rho = adapters off
        nb2 = execute(tmp_path / path.name, tmp_path)
        text = "".join(o.get("text", "") for c in nb2.cells if c.cell_type == "code" for o in c.outputs)
        assert "Resumed from" in text and "loaded the saved reward model" in text
