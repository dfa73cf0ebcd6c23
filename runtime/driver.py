"""The one driver: every stage of an ``LLMTrainingJob``, in order, on a Ray cluster.

Two launchers run it and nothing else runs the workflow:

* ``llmtrain run job.yaml`` (``runtime/run.py``) starts a local Ray cluster, calls
  :func:`drive` and prints a report;
* on Kubernetes the operator submits ``llmtrain driver`` as a Ray job on the job's head
  (Ray's Jobs API); :func:`run_submitted` joins that cluster, serves the run's
  :class:`~llmtrain.api.progress.RunSnapshot` to the operator and calls :func:`drive`.
  Anyone can run the same command by hand on any Ray cluster.

The stages, one call per stage module::

    prepare_data   collect → clean → tokenize → shard        (data/prepare.py)
    tune           spec.tuning only: the search, Ray Tune     (tune.py)
    train          train → validate → checkpoint, Ray Train   (trainer.py, train.py)
    export         newest checkpoint → Hugging Face model     (export.py)
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from llmtrain.api.config import RuntimeConfig, runtime_config_from_spec
from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import (
    RESULT_PREFIX,
    CheckpointEntry,
    DataInfo,
    ProgressEvent,
    RunFailure,
    RunSnapshot,
    process_started_at,
)
from llmtrain.api.quantity import ray_num_cpus
from llmtrain.api.shards import Manifest
from llmtrain.api.status import Reason

if TYPE_CHECKING:  # torch, ray and optuna load only when a stage needs them
    from llmtrain.runtime.trainer import LaunchOptions
    from llmtrain.runtime.tune import TuneOutcome

log = logging.getLogger("llmtrain.driver")

LOG_LEVEL_ENV = "LLMTRAIN_LOG_LEVEL"
# What the pod's environment holds that no log line may show: botocore at DEBUG logs each
# request's headers, and its Authorization header names the access key id; anything may
# format an exception or an environment that carries one of these.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")
REDACTED = "<redacted>"


def redact(text: str, secrets: tuple[str, ...]) -> str:
    for s in secrets:
        text = text.replace(s, REDACTED)
    return text


class RedactSecrets(logging.Filter):
    """Masks the given values in every record a handler writes (message, arguments,
    traceback): the driver's log goes to the head, to S3, and its tail into the job's
    status and Events."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg, self.secrets)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


def secret_values(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The secret values in ``env`` long enough to mask without masking ordinary words."""
    env = os.environ if env is None else env
    return tuple(v for k in SECRET_ENV if len(v := env.get(k, "")) >= 8)


def configure_logging() -> None:
    """``$LLMTRAIN_LOG_LEVEL`` (e.g. DEBUG) on the root logger, and every root handler masks
    the pod's secrets (:data:`SECRET_ENV`), so no level shows them."""
    root = logging.getLogger()
    level = os.environ.get(LOG_LEVEL_ENV, "").upper()
    if level:
        root.setLevel(level)
    secrets = secret_values()
    for h in root.handlers:
        if not any(isinstance(f, RedactSecrets) for f in h.filters):
            h.addFilter(RedactSecrets(secrets))


class DriverError(RuntimeError):
    """The run stopped; :attr:`failure` says why and whether another attempt could help."""

    def __init__(self, failure: RunFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


# ------------------------------------------------------------------------------ where


@dataclass
class Place:
    """What differs between the launchers: where local files and defaults go, how Ray is
    reached, how much of each node a training worker takes."""

    run_dir: Path  # local scratch: Ray Train's run directory, logs
    output_prefix: str  # the default checkpoint/model location: <prefix>/checkpoints, /model
    connect: Callable[[], None]  # start or join Ray: called once, right before training
    cpus_per_worker: float
    metrics_addr: str = "0.0.0.0"


@dataclass
class Reporter:
    """The run's snapshot, updated by the stages; callbacks for a terminal display."""

    snapshot: RunSnapshot = field(default_factory=RunSnapshot)
    on_event: Callable[[ProgressEvent], None] | None = None
    on_stage: Callable[[str], None] | None = None
    # Set while training runs: asks rank 0 for a checkpoint at its next log step.
    ask_checkpoint: Callable[[], None] | None = None
    # Start-up marks (unix seconds, llmtrain.api.progress.STARTUP_MARKS): the driver's, then
    # rank 0's from the first step of the first training launch.
    startup: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stage(self, stage: str) -> None:
        with self.lock:
            self.snapshot.stage = stage
            self.snapshot.updated = time.time()
        if self.on_stage is not None:
            self.on_stage(stage)

    def event(self, event: ProgressEvent) -> None:
        with self.lock:
            if event.startup and "step" not in self.startup:
                self.startup.update(event.startup)
            self.snapshot.absorb(event)
        if self.on_event is not None:
            self.on_event(event)

    def update(self, **changes: Any) -> None:
        with self.lock:
            for k, v in changes.items():
                setattr(self.snapshot, k, v)
            self.snapshot.updated = time.time()

    def json(self) -> str:
        with self.lock:
            return self.snapshot.to_json()


@dataclass
class DriveResult:
    snapshot: RunSnapshot
    data_uri: str
    storage_options: Any
    unigram_cross_entropy: float
    stage_seconds: dict[str, float]
    startup: dict[str, float]  # start-up marks (unix seconds); "step" absent: no step trained


# --------------------------------------------------------------- stage helpers


def unigram_cross_entropy(manifest: Manifest, data_uri: str, storage_options: Any = None) -> float:
    """Entropy (nats/token) of the validation split's own unigram distribution.

    The loss of the best model that knows only token frequencies, and a conservative bar:
    fitted on the validation tokens themselves, it is lower than any frequency model fitted
    on the training split would score there.
    """
    import torch
    from llmtrain.runtime.data.loader import read_verified_shard
    from llmtrain.runtime.data.storage import open_storage

    storage = open_storage(data_uri, storage_options)
    counts = torch.zeros(manifest.tokenizer.vocab_size, dtype=torch.float64)
    for info in manifest.split_shards("validation"):
        tokens = read_verified_shard(storage, info, manifest)
        counts += torch.bincount(tokens.long(), minlength=counts.numel()).double()
    total = counts.sum()
    if total == 0:
        raise DriverError(
            RunFailure(
                Reason.DataError.value,
                "the validation split is empty: raise spec.data.validationFraction",
                permanent=True,
            )
        )
    p = counts[counts > 0] / total
    return float(-(p * p.log()).sum())


def make_shard_loader(
    data_uri: str,
    storage_options: Any,
    *,
    split: str,
    rank: int,
    world_size: int,
    micro_batch: int,
    context_length: int,
    seed: int,
) -> Any:
    """The loader factory handed to every training worker (a module-level function: picklable)."""
    from llmtrain.runtime.data.loader import open_loader

    return open_loader(
        data_uri,
        split=split,
        rank=rank,
        world_size=world_size,
        micro_batch=micro_batch,
        context_length=context_length,
        seed=seed,
        storage=storage_options,
    )


def planned_steps(cfg: RuntimeConfig, data_uri: str, storage_options: Any) -> int:
    """The optimizer steps of the whole run, as rank 0 computes them (an epoch's steps from
    the training split's loader: only read when the duration is in epochs)."""
    t = cfg.train
    steps_per_epoch = None
    if t.epochs is not None:
        loader = make_shard_loader(
            data_uri,
            storage_options,
            split="train",
            rank=0,
            world_size=t.world_size,
            micro_batch=t.micro_batch_size,
            context_length=cfg.model.context_length,
            seed=t.seed,
        )
        steps_per_epoch = loader.steps_per_epoch
    return t.total_steps(steps_per_epoch, cfg.model.context_length)


class _Channel:
    """The actor behind :class:`RunChannel` (plain Python: Ray runs it in its own process)."""

    def __init__(self, max_events: int) -> None:
        self.events: list[str] = []
        self.max_events = max_events
        self.checkpoint = False

    def put(self, event: str) -> None:
        if len(self.events) < self.max_events:  # a driver that stopped draining: drop, not grow
            self.events.append(event)

    def drain(self) -> list[str]:
        out, self.events = self.events, []
        return out

    def ask(self) -> None:
        self.checkpoint = True

    def take(self) -> bool:
        asked, self.checkpoint = self.checkpoint, False
        return asked


class RunChannel:
    """Rank 0 ↔ this process through one small Ray actor (works across nodes): progress
    events up, "checkpoint now" down (the operator asks before it suspends a job, so the
    suspended run loses no finished steps). One actor of ours rather than two
    ``ray.util.queue`` queues: every actor is a process whose start (about a second of CPU)
    falls inside the time to the first step."""

    def __init__(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On this process's node (the head, on Kubernetes), not wherever Ray finds room: the
        # head runs no tasks (num-cpus 0), so an unpinned actor lands on a worker node, and
        # losing that worker pod killed the channel and with it the whole Ray job, where Ray
        # Train would have restarted the worker group (seen on the real node).
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.actor: Any = ray.remote(num_cpus=0)(_Channel).options(scheduling_strategy=here).remote(10_000)

    def drain(self, timeout: float) -> list[ProgressEvent]:
        """The events so far; waits ``timeout`` seconds first when there are none."""
        import ray

        raw = ray.get(self.actor.drain.remote())
        if not raw:
            time.sleep(timeout)
        return [ProgressEvent.from_json(r) for r in raw]

    def ask(self) -> None:
        import ray

        ray.get(self.actor.ask.remote())


def _put_event(actor: Any, event: ProgressEvent) -> None:
    # Runs on rank 0: one small actor round trip per log/validation/checkpoint step (waited
    # for, so that no event is still in flight when the worker exits).
    import ray

    ray.get(actor.put.remote(event.to_json()))


def _take_checkpoint_request(actor: Any) -> bool:
    # Runs on rank 0 at each log step: one actor round trip (about a millisecond, beside the
    # log step's own host sync).
    import ray

    return bool(ray.get(actor.take.remote()))


# ------------------------------------------------------------------------------ the run


def drive(job: LLMTrainingJob, place: Place, report: Reporter) -> DriveResult:
    """Every stage of ``job``, in order. Reruns are cheap: the data is reused when its
    fingerprint matches and training resumes from the newest complete checkpoint."""
    spec = job.spec
    seconds: dict[str, float] = {}
    if (started := process_started_at()) is not None:
        report.startup.setdefault("process", started)
    report.startup.setdefault("driver", time.time())
    checkpoints = spec.checkpoint.uri or f"{place.output_prefix}/checkpoints"
    report.update(keep_last=spec.checkpoint.keep_last)

    report.stage("data")
    t0 = time.perf_counter()
    data_uri, storage_options, manifest = prepare_data(job, report)
    seconds["data"] = time.perf_counter() - t0
    report.startup["data"] = time.time()

    data = report.snapshot.data
    assert data is not None
    train_final = True
    if spec.tuning is not None:
        report.startup.clear()  # the final run starts after the trials: no start-up to measure
        report.stage("tuning")
        t0 = time.perf_counter()
        outcome = tune(job, data_uri, storage_options, data.vocab_size, place, report)
        seconds["tuning"] = time.perf_counter() - t0
        # From here on the job is the best configuration, trained in full (or, with
        # final.train false, exported from the best trial's own checkpoint).
        job, spec, train_final = outcome.job, outcome.job.spec, outcome.train_final
        if not train_final:
            checkpoints = outcome.checkpoint_uri

    if train_final:
        report.stage("training")
        t0 = time.perf_counter()
        cfg = runtime_config_from_spec(spec, vocab_size=data.vocab_size, checkpoint_uri=checkpoints)
        train(job, cfg, data_uri, storage_options, place, report)
        seconds["training"] = time.perf_counter() - t0

    report.stage("export")
    t0 = time.perf_counter()
    export(job, checkpoints, data_uri, storage_options, place, report)
    seconds["export"] = time.perf_counter() - t0

    # The summary's yardstick, computed last: it reads the validation shards with torch, an
    # import (about 1.5 s) that the time to the first step does without.
    try:
        unigram = unigram_cross_entropy(manifest, data_uri, storage_options)
    except ValueError as e:  # a shard that does not match its manifest
        raise DriverError(RunFailure(Reason.DataError.value, f"data: {e}", permanent=True)) from e
    report.stage("done")
    return DriveResult(report.snapshot, data_uri, storage_options, unigram, seconds, dict(report.startup))


def prepare_data(job: LLMTrainingJob, report: Reporter) -> tuple[str, Any, Manifest]:
    """collect → clean → tokenize → shard (reused when the fingerprint matches); the data
    URI, its storage options and its manifest."""
    from llmtrain.runtime.data.prepare import PrepareConfig, PrepareError, prepare

    cfg = PrepareConfig.from_spec(job.spec, None)
    try:
        prepared = prepare(cfg, log=lambda m: log.info("data: %s", m))
    except (PrepareError, ValueError) as e:  # a missing source, unreadable data: no retry helps
        raise DriverError(RunFailure(Reason.DataError.value, f"data: {e}", permanent=True)) from e
    manifest = prepared.manifest
    data_uri = prepared.manifest_uri.rsplit("/", 1)[0]
    report.update(
        data=DataInfo(
            manifest_uri=prepared.manifest_uri,
            train_tokens=manifest.split_tokens("train"),
            validation_tokens=manifest.split_tokens("validation"),
            vocab_size=manifest.tokenizer.vocab_size,
            reused=prepared.reused,
            validation_set=manifest.validation_set,
        )
    )
    if manifest.split_tokens("validation") == 0:
        raise DriverError(
            RunFailure(
                Reason.DataError.value,
                "data: the validation split is empty: raise spec.data.validationFraction",
                permanent=True,
            )
        )
    return data_uri, cfg.s3, manifest


def tune(
    job: LLMTrainingJob, data_uri: str, storage_options: Any, vocab_size: int, place: Place, report: Reporter
) -> TuneOutcome:
    """The hyperparameter search of ``spec.tuning`` (Ray Tune; each trial trains through the
    same launch path as :func:`train`); the best configuration as a job."""
    from llmtrain.runtime.tune import TuningError, tune_stage

    try:
        return tune_stage(
            job, data_uri, storage_options, vocab_size, place, report, launch_options(job, place, "tune")
        )
    except TuningError as e:
        raise DriverError(
            RunFailure(
                Reason.InvalidSpec.value if e.permanent else Reason.RunFailed.value,
                f"tuning: {e}",
                e.permanent,
            )
        ) from e


def launch_options(job: LLMTrainingJob, place: Place, run_name: str) -> LaunchOptions:
    """How a training run is launched here (resources, restarts, labels)."""
    from llmtrain.runtime.trainer import LaunchOptions

    spec = job.spec
    return LaunchOptions(
        gpus_per_worker=spec.resources.gpus_per_worker,
        cpus_per_worker=place.cpus_per_worker,
        max_failures=spec.backoff_limit,
        storage_path=str(place.run_dir / "ray"),
        run_name=run_name,
        namespace=job.metadata.namespace or "default",
        job=job.metadata.name,
        metrics_addr=place.metrics_addr,
        # No S3 environment: the workers open every store with spec.storage's settings, which
        # reach them in the RuntimeConfig (train.storage_*) and the loader's S3Options.
    )


def train(
    job: LLMTrainingJob,
    cfg: RuntimeConfig,
    data_uri: str,
    storage_options: Any,
    place: Place,
    report: Reporter,
) -> None:
    """train → validate → checkpoint on Ray Train. Resumes from the newest complete
    checkpoint by itself; rank 0's events reach ``report`` through a Ray queue."""
    from llmtrain.runtime.checkpoint import Lineage
    from llmtrain.runtime.trainer import launch

    # spec.storage's endpoint (storage_options), not boto3's default: a local run against any
    # S3 server but AWS's has no AWS_ENDPOINT_URL.
    lineage = Lineage(
        cfg.train.checkpoint_uri or "", keep_last=cfg.train.checkpoint_keep_last, s3=storage_options
    )
    for step in lineage.complete_steps()[-cfg.train.checkpoint_keep_last :]:
        report.snapshot.add_checkpoint(CheckpointEntry(step, lineage.uri_of(step)))
    latest = report.snapshot.latest_checkpoint
    if latest is not None:
        report.update(resumed_from=latest)
        if latest.step >= planned_steps(cfg, data_uri, storage_options):
            # A rerun of a finished run: nothing to train, so no Ray cluster and no workers
            # (their start-up alone is most of a short run's wall time).
            if report.on_stage is not None:
                report.on_stage(f"training already done at step {latest.step}")
            return
        if report.on_stage is not None:
            report.on_stage(f"resume from step {latest.step}")
    place.connect()
    # Only the first launch of an untuned run measures start-up (drive() sets the first marks).
    startup = None
    if report.startup and "ray" not in report.startup:
        report.startup["ray"] = time.time()
        startup = dict(report.startup)
    channel = RunChannel()
    options = launch_options(job, place, "train")
    errors: list[BaseException] = []

    def fit() -> None:
        try:
            launch(
                cfg,
                functools.partial(make_shard_loader, data_uri, storage_options),
                on_progress=functools.partial(_put_event, channel.actor),
                checkpoint_requested=functools.partial(_take_checkpoint_request, channel.actor),
                options=options,
                startup=startup,
            )
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    thread = threading.Thread(target=fit, name="llmtrain-fit", daemon=True)
    thread.start()
    report.ask_checkpoint = channel.ask
    done = False
    try:
        while not done:
            done = not thread.is_alive()  # drain once more after the thread ends
            for event in channel.drain(timeout=0.0 if done else 0.5):
                report.event(event)
    finally:
        report.ask_checkpoint = None
    if errors:
        raise DriverError(classify(errors[0], has_checkpoint=report.snapshot.latest_checkpoint is not None))
    # The lineage, not the events, says what exists (a resumed run that was already done
    # trains no step and reports no checkpoint).
    complete = lineage.complete_steps()
    if not complete:
        raise DriverError(
            RunFailure(
                Reason.RunFailed.value,
                f"training wrote no checkpoint under {cfg.train.checkpoint_uri}",
                False,
            )
        )
    if report.snapshot.latest_checkpoint is None or report.snapshot.latest_checkpoint.step != complete[-1]:
        report.snapshot.add_checkpoint(CheckpointEntry(complete[-1], lineage.uri_of(complete[-1])))


def export(
    job: LLMTrainingJob, checkpoints: str, data_uri: str, storage_options: Any, place: Place, report: Reporter
) -> None:
    """The newest complete checkpoint → a Hugging Face Llama directory: ``spec.export.uri``,
    else ``<output prefix>/model``."""
    from llmtrain.runtime.export import ExportError, export_checkpoint, export_for_job, tokenizer_from_data

    spec = job.spec
    try:
        uri = export_for_job(spec, checkpoints, s3=storage_options)
        if uri is None:
            uri = f"{place.output_prefix}/model"
            tokenizer = tokenizer_from_data(data_uri, storage_options)
            export_checkpoint(checkpoints, uri, tokenizer, job=spec, s3=storage_options)
    except ExportError as e:
        raise DriverError(RunFailure(Reason.InvalidSpec.value, f"export: {e}", permanent=True)) from e
    report.update(export_uri=uri)


def classify(error: BaseException, *, has_checkpoint: bool) -> RunFailure:
    """Why training failed, from the exception Ray Train raised (the worker's error is in
    its cause chain or its ``worker_failures``)."""
    from llmtrain.runtime.data.loader import LoaderError
    from llmtrain.runtime.train import NonFiniteError
    from llmtrain.runtime.trainer import InsufficientResourcesError

    for e in _causes(error):
        if isinstance(e, NonFiniteError):
            # From a checkpoint another attempt may get past it (data order, a restart);
            # without one it would only repeat.
            return RunFailure(Reason.NonFiniteLoss.value, str(e), permanent=not has_checkpoint)
        if isinstance(e, LoaderError | ValueError):  # bad shards, a spec the data cannot train
            return RunFailure(Reason.DataError.value, str(e), permanent=True)
        if isinstance(e, InsufficientResourcesError):
            return RunFailure(Reason.InsufficientResources.value, str(e), permanent=False)
    return RunFailure(Reason.RunFailed.value, f"training failed: {error}", permanent=False)


def _causes(error: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    todo = [error]
    while todo and len(out) < 50:
        e = todo.pop(0)
        if e in out:
            continue
        out.append(e)
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        todo += [
            c for c in (getattr(e, "worker_failures", None) or {}).values() if isinstance(c, BaseException)
        ]
    return out


# ----------------------------------------------------------- launched as a Ray job


PROGRESS_PATH = "/progress"
CHECKPOINT_PATH = "/checkpoint"
SID_PARAM = "submissionId"  # the attempt a request is for (llmtrain.operator.rayjobs.SID_PARAM)


class ProgressServer:
    """``GET /progress`` → the run's snapshot as JSON, for the operator, behind the job's
    Ray token (``Authorization: Bearer``; 401 without it, 403 with another).
    ``POST /checkpoint`` → 202 and rank 0 checkpoints at its next log step (409 when no
    training runs); the operator asks before it suspends the job.
    Both name the attempt they are for (``?submissionId=<id>``): a request for another one
    is answered 409 with this driver's own id, so an operator that reached the wrong driver
    (a head Service selecting another job's head, a stale endpoint) writes none of its
    progress into its job's status and makes no other run checkpoint.

    The operator pulls (KubeRay's way for job state) rather than the driver pushing: the
    operator makes every connection, so no endpoint of the control plane is reachable from
    pods that run user code, the poll rate is the operator's to bound, and a lost read loses
    nothing (each answer is the whole snapshot). One GET of ~2 KB per job per resync.
    The standard library's threaded server: one path, one header, no framework needed.
    """

    def __init__(self, report: Reporter, token: str, host: str, port: int) -> None:
        reporter, expected = report, f"Bearer {token}".encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self._authorized(PROGRESS_PATH) and self._ours():
                    self._send(200, reporter.json().encode())

            def do_POST(self) -> None:
                if not (self._authorized(CHECKPOINT_PATH) and self._ours()):
                    return
                ask = reporter.ask_checkpoint
                if ask is None:
                    self._send(409, b'{"error":"no training runs: nothing to checkpoint"}')
                    return
                ask()
                with reporter.lock:
                    step = reporter.snapshot.progress.step if reporter.snapshot.progress else 0
                self._send(202, json.dumps({"requested": True, "step": step}).encode())

            def _ours(self) -> bool:
                """The request names this driver's attempt, or none (an older operator)."""
                asked = parse_qs(urlsplit(self.path).query).get(SID_PARAM)
                own = reporter.snapshot.submission_id
                if asked is None or asked[-1] == own:
                    return True
                body = {"error": f"this driver runs Ray job {own}, not {asked[-1]}", "submission_id": own}
                self._send(409, json.dumps(body).encode())
                return False

            def _authorized(self, path: str) -> bool:
                given = (self.headers.get("Authorization") or "").encode()
                if urlsplit(self.path).path != path:
                    self._send(404, b'{"error":"not found"}')
                elif not given:
                    self._send(401, b'{"error":"missing token"}')
                elif not hmac.compare_digest(given, expected):
                    self._send(403, b'{"error":"wrong token"}')
                else:
                    return True
                return False

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # one line per poll: none
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="progress", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
        from llmtrain.runtime.data.storage import S3Options, open_storage
        from llmtrain.runtime.ray_local import session_logs_dir

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
        store = open_storage(f"{output_prefix(job)}/logs", S3Options.from_spec(job.spec.storage))
        store.put(f"{submission_id}.log", path.read_bytes())
        print(f"llmtrain driver: log copied to {output_prefix(job)}/logs/{submission_id}.log", flush=True)
    except Exception as e:
        print(f"llmtrain driver: cannot copy the log: {e}", file=sys.stderr, flush=True)


def load_job(path: str, sha256: str | None = None, wait_seconds: float = 180.0) -> LLMTrainingJob:
    """The job from ``--spec FILE``: on the cluster the spec ConfigMap's mount.

    With ``sha256`` (what the operator submits) the file must hold exactly the spec the job
    was submitted with: a kubelet syncs an updated ConfigMap into running pods lazily (up to
    about a minute), so a stale copy is waited out rather than trained on.
    """
    import hashlib
    import time

    from llmtrain.api.job import load_job as parse

    if sha256:
        deadline = time.monotonic() + wait_seconds
        seen = "no file"
        while True:
            try:
                seen = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            except FileNotFoundError:
                seen = "no file"
            if seen == sha256:
                break
            if time.monotonic() > deadline:
                raise ValueError(
                    f"--spec {path}: still not the submitted spec after {wait_seconds:.0f} s "
                    f"(sha256 {seen[:12]}, submitted {sha256[:12]}): is the job's spec ConfigMap "
                    "mounted on the head, and up to date?"
                )
            time.sleep(1.0)
    return parse(path)
