"""``LLMTrainingJob.status``: phase, conditions, progress, metrics, checkpoint lineage.

Written by the operator (from observation) and, for progress/metrics/lineage, from the
training run's :class:`~llmtrain.api.progress.ProgressEvent` stream.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from llmtrain.api.base import ApiModel


class Phase(StrEnum):
    Pending = "Pending"
    Provisioning = "Provisioning"
    Preprocessing = "Preprocessing"
    Tuning = "Tuning"
    Training = "Training"
    Exporting = "Exporting"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Suspended = "Suspended"

    @property
    def terminal(self) -> bool:
        return self in (Phase.Succeeded, Phase.Failed)


class ConditionType(StrEnum):
    Scheduled = "Scheduled"
    DataReady = "DataReady"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Suspended = "Suspended"
    Serving = "Serving"


class Reason(StrEnum):
    """Every reason a condition may carry. ``CONDITION_REASONS`` says which type uses which."""

    # Scheduled
    AllPodsScheduled = "AllPodsScheduled"
    WaitingForPods = "WaitingForPods"
    Unschedulable = "Unschedulable"
    QueuedByKueue = "QueuedByKueue"
    # DataReady
    DataPrepared = "DataPrepared"
    DataReused = "DataReused"
    PreparingData = "PreparingData"
    DataError = "DataError"
    # Running
    Provisioning = "Provisioning"
    TrainingRunning = "TrainingRunning"
    TuningRunning = "TuningRunning"  # the hyperparameter search of spec.tuning
    Restarting = "Restarting"
    Exporting = "Exporting"
    # A spec reference the pods would need is missing: no pods are made until it exists.
    SecretNotFound = "SecretNotFound"
    ConfigMapNotFound = "ConfigMapNotFound"
    # A container cannot start (the kubelet's reason in the message; fixable by a spec edit).
    ImagePullFailed = "ImagePullFailed"
    ContainerConfigError = "ContainerConfigError"
    # The progress endpoint answered for another Ray job: nothing of it is written.
    ForeignProgress = "ForeignProgress"
    # Succeeded
    Completed = "Completed"
    # Failed (the Running condition carries the same reason, see below)
    DeadlineExceeded = "DeadlineExceeded"
    PreRunningDeadlineExceeded = "PreRunningDeadlineExceeded"
    BackoffLimitExceeded = "BackoffLimitExceeded"
    NonFiniteLoss = "NonFiniteLoss"
    InsufficientResources = "InsufficientResources"
    InvalidSpec = "InvalidSpec"
    WorkerFailed = "WorkerFailed"
    HeadUnreachable = "HeadUnreachable"
    RunFailed = "RunFailed"
    # The checkpoint or output prefix belongs to another job (its OWNER record; runtime/owner.py).
    OutputPrefixInUse = "OutputPrefixInUse"
    # Suspended
    SuspendedByUser = "SuspendedByUser"
    Resumed = "Resumed"
    # A node hosting the job's pods is drained (cordoned) or a pod is to be evicted: a
    # just-in-time checkpoint, then the Ray cluster is made again elsewhere (operator/disruption.py).
    Disrupted = "Disrupted"
    # Serving
    ServerReady = "ServerReady"
    ServerStarting = "ServerStarting"
    ServerScaledToZero = "ServerScaledToZero"
    ServerFailing = "ServerFailing"  # a server container crash-loops or cannot start


# Documented reasons per condition type (``kubectl describe`` readers and tests use it).
# The Running condition is the one the printer column "Reason" shows: while a job is
# not running it says why (Provisioning, Unschedulable, SuspendedByUser, …) and when a
# job fails it turns False with the Failed condition's reason.
FAILURE_REASONS: tuple[Reason, ...] = (
    Reason.DeadlineExceeded,
    Reason.PreRunningDeadlineExceeded,
    Reason.BackoffLimitExceeded,
    Reason.NonFiniteLoss,
    Reason.InsufficientResources,
    Reason.InvalidSpec,
    Reason.WorkerFailed,
    Reason.DataError,
    Reason.HeadUnreachable,
    Reason.OutputPrefixInUse,
    Reason.RunFailed,
)

CONDITION_REASONS: dict[ConditionType, tuple[Reason, ...]] = {
    ConditionType.Scheduled: (
        Reason.AllPodsScheduled,
        Reason.WaitingForPods,
        Reason.Unschedulable,
        Reason.QueuedByKueue,
    ),
    ConditionType.DataReady: (Reason.DataPrepared, Reason.DataReused, Reason.PreparingData, Reason.DataError),
    ConditionType.Running: (
        Reason.Provisioning,
        Reason.Unschedulable,
        Reason.QueuedByKueue,
        Reason.PreparingData,
        Reason.TuningRunning,
        Reason.TrainingRunning,
        Reason.Restarting,
        Reason.Exporting,
        Reason.SecretNotFound,
        Reason.ConfigMapNotFound,
        Reason.ImagePullFailed,
        Reason.ContainerConfigError,
        Reason.ForeignProgress,
        Reason.Completed,
        Reason.SuspendedByUser,
        Reason.Disrupted,
        *FAILURE_REASONS,
    ),
    ConditionType.Succeeded: (Reason.Completed,),
    ConditionType.Failed: FAILURE_REASONS,
    ConditionType.Suspended: (Reason.SuspendedByUser, Reason.Resumed),
    ConditionType.Serving: (
        Reason.ServerReady,
        Reason.ServerStarting,
        Reason.ServerScaledToZero,
        Reason.ServerFailing,
        Reason.SecretNotFound,  # spec.serve names a Secret (key) that does not exist
        Reason.ConfigMapNotFound,
    ),
}


class Condition(ApiModel):
    """The standard metav1.Condition shape."""

    type: str = Field(
        max_length=316,
        description="Condition type: Scheduled, DataReady, Running, Succeeded, Failed or Suspended.",
    )
    status: str = Field(pattern=r"^(True|False|Unknown)$", description="True, False or Unknown.")
    reason: str = Field(
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase reason; the documented reasons per type are in llmtrain.api.status.",
    )
    message: str = Field("", max_length=32_768, description="Human-readable detail.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation it was set for.")


class Progress(ApiModel):
    """Where training is."""

    step: int = Field(0, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, ge=0, description="Optimizer steps in the whole run.")
    epoch: int = Field(0, ge=0, description="Current epoch (0-based).")
    tokens_seen: int = Field(0, ge=0, description="Training tokens consumed.")
    percent: float | None = Field(None, ge=0, le=100, description="step / totalSteps × 100.")
    eta: str | None = Field(
        None, max_length=64, description="Estimated time left, preformatted (e.g. 1h02m)."
    )


class LatestMetrics(ApiModel):
    """The latest reported training-quality and speed figures."""

    train_loss: float | None = Field(
        None, description="Training loss (mean over tokens) at the last log step."
    )
    val_loss: float | None = Field(None, description="Validation loss at the last validation.")
    val_perplexity: float | None = Field(None, description="exp(valLoss).")
    val_accuracy: float | None = Field(None, description="Next-token accuracy at the last validation.")
    val_bits_per_byte: float | None = Field(
        None, description="Bits per UTF-8 byte of validation text: comparable across tokenizers."
    )
    val_task_exact_match: float | None = Field(
        None, description="Share of held-out task answers equal to the reference (spec.validation.task)."
    )
    val_task_score: float | None = Field(
        None, description="Share of held-out task answers passing spec.validation.task.checker."
    )
    best_val_loss: float | None = Field(None, description="Lowest validation loss so far.")
    tokens_per_second: float | None = Field(None, description="Training throughput, all ranks.")
    mfu: float | None = Field(None, description="Model FLOPs utilisation, 0–1 (absent on CPU).")


class CheckpointRecord(ApiModel):
    uri: str = Field(max_length=1024, description="Checkpoint directory.")
    step: int = Field(ge=0, description="Optimizer step it holds.")
    time: str | None = Field(None, description="When it completed (RFC 3339).")
    val_loss: float | None = Field(None, description="Validation loss at its step, if validated there.")


class CheckpointStatus(ApiModel):
    """Checkpoint lineage: what exists and what the run resumed from."""

    latest_uri: str | None = Field(None, max_length=1024, description="Newest complete checkpoint.")
    latest_step: int | None = Field(None, ge=0, description="Its step.")
    resumed_from: CheckpointRecord | None = Field(
        None, description="Checkpoint the current attempt resumed from."
    )
    lineage: list[CheckpointRecord] = Field(
        default_factory=list, max_length=100, description="Complete checkpoints kept, oldest first."
    )


class DataStatus(ApiModel):
    """The prepared data set the run trains on (its manifest lists every shard)."""

    manifest_uri: str = Field(max_length=1024, description="The data manifest (manifest.json).")
    train_tokens: int = Field(ge=0, description="Tokens in the training split.")
    validation_tokens: int = Field(ge=0, description="Tokens in the validation split.")
    vocab_size: int = Field(ge=1, description="Tokenizer vocabulary size.")
    reused: bool = Field(False, description="Reused from an earlier run (same fingerprint).")
    validation_set: str | None = Field(
        None,
        max_length=1024,
        description="Which text the validation metrics measure (sources or hash split).",
    )
    task_records: int | None = Field(
        None, ge=0, description="Task data: the records trained on and held out (unset for plain text)."
    )
    bad_records: dict[str, int] | None = Field(
        None,
        max_length=16,
        description="Task data: records refused (never trained on), by reason; the data manifest names "
        "the first ones (extra.task.bad_examples).",
    )


class RayJobStatus(ApiModel):
    """The training run as a Ray job on the job's head (Ray's Jobs API)."""

    submission_id: str = Field(max_length=253, description="<job>-<attempt>: one Ray job per attempt.")
    status: str | None = Field(
        None, max_length=32, description="Ray's job status: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED."
    )
    unreachable_since: str | None = Field(
        None, description="When polls of the head started failing (RFC 3339); unset while it answers."
    )
    checkpoint_asked_at: str | None = Field(
        None,
        description="When the operator asked the driver for a last checkpoint before suspending (RFC 3339).",
    )
    checkpoint_asked_step: int | None = Field(
        None, ge=0, description="The step the run had reached when that checkpoint was asked for."
    )
    foreign_progress_since: str | None = Field(
        None,
        description="When the progress endpoint started answering for another Ray job than this "
        "attempt's (RFC 3339; nothing of it is written into status); unset while it answers for this one.",
    )


class ServingStatus(ApiModel):
    """The model server of ``spec.serve`` (from its Deployment)."""

    url: str = Field(max_length=1024, description="OpenAI-compatible base URL inside the cluster.")
    model_name: str = Field(max_length=253, description="The model id clients send (the job's name).")
    model_uri: str = Field(max_length=1024, description="The exported model it serves.")
    replicas: int = Field(0, ge=0, description="Replicas asked for.")
    ready_replicas: int = Field(0, ge=0, description="Replicas answering /health.")


class TrialStatus(ApiModel):
    """One trial of the hyperparameter search."""

    number: int = Field(ge=0, description="Trial number, in the order the searcher proposed it (1-based).")
    state: str = Field(
        max_length=16, description="pending, running, completed, stopped (early, by ASHA) or failed."
    )
    steps: int = Field(0, ge=0, description="Optimizer steps it trained.")
    metric: float | None = Field(None, description="The judged metric at its last validation.")
    config: dict[str, float] = Field(
        default_factory=dict, description="Its configuration: spec path → value."
    )
    message: str | None = Field(None, max_length=1024, description="Why it failed.")


class TuningStatus(ApiModel):
    """The hyperparameter search (spec.tuning): counts, the best trial and a table bounded
    to the best finished trials plus the running ones, whatever the number of trials."""

    search: str = Field(max_length=16, description="grid, random or bayesian.")
    metric: str = Field(
        max_length=32, description="The judged metric: valLoss, valPerplexity, valAccuracy or valTaskScore."
    )
    mode: str = Field(max_length=8, description="min or max.")
    planned: int | None = Field(None, ge=0, description="Trials the search runs.")
    completed: int = Field(0, ge=0, description="Trials that trained their whole budget.")
    running: int = Field(0, ge=0, description="Trials running now.")
    stopped: int = Field(0, ge=0, description="Trials stopped early by ASHA.")
    failed: int = Field(0, ge=0, description="Trials that failed (or whose configuration was invalid).")
    best: TrialStatus | None = Field(None, description="The best trial so far.")
    trials: list[TrialStatus] = Field(
        default_factory=list,
        max_length=20,
        description="The best finished trials (best first), then the running ones.",
    )


CONTRACT_VERSION = "v1"


class ContractCheckpoint(ApiModel):
    """The newest complete checkpoint, as the checkpoint contract states it."""

    step: int = Field(ge=0, description="Optimizer step it holds: a resumed run's first step is step + 1.")
    time: str | None = Field(None, description="When it completed (RFC 3339).")
    uri: str = Field(max_length=1024, description="Where it is.")


class CheckpointContract(ApiModel):
    """A small, versioned summary for schedulers and tools (docs/checkpoint-contract.md):
    readable without knowing the rest of this status. Computed from observation by
    :func:`llmtrain.api.contract.checkpoint_contract`."""

    version: str = Field(CONTRACT_VERSION, max_length=16, description="Contract version: v1.")
    attempt: int = Field(0, ge=0, description="Execution attempt: +1 per restart, resume or disruption.")
    latest_checkpoint: ContractCheckpoint | None = Field(
        None, description="Newest complete checkpoint (unset: none yet; a restart starts over)."
    )
    training: bool = Field(False, description="Training runs now, so work since the checkpoint is at risk.")
    at_risk_since: str | None = Field(
        None,
        description="While training: the later of the latest checkpoint's time and the attempt's start "
        "(RFC 3339). Work at risk now = now - atRiskSince: exact at any time, between status writes too.",
    )
    work_at_risk_seconds: int = Field(
        0, ge=0, description="Seconds of training work no checkpoint holds, as of asOf (0: not training)."
    )
    steps_at_risk: int = Field(0, ge=0, description="Optimizer steps no checkpoint holds, as of asOf.")
    as_of: str | None = Field(
        None, description="When workAtRiskSeconds and stepsAtRisk were computed (RFC 3339)."
    )
    checkpoint_on_disruption: bool = Field(
        False,
        description="A node drain or eviction gets a just-in-time checkpoint before the pods go "
        "(spec.checkpoint.onDisruption; spec.suspend always does).",
    )
    disruption_checkpoint_seconds: int | None = Field(
        None, ge=0, description="At most this long is waited for that checkpoint; then the pods go anyway."
    )


class DisruptionStatus(ApiModel):
    """The latest voluntary disruption (a node drained, a pod evicted) and what it cost."""

    node: str | None = Field(None, max_length=253, description="The drained node.")
    cause: str = Field(
        max_length=1024, description="What was observed (a cordoned node, a DisruptionTarget)."
    )
    observed_time: str = Field(description="When the operator noticed it (RFC 3339).")
    attempt: int = Field(ge=0, description="The attempt it ended (the run resumes as the next one).")
    step: int | None = Field(None, ge=0, description="The step the run had reached when noticed.")
    checkpoint_step: int | None = Field(
        None, ge=0, description="The checkpoint the run resumes from (unset: none, it starts over)."
    )
    just_in_time: bool = Field(False, description="A checkpoint was asked for when it was noticed.")
    steps_lost: int | None = Field(
        None,
        ge=0,
        description="Steps done when noticed that no checkpoint holds (0: the JIT checkpoint held them).",
    )
    completion_time: str | None = Field(
        None, description="When the pods were let go (RFC 3339); unset while the checkpoint is awaited."
    )


class LLMTrainingJobStatus(ApiModel):
    """Observed state of the job."""

    phase: Phase = Field(
        Phase.Pending,
        description="Pending, Provisioning, Preprocessing, Tuning, Training, "
        "Exporting, Succeeded, Failed or Suspended.",
    )
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, description="Standard conditions, one per type."
    )
    progress: Progress = Field(default_factory=Progress, description="Training progress.")
    metrics: LatestMetrics = Field(default_factory=LatestMetrics, description="Latest metrics.")
    checkpoint: CheckpointStatus = Field(default_factory=CheckpointStatus, description="Checkpoint lineage.")
    restarts: int = Field(0, ge=0, description="Times the run restarted from a checkpoint.")
    attempt: int = Field(
        0, ge=0, description="Current attempt: 1 for the first Ray cluster, +1 per restart or resume."
    )
    ray_job: RayJobStatus | None = Field(None, description="The current attempt's Ray job.")
    data: DataStatus | None = Field(None, description="The prepared data the run trains on.")
    export_uri: str | None = Field(None, max_length=1024, description="Where the exported model is.")
    tuning: TuningStatus | None = Field(
        None, description="The hyperparameter search, when spec.tuning is set."
    )
    ray_cluster_name: str | None = Field(None, max_length=253, description="Name of the job's Ray cluster.")
    start_time: str | None = Field(None, description="When the job started (RFC 3339).")
    attempt_start_time: str | None = Field(
        None,
        description="When the current attempt's pods were asked for, after a resume or restart (RFC 3339).",
    )
    suspended_seconds: int | None = Field(
        None, ge=0, description="Seconds spent suspended, not counted against activeDeadlineSeconds."
    )
    completion_time: str | None = Field(None, description="When the job finished (RFC 3339).")
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation last reconciled.")
    serving: ServingStatus | None = Field(None, description="The model server (spec.serve).")
    checkpoint_contract: CheckpointContract | None = Field(
        None, description="The versioned checkpoint contract for schedulers (docs/checkpoint-contract.md)."
    )
    disruption: DisruptionStatus | None = Field(
        None, description="The latest node drain or eviction: its checkpoint and the steps lost."
    )
