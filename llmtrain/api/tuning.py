"""The pure side of ``spec.tuning``: configurations as manifests.

Shared by ``llmtrain validate`` (a grid's configurations are expanded and checked up front,
before anything reaches a cluster, by :func:`llmtrain.api.validate.configuration_problems`)
and the tuning stage (``runtime/tune.py``, which checks each configuration again before its
trial launches, by :func:`llmtrain.api.validate.trial_problems`). Standard library and the
API models only: no torch, ray or optuna, so the operator and ``validate`` stay light.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.spec import TUNABLE_PATHS, TuningSpec

# Trials checkpoint once, at their end (final.train: false exports the best one's).
TRIAL_CHECKPOINT_EVERY = 100_000_000


def _set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    node = doc
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def typed_config(config: dict[str, Any]) -> dict[str, float | int]:
    """Sampled values with integer fields rounded (a uniform over microBatchSize yields floats)."""
    return {
        path: round(float(v)) if TUNABLE_PATHS.get(path, False) else float(v)
        for path, v in config.items()
        if path in TUNABLE_PATHS
    }


def format_config(config: dict[str, float | int]) -> str:
    """``lr=0.001 microBatchSize=8``: the last part of each path, 4 significant digits."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v:.4g}" for k, v in config.items())


def job_document(job: LLMTrainingJob) -> dict[str, Any]:
    """The job as a manifest (camelCase), the form configurations are applied to."""
    return job.model_dump(by_alias=True, exclude_none=True, mode="json")


def final_document(doc: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The job with ``config`` applied, as the final run trains it (full duration, every worker)."""
    out = copy.deepcopy(doc)
    out["spec"].pop("tuning", None)
    for path, value in typed_config(config).items():
        _set_path(out["spec"], path, value)
    return out


def trial_document(doc: dict[str, Any], config: dict[str, Any], *, checkpoint_uri: str) -> dict[str, Any]:
    """The job as one trial trains it: ``config`` applied, the trial budget as its duration,
    workersPerTrial workers, its own checkpoint prefix, no export, no metrics port (trials
    share hosts)."""
    tuning = doc["spec"]["tuning"]
    out = final_document(doc, config)
    spec = out["spec"]
    spec["training"]["duration"] = dict(tuning["trialBudget"])
    spec["resources"]["workers"] = tuning["workersPerTrial"]
    spec["checkpoint"] = {"uri": checkpoint_uri, "everySteps": TRIAL_CHECKPOINT_EVERY, "keepLast": 1}
    spec["metrics"] = {**spec.get("metrics", {}), "enabled": False}
    for key in ("export", "serve"):
        spec.pop(key, None)
    return out


def describe(config: dict[str, Any]) -> str:
    """``{training.optimizer.lr=0.001, ...}``: a configuration as problems name it."""
    return "{" + ", ".join(f"{k}={v:g}" for k, v in typed_config(config).items()) + "}"


def grid_configs(tuning: TuningSpec) -> list[dict[str, float]]:
    """Every combination of the choices, in the order of the space's keys and their values."""
    paths = list(tuning.space)
    choices = [tuning.space[p].choice or [] for p in paths]
    return [dict(zip(paths, combo, strict=True)) for combo in itertools.product(*choices)]
