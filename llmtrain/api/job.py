"""The whole ``LLMTrainingJob`` object and how manifests are read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field

from llmtrain.api.base import ApiModel
from llmtrain.api.spec import GROUP, KIND, VERSION, LLMTrainingJobSpec
from llmtrain.api.status import LLMTrainingJobStatus

API_VERSION = f"{GROUP}/{VERSION}"


class ObjectMeta(ApiModel):
    """The parts of metav1.ObjectMeta llmtrain reads; the rest is kept as written."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9\-]*[a-z0-9])?$")
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class LLMTrainingJob(ApiModel):
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
    from llmtrain.api.validate import as_applied  # imports this module

    return LLMTrainingJob.model_validate(as_applied(docs[0]))
