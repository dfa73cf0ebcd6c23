"""Generated LLMTrainingJob manifests (Hypothesis): valid ones and mutations of them.

Every manifest starts from :data:`tests.manifests.BASE` (valid, every kind of field set) and
changes one place, chosen among every field BASE sets (the schema walk of
``tests.manifests._leaf_locations``):

* a value drawn for the field's own schema (an enum member, a number inside or just outside
  its bounds, a string for its pattern or not): mostly valid, sometimes not;
* an arbitrary JSON value of any type (wrong types, huge numbers, unicode, long strings,
  nested lists and maps);
* the field removed (required fields), or an unknown field added next to it.

The tests hand each manifest to ``llmtrain validate`` and to the real kube-apiserver and
compare verdicts (tests/integration/test_fuzz_parity.py).
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

from llmtrain.api.validate import root_schema
from tests.manifests import BASE, _get_container, _leaf_locations, path_string

# JSON numbers the apiserver and Python both read exactly (int64 and finite doubles).
_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_FLOAT = st.floats(allow_nan=False, allow_infinity=False, width=64)
_TEXT = st.one_of(
    st.text(max_size=20), st.text(min_size=300, max_size=2000), st.sampled_from(["", " ", "1", "true"])
)
JSON: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), _INT64, _FLOAT, _TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(min_size=1, max_size=10), inner, max_size=5)
    ),
    max_leaves=12,
)


def locations() -> list[tuple[dict[str, Any], list[str | int]]]:
    """(schema node, path parts under the manifest) for every field BASE sets."""
    spec = root_schema()["properties"]["spec"]
    return [(node, ["spec", *rel]) for node, rel in _leaf_locations(spec, BASE["spec"], [])]


def for_schema(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values aimed at one schema node: near its bounds, its enum, its pattern."""
    kind = node.get("type")
    if "enum" in node:
        return st.one_of(st.sampled_from(node["enum"]), st.text(max_size=12))
    if kind == "integer":
        lo, hi = node.get("minimum", -(2**31)), node.get("maximum", 2**31)
        return st.one_of(
            st.integers(min_value=lo, max_value=hi),
            st.sampled_from([lo - 1, lo, hi, hi + 1]),
        )
    if kind == "number":
        lo, hi = node.get("minimum", -1e9), node.get("maximum", 1e9)
        return st.one_of(st.floats(min_value=lo, max_value=hi), st.sampled_from([lo, hi, lo - 0.5, hi + 0.5]))
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        bounded = st.text(min_size=node.get("minLength", 0), max_size=min(node.get("maxLength", 40), 40))
        if "pattern" in node:
            return st.one_of(st.from_regex(node["pattern"], fullmatch=True), bounded)
        return bounded
    return JSON


@st.composite
def manifests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """(what was done, the manifest)."""
    places = locations()
    node, parts = places[draw(st.integers(0, len(places) - 1))]
    doc = copy.deepcopy(BASE)
    doc["metadata"]["name"] = "fuzz"
    parent = _get_container(doc, parts[:-1])
    key = parts[-1]
    where = path_string(parts)
    how = draw(st.sampled_from(["schema", "schema", "any", "delete", "unknown"]))
    if how == "schema":
        parent[key] = draw(for_schema(node))
        return f"{where} = {parent[key]!r}", doc
    if how == "any":
        parent[key] = draw(JSON)
        return f"{where} = {parent[key]!r}", doc
    if how == "delete" and isinstance(parent, dict):
        del parent[key]
        return f"del {where}", doc
    # An unknown field beside it (in a map of our own schema; lists get one appended item).
    if isinstance(parent, dict):
        name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyzXYZ", min_size=1, max_size=12))
        if name in parent:
            return "unchanged", doc
        parent[name] = draw(JSON)
        return f"{path_string(parts[:-1])}.{name} (unknown) = {parent[name]!r}", doc
    parent.append(draw(JSON))
    return f"{path_string(parts[:-1])}[+] = {parent[-1]!r}", doc
