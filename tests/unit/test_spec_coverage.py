"""No field that parses but does nothing: every spec leaf has a test proving its effect, or is rejected."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest

from llmtrain.api import validate as validate_mod
from llmtrain.api.support import NOT_SUPPORTED_YET, spec_leaf_paths
from llmtrain.api.validate import validate_object
from tests.manifests import base
from tests.spec_coverage import EFFECTS

REPO = Path(__file__).resolve().parents[2]


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def _covered_by_unsupported(leaf: str) -> bool:
    return any(leaf == p or leaf.startswith(p + ".") or leaf.startswith(p + "[]") for p in NOT_SUPPORTED_YET)


def test_every_leaf_has_an_effect_test_or_is_rejected() -> None:
    leaves = spec_leaf_paths()
    assert len(leaves) > 100
    missing = [leaf for leaf in leaves if leaf not in EFFECTS and not _covered_by_unsupported(leaf)]
    assert missing == [], "map these spec fields to a test in tests/spec_coverage.py or reject them"
    both = [leaf for leaf in leaves if leaf in EFFECTS and _covered_by_unsupported(leaf)]
    assert both == [], "a field cannot be both supported and rejected"
    stale = sorted(set(EFFECTS) - set(leaves))
    assert stale == [], "tests/spec_coverage.py names fields the spec no longer has"


def test_every_mapped_test_exists() -> None:
    cache: dict[Path, set[str]] = {}
    problems = []
    for leaf, node in EFFECTS.items():
        file, _, name = node.partition("::")
        path = REPO / file
        if not path.exists():
            problems.append(f"{leaf}: {file} does not exist")
            continue
        if name.split("[")[0] not in cache.setdefault(path, _test_functions(path)):
            problems.append(f"{leaf}: {node} does not exist")
    assert problems == []


def _set_leaf(doc: dict, leaf: str) -> None:  # type: ignore[type-arg]
    """Set an unsupported path to a non-default value in a valid manifest."""
    node = doc
    parts = leaf.split(".")[1:]
    for part in parts[:-1]:
        key = part.removesuffix("[]")
        node = node.setdefault(key, [{}] if part.endswith("[]") else {})
        if isinstance(node, list):
            node = node[0]
    node[parts[-1].removesuffix("[]")] = {"x": 1}


@pytest.mark.parametrize("path", sorted(NOT_SUPPORTED_YET) or ["<none>"])
def test_unsupported_fields_are_rejected_by_validate(path: str) -> None:
    if path == "<none>":
        pytest.skip("every spec field is supported")
    doc = copy.deepcopy(base())
    _set_leaf(doc, path)
    problems = validate_object(doc)
    assert any(p.path.startswith(path) and "not supported yet" in p.message for p in problems), problems


def test_rejection_mechanism_negative_control(monkeypatch: pytest.MonkeyPatch) -> None:
    # With the registry emptied, a planted field is no longer rejected by the unsupported layer.
    monkeypatch.setattr(validate_mod, "NOT_SUPPORTED_YET", {})
    assert not [p for p in validate_object(base()) if p.layer == "unsupported"]
    monkeypatch.setattr(validate_mod, "NOT_SUPPORTED_YET", {"spec.resources.affinity": "planned"})
    assert [p.path for p in validate_object(base()) if p.layer == "unsupported"] == [
        "spec.resources.affinity"
    ]
