"""The package's floors: a module imports only modules on its own floor or below, and no two import each other
(counting imports inside functions too); the label store imports no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import labkit

ROOT = Path(labkit.__file__).parent

# lowest first; a module's floor is that of its longest matching prefix
FLOORS = {
    "labkit.speed": 0,  # the speed layer: patches any transformers model, knows nothing of labkit's algorithm
    "labkit": 1, "labkit.tasks": 1, "labkit.data": 1, "labkit.models": 1, "labkit.optim": 1, "labkit.distributed": 1,
    "labkit.sampling": 1,
    "labkit.reward": 2,
    "labkit.rl": 3, "labkit.evaluate": 3, "labkit.sft": 3, "labkit.recipes": 3,  # recipes: PPOConfig + RewardConfig
    "labkit.labeling": 4,
    "labkit.scale": 5, "labkit.widgets": 5,
}


def _floor(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return FLOORS[".".join(parts[:n])]
    raise AssertionError(f"{module} has no floor in tests/test_layout.py")


def _modules() -> dict[str, set[str]]:
    """module name -> the labkit modules it imports (anywhere in the file)."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("labkit")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("labkit"):
                # `from labkit import speed` imports the submodule labkit.speed
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in _all_names() else node.module
                         for a in node.names}
        graph[name] = deps - {name}
    return graph


def _all_names() -> set[str]:
    out = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        out.add(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    return out


def test_lower_floors_never_import_higher_ones():
    bad = [(m, d) for m, deps in _modules().items() for d in deps if _floor(d) > _floor(m)]
    assert not bad, bad


def test_no_import_cycles():
    graph = _modules()
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for d in graph.get(m, ()):
            if d != "labkit" and not m.startswith(d + "."):  # a package's own __init__ is not a cycle
                visit(d)
        stack.pop()
        done.add(m)

    for m in graph:
        visit(m)


def test_the_label_store_and_widgets_package_import_without_torch():
    code = ("import sys, labkit.labeling.store, labkit.widgets; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
