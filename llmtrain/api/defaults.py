"""What the apiserver does to an object before it validates and stores it: nulls of
non-nullable fields pruned, then the schema's defaults filled.

Below both readers of manifests: :mod:`llmtrain.api.job` (``load_job``: what ``llmtrain run``
and the driver read) and :mod:`llmtrain.api.validate` (the CEL rules see defaulted objects),
so that both treat a manifest exactly as the apiserver would.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from llmtrain.api.schema import spec_schema


@cache
def _spec_schema() -> dict[str, Any]:
    """The CRD's spec schema, built once (it walks every model)."""
    return spec_schema()


def as_applied(doc: dict[str, Any]) -> dict[str, Any]:
    """The manifest as the apiserver stores it: nulls of non-nullable fields pruned (it does so
    before defaulting and validating: `fsdp: null` means "unset", not "a null FsdpSpec").
    A copy; what every loader hands to the models."""
    if not isinstance(doc.get("spec"), dict):
        return doc
    return {**doc, "spec": drop_nulls(_spec_schema(), copy.deepcopy(doc["spec"]))}


def drop_nulls(schema: dict[str, Any], value: Any) -> Any:
    """Remove, in place, the null values of object fields (none of ours is nullable), as the
    apiserver does before defaulting."""
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in list(value):
            sub = (
                (props or {}).get(key) if props is not None else (extra if isinstance(extra, dict) else None)
            )
            if value[key] is None and sub is not None and not sub.get("nullable"):
                del value[key]
            elif sub is not None:
                drop_nulls(sub, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            drop_nulls(schema["items"], item)
    return value


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Fill schema defaults the way the apiserver does (parents first, then their children)."""
    if not isinstance(value, dict):
        if isinstance(value, list) and isinstance(schema.get("items"), dict):
            return [apply_defaults(schema["items"], v) for v in value]
        return value
    props = schema.get("properties", {})
    for key, sub in props.items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            value[key] = apply_defaults(sub, value[key])
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key in value:
            value[key] = apply_defaults(extra, value[key])
    return value
