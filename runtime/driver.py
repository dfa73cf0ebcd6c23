"""The one driver: every stage of an ``LLMTrainingJob``, in order, on a Ray cluster.

Two launchers run it and nothing else runs the workflow:

* ``llmtrain run job.yaml`` (``runtime/run.py``) calls :func:`drive` and prints a report;
  it starts a local Ray cluster when a stage needs one (a one-worker run trains in its own
  process, without Ray);
* on Kubernetes the operator submits ``llmtrain driver`` as a Ray job on the job's head
  (Ray's Jobs API); :func:`~llmtrain.runtime.submitted.run_submitted` joins that cluster,
  serves the run's :class:`~llmtrain.api.progress.RunSnapshot` to the operator and calls
  :func:`drive`. Anyone can run the same command by hand on any Ray cluster.

The stages, one call per stage module::

    prepare_data   collect → clean → tokenize → shard        (data/prepare.py)
    tune           spec.tuning only: the search, Ray Tune     (tune.py)
    train          train → validate → checkpoint, Ray Train   (trainer.py, train.py)
                   (or in this process: a one-worker local run)
    export         newest checkpoint → Hugging Face model     (export.py)

What the stages share lives below this module: :mod:`~llmtrain.runtime.stage` (where the run
lives, its snapshot, the workers' loader factory), :mod:`~llmtrain.runtime.failures` (why a
run stopped), :mod:`~llmtrain.runtime.channel` (rank 0 ↔ this process while training runs).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmtrain.runtime.channel import RunChannel, put_event, take_checkpoint_request
from llmtrain.runtime.failures import DriverError, classify
from llmtrain.runtime.stage import Place, Reporter, make_shard_loader

from llmtrain.api.config import RuntimeConfig, runtime_config_from_spec
from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import CheckpointEntry, DataInfo, RunFailure, RunSnapshot, process_started_at
from llmtrain.api.s3 import S3Options
from llmtrain.api.shards import Manifest
from llmtrain.api.status import Reason

if TYPE_CHECKING:  # torch, ray and optuna load only when a stage needs them
    from llmtrain.runtime.trainer import LaunchOptions
    from llmtrain.runtime.tune import TuneOutcome

log = logging.getLogger("llmtrain.driver")


@dataclass
class DriveResult:
    snapshot: RunSnapshot
    data_uri: str
    storage_options: S3Options
    unigram_cross_entropy: float
    stage_seconds: dict[str, float]
    startup: dict[str, float]  # start-up marks (unix seconds); "step" absent: no step trained


# --------------------------------------------------------------- stage helpers


def unigram_cross_entropy(
    manifest: Manifest, data_uri: str, storage_options: S3Options | None = None
) -> float:
    """Entropy (nats/token) of the validation split's own unigram distribution.

    The loss of the best model that knows only token frequencies, and a conservative bar:
    fitted on the validation tokens themselves, it is lower than any frequency model fitted
    on the training split would score there.
    """
    import torch
    from llmtrain.runtime.data.loader import read_verified_shard
    from llmtrain.runtime.store import open_store

    storage = open_store(data_uri, storage_options)
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


def planned_steps(cfg: RuntimeConfig, data_uri: str, storage_options: S3Options) -> int:
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
    owner = claim_outputs(job, place, checkpoints)  # before anything is written: fail at once

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
        cfg = runtime_config_from_spec(
            spec, vocab_size=data.vocab_size, checkpoint_uri=checkpoints, checkpoint_owner=owner
        )
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


def claim_outputs(job: LLMTrainingJob, place: Place, checkpoints: str) -> str:
    """Make the checkpoint prefix and the output prefix this job's (runtime/owner.py); its
    owner key, which the training workers' lineage checks. Another job's prefix is a
    permanent OutputPrefixInUse, unless spec.checkpoint.takeOver."""
    from llmtrain.runtime import owner as ow

    me = ow.job_owner(job, place.run_dir)
    take_over = job.spec.checkpoint.take_over
    try:
        taken = ow.claim_outputs(
            [checkpoints, place.output_prefix],
            me,
            take_over=take_over,
            s3=S3Options.from_spec(job.spec.storage),
        )
    except ow.PrefixInUseError as e:
        raise DriverError(RunFailure(Reason.OutputPrefixInUse.value, str(e), permanent=True)) from e
    for uri, before in taken:
        log.warning("spec.checkpoint.takeOver: %s taken over from %s", uri, before.describe())
    return me.key


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
            **_task_info(manifest),
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


def _task_info(manifest: Manifest) -> dict[str, Any]:
    """Task data: records trained on + held out, and those refused by reason (status.data)."""
    task = manifest.task
    if task is None:
        return {}
    records = task.get("records", {})
    return {"task_records": sum(records.values()), "bad_records": dict(task.get("bad_records", {}))}


def tune(
    job: LLMTrainingJob,
    data_uri: str,
    storage_options: S3Options,
    vocab_size: int,
    place: Place,
    report: Reporter,
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
    storage_options: S3Options,
    place: Place,
    report: Reporter,
) -> None:
    """train → validate → checkpoint on Ray Train, or in this process for a one-worker local
    run (``place.in_process``). Resumes from the newest complete checkpoint by itself."""
    from llmtrain.runtime.checkpoint import Lineage

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
    if place.in_process and cfg.train.world_size == 1:
        _train_in_process(job, cfg, data_uri, storage_options, place, report)
    else:
        _train_on_ray(job, cfg, data_uri, storage_options, place, report)
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


def _train_in_process(
    job: LLMTrainingJob,
    cfg: RuntimeConfig,
    data_uri: str,
    storage_options: S3Options,
    place: Place,
    report: Reporter,
) -> None:
    """A one-worker local run: ``train()`` here (trainer.launch_in_process), its events
    straight to ``report``; a failure restarts it from the newest checkpoint up to
    ``spec.backoffLimit`` times, as Ray Train's FailureConfig would."""
    from llmtrain.runtime.trainer import launch_in_process

    options = launch_options(job, place, "train")
    asked = threading.Event()  # "checkpoint now" (Reporter.ask_checkpoint), polled at log steps

    def checkpoint_requested() -> bool:
        was = asked.is_set()
        asked.clear()
        return was

    # Only the first launch of an untuned run measures start-up (drive() sets the first marks).
    startup = dict(report.startup) if report.startup and "worker" not in report.startup else None
    report.ask_checkpoint = asked.set
    try:
        for attempt in range(options.max_failures + 1):
            try:
                launch_in_process(
                    cfg,
                    functools.partial(make_shard_loader, data_uri, storage_options),
                    on_progress=report.event,
                    checkpoint_requested=checkpoint_requested,
                    options=options,
                    startup=startup if attempt == 0 else None,
                )
                return
            except Exception as e:  # KeyboardInterrupt and SystemExit end the run as they are
                failure = classify(e, has_checkpoint=report.snapshot.latest_checkpoint is not None)
                if failure.permanent or attempt == options.max_failures:
                    raise DriverError(failure) from e
                log.warning(
                    "training failed (%s); restart %d of %d (spec.backoffLimit) from the newest checkpoint",
                    failure.message,
                    attempt + 1,
                    options.max_failures,
                )
    finally:
        report.ask_checkpoint = None


def _train_on_ray(
    job: LLMTrainingJob,
    cfg: RuntimeConfig,
    data_uri: str,
    storage_options: S3Options,
    place: Place,
    report: Reporter,
) -> None:
    """Ray Train's worker group on the connected cluster; rank 0's events reach ``report``
    through a Ray actor (:class:`RunChannel`) drained here while the fit runs in a thread."""
    from llmtrain.runtime.trainer import launch

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
                on_progress=functools.partial(put_event, channel.actor),
                checkpoint_requested=functools.partial(take_checkpoint_request, channel.actor),
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


def export(
    job: LLMTrainingJob,
    checkpoints: str,
    data_uri: str,
    storage_options: S3Options,
    place: Place,
    report: Reporter,
) -> None:
    """The newest complete checkpoint → a Hugging Face Llama directory: ``spec.export.uri``,
    else ``<output prefix>/model``."""
    from llmtrain.runtime.export import ExportError, tokenizer_from_data
    from llmtrain.runtime.lora import export_checkpoint, export_for_job  # LoRA checkpoints too

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
