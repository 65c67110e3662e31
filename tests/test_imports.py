"""The house rule, checked on the source: imports point one way, from the command line down to data and io,
and no module imports itself back through a circle.

    cli -> launch -> benchmark | leaderboard -> fit -> models | metrics -> data -> io, registry, seeds, console

A package may import its own modules and any package of a lower layer; packages on the same layer do not
import each other (the benchmark writes records the leaderboard reads; metrics see features, not models).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

LAYERS = {
    "pipeline.cli": 6,
    "pipeline.launch": 5, "pipeline.services": 5,
    "pipeline.benchmark": 4, "pipeline.leaderboard": 4,
    "pipeline.fit": 3,
    "pipeline.models": 2, "pipeline.metrics": 2,
    "pipeline.data": 1,
    "pipeline.io": 0, "pipeline.weights": 0, "pipeline.registry": 0, "pipeline.seeds": 0, "pipeline.console": 0,
    "pipeline": 0,
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """Every pipeline module ``path`` imports, at the top or inside a function: ``from a.b import c`` counts
    as importing ``a.b.c`` when that is a module, else ``a.b``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules}


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in (root / "pipeline").rglob("*.py")}
    return {name: imports_of(path, name, set(files)) for name, path in files.items()}


def layer_of(module: str) -> tuple[str, int]:
    """(package, layer) of a module: the longest LAYERS key that is the module or a parent of it."""
    key = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return key, LAYERS[key]


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        package, layer = layer_of(module)
        for target in sorted(targets):
            target_package, target_layer = layer_of(target)
            if target_package != package and target_layer >= layer:
                out.append(f"{module} imports {target}: {package} (layer {layer}) may only import lower layers, "
                           f"and {target_package} is layer {target_layer}")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_point_down_the_layers_and_never_in_a_circle():
    graph = import_graph(REPO)
    assert len(graph) > 30 and graph["pipeline.cli"]  # the walk found the package and its imports
    unplaced = [m for m in graph if not any(m == k or m.startswith(k + ".") for k in LAYERS if k != "pipeline")
                and m != "pipeline"]
    assert not unplaced, f"modules outside every layer (add them to LAYERS in {__file__}): {unplaced}"
    assert violations(graph) == []
    assert cycles(graph) == []


def test_the_checker_catches_an_upward_import_and_a_circle(tmp_path):
    """The rule above on a made-up tree: a model importing the fit stage, and two data modules in a circle."""
    for rel, text in {
        "pipeline/__init__.py": "",
        "pipeline/models/__init__.py": "",
        "pipeline/models/vae.py": "from pipeline.fit.train import fit\n",
        "pipeline/fit/__init__.py": "",
        "pipeline/fit/train.py": "def f():\n    from pipeline.models import vae\n",
        "pipeline/data/__init__.py": "",
        "pipeline/data/a.py": "from pipeline.data import b\n",
        "pipeline/data/b.py": "import pipeline.data.a\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["pipeline.fit.train"] == {"pipeline.models.vae"}  # imports inside functions count too
    assert [v.split(":")[0] for v in violations(graph)] == ["pipeline.models.vae imports pipeline.fit.train"]
    assert sorted(cycles(graph)) == [["pipeline.data.a", "pipeline.data.b"],
                                     ["pipeline.fit.train", "pipeline.models.vae"]]
