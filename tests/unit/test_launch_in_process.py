"""A one-worker local run trains in the launcher's own process (issue 28): the same train()
with the start-up marks of its phases, restarts up to spec.backoffLimit, and CPU AdamW fused."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from llmtrain.runtime import driver
from llmtrain.runtime.failures import DriverError
from llmtrain.runtime.model import GPT
from llmtrain.runtime.stage import Place, Reporter
from llmtrain.runtime.synthetic import SyntheticLoader, tiny_spec_dict
from llmtrain.runtime.train import build_optimizer
from llmtrain.runtime.trainer import LaunchOptions, launch_in_process

from llmtrain.api.config import OptimizerConfig, RuntimeConfig, runtime_config_from_spec
from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import ProgressEvent, startup_breakdown
from llmtrain.api.spec import LLMTrainingJobSpec

LOADER = functools.partial(SyntheticLoader, vocab_size=60, windows=32)
TINY = {"metrics.enabled": False, "training.duration": {"maxSteps": 3}, "training.logEverySteps": 1}


def cfg(**overrides: Any) -> RuntimeConfig:
    spec = LLMTrainingJobSpec.model_validate(tiny_spec_dict(**{**TINY, **overrides}))
    return runtime_config_from_spec(spec, vocab_size=60)


def test_adamw_is_fused_on_plain_cpu_tensors() -> None:
    model = GPT(cfg().model)
    assert build_optimizer(model, OptimizerConfig()).defaults["fused"] is True
    assert not build_optimizer(model, OptimizerConfig(), fused=False).defaults["fused"]


def test_in_process_launch_trains_and_marks_every_start_up_phase() -> None:
    events: list[ProgressEvent] = []
    now = time.time()
    result = launch_in_process(
        cfg(),
        LOADER,
        on_progress=events.append,
        options=LaunchOptions(cpus_per_worker=1, metrics_addr="127.0.0.1"),
        startup={"process": now - 2, "driver": now - 1, "data": now},
    )
    assert result.final_step == 3 and len(result.losses) == 3
    marks = next(e.startup for e in events if e.startup)
    assert marks is not None
    # No Ray phases; every second from the process start to the first step is in one phase.
    phases = startup_breakdown(marks)
    assert [p for p, _ in phases] == [
        "python + CLI", "data", "worker set-up", "model build", "data loader", "resume", "first step",
    ]  # fmt: skip
    assert sum(s for _, s in phases) == pytest.approx(marks["step"] - marks["process"])
    assert torch.get_num_threads() == 1  # the CPUs a Ray worker would have had


def test_in_process_launch_refuses_more_than_one_worker() -> None:
    with pytest.raises(ValueError, match=r"spec\.resources\.workers"):
        launch_in_process(cfg(**{"resources.workers": 2}), LOADER)


class FlakyLoader:
    """The loader factory failing its first ``failures`` training-split calls (a transient error)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def __call__(self, data_uri: str, storage: Any, **kw: Any) -> Any:
        if kw["split"] == "train" and self.failures > 0:
            self.failures -= 1
            raise ConnectionError("storage went away")
        return LOADER(**kw)


@pytest.mark.parametrize(("backoff_limit", "fails"), [(1, False), (0, True)])
def test_a_failed_attempt_restarts_up_to_the_backoff_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backoff_limit: int, fails: bool
) -> None:
    monkeypatch.setattr(driver, "make_shard_loader", FlakyLoader(failures=1))
    spec = tiny_spec_dict(**TINY, backoffLimit=backoff_limit)
    job = LLMTrainingJob.model_validate(
        {
            "apiVersion": "llmtrain.dev/v1alpha1",
            "kind": "LLMTrainingJob",
            "metadata": {"name": "t"},
            "spec": spec,
        }
    )
    place = Place(tmp_path, str(tmp_path), connect=lambda: None, cpus_per_worker=1, in_process=True)
    report = Reporter()
    config = cfg(**{"backoffLimit": backoff_limit})
    if fails:  # the control: no restart allowed, the same transient error ends the run
        with pytest.raises(DriverError, match="storage went away"):
            driver._train_in_process(job, config, "unused", None, place, report)  # type: ignore[arg-type]
        return
    driver._train_in_process(job, config, "unused", None, place, report)  # type: ignore[arg-type]
    assert report.snapshot.progress is not None and report.snapshot.progress.step == 3
