"""The layers hold: ``llmtrain.api`` below both sides, and the operator and the runtime never
import each other (they meet only through the API: the spec, the progress snapshot).

Read from the source (every ``import`` in every file, those inside functions included), not
from ``sys.modules``: a lazy import is an arrow all the same, only one a test would not load.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.unit.test_api_imports import cycles

REPO = Path(__file__).resolve().parents[2]
# Folder → the package it is installed as (pyproject.toml's package-dir).
PACKAGES = {"llmtrain/api": "llmtrain.api", "operator": "llmtrain.operator", "runtime": "llmtrain.runtime"}
# Which packages each layer must never import.
FORBIDDEN = {
    "llmtrain.runtime": ("llmtrain.operator",),
    "llmtrain.operator": ("llmtrain.runtime",),
    "llmtrain.api": ("llmtrain.operator", "llmtrain.runtime"),
}


def module_name(path: Path, folder: Path, package: str) -> str:
    parts = list(path.relative_to(folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imported(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in the file, relative ones resolved."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from pkg import mod`` may name a module: count both.
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def violations(root: Path = REPO) -> list[str]:
    out = []
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            me = module_name(path, root / folder, package)
            bad = {
                line: target
                for line, target in imported(path, me)
                if any(target == b or target.startswith(b + ".") for b in FORBIDDEN[package])
            }
            out += [f"{path.relative_to(root)}:{line}: {me} imports {t}" for line, t in bad.items()]
    return out


def module_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module → the modules of the three packages it imports (anywhere in the file)."""
    files = {
        module_name(path, root / folder, package): path
        for folder, package in PACKAGES.items()
        for path in sorted((root / folder).rglob("*.py"))
    }
    return {me: {t for _, t in imported(path, me) if t in files and t != me} for me, path in files.items()}


def test_runtime_and_operator_never_import_each_other_and_the_api_neither() -> None:
    assert violations() == []


def test_a_planted_import_is_found_even_inside_a_function(tmp_path: Path) -> None:
    """The check's own negative control: each kind of arrow it must see, in a copy of the layout."""
    for folder in PACKAGES:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "runtime" / "lazy.py").write_text(
        "def f():\n    from llmtrain.operator.manifests import ray_num_cpus\n"
    )
    (tmp_path / "operator" / "plain.py").write_text("import llmtrain.runtime.driver\n")
    (tmp_path / "operator" / "relative.py").write_text("from ..runtime import driver\n")
    (tmp_path / "llmtrain" / "api" / "up.py").write_text("from llmtrain import operator\n")
    (tmp_path / "llmtrain" / "api" / "fine.py").write_text("from llmtrain.api import spec\n")
    found = violations(tmp_path)
    assert [v.split(":", 1)[0] for v in found] == [
        "llmtrain/api/up.py",
        "operator/plain.py",
        "operator/relative.py",
        "runtime/lazy.py",
    ]


def test_no_import_circle_in_the_runtime_the_operator_or_the_api() -> None:
    """Not even through an import inside a function (the driver and the tuning stage were one)."""
    assert cycles(module_graph()) == []


def test_a_circle_across_packages_is_found(tmp_path: Path) -> None:
    """Negative control: a lazy circle between two runtime modules, and one through a package's
    ``__init__``, are found; one-way arrows are not."""
    for folder in PACKAGES:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "runtime" / "driver.py").write_text("from llmtrain.runtime.stage import Place\n")
    (tmp_path / "runtime" / "tune.py").write_text("def f():\n    from llmtrain.runtime import driver\n")
    (tmp_path / "runtime" / "stage.py").write_text("def g():\n    from llmtrain.runtime.tune import f\n")
    (tmp_path / "runtime" / "data").mkdir()
    (tmp_path / "runtime" / "data" / "__init__.py").write_text("from .loader import open_loader\n")
    (tmp_path / "runtime" / "data" / "loader.py").write_text("from llmtrain.runtime.data import x\n")
    (tmp_path / "operator" / "main.py").write_text("from llmtrain.api import spec\n")
    assert cycles(module_graph(tmp_path)) == [
        ["llmtrain.runtime.data", "llmtrain.runtime.data.loader"],
        ["llmtrain.runtime.driver", "llmtrain.runtime.stage", "llmtrain.runtime.tune"],
    ]
