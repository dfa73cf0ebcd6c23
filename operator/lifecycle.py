"""The job's life around the run: its spec read (or refused), a finished job's cleanup and
``ttlSecondsAfterFinished``, ``suspend`` and resume, ``activeDeadlineSeconds``, and at the
end of each tick the finalizer that follows the Ray job."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from llmtrain.operator import manifests as m
from llmtrain.operator import rayjobs as rj
from llmtrain.operator.effects import delete_pods, owner_uids, ray_token, stop_ray_job
from llmtrain.operator.kube import ApiError
from llmtrain.operator.mirror import mirror
from llmtrain.operator.outcome import Event, parse_time, rfc3339
from llmtrain.operator.rayjobs import HeadError
from llmtrain.operator.tick import (
    ANN_ATTEMPT_STARTED,
    ANN_CLEANED_UP,
    ANN_SUSPENDED_SECONDS,
    FINALIZER,
    JobFacts,
    Stop,
    Tick,
    job_model,
)
from pydantic import ValidationError

from llmtrain.api.status import ConditionType, Phase, Reason


def parse(t: Tick) -> Stop | None:
    """1. The spec, validated, its manifests buildable; an invalid one fails the job
    (``InvalidSpec``, naming the field to fix) and its pods go."""
    try:
        t.facts = _facts(t)
    except (ValidationError, m.ManifestError) as e:
        if t.old_phase != Phase.Failed:
            t.fail(Reason.InvalidSpec, _spec_error(e))
            delete_pods(t)
        return Stop("invalid spec")
    return None


def finished(t: Tick) -> Stop | None:
    """2. A finished job: nothing runs any more; leftover pods go, and the Ray cluster's
    objects ``ttlSecondsAfterFinished`` later (the job itself stays). The tick goes on to
    the model server (the serve step), which ends it."""
    if t.old_phase is None or not t.old_phase.terminal:
        return None
    t.out.phase = t.old_phase
    if FINALIZER in (t.meta.get("finalizers") or ()):
        t.out.finalizer = False
    delete_pods(t)
    _ttl(t)
    return None


def suspend(t: Tick) -> Stop | None:
    """3. ``suspend: true``: a last checkpoint (while training), then the pods go and the
    status is kept (``Suspended``). Resuming counts the time suspended and is a new attempt."""
    _own_clocks(t)
    if not t.job.suspend:
        _resume(t)
        return None
    if t.mine and last_checkpoint(t, Reason.SuspendedByUser, "suspending"):
        return Stop("suspending: waiting for the last checkpoint")
    if t.mine:
        stop_ray_job(t)
    delete_pods(t)
    conds = t.conds
    latest = (t.st.get("checkpoint") or {}).get("latestStep")
    resumes = (
        f"resumes from its newest checkpoint, step {latest} when suspended"
        if latest is not None
        else "starts over"
    )
    if not conds.is_true(ConditionType.Suspended):
        t.out.events.append(
            Event("Normal", Reason.SuspendedByUser.value, f"suspended: Ray pods deleted; {resumes}")
        )
    msg = (
        "suspended by spec.suspend: the Ray pods are deleted, status is kept; set suspend: false "
        f"to resume (the run {resumes})"
    )
    conds.set(ConditionType.Suspended, True, Reason.SuspendedByUser, msg)
    conds.set(ConditionType.Running, False, Reason.SuspendedByUser, msg)
    conds.set(ConditionType.Scheduled, False, Reason.WaitingForPods, "suspended: no pods")
    t.st["phase"] = Phase.Suspended.value
    t.out.phase = Phase.Suspended
    return Stop("suspended")


def deadline(t: Tick) -> Stop | None:
    """4. ``activeDeadlineSeconds``: wall time since the start less the time suspended. The
    first tick starts the clock and attempt 1."""
    st = t.st
    if not st.get("startTime"):
        st["startTime"] = st["attemptStartTime"] = rfc3339(t.now)
        st["suspendedSeconds"] = 0
    if not st.get("attempt"):
        st["attempt"] = 1
    limit = t.job.active_deadline_seconds
    start = parse_time(st["startTime"]) or t.now
    active = (t.now - start).total_seconds() - t.suspended_seconds
    if limit is None or active < limit:
        return None
    t.fail(Reason.DeadlineExceeded, f"active for {active:.0f}s, over spec.activeDeadlineSeconds={limit}")
    stop_ray_job(t)
    delete_pods(t)
    return Stop("activeDeadlineSeconds passed")


def finalizer(t: Tick) -> Stop | None:
    """9. A job that ended in this tick: its pods go, and the finalizer; a Ray job that may
    run: the finalizer, so that deleting the job stops the Ray job first."""
    has_finalizer = FINALIZER in (t.meta.get("finalizers") or ())
    if Phase(t.st["phase"]).terminal:
        delete_pods(t)
        if has_finalizer:
            t.out.finalizer = False
    elif (t.st.get("rayJob") or {}).get("status") in ("PENDING", "RUNNING") and not has_finalizer:
        t.out.finalizer = True
    return None


def _facts(t: Tick) -> JobFacts:
    """What the spec says, validated, with its manifests buildable (an error names the
    spec field to fix). Cached per (uid, generation): the spec only changes with the
    generation, and a tick then costs no pydantic validation (at 1000 jobs, 200
    ticks/s)."""
    rec, generation = t.rec, t.meta.get("generation")
    key = (t.meta.get("uid", ""), generation)
    hit = rec._cache.get(key) if generation is not None else None
    if hit is not None:
        return hit
    job = job_model(t.body)
    m.pods(job, rec.settings)
    m.network_policy(job, rec.settings)
    facts = JobFacts.of(job)
    if generation is not None:
        rec.remember(rec._cache, key, facts)
    return facts


def _ttl(t: Tick) -> None:
    """``ttlSecondsAfterFinished`` after the completion: the Ray cluster's Service,
    NetworkPolicy, ConfigMap and Secret go (once: ANN_CLEANED_UP)."""
    job, out, now = t.job, t.out, t.now
    ttl = job.ttl_seconds_after_finished
    if ttl is None or ANN_CLEANED_UP in t.annotations:
        return
    done = parse_time(t.st.get("completionTime")) or now
    left = (done - now).total_seconds() + ttl
    if left > 0:
        out.requeue = f"ttlSecondsAfterFinished: Ray cluster deleted in {left:.0f}s"
        return
    name = job.name
    t.rec._children_made.discard(t.uid)
    t.rec._spec_synced.pop(t.uid, None)
    for kind, child in (
        ("Service", m.service_name(name)),
        ("NetworkPolicy", m.network_policy_name(name)),
        ("ConfigMap", m.spec_configmap_name(name)),
        ("Secret", m.auth_secret_name(name)),
        ("PodDisruptionBudget", m.disruption_budget_name(name)),
    ):
        _delete_own(t, kind, child)
    out.annotations[ANN_CLEANED_UP] = rfc3339(now)
    out.events.append(
        Event("Normal", "RayClusterDeleted", f"ttlSecondsAfterFinished={ttl} passed: Ray cluster deleted")
    )


def _delete_own(t: Tick, kind: str, name: str) -> None:
    """Delete a child by name only if it is this job's, and only that incarnation of it (a
    uid precondition): an object of the same name that someone else made, or made again
    since, is left alone and said in an Event."""
    found = t.rec.api.get(kind, t.job.namespace, name)
    if found is None:
        return
    if t.uid not in owner_uids(found):
        t.out.events.append(
            Event("Warning", "NotOwned", f"{kind} {name} is not this job's: left in place after the TTL")
        )
        return
    t.rec.api.delete(kind, t.job.namespace, name, uid=(found.get("metadata") or {}).get("uid"))


def _resume(t: Tick) -> None:
    """A job no longer suspended: the time it was is added up (for the active deadline),
    and the pods made again are a new attempt."""
    out, conds, now = t.out, t.conds, t.now
    t.suspended_seconds = _seconds(str(t.st.get("suspendedSeconds") or 0))
    if not conds.is_true(ConditionType.Suspended):
        return
    since = parse_time((conds.get(ConditionType.Suspended) or {}).get("lastTransitionTime")) or now
    t.suspended_seconds += max(0.0, (now - since).total_seconds())
    t.st["suspendedSeconds"] = round(t.suspended_seconds)
    t.st["attemptStartTime"] = rfc3339(now)
    conds.set(ConditionType.Suspended, False, Reason.Resumed, "resumed: Ray pods recreated")
    t.st["attempt"] = int(t.st.get("attempt") or 0) + 1
    out.events.append(Event("Normal", Reason.Resumed.value, "resumed: recreating the Ray pods"))


def last_checkpoint(t: Tick, reason: Reason, doing: str) -> bool:
    """3a. A training run told to yield (``suspend``; a node drain, operator/disruption.py)
    first takes a last checkpoint: the driver is asked for one (rank 0 saves at its next
    log step) and the pods stay until the lineage holds a checkpoint past the step the run
    had reached, at most ``suspend_checkpoint_seconds``. True while waiting; ``reason``
    and ``doing`` ("suspending") say why in the condition. No driver to ask, or no answer:
    yield with what exists."""
    st, now = t.st, t.now
    ray_job: dict[str, Any] = dict(st.get("rayJob") or {})
    if ray_job.get("status") != "RUNNING" or st.get("phase") != Phase.Training.value:
        return False
    ns, name = t.meta.get("namespace", ""), t.meta.get("name", "")
    head = rj.head_of(t.rec.settings, ns, name)
    try:
        token = ray_token(t.rec, ns, name, t.uid)
        sid = str(ray_job.get("submissionId") or "")
        if not ray_job.get("checkpointAskedAt"):
            step = t.rec.ray.checkpoint(head, token, sid)
            ray_job.update(checkpointAskedAt=rfc3339(now), checkpointAskedStep=step)
            st["rayJob"] = ray_job
        else:
            mirror(t, t.rec.ray.progress(head, token, sid))
    except rj.ForeignSnapshot as e:  # another run's driver: suspend with what exists
        t.out.foreign.append((e.source, e.found or ""))
        return False
    except (HeadError, ApiError):
        return False
    return _awaiting_checkpoint(t, ray_job, reason, doing)


def _awaiting_checkpoint(t: Tick, ray_job: Mapping[str, Any], reason: Reason, doing: str) -> bool:
    """The asked-for checkpoint is not there yet, and the wait is not over."""
    limit = t.rec.settings.suspend_checkpoint_seconds
    asked_at = parse_time(ray_job["checkpointAskedAt"]) or t.now
    asked_step = int(ray_job.get("checkpointAskedStep") or 0)
    latest = (t.st.get("checkpoint") or {}).get("latestStep")
    # Strictly past it: the snapshot's step S was reported after rank 0 polled at S, so
    # the asked-for checkpoint comes at a later log step (one at S may predate the ask).
    if latest is not None and int(latest) > asked_step:
        return False
    waited = (t.now - asked_at).total_seconds()
    if waited >= limit:
        t.out.events.append(
            Event(
                "Warning",
                reason.value,
                f"no checkpoint within {limit:.0f}s of asking (step {asked_step}): {doing} anyway",
            )
        )
        return False
    why = (
        f"{doing}: a last checkpoint was asked for at step {asked_step} "
        f"({ray_job['checkpointAskedAt']}); the Ray pods go once it is complete, or {limit:.0f}s after"
    )
    t.conds.set(ConditionType.Running, True, reason, why)
    t.out.requeue = f"{doing}: waiting for the last checkpoint"
    return True


def _own_clocks(t: Tick) -> None:
    """The clocks of the deadlines live in status, which users cannot write (an annotation
    ``llmtrain.dev/suspended-seconds: 1e9`` once switched activeDeadlineSeconds off). A job
    started by an older operator has them only as annotations: read once, each held to what
    can be true (suspended at most as long as the job has existed; the attempt started
    between the start and now), and kept in status from then on."""
    st, now = t.st, t.now
    start = parse_time(st.get("startTime"))
    if start is None:
        return  # a new job: the deadline step starts its clocks
    if "suspendedSeconds" not in st:
        elapsed = max(0.0, (now - start).total_seconds())
        st["suspendedSeconds"] = round(min(_seconds(t.annotations.get(ANN_SUSPENDED_SECONDS)), elapsed))
    if "attemptStartTime" not in st:
        old = parse_time(t.annotations.get(ANN_ATTEMPT_STARTED))
        st["attemptStartTime"] = rfc3339(old if old is not None and start <= old <= now else start)


def _seconds(s: str | None) -> float:
    """A seconds annotation; 0 when absent or unreadable."""
    try:
        v = float(s or 0)
    except ValueError:
        return 0.0
    return v if math.isfinite(v) and v >= 0 else 0.0


def _spec_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        parts = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err["loc"])
            parts.append(f"{loc}: {err['msg']}")
        return "invalid spec: " + "; ".join(parts)
    return f"invalid spec: {e}"
