"""The structural OpenAPI schema of the ``LLMTrainingJob`` spec and status, built from the
pydantic models.

The schema is built by walking the models' fields (not by post-processing pydantic's JSON
schema, which uses ``$ref``/``anyOf``/``title`` and is not *structural*): every property
gets a type and the field's description, defaults become ``default`` (nested objects get
``default: {}`` so the apiserver fills their own defaults, which CEL rules rely on), and
``x-kubernetes-preserve-unknown-fields`` appears only on the models that declare
``preserve_unknown`` (core/v1 Affinity and Volume).

Below :mod:`llmtrain.api.job` (which reads manifests as the apiserver stores them, with this
schema's nulls pruned) and :mod:`llmtrain.api.crd` (which wraps it in the CRD object).
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, WithJsonSchema
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from llmtrain.api.base import ApiModel
from llmtrain.api.spec import LLMTrainingJobSpec
from llmtrain.api.status import LLMTrainingJobStatus

# Models whose content is Kubernetes' own and is passed through untouched.
PRESERVE_UNKNOWN_ALLOWLIST = ("Affinity", "Volume")


class SchemaError(TypeError):
    """A model uses a type the CRD generator cannot express structurally."""


def _unwrap_optional(annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise SchemaError(f"unions other than Optional are not structural: {annotation}")
        return args[0]
    return annotation


def _apply_constraints(schema: dict[str, Any], metadata: list[Any]) -> None:
    kind = schema.get("type")
    for m in metadata:
        if isinstance(m, WithJsonSchema):
            continue
        if isinstance(m, FieldInfo):
            # Optional[Annotated[str, Field(...)]] (``Uri | None``) keeps its Field whole in
            # the Annotated metadata; without this its bounds and pattern never reach the CRD.
            _apply_constraints(schema, list(m.metadata))
            continue
        for attr, key in (("ge", "minimum"), ("le", "maximum"), ("gt", "minimum"), ("lt", "maximum")):
            value = getattr(m, attr, None)
            if value is not None:
                schema[key] = value
                if attr in ("gt", "lt"):
                    # OpenAPI v3.0 (what Kubernetes speaks): exclusive bounds are booleans.
                    schema["exclusiveMinimum" if attr == "gt" else "exclusiveMaximum"] = True
        min_len = getattr(m, "min_length", None)
        max_len = getattr(m, "max_length", None)
        # Arrays count items, maps properties (bounded maps keep CEL over them in budget).
        sizes = {"array": ("minItems", "maxItems"), "object": ("minProperties", "maxProperties")}
        low_key, high_key = sizes.get(str(kind), ("minLength", "maxLength"))
        if min_len is not None:
            schema[low_key] = min_len
        if max_len is not None:
            schema[high_key] = max_len
        pattern = getattr(m, "pattern", None)
        if pattern is not None:
            schema["pattern"] = pattern


def type_schema(annotation: Any, metadata: list[Any] | None = None) -> dict[str, Any]:
    """Structural schema of one annotation (Annotated metadata included)."""
    metadata = list(metadata or [])
    annotation = _unwrap_optional(annotation)
    if get_origin(annotation) is typing.Annotated:
        base, *extra = get_args(annotation)
        return type_schema(base, [*extra, *metadata])
    for m in metadata:
        if (
            isinstance(m, WithJsonSchema)
            and m.json_schema
            and m.json_schema.get("x-kubernetes-int-or-string")
        ):
            return {"x-kubernetes-int-or-string": True}

    origin = get_origin(annotation)
    schema: dict[str, Any]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        schema = model_schema(annotation)
    elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        schema = {"type": "string", "enum": [e.value for e in annotation]}
    elif origin is Literal:
        schema = {"type": "string", "enum": list(get_args(annotation))}
    elif annotation is bool:
        schema = {"type": "boolean"}
    elif annotation is int:
        schema = {"type": "integer"}
    elif annotation is float:
        schema = {"type": "number"}
    elif annotation is str:
        schema = {"type": "string"}
    elif origin is list:
        (item,) = get_args(annotation)
        schema = {"type": "array", "items": type_schema(item)}
    elif origin is dict:
        key, value = get_args(annotation)
        if key is not str:
            raise SchemaError(f"map keys must be strings: {annotation}")
        schema = {"type": "object", "additionalProperties": type_schema(value)}
    else:
        raise SchemaError(f"no structural schema for {annotation!r}")
    _apply_constraints(schema, metadata)
    return schema


def _drop_empty(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_empty(v) for k, v in value.items() if v not in ({}, [])}
    return value


def _json_default(field: FieldInfo, annotation: Any) -> Any:
    """The field's default as the apiserver should apply it, or PydanticUndefined."""
    if field.default is PydanticUndefined and field.default_factory is None:
        return PydanticUndefined
    value = field.get_default(call_default_factory=True)
    if value is None:
        return PydanticUndefined
    if isinstance(value, BaseModel):
        # The whole object, nested defaults included: the apiserver checks each default
        # against the CEL rules as written, before any nested default is applied.
        return _drop_empty(value.model_dump(by_alias=True, mode="json", exclude_none=True))
    if isinstance(value, list | dict) and not value:
        return PydanticUndefined  # absent means empty; keep manifests and diffs small
    if isinstance(value, enum.Enum):
        return value.value
    return value


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    doc = (model.__doc__ or "").strip()
    schema: dict[str, Any] = {"type": "object"}
    if doc:
        schema["description"] = " ".join(doc.split("\n\n")[0].split())
    if issubclass(model, ApiModel) and model.preserve_unknown:
        if model.__name__ not in PRESERVE_UNKNOWN_ALLOWLIST:
            raise SchemaError(f"{model.__name__} is not on the preserve-unknown-fields allowlist")
        schema["x-kubernetes-preserve-unknown-fields"] = True
        return schema
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        prop = type_schema(field.annotation, list(field.metadata))
        if field.description:
            prop["description"] = field.description
        default = _json_default(field, field.annotation)
        if default is not PydanticUndefined:
            prop["default"] = default
        if field.is_required():
            required.append(key)
        properties[key] = prop
    schema["properties"] = properties
    if required:
        schema["required"] = required
    if issubclass(model, ApiModel) and model.cel_rules:
        schema["x-kubernetes-validations"] = [r.as_schema() for r in model.cel_rules]
    return schema


def spec_schema() -> dict[str, Any]:
    return model_schema(LLMTrainingJobSpec)


def status_schema() -> dict[str, Any]:
    return model_schema(LLMTrainingJobStatus)
