"""The tuning stage end to end on a local 2-CPU Ray: real data, the tiny model, Ray Tune over
Ray Train V2 (each trial through the shared launch path), then the final run and export."""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import TuningInfo

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Path]:
    """One local 2-CPU Ray on loopback for this module's tests."""
    ray = pytest.importorskip("ray")
    from llmtrain.runtime.ray_local import LOCAL_ENV, init_local_ray

    tmp = Path(tempfile.mkdtemp(prefix="ray-"))  # short: unix socket paths must stay < 108 bytes
    saved = {k: os.environ.get(k) for k in (*LOCAL_ENV, "RAY_TMPDIR")}
    init_local_ray(2, temp_dir=tmp)
    try:
        yield tmp
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tune_job(tmp: Path, tuning: dict[str, Any], *, data: Path, workers: int = 1) -> LLMTrainingJob:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return LLMTrainingJob.model_validate(
        {
            "apiVersion": "llmtrain.dev/v1alpha1",
            "kind": "LLMTrainingJob",
            "metadata": {"name": "tune"},
            "spec": {
                "data": {
                    "sources": [
                        {"name": "json", "local": {"glob": str(stdlib / "json" / "*.py"), "textUnit": "file"}}
                    ],
                    "tokenizer": {"train": {"vocabSize": 300}},
                    "outputUri": str(data),
                    "validationFraction": 0.2,
                },
                "model": {"architecture": {"layers": 1, "dModel": 32, "heads": 2, "contextLength": 32}},
                "training": {
                    "optimizer": {"lr": 0.003},
                    "schedule": {"warmupSteps": 1, "decay": "constant"},
                    "batch": {"globalBatchSize": 8, "microBatchSize": 8 // workers},
                    "duration": {"maxSteps": 4},
                    "logEverySteps": 1,
                },
                "validation": {"everySteps": 2, "batches": 2},
                "checkpoint": {"uri": str(tmp / "ckpt"), "everySteps": 4, "keepLast": 1},
                "export": {"uri": str(tmp / "model")},
                "metrics": {"enabled": False},
                "resources": {"workers": workers},
                "tuning": tuning,
            },
        }
    )


class Recorder:
    """Every tuning snapshot the stage publishes, with when (a Reporter's ``update`` hook)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, TuningInfo]] = []

    def __call__(self, info: TuningInfo) -> None:
        self.seen.append((time.monotonic(), info))


def drive_job(
    job: LLMTrainingJob, tmp: Path, monkeypatch: pytest.MonkeyPatch, *, cpus_per_worker: int = 2
) -> tuple[Any, Recorder, list[Any]]:
    """``drive`` with the tuning snapshots recorded and the final run's config captured."""
    from llmtrain.runtime import driver

    recorder, finals = Recorder(), []
    real_train = driver.train

    def train(job: LLMTrainingJob, cfg: Any, *args: Any) -> None:
        finals.append(cfg)
        real_train(job, cfg, *args)

    monkeypatch.setattr(driver, "train", train)

    class Reporter(driver.Reporter):
        def update(self, **changes: Any) -> None:
            super().update(**changes)
            if changes.get("tuning") is not None:
                recorder(changes["tuning"])

    # Each trial's worker takes both CPUs (as `llmtrain run` gives one worker): a stopped
    # trial that kept its workers would leave the next one waiting.
    place = driver.Place(
        run_dir=tmp / "run",
        output_prefix=str(tmp / "out"),
        connect=lambda: None,
        cpus_per_worker=cpus_per_worker,
    )
    result = driver.drive(job, place, Reporter())
    return result, recorder, finals


def test_grid_runs_its_grid_asha_frees_workers_and_the_best_is_trained_and_exported(
    ray_local: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3-point grid over lr (good first, then a useless lr) with ASHA: exactly the grid runs,
    the useless trial is stopped at its first rung with fewer steps than its budget, the next
    trial starts within seconds of that, and the final run trains the best lr and exports it."""
    grid = [3e-3, 1e-6, 1e-3]
    job = tune_job(
        tmp_path,
        {
            "search": "grid",
            "trialBudget": {"maxSteps": 6},
            "earlyStopping": {"gracePeriodSteps": 2, "reductionFactor": 2},
            "space": {"training.optimizer.lr": {"choice": grid}},
        },
        data=tmp_path / "data",
    )
    result, recorder, finals = drive_job(job, tmp_path, monkeypatch)
    info = result.snapshot.tuning
    assert info is not None and info.planned == 3
    assert info.completed + info.stopped == 3 and info.failed == 0 and info.running == 0
    assert sorted(t.config["training.optimizer.lr"] for t in info.trials) == sorted(grid)
    useless = next(t for t in info.trials if t.config["training.optimizer.lr"] == 1e-6)
    assert useless.state == "stopped" and useless.steps < 6
    # ASHA freed its workers: the next trial was running within seconds.
    stopped_at = min(
        t
        for t, i in recorder.seen
        if any(r.number == useless.number and r.state == "stopped" for r in i.trials)
    )
    started_at = min(t for t, i in recorder.seen if any(r.number == useless.number + 1 for r in i.trials))
    assert started_at - stopped_at < 10
    # The final run trains the best trial's lr for the job's own duration, and is exported.
    assert info.best is not None and info.best.state == "completed"
    (final,) = finals
    assert final.optimizer.lr == info.best.config["training.optimizer.lr"]
    assert final.train.max_steps == 4 and final.train.world_size == 1
    assert result.snapshot.export_uri == str(tmp_path / "model")
    assert (tmp_path / "model" / "config.json").exists()


def test_bayesian_runs_num_trials_concurrently_and_exports_the_best_trials_checkpoint(
    ray_local: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bayesian (TPE) over lr, judged by valAccuracy (mode derived: max): exactly numTrials
    run, two at a time on the two workers, and with final.train false nothing trains again:
    the best trial's own checkpoint is exported."""
    job = tune_job(
        tmp_path,
        {
            "search": "bayesian",
            "metric": "valAccuracy",
            "numTrials": 3,
            "initialRandomTrials": 2,
            "maxConcurrentTrials": 2,
            "seed": 7,
            "trialBudget": {"maxSteps": 4},
            "space": {"training.optimizer.lr": {"logUniform": [1e-4, 1e-2]}},
            "final": {"train": False},
        },
        data=tmp_path / "data",
        workers=2,
    )
    result, recorder, finals = drive_job(job, tmp_path, monkeypatch, cpus_per_worker=1)
    info = result.snapshot.tuning
    assert info is not None and info.planned == 3
    assert info.completed == 3 and info.failed == info.stopped == 0
    assert len({t.config["training.optimizer.lr"] for t in info.trials}) == 3
    assert max(i.running for _, i in recorder.seen) == 2  # maxConcurrentTrials
    assert info.best is not None
    assert info.best.metric == max(t.metric or 0.0 for t in info.trials)  # valAccuracy: higher is better
    assert finals == []  # final.train: false
    assert result.snapshot.export_uri == str(tmp_path / "model")
    assert (tmp_path / "model" / "config.json").exists()
    trial_ckpts = list((tmp_path / "out" / "tune" / "trials").iterdir())
    assert len(trial_ckpts) == 3  # one checkpoint prefix per trial
