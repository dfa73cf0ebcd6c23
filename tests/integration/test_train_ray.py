"""Ray Train: the resource check fails fast, and a SIGKILLed worker is restarted by
FailureConfig(max_failures=1) and resumes from the S3 lineage bitwise exactly."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llmtrain.runtime.ray_local import LOCAL_ENV
from llmtrain.runtime.synthetic import JsonlSink, PickleSink, SyntheticLoader, run_ranks, train_worker
from llmtrain.runtime.trainer import InsufficientResourcesError, LaunchOptions, launch

from llmtrain.api.config import RuntimeConfig
from tests.data.datahelpers import S3Server, s3_server  # noqa: F401 - the session fixture
from tests.integration.test_train_distributed import MODEL, config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

RAY_ENV = LOCAL_ENV  # what init_local_ray gives the cluster; the workers get it too


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Path]:
    """One local 2-CPU Ray on loopback for this module's tests."""
    ray = pytest.importorskip("ray")
    from llmtrain.runtime.ray_local import init_local_ray

    tmp = Path(tempfile.mkdtemp(prefix="ray-"))  # short: unix socket paths must stay < 108 bytes
    saved = {k: os.environ.get(k) for k in (*RAY_ENV, "RAY_TMPDIR")}
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


def test_more_workers_than_cpus_fails_fast(ray_local: Path) -> None:
    """workers = 3 on a 2-CPU Ray: a clear error naming spec.resources.workers within seconds."""
    cfg = RuntimeConfig.from_dict(config(3, 1, global_batch_size=3))
    loader = functools.partial(SyntheticLoader, windows=12)
    started = time.monotonic()
    with pytest.raises(InsufficientResourcesError, match=r"spec\.resources\.workers"):
        launch(cfg, loader, options=LaunchOptions(storage_path=str(ray_local / "results")))
    assert time.monotonic() - started < 30
    with pytest.raises(InsufficientResourcesError, match=r"spec\.resources\.gpusPerWorker"):
        launch(
            RuntimeConfig.from_dict(config(1, 4)),
            loader,
            options=LaunchOptions(
                gpus_per_worker=1, resource_timeout_s=1, storage_path=str(ray_local / "results")
            ),
        )


@pytest.mark.slow
def test_sigkilled_worker_restarts_and_resumes_bitwise(
    ray_local: Path,
    s3_server: S3Server,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """2 workers, deterministic algorithms, dropout 0.1, accumulation 2, warmup + cosine; rank 1
    is SIGKILLed before step
    6 (checkpoints every 4). Ray restarts the group, which resumes from step 4 in the S3
    lineage, crosses the epoch boundary at step 7, and matches an uninterrupted run bitwise."""
    bucket = s3_server.bucket("ray-resume")
    env = {
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    model = dataclasses.replace(MODEL, dropout=0.1)
    loader_kwargs: dict[str, Any] = {"vocab_size": 64, "windows": 24}  # 6 steps per epoch

    def cfg(prefix: str) -> dict[str, Any]:
        return config(
            2, 1, model=model, max_steps=10, log_every_steps=1, checkpoint_every_steps=4,
            checkpoint_keep_last=3, checkpoint_uri=f"s3://{bucket}/{prefix}",
        )  # fmt: skip

    # The uninterrupted reference, on the plain gloo harness (same ops, same reductions).
    whole = run_ranks(2, train_worker, cfg("whole"), loader_kwargs, {"deterministic": True}, env=env)[0]

    events, result_file, sentinel = tmp_path / "events.jsonl", tmp_path / "result.pkl", tmp_path / "killed"
    fault_env = {**env, "LLMTRAIN_FAULT_KILL_AT_STEP": "6", "LLMTRAIN_FAULT_SENTINEL": str(sentinel)}
    launch(
        RuntimeConfig.from_dict(cfg("ray")),
        functools.partial(SyntheticLoader, **loader_kwargs),
        on_progress=JsonlSink(str(events)),
        on_result=PickleSink(str(result_file)),
        options=LaunchOptions(
            max_failures=1,
            storage_path=str(ray_local / "results"),
            run_name="resume",
            deterministic=True,
            env=tuple({**fault_env, **RAY_ENV}.items()),
        ),
    )
    assert sentinel.exists()  # the worker really was killed once
    with open(result_file, "rb") as f:
        resumed = pickle.load(f)
    assert resumed.resumed_from == 4  # the restarted group's run
    assert resumed.losses == whole.losses[4:]  # bitwise, steps 5-10
    # The event stream shows the replay: steps 5 (and maybe more) were reported twice.
    losses: dict[int, float] = {}
    seen: list[int] = []
    for line in events.read_text().splitlines():
        e = json.loads(line)
        if e["stage"] == "training":
            seen.append(e["step"])
            losses[e["step"]] = e["train_loss"]
    assert seen.count(5) >= 1 and seen[-1] == 10 and len(seen) > 10
    assert [losses[s] for s in range(1, 11)] == whole.losses
