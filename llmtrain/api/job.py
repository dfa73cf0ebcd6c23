"""The whole ``LLMTrainingJob`` object and how manifests are read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import ConfigDict, Field, field_validator

from llmtrain.api.base import ApiModel, CelRule, cel
from llmtrain.api.defaults import as_applied
from llmtrain.api.spec import GROUP, KIND, VERSION, LLMTrainingJobSpec
from llmtrain.api.status import LLMTrainingJobStatus

API_VERSION = f"{GROUP}/{VERSION}"

# The job's name is the prefix of its children's names, and the longest child that must be a
# DNS-1035 label (at most 63 characters) is the head Service, "<name>-head-svc" (pods, Secrets
# and ConfigMaps allow 253). The name is also a label value (at most 63). The apiserver itself
# allows 253 for a custom resource, so the limit is a CEL rule on the root of the CRD.
# tests/unit/test_job_name.py checks this against the operator's child names.
LONGEST_DNS_LABEL_SUFFIX = "-head-svc"
MAX_NAME_LENGTH = 63 - len(LONGEST_DNS_LABEL_SUFFIX)
NAME_TOO_LONG = (
    f"metadata.name must be at most {MAX_NAME_LENGTH} characters: the head Service is named "
    f"<name>{LONGEST_DNS_LABEL_SUFFIX} and a Service name is at most 63; choose a shorter name"
)


class ObjectMeta(ApiModel):
    """The parts of metav1.ObjectMeta llmtrain reads; the rest is kept as written."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, pattern=r"^[a-z0-9]([a-z0-9\-]*[a-z0-9])?$")
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_length(cls, name: str) -> str:
        # The CEL rule's message word for word: llmtrain validate reports the two as one problem.
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(NAME_TOO_LONG)
        return name


class LLMTrainingJob(ApiModel):
    # Rules on the whole object: the CRD generator puts them at the schema's root, where the
    # apiserver lets CEL read metadata.name (and generateName, nothing else of metadata).
    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        cel(f"size(self.metadata.name) <= {MAX_NAME_LENGTH}", NAME_TOO_LONG, ".metadata.name"),
    )

    api_version: str = Field(API_VERSION, pattern=f"^{GROUP.replace('.', '[.]')}/{VERSION}$")
    kind: str = Field(KIND, pattern=f"^{KIND}$")
    metadata: ObjectMeta
    spec: LLMTrainingJobSpec
    status: LLMTrainingJobStatus | None = None


def read_manifests(path: str | Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document in a file, as plain dicts."""
    text = Path(path).read_text(encoding="utf-8")
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise ValueError(f"{path}: document {i + 1} is not a mapping")
    return docs


def load_job(path: str | Path) -> LLMTrainingJob:
    """Parse the single LLMTrainingJob in a file (pydantic checks only; see llmtrain.api.validate)."""
    docs = [d for d in read_manifests(path) if d.get("kind") == KIND]
    if len(docs) != 1:
        raise ValueError(f"{path}: expected exactly one {KIND} document, found {len(docs)}")
    return LLMTrainingJob.model_validate(as_applied(docs[0]))
