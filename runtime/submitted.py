"""``llmtrain driver``: the driver as the operator launches it, a Ray job on the job's head.

Joins the Ray cluster it was submitted to, serves the run's progress to the operator
(:class:`~llmtrain.runtime.progress_server.ProgressServer`), runs every stage
(:func:`~llmtrain.runtime.driver.drive`), prints the final snapshot and copies its own log
next to the job's outputs. Anyone can run the same command by hand on any Ray cluster.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from llmtrain.runtime.driver import drive
from llmtrain.runtime.failures import DriverError
from llmtrain.runtime.progress_server import PROGRESS_PATH, ProgressServer
from llmtrain.runtime.redaction import configure_logging, redact, secret_values
from llmtrain.runtime.stage import Place, Reporter

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import RESULT_PREFIX, RunFailure, RunSnapshot
from llmtrain.api.quantity import ray_num_cpus
from llmtrain.api.status import Reason

log = logging.getLogger("llmtrain.driver")


def output_prefix(job: LLMTrainingJob) -> str:
    """Where a job's outputs go when the spec names no place for them: beside its
    checkpoints (``s3://b/jobs/x/checkpoints`` → ``s3://b/jobs/x``)."""
    uri = job.spec.checkpoint.uri
    if not uri:
        raise DriverError(
            RunFailure(
                Reason.InvalidSpec.value,
                "spec.checkpoint.uri is required on a Ray cluster (the workers share no disk): "
                "set it to an s3:// prefix",
                permanent=True,
            )
        )
    return uri.rstrip("/").rsplit("/", 1)[0]


def run_submitted(
    job: LLMTrainingJob, *, submission_id: str | None, progress_host: str, progress_port: int | None
) -> int:
    """``llmtrain driver``: join the Ray cluster this process runs on, serve progress, run
    every stage, print the final snapshot (the operator reads it from the job's log), copy
    the log next to the job's outputs. Exit code 0 on success, 2 on a permanent failure
    (the operator does not retry), 1 otherwise."""
    configure_logging()
    secrets = secret_values()
    report = Reporter(RunSnapshot(submission_id=submission_id))
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    server = None
    if progress_port is not None:
        if not token:
            print("llmtrain driver: RAY_AUTH_TOKEN is unset; progress is not served", file=sys.stderr)
        else:
            try:
                server = ProgressServer(report, token, progress_host, progress_port)
                print(
                    f"llmtrain driver: progress on {progress_host}:{server.port}{PROGRESS_PATH}", flush=True
                )
            except OSError as e:  # the run matters more than its progress report
                print(f"llmtrain driver: cannot serve progress on port {progress_port}: {e}", file=sys.stderr)
    code = 1
    try:
        prefix = output_prefix(job)
        run_dir = Path(
            os.environ.get("LLMTRAIN_RUN_DIR") or Path.home() / "llmtrain-runs" / job.metadata.name
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        place = Place(
            run_dir=run_dir,
            output_prefix=prefix,
            connect=_join_ray,
            cpus_per_worker=_worker_cpus(job),
        )
        drive(job, place, report)
        code = 0
    except DriverError as e:
        # The failure's message goes into the job's status and Events: masked like the log.
        failure = RunFailure(e.failure.reason, redact(e.failure.message, secrets), e.failure.permanent)
        report.update(stage="failed", failure=failure)
        code = 2 if failure.permanent else 1
        print(f"llmtrain driver: {failure.reason}: {failure.message}", file=sys.stderr, flush=True)
    except Exception as e:  # anything else: retriable, with its traceback in the log
        log.exception("the run failed")
        message = redact(str(e), secrets)[:2000]
        report.update(stage="failed", failure=RunFailure(Reason.RunFailed.value, message, False))
    finally:
        print(RESULT_PREFIX + report.json(), flush=True)
        _copy_log(job, submission_id)
        if server is not None:
            server.close()
    return code


def _join_ray() -> None:
    """Join the Ray cluster the driver was submitted to (RAY_ADDRESS, set by Ray's job supervisor)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="auto", log_to_driver=True)


def _worker_cpus(job: LLMTrainingJob) -> float:
    """A worker takes its whole pod's CPUs (the pod runs nothing else)."""
    return float(ray_num_cpus(job.spec.resources.worker.cpu))


def _copy_log(job: LLMTrainingJob, submission_id: str | None) -> None:
    """The driver's log (Ray keeps it on the head, which goes with the cluster) →
    ``<output prefix>/logs/<submission id>.log``. Best effort: never the reason a run fails."""
    try:
        from llmtrain.runtime.ray_local import session_logs_dir
        from llmtrain.runtime.store import open_store

        from llmtrain.api.s3 import S3Options

        if submission_id is None:
            return
        _join_ray()  # a run that failed before training never joined: Ray knows where its log is
        logs = session_logs_dir()
        if logs is None:
            return
        path = logs / f"job-driver-{submission_id}.log"
        if not path.exists():
            return
        sys.stdout.flush()
        store = open_store(f"{output_prefix(job)}/logs", S3Options.from_spec(job.spec.storage))
        store.put(f"{submission_id}.log", path.read_bytes())
        print(f"llmtrain driver: log copied to {output_prefix(job)}/logs/{submission_id}.log", flush=True)
    except Exception as e:
        print(f"llmtrain driver: cannot copy the log: {e}", file=sys.stderr, flush=True)
