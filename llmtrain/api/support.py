"""Spec fields that parse but have no effect yet.

"No field that parses but does nothing": ``llmtrain validate`` rejects a manifest that
sets any path listed here, with the reason. Paths are spec leaf paths with list items
written as ``[]`` (``spec.data.sources[].huggingface``); a listed object path covers
everything under it. ``tests/unit/test_spec_coverage.py`` checks that every leaf of the
spec is either listed here or mapped to a test that proves its effect.
"""

from __future__ import annotations

from llmtrain.api.schema import spec_schema

NOT_SUPPORTED_YET: dict[str, str] = {}


def spec_leaf_paths() -> list[str]:
    """Every leaf of the spec schema (``spec.data.sources[].s3.uri``), in schema order."""
    out: list[str] = []

    def walk(node: dict[str, object], path: str) -> None:
        props = node.get("properties")
        items = node.get("items")
        if isinstance(props, dict) and props:
            for key, sub in props.items():
                walk(sub, f"{path}.{key}")
        elif isinstance(items, dict) and isinstance(items.get("properties"), dict):
            walk(items, f"{path}[]")
        else:
            out.append(path)

    walk(spec_schema(), "spec")
    return out
