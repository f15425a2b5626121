"""DESIGN.md's layers, enforced: every import inside peftkit points down the list below, and
no two modules import each other (directly or round a longer circle), lazy imports included."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "peftkit"

# Top to bottom, as DESIGN.md's "Layers of the house" lists them; each imports only those
# below it (and its own layer). `peftkit/__init__.py` and `__main__.py` are the public facade.
LAYERS = ["cli", "recipe", "integrations", "train", "data", "auto", "model", "mixed_adapters", "tuner", "fast_attention",
          "lm_head_split", "injection", "methods", "checkpoint", "targeting", "config", "kernels", "atomic_files",
          "_private_apis", "_third_party_noise"]
FACADE = {"peftkit", "peftkit.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """peftkit modules that `name` imports anywhere in its file (top-level or in functions)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("peftkit"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("peftkit"):
                continue
            # `from pkg import sub` imports the sub-module; `from mod import name` the module
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            found.update(subs or [target])
    found.discard(name)
    return {m for m in found if m in MODULES}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer(name: str) -> str:
    return name.split(".")[1]


def test_every_module_has_a_layer():
    unknown = sorted(n for n in MODULES if n not in FACADE and layer(n) not in LAYERS)
    assert not unknown, f"modules in no layer of DESIGN.md (add them to LAYERS and to DESIGN.md): {unknown}"


def test_imports_point_down():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() if a not in FACADE for b in targets
                    if b not in FACADE and rank[layer(b)] < rank[layer(a)])
    upward += sorted(f"{a} -> {b}" for a, targets in GRAPH.items() if a not in FACADE for b in targets if b in FACADE)
    assert not upward, "imports that point up DESIGN.md's layers:\n" + "\n".join(upward)


def test_no_import_circles():
    # A package's __init__ re-exports its modules; a module importing its own package's
    # __init__ would close a circle through it, so those edges count too.
    circles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w in FACADE:
                continue
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
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index and v not in FACADE:
            visit(v)
    assert not circles, "modules that import each other (directly or round a circle): " + str(circles)


def test_no_method_imports_another():
    # Shared bases (methods/base.py, lycoris.py, prompt_learning.py, ...) are modules of their
    # own; a method's folder never reaches into a sibling's.
    folders = {p.name for p in (PACKAGE / "methods").iterdir() if (p / "__init__.py").exists()}
    crossing = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
                      if a.startswith("peftkit.methods.") and b.startswith("peftkit.methods.")
                      and len(a.split(".")) > 3 and len(b.split(".")) > 2
                      and a.split(".")[2] in folders and b.split(".")[2] in folders
                      and a.split(".")[2] != b.split(".")[2])
    assert not crossing, "a method imports a sibling method's folder:\n" + "\n".join(crossing)


@pytest.mark.parametrize("bad", ["up", "circle"])
def test_the_checks_catch_what_they_should(bad, monkeypatch):
    # The two checks above must be able to fail: give them an upward edge / a circle.
    if bad == "up":
        monkeypatch.setitem(GRAPH, "peftkit.kernels._dispatch", GRAPH["peftkit.kernels._dispatch"] | {"peftkit.model"})
        with pytest.raises(AssertionError, match="point up"):
            test_imports_point_down()
    else:
        monkeypatch.setitem(GRAPH, "peftkit.config", GRAPH["peftkit.config"] | {"peftkit.methods.base"})
        monkeypatch.setitem(GRAPH, "peftkit.methods.base", GRAPH["peftkit.methods.base"] | {"peftkit.config"})
        with pytest.raises(AssertionError, match="circle"):
            test_no_import_circles()
