"""``llmtrain run job.yaml``: the whole workflow on this machine.

data (reused when the fingerprint matches) → training with validation and checkpoints
(resumes from the newest complete checkpoint) → export → a sample from the exported model.
Stages run one after another, so 2 CPUs are never shared between tokenization and training.
The same code runs inside the cluster on Kubernetes; only the Ray cluster differs.

A one-worker run trains in this process (``trainer.launch_in_process``): no Ray cluster, no
actors, no worker process: seconds of start-up that bought nothing on one machine. Tuning
and multi-worker runs start a local Ray cluster and use Ray Train. ``LLMTRAIN_LAUNCH=ray``
sends a one-worker run through Ray Train too (``bench/startup.py --launch ray`` compares).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from llmtrain.runtime.curves import CURVES, EventLog, read_summary, redraw, write_summary

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import ProgressEvent, startup_breakdown
from llmtrain.api.s3 import S3Options

log = logging.getLogger("llmtrain.run")

STATUS = "status.json"  # <run dir>/status.json: the run's status fields, as on the cluster
LAUNCH_ENV = "LLMTRAIN_LAUNCH"  # "ray": a one-worker run on Ray Train as well (benchmarks, debugging)


class RunError(RuntimeError):
    """The run stopped; the message says which stage and why, after the reason the operator
    would give the job's Failed condition (``OutputPrefixInUse: output prefix … belongs to …``)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(f"{reason}: {message}" if reason else message)
        self.reason = reason


@dataclass
class RunSummary:
    job: str
    run_dir: str
    data_uri: str
    data_reused: bool
    train_tokens: int
    val_tokens: int
    vocab_size: int
    unigram_cross_entropy: float
    steps: int = 0
    resumed_from: int | None = None
    final_train_loss: float | None = None
    val_loss: float | None = None
    val_perplexity: float | None = None
    val_accuracy: float | None = None
    val_bits_per_byte: float | None = None
    # spec.validation.task at the last validation (None: no task metric)
    val_task_exact_match: float | None = None
    val_task_score: float | None = None
    val_task_records: int | None = None
    val_task_checker: str | None = None
    validation_set: str = ""  # which text the validation figures measure
    tokens_per_second: float | None = None
    mfu: float | None = None
    checkpoint_uri: str | None = None
    export_uri: str | None = None
    sample_prompt: str = ""
    sample: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Process start → first optimizer step, by phase (STARTUP_MARKS' names, in order); empty
    # when the run trained no step (a rerun of a finished job).
    startup: dict[str, float] = field(default_factory=dict)
    tuning: dict[str, Any] | None = None  # the search of spec.tuning (TuningInfo), if any
    wall_seconds: float = 0.0  # the whole run_job, set-up and sample included
    curves: str | None = None  # <run dir>/curves.png

    @property
    def startup_seconds(self) -> float | None:
        """Process start → the first optimizer step."""
        return sum(self.startup.values()) if self.startup else None

    @property
    def loss_ratio(self) -> float | None:
        """Validation loss / unigram cross-entropy: < 1 means the model learned more than frequencies."""
        if self.val_loss is None or not self.unigram_cross_entropy:
            return None
        return self.val_loss / self.unigram_cross_entropy


# ------------------------------------------------------------------------------ pieces


# ------------------------------------------------------------------------------ the run


@dataclass
class RunOptions:
    run_dir: Path | None = None  # default ./runs/<metadata.name>
    num_cpus: int | None = None  # default: all cores
    sample_prompt: str | None = None  # None: spec.export.samplePrompt, else a validation document's start
    sample_tokens: int = 50


def _run_dir(job: LLMTrainingJob, opts: RunOptions) -> Path:
    return (opts.run_dir or Path("runs") / job.metadata.name).resolve()


def _quiet_ray_logs(run_dir: Path) -> None:
    """Ray's driver-side chatter goes to <run dir>/logs/ray.log, not the terminal."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / "ray.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "ray.train", "ray.data", "ray.tune"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)


def _link_ray_session_logs(run_dir: Path) -> None:
    """<run dir>/logs/ray-session → the Ray session's logs (workers' output included). They
    stay in Ray's short temp dir (its unix socket paths must stay < 108 bytes); the link puts
    them with the run's other files."""
    from llmtrain.runtime.ray_local import session_logs_dir

    logs = session_logs_dir()
    link = run_dir / "logs" / "ray-session"
    if logs is None or (link.exists() and not link.is_symlink()):
        return
    if link.is_symlink():
        link.unlink()
    link.symlink_to(logs, target_is_directory=True)


def _absolute(uri: str | None) -> str | None:
    if uri is None or "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def with_absolute_paths(job: LLMTrainingJob) -> LLMTrainingJob:
    """Local paths in the spec resolved against the current directory: Ray workers run elsewhere."""
    spec = job.spec.model_copy(deep=True)
    spec.data.output_uri = _absolute(spec.data.output_uri) or spec.data.output_uri
    spec.checkpoint.uri = _absolute(spec.checkpoint.uri)
    if spec.export is not None:
        spec.export.uri = _absolute(spec.export.uri) or spec.export.uri
    if spec.data.tokenizer.load is not None:
        spec.data.tokenizer.load.uri = _absolute(spec.data.tokenizer.load.uri) or spec.data.tokenizer.load.uri
    for init in (spec.model.init.checkpoint, spec.model.init.pretrained):
        if init is not None:
            init.uri = _absolute(init.uri) or init.uri
    return job.model_copy(update={"spec": spec})


def run_job(
    job: LLMTrainingJob,
    opts: RunOptions | None = None,
    *,
    on_event: Callable[[ProgressEvent], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> RunSummary:
    """The local launcher: :func:`~llmtrain.runtime.driver.drive` here (a one-worker run trains
    in this process) or on a local Ray cluster (started only when training or tuning needs it,
    so data preparation has every core), then a sample from the exported model."""
    from llmtrain.runtime.driver import drive
    from llmtrain.runtime.failures import DriverError
    from llmtrain.runtime.ray_local import init_local_ray
    from llmtrain.runtime.stage import Place, Reporter

    started = time.perf_counter()
    opts = opts or RunOptions()
    job = with_absolute_paths(job)
    run_dir = _run_dir(job, opts)
    run_dir.mkdir(parents=True, exist_ok=True)
    events = EventLog(run_dir)
    title = f"llmtrain run: {job.metadata.name}"

    def record(event: ProgressEvent) -> None:
        events(event)
        if event.stage == "validation":
            _draw_curves(run_dir, title)
        if on_event is not None:
            on_event(event)

    ncpu = opts.num_cpus or os.cpu_count() or 1

    def connect() -> None:
        _quiet_ray_logs(run_dir)
        init_local_ray(ncpu, log_to_driver=False)
        _link_ray_session_logs(run_dir)

    place = Place(
        run_dir=run_dir,
        output_prefix=str(run_dir),
        connect=connect,
        # Every core to the workers: torch's intra-op threads follow the CPUs Ray grants.
        cpus_per_worker=max(1, ncpu // job.spec.resources.workers),
        metrics_addr="127.0.0.1",
        in_process=os.environ.get(LAUNCH_ENV, "") != "ray",
    )
    report = Reporter(on_event=record, on_stage=on_stage)
    try:
        result = drive(job, place, report)
    except DriverError as e:
        raise RunError(e.failure.message, e.failure.reason) from e
    finally:
        import sys

        if "ray" in sys.modules:
            import ray

            ray.shutdown()
    snap = result.snapshot
    assert snap.data is not None
    progress = snap.progress
    summary = RunSummary(
        job=job.metadata.name,
        run_dir=str(run_dir),
        data_uri=result.data_uri,
        data_reused=snap.data.reused,
        train_tokens=snap.data.train_tokens,
        val_tokens=snap.data.validation_tokens,
        validation_set=snap.data.validation_set,
        vocab_size=snap.data.vocab_size,
        unigram_cross_entropy=result.unigram_cross_entropy,
        resumed_from=snap.resumed_from.step if snap.resumed_from else None,
        checkpoint_uri=snap.latest_checkpoint.uri if snap.latest_checkpoint else None,
        export_uri=snap.export_uri,
        sample_prompt=_sample_prompt(job, opts, result.data_uri, result.storage_options),
        stage_seconds=result.stage_seconds,
        startup=dict(startup_breakdown(result.startup)) if "step" in result.startup else {},
        tuning=asdict(snap.tuning) if snap.tuning is not None else None,
    )
    # What the operator would write into the LLMTrainingJob's status for the same run.
    (run_dir / STATUS).write_text(json.dumps(snap.status_patch(), indent=2, sort_keys=True) + "\n")
    if progress is not None:
        summary.final_train_loss = _finite_or_none(progress.train_loss)
        summary.val_loss = progress.val_loss
        summary.val_perplexity = progress.val_perplexity
        summary.val_accuracy = progress.val_accuracy
        summary.val_bits_per_byte = progress.val_bits_per_byte
        summary.val_task_exact_match = progress.val_task_exact_match
        summary.val_task_score = progress.val_task_score
        summary.val_task_records = progress.val_task_records
        summary.val_task_checker = progress.val_task_checker
        summary.tokens_per_second = progress.tokens_per_second
        summary.mfu = progress.mfu
    summary.steps = max(
        progress.step if progress else 0, snap.latest_checkpoint.step if snap.latest_checkpoint else 0
    )

    # ---- a sample from what was exported (proves the export loads)
    if on_stage is not None:
        on_stage("sample")
    t0 = time.perf_counter()
    assert summary.export_uri is not None
    summary.sample = sample_text(
        summary.export_uri, summary.sample_prompt, opts.sample_tokens, result.storage_options
    )
    summary.stage_seconds["sample"] = time.perf_counter() - t0
    summary.curves = _draw_curves(run_dir, title)
    summary.wall_seconds = time.perf_counter() - started
    write_summary(run_dir, asdict(summary))
    if on_stage is not None:
        on_stage("done")
    return summary


def summary_from_run_dir(run_dir: Path) -> RunSummary:
    """The summary ``llmtrain run`` wrote (``llmtrain report``); keys it does not know are
    left out, so an older run directory still reads."""
    raw = read_summary(run_dir)
    known = {f.name for f in fields(RunSummary)}
    return RunSummary(**{k: v for k, v in raw.items() if k in known})


def _draw_curves(run_dir: Path, title: str) -> str | None:
    """<run dir>/curves.png from the events so far. A picture that cannot be drawn costs the
    picture (logged), never the training run that asked for it."""
    try:
        return str(redraw(run_dir, title))
    except Exception as e:
        log.warning("cannot draw %s: %s", run_dir / CURVES, e)
        return None


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _sample_prompt(
    job: LLMTrainingJob, opts: RunOptions, data_uri: str, storage_options: S3Options | None
) -> str:
    """``--prompt``, else ``spec.export.samplePrompt``, else the first words of a validation
    document: a model trained on novels is not sampled with Python."""
    if opts.sample_prompt is not None:
        return opts.sample_prompt
    if job.spec.export is not None and job.spec.export.sample_prompt is not None:
        return job.spec.export.sample_prompt
    return validation_prompt(data_uri, storage_options)


def validation_prompt(data_uri: str, storage_options: S3Options | None = None, words: int = 5) -> str:
    """The first ``words`` words (with their own spacing) of the first validation document."""
    import re

    from llmtrain.runtime.data.loader import read_verified_shard
    from llmtrain.runtime.store import open_store
    from tokenizers import Tokenizer

    from llmtrain.api.shards import Manifest

    store = open_store(data_uri, storage_options)
    manifest = Manifest.from_json(store.get("manifest.json"))
    shards = manifest.split_shards("validation")
    if not shards:
        return ""
    # Documents are laid end to end, each closed by end-of-text: the shard starts a document.
    ids = read_verified_shard(store, shards[0], manifest)[:512].tolist()
    eot = manifest.tokenizer.eot_id
    ids = ids[: ids.index(eot)] if eot in ids else ids
    text = Tokenizer.from_str(store.get(manifest.tokenizer.path).decode()).decode(ids)
    m = re.match(rf"\s*(?:\S+\s+){{0,{words - 1}}}\S+", text)
    return m.group(0).lstrip() if m else ""


def sample_text(
    model_uri: str, prompt: str, max_tokens: int, storage_options: S3Options | None = None, seed: int = 0
) -> str:
    """A short sample from an exported model directory (temperature 0.8, top-k 40)."""
    from llmtrain.runtime.generate import Sampling, generate, load_text_tokenizer
    from llmtrain.runtime.lora import load_model
    from llmtrain.runtime.publish import resolve_export

    pinned = resolve_export(model_uri, storage_options).uri  # tokenizer and weights of one export
    tok = load_text_tokenizer(pinned, storage_options)
    model = load_model(pinned, s3=storage_options)  # an adapter export is merged into its base
    ids = tok.encode(prompt)
    out = generate(
        model,
        ids,
        Sampling(
            max_new_tokens=max_tokens,
            temperature=0.8,
            top_k=40,
            seed=seed,
            stop_ids=(tok.eos_id,) if tok.eos_id is not None else (),
            vocab_limit=tok.vocab_size,
        ),
    )
    return tok.decode(ids + out)
