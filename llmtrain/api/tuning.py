"""The pure side of ``spec.tuning``: configurations as manifests.

Shared by ``llmtrain validate`` (a grid's configurations are expanded and checked up front,
before anything reaches a cluster, by :func:`llmtrain.api.validate.configuration_problems`)
and the tuning stage (``runtime/tune.py``, which checks each configuration again before its
trial launches, by :func:`llmtrain.api.validate.trial_problems`). Standard library and the
API models only: no torch, ray or optuna, so the operator and ``validate`` stay light.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from llmtrain.api.base import ApiModel
from llmtrain.api.config import total_steps
from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.spec import TUNABLE_PATHS, CheckpointSpec, DurationSpec, TuningSpec

# Trials checkpoint once, at their end (final.train: false exports the best one's).
TRIAL_CHECKPOINT_EVERY = 100_000_000


def typed_config(config: Mapping[str, Any]) -> dict[str, float | int]:
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


def apply_configuration(job: LLMTrainingJob, config: Mapping[str, Any]) -> LLMTrainingJob:
    """The job with ``config`` applied, as the final run trains it (full duration, every
    worker, no search).

    Typed copies, not validated: a configuration is checked as a manifest, as the apiserver
    would check it (:func:`llmtrain.api.validate.trial_problems`), before anything trains it."""
    spec = job.spec.model_copy(update={"tuning": None})
    for path, value in typed_config(config).items():
        spec = _with_field(spec, path.split("."), value)
    return job.model_copy(update={"spec": spec})


def trial_job(
    job: LLMTrainingJob, config: Mapping[str, Any], *, checkpoint_uri: str | None = None
) -> LLMTrainingJob:
    """The job as one trial trains it: ``config`` applied, the trial budget as its duration,
    workersPerTrial workers, its own checkpoint prefix, no export, no metrics port (trials
    share hosts)."""
    tuning = _tuning(job)
    final = apply_configuration(job, config).spec
    budget = tuning.trial_budget
    spec = final.model_copy(
        update={
            "training": final.training.model_copy(
                update={"duration": DurationSpec(max_steps=budget.max_steps, max_tokens=budget.max_tokens)}
            ),
            "resources": final.resources.model_copy(update={"workers": tuning.workers_per_trial}),
            "checkpoint": CheckpointSpec(uri=checkpoint_uri, every_steps=TRIAL_CHECKPOINT_EVERY, keep_last=1),
            "metrics": final.metrics.model_copy(update={"enabled": False}),
            "export": None,
            "serve": None,
        }
    )
    return job.model_copy(update={"spec": spec})


def trial_steps(job: LLMTrainingJob, config: Mapping[str, Any]) -> int:
    """Optimizer steps a trial with ``config`` trains: its budget in steps, or its tokens in
    whole steps of the configuration's batch."""
    spec = trial_job(job, config).spec
    duration = spec.training.duration
    return total_steps(
        max_steps=duration.max_steps,
        max_tokens=duration.max_tokens,
        epochs=duration.epochs,
        tokens_per_step=spec.training.batch.global_batch_size * spec.model.architecture.context_length,
        steps_per_epoch=None,  # a trial budget is never in epochs
    )


def final_document(doc: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """:func:`apply_configuration` as a manifest (what ``llmtrain validate`` checks)."""
    return job_document(apply_configuration(LLMTrainingJob.model_validate(doc), config))


def trial_document(doc: dict[str, Any], config: dict[str, Any], *, checkpoint_uri: str) -> dict[str, Any]:
    """:func:`trial_job` as a manifest (what ``llmtrain validate`` checks)."""
    job = LLMTrainingJob.model_validate(doc)
    return job_document(trial_job(job, config, checkpoint_uri=checkpoint_uri))


def _tuning(job: LLMTrainingJob) -> TuningSpec:
    if job.spec.tuning is None:
        raise ValueError(f"{job.metadata.name}: spec.tuning is unset: no trials to run")
    return job.spec.tuning


def _with_field(model: ApiModel, path: list[str], value: Any) -> Any:
    """A copy of ``model`` with the field at ``path`` (its wire names: ``optimizer``, ``lr``) set."""
    names = {info.alias or name: name for name, info in type(model).model_fields.items()}
    name = names[path[0]]
    if len(path) > 1:
        value = _with_field(getattr(model, name), path[1:], value)
    return model.model_copy(update={name: value})


def describe(config: dict[str, Any]) -> str:
    """``{training.optimizer.lr=0.001, ...}``: a configuration as problems name it."""
    return "{" + ", ".join(f"{k}={v:g}" for k, v in typed_config(config).items()) + "}"


def grid_configs(tuning: TuningSpec) -> list[dict[str, float]]:
    """Every combination of the choices, in the order of the space's keys and their values."""
    paths = list(tuning.space)
    choices = [tuning.space[p].choice or [] for p in paths]
    return [dict(zip(paths, combo, strict=True)) for combo in itertools.product(*choices)]
