"""Contract (d): ``ProgressEvent``, what a training run reports and where it lands in status.

Emitted by rank 0 at log, validation and checkpoint steps; consumed by ``llmtrain run``'s
display and by the operator, which writes :meth:`ProgressEvent.status_patch` into
``LLMTrainingJob.status``. Standard library only.

Mapping to status (``STATUS_FIELDS``)::

    step               -> status.progress.step
    total_steps        -> status.progress.totalSteps       (and percent = step/total·100)
    epoch              -> status.progress.epoch
    tokens             -> status.progress.tokensSeen
    eta_seconds        -> status.progress.eta              (preformatted, format_eta)
    train_loss         -> status.metrics.trainLoss
    val_loss           -> status.metrics.valLoss
    val_perplexity     -> status.metrics.valPerplexity
    val_accuracy       -> status.metrics.valAccuracy
    val_bits_per_byte  -> status.metrics.valBitsPerByte
    val_task_exact_match -> status.metrics.valTaskExactMatch  (spec.validation.task)
    val_task_score     -> status.metrics.valTaskScore       (the checker's pass ratio)
    tokens_per_second  -> status.metrics.tokensPerSecond
    mfu                -> status.metrics.mfu
    checkpoint_uri     -> status.checkpoint.latestUri       (with checkpoint_step -> latestStep)
    checkpoint_step    -> status.checkpoint.latestStep

Fields left ``None`` are not written, so a log-step event never erases the last
validation loss.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

Stage = Literal["data", "training", "validation", "checkpoint", "export", "done"]

STATUS_FIELDS: dict[str, str] = {
    "step": "progress.step",
    "total_steps": "progress.totalSteps",
    "epoch": "progress.epoch",
    "tokens": "progress.tokensSeen",
    "eta_seconds": "progress.eta",
    "train_loss": "metrics.trainLoss",
    "val_loss": "metrics.valLoss",
    "val_perplexity": "metrics.valPerplexity",
    "val_accuracy": "metrics.valAccuracy",
    "val_bits_per_byte": "metrics.valBitsPerByte",
    "val_task_exact_match": "metrics.valTaskExactMatch",
    "val_task_score": "metrics.valTaskScore",
    "tokens_per_second": "metrics.tokensPerSecond",
    "mfu": "metrics.mfu",
    "checkpoint_uri": "checkpoint.latestUri",
    "checkpoint_step": "checkpoint.latestStep",
}


def format_eta(seconds: float | None) -> str | None:
    """Compact ETA for a printer column: 45s, 12m05s, 3h07m, 2d04h."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def task_metric_line(exact_match: float, score: float, records: int, checker: str) -> str:
    """``task exact match 0.12 (37/300), identifier 0.15 (45/300)``: the run summary's and the
    display's words for spec.validation.task's result (ratios are counts / records)."""
    text = f"task exact match {exact_match:.2f} ({round(exact_match * records)}/{records})"
    if checker != "exactMatch":
        text += f", {checker} {score:.2f} ({round(score * records)}/{records})"
    return text


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class ProgressEvent:
    step: int
    total_steps: int | None = None
    epoch: int = 0
    tokens: int = 0
    stage: Stage = "training"
    train_loss: float | None = None
    val_loss: float | None = None
    val_perplexity: float | None = None
    val_accuracy: float | None = None
    val_bits_per_byte: float | None = None
    val_task_exact_match: float | None = None
    val_task_score: float | None = None
    val_task_records: int | None = None  # how many answers the two ratios count
    val_task_checker: str | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    eta_seconds: float | None = None
    checkpoint_uri: str | None = None
    checkpoint_step: int | None = None
    time: float | None = None  # unix seconds when emitted
    # Rank 0's start-up marks (unix seconds, :data:`STARTUP_MARKS`), on the event of the
    # first step a training process runs.
    startup: dict[str, float] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ProgressEvent:
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @property
    def percent(self) -> float | None:
        if not self.total_steps:
            return None
        return round(min(100.0, 100.0 * self.step / self.total_steps), 1)

    def status_patch(self) -> dict[str, Any]:
        """A merge patch for ``status`` (camelCase), omitting unknown values."""
        progress: dict[str, Any] = {"step": self.step, "epoch": self.epoch, "tokensSeen": self.tokens}
        if self.total_steps is not None:
            progress["totalSteps"] = self.total_steps
            progress["percent"] = self.percent
        eta = format_eta(self.eta_seconds)
        if eta is not None:
            progress["eta"] = eta
        metrics: dict[str, Any] = {}
        for name in (
            "train_loss",
            "val_loss",
            "val_perplexity",
            "val_accuracy",
            "val_bits_per_byte",
            "val_task_exact_match",
            "val_task_score",
            "tokens_per_second",
            "mfu",
        ):
            value = _finite(getattr(self, name))
            if value is not None:
                # tokens/s to the token (a printer column); losses to 4 decimals
                metrics[STATUS_FIELDS[name].split(".", 1)[1]] = round(
                    value, 0 if name == "tokens_per_second" else 4
                )
        patch: dict[str, Any] = {"progress": progress}
        if metrics:
            patch["metrics"] = metrics
        if self.checkpoint_uri is not None:
            patch["checkpoint"] = {"latestUri": self.checkpoint_uri, "latestStep": self.checkpoint_step}
        return patch


def merge(prev: ProgressEvent | None, event: ProgressEvent) -> ProgressEvent:
    """``event`` on top of ``prev``: what ``event`` leaves unknown (``None``) keeps its last
    value, so a checkpoint event does not erase the train loss, nor a log step the val loss."""
    if prev is None:
        return event
    return ProgressEvent(
        **{
            f.name: (getattr(event, f.name) if getattr(event, f.name) is not None else getattr(prev, f.name))
            for f in fields(ProgressEvent)
        }
    )


# ------------------------------------------------------------------ time to the first step

# Marks from process start to the first optimizer step, in the order they happen, each with
# the name of the phase that ends at it. The driver sets the first four; rank 0 of the first
# training launch sets the rest (its process and the driver's share one clock: local runs).
STARTUP_MARKS: tuple[tuple[str, str], ...] = (
    ("process", ""),  # the launcher process started (the CLI, or the Ray job's driver)
    ("driver", "python + CLI"),  # interpreter, imports, spec parsed: the workflow begins
    ("data", "data"),  # prepared data found, or prepared (a cold start)
    ("ray", "Ray start"),  # connected to a Ray cluster (started one, locally)
    ("launch", "trainer launch"),  # ray.train imported, resources checked: TorchTrainer.fit() begins
    ("worker_process", "worker process"),  # rank 0's worker process started (spawned by Ray)
    ("worker", "worker set-up"),  # imports (torch), process group: rank 0's loop is entered
    ("model", "model build"),  # meta-device build, FSDP wrap, init, optimizer
    ("loader", "data loader"),  # the training split's loader opened
    ("resume", "resume"),  # the newest checkpoint restored (no time when there is none)
    ("step", "first step"),  # the first optimizer step done
)


def process_started_at() -> float | None:
    """When this process started (unix seconds, to 10 ms), from /proc; None without /proc."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22 (clock ticks since boot), after the parenthesised command name.
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))


def startup_breakdown(marks: dict[str, float]) -> list[tuple[str, float]]:
    """The phases between consecutive marks, in seconds. A mark earlier than the one before
    (a worker process Ray started ahead of time) counts as reached then: no negative phase."""
    out: list[tuple[str, float]] = []
    last: float | None = None
    for mark, phase in STARTUP_MARKS:
        t = marks.get(mark)
        if t is None:
            continue
        if last is not None:
            out.append((phase, max(0.0, t - last)))
        last = t if last is None else max(last, t)
    return out


# ------------------------------------------------------------------ the run's snapshot

RunStage = Literal["starting", "data", "tuning", "training", "export", "done", "failed"]
RUN_STAGES: tuple[str, ...] = ("starting", "data", "tuning", "training", "export", "done", "failed")
# The status phase each stage shows (the operator writes Succeeded/Failed from the Ray job).
STAGE_PHASE: dict[str, str] = {
    "starting": "Preprocessing",
    "data": "Preprocessing",
    "tuning": "Tuning",
    "training": "Training",
    "export": "Exporting",
    "done": "Exporting",
    "failed": "Training",
}
# A snapshot is small; anything bigger is not one of ours (the operator reads it from a
# pod that runs user code, so it bounds what it parses).
MAX_SNAPSHOT_BYTES = 64 * 1024
# What the driver prints as its last line: the snapshot the operator reads from the log
# when the Ray job has ended (the progress endpoint ends with the driver).
RESULT_PREFIX = "LLMTRAIN_RESULT "


@dataclass(frozen=True)
class CheckpointEntry:
    """A complete checkpoint (its completion marker is written)."""

    step: int
    uri: str
    time: float | None = None  # unix seconds
    val_loss: float | None = None  # the validation at the same step, if any

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uri": self.uri, "step": self.step}
        if self.time is not None:
            out["time"] = _rfc3339(self.time)
        if _finite(self.val_loss) is not None:
            out["valLoss"] = round(float(self.val_loss or 0.0), 4)
        return out


@dataclass(frozen=True)
class DataInfo:
    """The prepared data set the run trains on."""

    manifest_uri: str
    train_tokens: int
    validation_tokens: int
    vocab_size: int
    reused: bool = False
    validation_set: str = ""  # which text the validation metrics measure (the manifest says)
    task_records: int | None = None  # task data: records trained on + held out
    bad_records: dict[str, int] | None = None  # task data: records refused, by reason

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "manifestUri": self.manifest_uri,
            "trainTokens": self.train_tokens,
            "validationTokens": self.validation_tokens,
            "vocabSize": self.vocab_size,
            "reused": self.reused,
        }
        if self.validation_set:
            out["validationSet"] = self.validation_set
        if self.task_records is not None:
            out["taskRecords"] = self.task_records
            out["badRecords"] = dict(self.bad_records or {})
        return out


@dataclass(frozen=True)
class RunFailure:
    """Why a run stopped. ``permanent``: another attempt would fail the same way (bad data,
    a spec that cannot train), so the job fails without retrying."""

    reason: str  # a llmtrain.api.status.Reason value
    message: str
    permanent: bool


TRIAL_STATES: tuple[str, ...] = ("pending", "running", "completed", "stopped", "failed")
# Rows of the trial table in the snapshot (and status.tuning.trials): the best finished
# trials plus the running ones, each capped, so status stays small at any trial count.
TOP_TRIALS = 10
MAX_RUNNING_ROWS = 10
# The last trials to finish, newest last: in the snapshot only (not in status), so the
# operator can name the trials that finished since its last look (an Event each, bounded).
RECENT_TRIALS = 5
FINISHED_STATES: tuple[str, ...] = ("completed", "stopped", "failed")


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a search: its sampled configuration (spec path → value) and how it went."""

    number: int  # 1-based, in the order the searcher proposed it
    state: str  # one of TRIAL_STATES; "stopped": early-stopped by ASHA
    config: dict[str, float] = field(default_factory=dict)
    metric: float | None = None  # the judged metric at its last validation
    steps: int = 0  # optimizer steps it trained
    message: str | None = None  # why it failed
    ended: float | None = None  # unix seconds when it finished (orders TuningInfo.recent)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "number": self.number,
            "state": self.state,
            "steps": self.steps,
            "config": {k: v if isinstance(v, int) else _round_sig(v) for k, v in self.config.items()},
        }
        if _finite(self.metric) is not None:
            out["metric"] = round(float(self.metric or 0.0), 4)
        if self.message:
            out["message"] = self.message[:1000]
        return out


def _round_sig(x: float) -> float:
    return float(f"{x:.6g}")


@dataclass
class TuningInfo:
    """The search as a whole: counts, the best trial and a bounded table (:func:`summarize`)."""

    search: str
    metric: str  # valLoss | valPerplexity | valAccuracy
    mode: str  # min | max
    planned: int | None = None  # trials the search will run (None: not known yet)
    completed: int = 0
    running: int = 0
    stopped: int = 0
    failed: int = 0
    best: TrialRecord | None = None
    trials: list[TrialRecord] = field(default_factory=list)
    recent: list[TrialRecord] = field(default_factory=list)  # the last to finish, newest last

    @property
    def finished(self) -> int:
        return self.completed + self.stopped + self.failed

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "search": self.search,
            "metric": self.metric,
            "mode": self.mode,
            "completed": self.completed,
            "running": self.running,
            "stopped": self.stopped,
            "failed": self.failed,
            "trials": [t.status() for t in self.trials],
        }
        if self.planned is not None:
            out["planned"] = self.planned
        if self.best is not None:
            out["best"] = self.best.status()
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> TuningInfo | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise TypeError("tuning must be an object")
        info = _known(cls, raw)
        info.best = _known(TrialRecord, raw.get("best"))
        info.trials = [_known(TrialRecord, t) for t in raw.get("trials") or []][
            : TOP_TRIALS + MAX_RUNNING_ROWS
        ]
        info.recent = [_known(TrialRecord, t) for t in raw.get("recent") or []][-RECENT_TRIALS:]
        return info


def better(a: float, b: float, mode: str) -> bool:
    """Whether metric ``a`` beats ``b`` under ``mode`` (min or max)."""
    return a < b if mode == "min" else a > b


def summarize(
    trials: list[TrialRecord], *, search: str, metric: str, mode: str, planned: int | None
) -> TuningInfo:
    """All trials → counts, the best one and a table of at most TOP_TRIALS finished trials
    (best first) plus MAX_RUNNING_ROWS running ones: the size is bounded whatever the count."""
    counts = {s: 0 for s in TRIAL_STATES}
    for t in trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    scored = [t for t in trials if t.state in ("completed", "stopped") and _finite(t.metric) is not None]
    sign = 1.0 if mode == "min" else -1.0
    scored.sort(key=lambda t: (sign * float(t.metric or 0.0), t.number))
    running = sorted((t for t in trials if t.state == "running"), key=lambda t: t.number)
    ended = sorted(
        (t for t in trials if t.state in FINISHED_STATES and t.ended is not None),
        key=lambda t: (t.ended or 0.0, t.number),
    )
    return TuningInfo(
        search=search,
        metric=metric,
        mode=mode,
        planned=planned,
        completed=counts["completed"],
        running=counts["running"],
        stopped=counts["stopped"],
        failed=counts["failed"],
        best=scored[0] if scored else None,
        trials=scored[:TOP_TRIALS] + running[:MAX_RUNNING_ROWS],
        recent=[replace(t, message=(t.message or "")[:300] or None) for t in ended[-RECENT_TRIALS:]],
    )


@dataclass
class RunSnapshot:
    """Everything a run has to say about itself, whole: the driver serves the latest one
    (and prints it last), the operator mirrors it into ``status``. Whole rather than a
    stream of events, so a lost or repeated read loses and duplicates nothing."""

    stage: str = "starting"
    submission_id: str | None = None
    progress: ProgressEvent | None = None
    data: DataInfo | None = None
    checkpoints: list[CheckpointEntry] = field(default_factory=list)  # oldest first
    keep_last: int = 3
    resumed_from: CheckpointEntry | None = None
    best_val_loss: float | None = None
    export_uri: str | None = None
    failure: RunFailure | None = None
    updated: float | None = None  # unix seconds of the last change
    tuning: TuningInfo | None = None  # the hyperparameter search, when spec.tuning is set

    def absorb(self, event: ProgressEvent) -> None:
        """One event from rank 0 into the snapshot."""
        self.progress = merge(self.progress, event)
        val = _finite(event.val_loss)
        if val is not None:
            self.best_val_loss = val if self.best_val_loss is None else min(self.best_val_loss, val)
        if event.checkpoint_uri is not None and event.checkpoint_step is not None:
            last_val = self.progress.val_loss if self.progress.step == event.checkpoint_step else None
            self.add_checkpoint(
                CheckpointEntry(event.checkpoint_step, event.checkpoint_uri, event.time, last_val)
            )
        self.updated = event.time

    def add_checkpoint(self, entry: CheckpointEntry) -> None:
        kept = [c for c in self.checkpoints if c.step != entry.step] + [entry]
        kept.sort(key=lambda c: c.step)
        self.checkpoints = kept[-max(1, self.keep_last) :]

    @property
    def latest_checkpoint(self) -> CheckpointEntry | None:
        return self.checkpoints[-1] if self.checkpoints else None

    # ---- wire format

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> RunSnapshot:
        """Parse a snapshot; ValueError for anything that is not one (bounded, typed)."""
        if len(text) > MAX_SNAPSHOT_BYTES:
            raise ValueError(f"a run snapshot is at most {MAX_SNAPSHOT_BYTES} bytes, this is {len(text)}")
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("a run snapshot is a JSON object")
        try:
            stage = str(raw.get("stage", "starting"))
            if stage not in RUN_STAGES:
                raise ValueError(f"unknown stage {stage!r}")
            return cls(
                stage=stage,
                submission_id=_opt_str(raw.get("submission_id")),
                progress=_known(ProgressEvent, raw.get("progress")),
                data=_known(DataInfo, raw.get("data")),
                checkpoints=[_known(CheckpointEntry, c) for c in raw.get("checkpoints") or []][-1000:],
                keep_last=int(raw.get("keep_last", 3)),
                resumed_from=_known(CheckpointEntry, raw.get("resumed_from")),
                best_val_loss=_opt_float(raw.get("best_val_loss")),
                export_uri=_opt_str(raw.get("export_uri")),
                failure=_known(RunFailure, raw.get("failure")),
                updated=_opt_float(raw.get("updated")),
                tuning=TuningInfo.from_dict(raw.get("tuning")),
            )
        except (TypeError, AttributeError) as e:
            raise ValueError(f"not a run snapshot: {e}") from None

    # ---- into status

    def status_patch(self) -> dict[str, Any]:
        """The ``status`` fields this snapshot fills (camelCase): progress, metrics,
        checkpoint lineage, data and export. Unknown values are left out."""
        patch: dict[str, Any] = self.progress.status_patch() if self.progress is not None else {}
        if self.best_val_loss is not None:
            patch.setdefault("metrics", {})["bestValLoss"] = round(self.best_val_loss, 4)
        # Only complete checkpoints (the lineage), never a progress event's checkpoint field.
        checkpoint: dict[str, Any] = {"lineage": [c.status() for c in self.checkpoints]}
        latest = self.latest_checkpoint
        if latest is not None:
            checkpoint["latestUri"] = latest.uri
            checkpoint["latestStep"] = latest.step
        if self.resumed_from is not None:
            checkpoint["resumedFrom"] = self.resumed_from.status()
        patch["checkpoint"] = checkpoint
        if self.data is not None:
            patch["data"] = self.data.status()
        if self.export_uri is not None:
            patch["exportUri"] = self.export_uri
        if self.tuning is not None:
            patch["tuning"] = self.tuning.status()
        return patch


def _rfc3339(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _opt_str(x: Any) -> str | None:
    return None if x is None else str(x)[:4096]


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _known(cls: Any, raw: Any) -> Any:
    """A dataclass from a dict, ignoring keys it does not know (a newer driver may add some)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError(f"{cls.__name__} must be an object")
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})


def snapshot_from_log(text: str) -> RunSnapshot | None:
    """The last snapshot a driver printed in ``text`` (its log), if any readable one."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_PREFIX):
            try:
                return RunSnapshot.from_json(line[len(RESULT_PREFIX) :])
            except ValueError:  # json.JSONDecodeError is one
                return None
    return None
