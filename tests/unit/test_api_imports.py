"""``llmtrain.api`` imports in one direction: no module of it reaches itself again through
other modules of it.

Read from the source (every ``import``, those inside functions included): an import moved
into a function still closes a circle, it only hides it until the function runs. A circle
means two modules that cannot be read, tested or moved one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "llmtrain.api"


def import_graph(folder: Path = REPO / "llmtrain" / "api") -> dict[str, set[str]]:
    """Module → the modules of the package it imports (anywhere in the file)."""
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name in modules:
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text(), filename=name)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: ``from .spec import X`` or ``from . import spec``
                    base = ".".join([PACKAGE, *([base] if base else [])])
                # ``from llmtrain.api import spec`` names a module: count both forms.
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            for t in targets:
                if t.startswith(PACKAGE + "."):
                    first = t.removeprefix(PACKAGE + ".").split(".")[0]
                    if first in modules and first != name:
                        graph[name].add(first)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of two or more modules (Tarjan), each as the
    sorted list of its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_llmtrain_api_has_no_import_circle() -> None:
    assert cycles(import_graph()) == []


def test_a_circle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    """The check's own negative control: a circle closed only inside a function, and one
    through ``from llmtrain.api import x``, are both found; a one-way arrow is not."""
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "a.py").write_text("from llmtrain.api.b import B\n")
    (tmp_path / "b.py").write_text("def f():\n    from llmtrain.api.a import A  # lazy: still a circle\n")
    (tmp_path / "c.py").write_text("from llmtrain.api import d\n")
    (tmp_path / "d.py").write_text("def g():\n    from . import c\n")
    (tmp_path / "e.py").write_text("from llmtrain.api import a\n")
    assert cycles(import_graph(tmp_path)) == [["a", "b"], ["c", "d"]]
