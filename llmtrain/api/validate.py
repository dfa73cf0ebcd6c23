"""``llmtrain validate``: the checks the apiserver runs, before anything reaches a cluster.

Three layers, each reporting the exact field path (``spec.model.architecture.kvHeads``):

1. pydantic — types, enums, bounds, patterns, required and unknown fields;
2. the CRD's CEL rules — the *same strings* the apiserver evaluates
   (``x-kubernetes-validations``), run with cel-python on the object after applying the
   schema's defaults, exactly as the apiserver defaults before it validates; transition
   rules (``oldSelf``) run when an old object is given;
3. fields that parse but have no effect yet (:mod:`llmtrain.api.support`) are rejected
   with "not supported yet";
4. a valid grid search (``spec.tuning``) is expanded and each configuration checked by
   1–3, named with the path it breaks (:func:`grid_problems`; the tuning stage checks
   each sampled configuration with :func:`trial_problems`).

How the apiserver prunes nulls and fills defaults first is :mod:`llmtrain.api.defaults`.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import yaml
from pydantic import ValidationError

from llmtrain.api.crd import crd
from llmtrain.api.defaults import apply_defaults, as_applied
from llmtrain.api.job import LLMTrainingJob, read_manifests
from llmtrain.api.spec import KIND, SearchAlgorithm
from llmtrain.api.support import NOT_SUPPORTED_YET
from llmtrain.api.tuning import describe, final_document, grid_configs, job_document, trial_document

_SECRET_KEY = re.compile(r"(secret|password|passwd|token|access[_-]?key|credential|session)", re.I)
INLINE_SECRET_HINT = (
    "inline credentials are not allowed: store them in a Secret and reference it with "
    "spec.storage.secretRef (or env[].valueFrom.secretKeyRef)"
)


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    layer: str  # "schema" | "cel" | "unsupported" | "manifest" | "tuning"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@cache
def root_schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@cache
def _cel_program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _join(path: str, part: str | int) -> str:
    return f"{path}[{part}]" if isinstance(part, int) else f"{path}.{part}" if path else part


def _schema_at(parts: list[str | int]) -> dict[str, Any] | None:
    node: dict[str, Any] | None = root_schema()
    for part in parts:
        if node is None:
            return None
        if isinstance(part, int):
            node = node.get("items")
        elif "properties" in node:
            node = node["properties"].get(part)
        else:
            node = (
                node.get("additionalProperties")
                if isinstance(node.get("additionalProperties"), dict)
                else None
            )
    return node


def _pydantic_problems(err: ValidationError) -> list[Problem]:
    out = []
    for e in err.errors():
        parts: list[str | int] = [p for p in e["loc"] if isinstance(p, int) or "[" not in str(p)]
        path = ""
        for p in parts:
            path = _join(path, p)
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            key = str(parts[-1]) if parts else ""
            parent = _schema_at(parts[:-1])
            known = sorted((parent or {}).get("properties", {}))
            if _SECRET_KEY.search(key):
                message = INLINE_SECRET_HINT
            else:
                close = difflib.get_close_matches(key, known, n=1)
                message = f"unknown field {key!r}" + (
                    f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
                )
        elif e["type"] == "missing":
            message = "required field is missing"
        elif e["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        out.append(Problem(path or "<root>", message, "schema"))
    return out


def _cel_problems(schema: dict[str, Any], value: Any, path: str, old: Any) -> list[Problem]:
    out: list[Problem] = []
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                old_sub = old.get(key) if isinstance(old, dict) else None
                out += _cel_problems(sub, value[key], _join(path, key), old_sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        # Like the apiserver, list items are not correlated with old items (no listType=map).
        for i, item in enumerate(value):
            out += _cel_problems(schema["items"], item, _join(path, i), None)
    for rule in schema.get("x-kubernetes-validations", []):
        is_transition = "oldSelf" in rule["rule"]
        if is_transition and old is None:
            continue
        activation = {"self": celpy.json_to_cel(value)}
        if is_transition:
            activation["oldSelf"] = celpy.json_to_cel(old)
        try:
            ok = _cel_program(rule["rule"]).evaluate(activation)
        except (celpy.CELEvalError, TypeError, AttributeError):
            # A value of the wrong type (celpy raises plain TypeErrors on some, e.g. a null
            # list): already reported by the schema layer; the apiserver skips CEL then too.
            continue
        if ok is not True and not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            where = (path + rule.get("fieldPath", "")).lstrip(".") or "<root>"
            out.append(Problem(where, rule["message"], "cel"))
    return out


def _root_cel_problems(doc: dict[str, Any]) -> list[Problem]:
    """The rules at the CRD's root (metadata.name): the apiserver shows them the object with
    metadata reduced to name and generateName, so they get the same here."""
    rules = root_schema().get("x-kubernetes-validations", [])
    meta = doc.get("metadata")
    if not rules or not isinstance(meta, dict):
        return []
    value = {"metadata": {k: meta[k] for k in ("name", "generateName") if k in meta}}
    return _cel_problems({"x-kubernetes-validations": rules}, value, "", None)


def _set_paths(value: Any, path: str) -> set[str]:
    """Every path the manifest sets, list indices written as []."""
    out = {path}
    if isinstance(value, dict):
        for k, v in value.items():
            out |= _set_paths(v, f"{path}.{k}")
    elif isinstance(value, list):
        for v in value:
            out |= _set_paths(v, f"{path}[]")
    return out


def _unsupported_problems(spec: Any) -> list[Problem]:
    if not isinstance(spec, dict):
        return []
    present = _set_paths(spec, "spec")
    return [
        Problem(path, f"not supported yet: {why}", "unsupported")
        for path, why in sorted(NOT_SUPPORTED_YET.items())
        if path in present
    ]


def validate_object(doc: dict[str, Any], old: dict[str, Any] | None = None) -> list[Problem]:
    """All problems of one LLMTrainingJob manifest (empty list: valid)."""
    problems: list[Problem] = []
    spec_schema = root_schema()["properties"]["spec"]
    doc = as_applied(doc)
    if old is not None:
        old = as_applied(old)
    try:
        LLMTrainingJob.model_validate(doc)
    except ValidationError as e:
        problems += _pydantic_problems(e)
    spec = doc.get("spec")
    if isinstance(spec, dict):
        new = apply_defaults(spec_schema, copy.deepcopy(spec))
        old_spec = None
        if old is not None and isinstance(old.get("spec"), dict):
            old_spec = apply_defaults(spec_schema, copy.deepcopy(old["spec"]))
        problems += _cel_problems(spec_schema, new, "spec", old_spec)
    problems += _root_cel_problems(doc)
    problems += _unsupported_problems(spec)
    # One problem per (path, message), schema layer first.
    seen: set[tuple[str, str]] = set()
    unique = []
    for p in problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            unique.append(p)
    if not unique:
        unique = grid_problems(doc)
    return unique


# A grid's configurations validated one by one (two manifests each, ~10 ms): beyond this many
# the rest are left to the tuning stage, which checks every one before the search starts.
MAX_GRID_CONFIGURATIONS = 1000


def grid_problems(doc: dict[str, Any]) -> list[Problem]:
    """4. A valid grid search, expanded: every configuration applied to the spec (as a trial
    runs it and as the final run would) must pass layers 1–3, or it is named with the path
    it breaks. Random and bayesian samples are checked in their trial (they are not known
    before the search runs). The apiserver cannot expand a grid: this layer is ours."""
    job = LLMTrainingJob.model_validate(doc)
    tuning = job.spec.tuning
    if tuning is None or tuning.search != SearchAlgorithm.grid:
        return []
    doc = job_document(job)  # with the defaults: trial_document reads workersPerTrial, trialBudget
    # The same rule broken by several configurations is one problem: the first one named,
    # the others counted (a 10 × 2 grid with one bad microBatchSize is not 20 lines).
    broken: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for config in grid_configs(tuning)[:MAX_GRID_CONFIGURATIONS]:
        for what, path, message in configuration_problems(doc, config):
            broken.setdefault((what, path, message), []).append(config)
    out = []
    for (what, path, message), configs in broken.items():
        more = len(configs) - 1
        also = f" (and {more} more configuration{'s' * (more != 1)} of the grid)" if more else ""
        out.append(
            Problem(path, f"grid configuration {describe(configs[0])} ({what}){also}: {message}", "tuning")
        )
    return out


def configuration_problems(doc: dict[str, Any], config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Every rule the trial's and the final run's spec break with ``config`` applied, as
    ``(which run, field path, message)`` (the checks of ``llmtrain validate``: schema and
    the CRD's CEL rules)."""
    out = []
    for what, candidate in (
        ("trial", trial_document(doc, config, checkpoint_uri="s3://validate/only")),
        ("final run", final_document(doc, config)),
    ):
        out += [(what, p.path, p.message) for p in validate_object(candidate)]
    return out


def trial_problems(doc: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """:func:`configuration_problems` as ``configuration {…} (trial): path: message`` lines."""
    values = describe(config)
    return [
        f"configuration {values} ({what}): {path}: {msg}"
        for what, path, msg in configuration_problems(doc, config)
    ]


@dataclass(frozen=True)
class FileResult:
    file: str
    name: str  # metadata.name or "document N"
    problems: list[Problem]


def validate_file(path: str | Path, old_path: str | Path | None = None) -> list[FileResult]:
    try:
        docs = read_manifests(path)
    except yaml.YAMLError as e:
        return [FileResult(str(path), "<file>", [Problem("<file>", f"not valid YAML: {e}", "manifest")])]
    except (OSError, ValueError) as e:
        return [FileResult(str(path), "<file>", [Problem("<file>", str(e), "manifest")])]
    olds: dict[str, dict[str, Any]] = {}
    if old_path is not None:
        for d in read_manifests(old_path):
            if d.get("kind") == KIND:
                olds[str((d.get("metadata") or {}).get("name"))] = d
    jobs = [d for d in docs if d.get("kind") == KIND]
    if not jobs:
        return [
            FileResult(str(path), "<file>", [Problem("kind", f"no {KIND} document in the file", "manifest")])
        ]
    results = []
    for i, d in enumerate(jobs):
        name = str((d.get("metadata") or {}).get("name") or f"document {i + 1}")
        results.append(FileResult(str(path), name, validate_object(d, olds.get(name))))
    return results
