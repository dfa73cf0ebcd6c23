"""Shared building blocks of the API models: camelCase aliases, strictness, CEL rules.

Every model in ``llmtrain.api`` derives from :class:`ApiModel`. Cross-field rules are
attached as CEL strings (:func:`cel`) so that the apiserver (through the generated
CRD's ``x-kubernetes-validations``) and ``llmtrain validate`` evaluate the *same* text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class CelRule:
    """One ``x-kubernetes-validations`` entry.

    ``field_path`` is relative to the object the rule is attached to (``.kvHeads``) and
    is what both the apiserver and ``llmtrain validate`` report as the failing field.
    ``transition`` marks rules that read ``oldSelf`` (evaluated on update only).
    """

    rule: str
    message: str
    field_path: str | None = None
    reason: str | None = None

    @property
    def transition(self) -> bool:
        return "oldSelf" in self.rule

    def as_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> CelRule:
    return CelRule(rule=rule, message=message, field_path=field_path, reason=reason)


def exactly_one(*fields: str) -> str:
    """Portable CEL for "exactly one of these optional fields is set"."""
    return " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields) + " == 1"


class ApiModel(BaseModel):
    """Base of every spec/status model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=False,
    )

    # CEL rules for this object; copied into the CRD by llmtrain.api.crd.
    cel_rules: ClassVar[tuple[CelRule, ...]] = ()
    # Objects whose content is Kubernetes' own (affinity, volumes): kept as-is by the
    # apiserver; the CRD generator allows x-kubernetes-preserve-unknown-fields only here.
    preserve_unknown: ClassVar[bool] = False

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        if cls.cel_rules:
            target["x-kubernetes-validations"] = [r.as_schema() for r in cls.cel_rules]
        return schema
