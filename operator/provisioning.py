"""The Ray cluster on its way up, from the pods' diagnosis: the Scheduled and Running
conditions, the phase (Pending while waiting for capacity, Provisioning otherwise), the
Event when the cluster is Ready, and ``preRunningDeadlineSeconds``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from llmtrain.operator.diagnose import ClusterState, Diagnosis
from llmtrain.operator.outcome import Event, parse_time
from llmtrain.operator.tick import Stop, Tick

from llmtrain.api.status import ConditionType, Phase, Reason

# Phases written from the training run's snapshot (the attempt step).
RUN_PHASES = (Phase.Preprocessing, Phase.Training, Phase.Exporting)
WARNING_REASONS = frozenset(
    {
        Reason.Unschedulable,
        Reason.Restarting,
        Reason.DeadlineExceeded,
        Reason.PreRunningDeadlineExceeded,
        Reason.BackoffLimitExceeded,
        Reason.InvalidSpec,
        Reason.WorkerFailed,
        Reason.InsufficientResources,
        Reason.HeadUnreachable,
        Reason.RunFailed,
        Reason.DataError,
        Reason.NonFiniteLoss,
        Reason.OutputPrefixInUse,
        Reason.SecretNotFound,
        Reason.ConfigMapNotFound,
        Reason.ImagePullFailed,
        Reason.ContainerConfigError,
        Reason.ForeignProgress,
    }
)


def diagnose(t: Tick) -> Stop | None:
    """7. Phase and conditions from the pods' diagnosis; ``preRunningDeadlineSeconds``
    fails a job whose pods are not all Running in time, with the diagnosis as its message."""
    apply_diagnosis(t, t.diagnosis)
    return None


def apply_diagnosis(t: Tick, diag: Diagnosis) -> None:
    """The Scheduled and Running conditions and the phase for ``diag``; one Event when the
    scheduling news changed."""
    old_running = t.conds.get(ConditionType.Running) or {}
    old_sched_reason = (t.conds.get(ConditionType.Scheduled) or {}).get("reason")
    _scheduled(t, diag)
    if diag.state == ClusterState.Ready:
        _ready(t, diag, old_running)
    elif not _not_ready(t, diag, old_running):
        return  # failed: the pre-running deadline passed
    new_sched = t.conds.get(ConditionType.Scheduled) or {}
    ready_event = any(e.reason == "RayClusterReady" for e in t.out.events)
    if (
        new_sched.get("reason") != old_sched_reason
        and new_sched.get("reason") != Reason.WaitingForPods
        and not ready_event  # "all scheduled" is implied by "all Running": one Event, not two
    ):
        kind = "Warning" if new_sched.get("reason") in WARNING_REASONS else "Normal"
        t.out.events.append(Event(kind, str(new_sched.get("reason")), str(new_sched.get("message"))))
    t.out.phase = Phase(t.st["phase"])


def _scheduled(t: Tick, diag: Diagnosis) -> None:
    scheduled = diag.state in (ClusterState.Starting, ClusterState.Ready) or (
        diag.state == ClusterState.Stuck and diag.scheduled == diag.expected
    )
    conds = t.conds
    if scheduled:
        conds.set(
            ConditionType.Scheduled, True, Reason.AllPodsScheduled, f"all {diag.expected} pods scheduled"
        )
    elif diag.state == ClusterState.Queued:
        conds.set(ConditionType.Scheduled, False, Reason.QueuedByKueue, diag.message)
    elif diag.state == ClusterState.Unschedulable:
        conds.set(ConditionType.Scheduled, False, Reason.Unschedulable, diag.message)
    else:
        conds.set(ConditionType.Scheduled, False, Reason.WaitingForPods, diag.message)


def _ready(t: Tick, diag: Diagnosis, old_running: Mapping[str, Any]) -> None:
    """Every pod Running: Provisioning until the run is submitted (a running attempt keeps
    its phase); the first time, the provisioning time and RayClusterReady."""
    old_phase, st = t.old_phase, t.st
    if old_phase in RUN_PHASES:
        st["phase"] = old_phase.value if old_phase else Phase.Provisioning.value
    else:
        st["phase"] = Phase.Provisioning.value
        t.conds.set(
            ConditionType.Running,
            False,
            Reason.Provisioning,
            f"{diag.message}; waiting for the training run to be submitted",
        )
    was_ready = str(old_running.get("message", "")).startswith("Ray cluster ready")
    if not was_ready and old_phase not in RUN_PHASES:
        started = _attempt_started(t)
        if started is not None:
            t.out.provisioning_seconds = max(0.0, (t.now - started).total_seconds())
        t.out.events.append(Event("Normal", "RayClusterReady", diag.message))


def _not_ready(t: Tick, diag: Diagnosis, old_running: Mapping[str, Any]) -> bool:
    """Pods not all Running: Pending while waiting for capacity (unschedulable, queued by
    Kueue), otherwise Provisioning (the pods are being created, scheduled or started).
    False if the pre-running deadline passed (the job failed)."""
    reason = _not_ready_reason(t, diag, old_running)
    waiting_for_capacity = diag.state in (ClusterState.Unschedulable, ClusterState.Queued)
    t.st["phase"] = Phase.Pending.value if waiting_for_capacity else Phase.Provisioning.value
    t.conds.set(ConditionType.Running, False, reason, diag.message)
    limit = t.job.pre_running_deadline_seconds
    started = _attempt_started(t)
    out = t.out
    if limit is None or started is None:
        out.requeue = out.requeue or diag.message
        return True
    waited = (t.now - started).total_seconds()
    if waited >= limit:
        t.fail(
            Reason.PreRunningDeadlineExceeded,
            f"pods not all Running within spec.preRunningDeadlineSeconds={limit}: {diag.message}",
        )
        return False
    out.requeue = out.requeue or f"{diag.message} (pre-running deadline in {limit - waited:.0f}s)"
    return True


def _not_ready_reason(t: Tick, diag: Diagnosis, old_running: Mapping[str, Any]) -> Reason:
    """The Running condition's reason while the pods are not all Running; a container that
    cannot start gets one Event per kind of trouble (the kubelet alternates ErrImagePull and
    ImagePullBackOff: not an Event each time), naming the image and the error."""
    reason = diag.reason or {
        ClusterState.Queued: Reason.QueuedByKueue,
        ClusterState.Unschedulable: Reason.Unschedulable,
    }.get(diag.state, Reason.Provisioning)
    if diag.state == ClusterState.Stuck and old_running.get("reason") != reason.value:
        kind = "Warning" if reason in WARNING_REASONS else "Normal"
        t.out.events.append(Event(kind, reason.value, diag.message))
    return reason


def _attempt_started(t: Tick) -> dt.datetime | None:
    """When the current set of pods was asked for: the start, or the last resume/restart
    (status.attemptStartTime; unreadable: the start, so a deadline is never lost to it)."""
    return parse_time(t.st.get("attemptStartTime")) or parse_time(t.st.get("startTime"))
