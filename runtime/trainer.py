"""Launch :func:`llmtrain.runtime.train.train` on a Ray cluster with Ray Train's TorchTrainer,
or, for a one-worker local run, in this process (:func:`launch_in_process`).

Ray Train starts the workers and the process group (gloo on CPU, NCCL on GPU) and restarts
the worker group after a failure (``FailureConfig(max_failures)``); the restarted workers resume
from our checkpoint lineage, which is the only source of truth for model state (Ray's own
checkpoint bookkeeping is not used). Before launching, the cluster's resources are checked:
Ray would otherwise wait forever for workers it can never place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmtrain.api.config import RuntimeConfig
from llmtrain.api.progress import ProgressEvent, process_started_at

if TYPE_CHECKING:  # torch loads in the workers only: the launcher's start-up stays short
    from llmtrain.runtime.train import LoaderFactory, TrainResult


class InsufficientResourcesError(RuntimeError):
    """The Ray cluster cannot place the requested workers."""


@dataclass(frozen=True)
class LaunchOptions:
    gpus_per_worker: int = 0
    cpus_per_worker: float = 1.0
    max_failures: int = 0  # restarts of the worker group (spec.backoffLimit)
    storage_path: str | None = None  # Ray Train's run directory (no model state lives there)
    run_name: str = "llmtrain"
    namespace: str = "default"
    job: str = "local"
    metrics_addr: str = "0.0.0.0"
    env: tuple[tuple[str, str], ...] = ()  # extra environment of every worker
    resource_timeout_s: float = 10.0  # wait this long for autoscaled/joining nodes
    deterministic: bool = False  # torch.use_deterministic_algorithms on every worker (tests)
    # Ray Train callbacks of the run (a tuning trial's: Train V2's TuneReportCallback).
    callbacks: tuple[Any, ...] = ()


def check_resources(workers: int, opts: LaunchOptions) -> None:
    """Fail fast, naming the spec field, when the cluster cannot hold the worker group."""
    import ray

    need_cpu = workers * opts.cpus_per_worker
    need_gpu = workers * opts.gpus_per_worker
    deadline = time.monotonic() + opts.resource_timeout_s
    while True:
        have = ray.cluster_resources()
        cpu, gpu = have.get("CPU", 0.0), have.get("GPU", 0.0)
        if cpu >= need_cpu and gpu >= need_gpu:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if gpu < need_gpu:
        raise InsufficientResourcesError(
            f"{workers} workers × {opts.gpus_per_worker} GPUs need {need_gpu:g} GPUs but the Ray cluster "
            f"has {gpu:g}: lower spec.resources.gpusPerWorker or spec.resources.workers"
        )
    raise InsufficientResourcesError(
        f"{workers} workers × {opts.cpus_per_worker:g} CPU need {need_cpu:g} CPUs but the Ray cluster has "
        f"{cpu:g}: lower spec.resources.workers (or give the workers more CPU)"
    )


def _loopback_only() -> bool:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return bool(nodes) and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)


def _ray_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; the process group is already initialised."""
    entered = time.time()
    import ray.train
    from llmtrain.runtime.train import RunContext, train

    startup: dict[str, float] = {}
    if config["startup"] is not None:  # the launcher measures the time to the first step
        startup = dict(config["startup"])
        if (started := process_started_at()) is not None:
            startup["worker_process"] = started
        startup["worker"] = entered
    context = ray.train.get_context()
    result: TrainResult = train(
        RuntimeConfig.from_dict(config["runtime"]),
        config["make_loader"],
        on_progress=config["on_progress"],
        ctx=RunContext(
            namespace=config["namespace"],
            job=config["job"],
            metrics_addr=config["metrics_addr"],
            local_rank=context.get_local_rank(),
            deterministic=config["deterministic"],
            report=lambda metrics: ray.train.report(metrics),
            checkpoint_requested=config["checkpoint_requested"],
            startup=startup,
        ),
    )
    if context.get_world_rank() == 0 and config["on_result"] is not None:
        config["on_result"](result)


def launch(
    cfg: RuntimeConfig,
    make_loader: LoaderFactory,
    *,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    on_result: Callable[[TrainResult], None] | None = None,
    checkpoint_requested: Callable[[], bool] | None = None,
    options: LaunchOptions | None = None,
    startup: dict[str, float] | None = None,
) -> Any:
    """Run training on the connected Ray cluster; returns Ray Train's Result.

    ``make_loader``, ``on_progress``, ``on_result`` and ``checkpoint_requested`` are pickled to
    the workers and called on rank 0 there (e.g. an appender of JSON lines, or an actor
    handle's method). ``startup``: the launcher's start-up marks so far; given, rank 0 adds
    its own and reports them with its first step.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    opts = options or LaunchOptions()
    workers = cfg.train.world_size
    check_resources(workers, opts)
    env = dict(opts.env)
    if "GLOO_SOCKET_IFNAME" not in env and _loopback_only():
        # A local cluster pinned to 127.0.0.1: keep gloo's sockets there too (it otherwise
        # binds to the host name's address, a private-range IP).
        from llmtrain.runtime.synthetic import loopback_interface

        env["GLOO_SOCKET_IFNAME"] = loopback_interface()
    if startup is not None:
        startup = {**startup, "launch": time.time()}
    resources: dict[str, float] = {"CPU": opts.cpus_per_worker}
    if opts.gpus_per_worker:
        resources["GPU"] = opts.gpus_per_worker
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={
            "runtime": cfg.to_dict(),
            "make_loader": make_loader,
            "on_progress": on_progress,
            "on_result": on_result,
            "checkpoint_requested": checkpoint_requested,
            "namespace": opts.namespace,
            "job": opts.job,
            "metrics_addr": opts.metrics_addr,
            "deterministic": opts.deterministic,
            "startup": startup,
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=opts.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=opts.run_name,
            storage_path=opts.storage_path,
            failure_config=FailureConfig(max_failures=opts.max_failures),
            callbacks=list(opts.callbacks) or None,
            # Ray Train v2 RunConfig (the stubs resolve to the v1 class).
            worker_runtime_env={"env_vars": env} if env else None,  # type: ignore[call-arg]
        ),
    )
    return trainer.fit()


def launch_in_process(
    cfg: RuntimeConfig,
    make_loader: LoaderFactory,
    *,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    checkpoint_requested: Callable[[], bool] | None = None,
    options: LaunchOptions | None = None,
    startup: dict[str, float] | None = None,
) -> TrainResult:
    """One attempt of the same :func:`~llmtrain.runtime.train.train` in this process, no Ray.

    For a one-worker local run: Ray's cluster start, the trainer's actors and the worker
    process were ~16 s of the quickstart's 25 s to its first step (issue 28), for a worker
    that runs this same function. The loop, checkpoints, progress events, metrics server and
    summary are the same; without a process group the model is a plain module (Ray Train's
    one-worker group ran FSDP2 over a world of one: same math, one copy of every parameter
    more). Restarts after a failure (``spec.backoffLimit``) are the caller's: it retries this
    function, which resumes from the newest complete checkpoint by itself. A SIGKILL or a
    crash of the interpreter ends the run; rerunning resumes it.
    """
    import torch
    from llmtrain.runtime.train import RunContext, train

    opts = options or LaunchOptions()
    if cfg.train.world_size != 1:
        raise ValueError(
            f"an in-process launch runs one worker, not {cfg.train.world_size} (spec.resources.workers)"
        )
    # The CPUs a Ray worker would have been granted: torch's intra-op threads (all cores by
    # default, which on a shared machine means more threads than this run's share).
    torch.set_num_threads(max(1, int(opts.cpus_per_worker)))
    marks: dict[str, float] = {}
    if startup is not None:  # torch and the training module are imported: the loop is entered
        marks = {**startup, "worker": time.time()}
    return train(
        cfg,
        make_loader,
        on_progress=on_progress,
        ctx=RunContext(
            namespace=opts.namespace,
            job=opts.job,
            metrics_addr=opts.metrics_addr,
            local_rank=0,
            deterministic=opts.deterministic,
            checkpoint_requested=checkpoint_requested,
            startup=marks,
        ),
    )
