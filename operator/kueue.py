"""Kueue admission of a job with ``spec.resources.queueName``, through Kueue's ``Workload`` API.

The operator is Kueue's job integration for the ``LLMTrainingJob`` kind, as Kueue's built-in
integrations are for a batch Job or a RayCluster (Kueue lists the kind in its configuration's
``integrations.externalFrameworks``: ``LLMTrainingJob.v1alpha1.llmtrain.dev``):

* one ``Workload`` per job incarnation, owned by the job (deleting the job deletes it), whose
  pod sets are the head and the workers with the pods' own requests;
* no pod is made before Kueue admits the Workload: the gang is all or nothing, and a job
  waiting in the queue holds no GPU (nor a half-started Ray cluster). Meanwhile the job is
  ``Pending`` with reason ``QueuedByKueue`` and Kueue's own words in the condition;
* Kueue evicts an admitted Workload (a higher-priority job preempts it, its queue is
  stopped): the run takes a last checkpoint first, like ``spec.suspend``
  (:func:`~llmtrain.operator.lifecycle.last_checkpoint`, bounded by the operator's
  ``suspend_checkpoint_seconds``), then its pods go and the quota is handed back by clearing
  the Workload's admission, as Kueue's jobframework does for its own integrations
  (``UnsetQuotaReservationWithCondition``); Kueue queues it again, and when it is admitted
  again the run resumes from that checkpoint as a new attempt;
* a finished job's Workload is marked ``Finished``: Kueue releases its quota.

Why not Kueue's plain-pod groups (pod labels): docs/kueue.md. The Workload manifest is
built here rather than in manifests.py: it is this integration's only object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmtrain.operator import manifests as m
from llmtrain.operator.effects import create, delete_pods, stop_ray_job
from llmtrain.operator.kube import ApiError
from llmtrain.operator.lifecycle import last_checkpoint
from llmtrain.operator.outcome import Event, rfc3339
from llmtrain.operator.tick import Stop, Tick

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.status import ConditionType, Phase, Reason

API_VERSION = "kueue.x-k8s.io/v1beta2"
# Kueue's conditions on a Workload (sigs.k8s.io/kueue/apis/kueue/v1beta2/workload_types.go).
QUOTA_RESERVED = "QuotaReserved"
ADMITTED = "Admitted"
EVICTED = "Evicted"
FINISHED = "Finished"
# Kueue's label naming a job's WorkloadPriorityClass (the same on every kind Kueue queues).
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
# On a finished job: its Workload was marked Finished (release() reads it no more).
ANN_RELEASED = "llmtrain.dev/kueue-released-at"
# The Events' reason when Kueue evicts the job's Workload.
EVENT_PREEMPTED = "EvictedByKueue"


def workload_name(job: str) -> str:
    return f"llmtrainingjob-{job}"


def queue_name(t: Tick) -> str | None:
    """spec.resources.queueName, read from the body: the parse step validated it, and the
    per-tick facts need not carry a field only this step reads."""
    res = ((t.body.get("spec") or {}).get("resources")) or {}
    name = res.get("queueName")
    return str(name) if name else None


def workload(
    job: LLMTrainingJob, settings: m.OperatorSettings, priority: tuple[str, int] | None = None
) -> dict[str, Any]:
    """The job's Workload: a pod set for the head and one for the workers, their templates
    the pods' own specs (Kueue counts the containers' requests: GPUs, CPU, memory).
    ``priority``: the WorkloadPriorityClass the job's label names and its value (Kueue
    preempts by ``spec.priority``; its own integrations resolve the class as this does)."""
    res = job.spec.resources
    head = m.head_pod(job, settings)
    pod_sets = [_pod_set("head", 1, head)]
    if res.workers:
        pod_sets.append(_pod_set("workers", res.workers, m.worker_pod(job, settings, 0)))
    return {
        "apiVersion": API_VERSION,
        "kind": "Workload",
        "metadata": {
            "name": workload_name(job.metadata.name),
            "namespace": job.metadata.namespace or "default",
            "labels": {m.LABEL_JOB: job.metadata.name, m.LABEL_MANAGED_BY: m.MANAGED_BY},
        },
        "spec": {
            "queueName": res.queue_name,
            "podSets": pod_sets,
            **(
                {
                    "priorityClassRef": {
                        "group": "kueue.x-k8s.io",
                        "kind": "WorkloadPriorityClass",
                        "name": priority[0],
                    },
                    "priority": priority[1],
                }
                if priority
                else {}
            ),
        },
    }


def _pod_set(name: str, count: int, pod: Mapping[str, Any]) -> dict[str, Any]:
    spec = pod["spec"]
    # What Kueue reads to count and place the pods: requests, node selection, tolerations.
    template_spec = {
        k: spec[k]
        for k in ("containers", "initContainers", "nodeSelector", "tolerations", "affinity")
        if k in spec
    }
    template_spec["containers"] = [
        {"name": c["name"], "image": c["image"], "resources": c.get("resources") or {}}
        for c in spec["containers"]
    ]
    template_spec.pop("initContainers", None)
    template_spec["restartPolicy"] = spec.get("restartPolicy", "Never")
    return {"name": name, "count": count, "template": {"spec": template_spec}}


def _cond(wl: Mapping[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in (wl.get("status") or {}).get("conditions") or ():
        if c.get("type") == ctype:
            return dict(c)
    return None


def _true(wl: Mapping[str, Any], ctype: str) -> bool:
    c = _cond(wl, ctype)
    return c is not None and c.get("status") == "True"


def _owned(t: Tick, wl: Mapping[str, Any]) -> bool:
    return any(r.get("uid") == t.uid for r in (wl.get("metadata") or {}).get("ownerReferences") or ())


def release(t: Tick) -> Stop | None:
    """2a. A finished job's Workload is marked Finished (once): Kueue releases its quota."""
    if not t.finished or not queue_name(t) or ANN_RELEASED in t.annotations:
        return None
    name = workload_name(t.job.name)
    wl = t.rec.api.get("Workload", t.job.namespace, name)
    if wl is not None and _owned(t, wl) and not _true(wl, FINISHED):
        reason = "Succeeded" if t.old_phase == Phase.Succeeded else "Failed"
        said = f"LLMTrainingJob {t.job.name} {reason.lower()}"
        _set_status(t, wl, [_condition(t, FINISHED, True, reason, said)])
    # Once: a finished job is resynced as long as it exists; its Workload need not be read again.
    t.out.annotations[ANN_RELEASED] = rfc3339(t.now)
    return None


def admit(t: Tick) -> Stop | None:
    """4a. With spec.resources.queueName: the job's Workload made; nothing more until Kueue
    admits it; an eviction (preemption) yields the quota after a last checkpoint."""
    queue = queue_name(t)
    if not queue:
        return None
    ns, name = t.job.namespace, workload_name(t.job.name)
    wl = t.rec.api.get("Workload", ns, name)
    if wl is None:
        priority: tuple[str, int] | None = None
        pclass = (t.meta.get("labels") or {}).get(PRIORITY_CLASS_LABEL)
        if pclass:
            value = t.rec.api.workload_priority(pclass)
            if value is None:
                return _queued(
                    t,
                    f"metadata.labels.{PRIORITY_CLASS_LABEL}: no WorkloadPriorityClass {pclass!r}; "
                    "create it or fix the label",
                )
            priority = (pclass, value)
        if create(t, workload(t.model(), t.rec.settings, priority)):
            t.out.events.append(
                Event("Normal", Reason.QueuedByKueue.value, f"created Workload {name} in LocalQueue {queue}")
            )
        return _queued(t, f"Workload {name} created in LocalQueue {queue}: waiting for Kueue to admit it")
    if not _owned(t, wl):
        return _queued(t, f"Workload {name} is an earlier job's: waiting for it to be deleted")
    if _true(wl, EVICTED) and _true(wl, QUOTA_RESERVED):
        return _yield(t, wl)
    if not _true(wl, ADMITTED):
        if t.live:
            # Admission lost while pods exist (cleared by hand, or an operator restart
            # between deleting the pods and clearing it): no pod runs unadmitted.
            stop_ray_job(t)
            delete_pods(t)
        return _queued(t, _kueue_says(wl))
    _readmitted(t)
    return None


def _kueue_says(wl: Mapping[str, Any]) -> str:
    """Why the Workload waits, in Kueue's words (its QuotaReserved condition's message)."""
    name = (wl.get("metadata") or {}).get("name")
    c = _cond(wl, QUOTA_RESERVED) or {}
    said = c.get("message") or "waiting for Kueue to reserve quota"
    return f"Kueue has not admitted Workload {name}: {said}"


def _queued(t: Tick, message: str) -> Stop:
    conds = t.conds
    conds.set(ConditionType.Scheduled, False, Reason.QueuedByKueue, message)
    conds.set(ConditionType.Running, False, Reason.QueuedByKueue, message)
    t.st["phase"] = Phase.Pending.value
    t.out.phase = Phase.Pending
    t.out.requeue = "queued by Kueue: waiting for admission"
    return Stop("queued by Kueue")


def _yield(t: Tick, wl: Mapping[str, Any]) -> Stop:
    """Kueue evicted the Workload: a last checkpoint (bounded; not with
    ``spec.checkpoint.onDisruption: false``), the pods go, then the admission is cleared so
    Kueue can give the quota to whoever preempted. The outcome is ``status.disruption``, as
    for a node drain (operator/disruption.py): the checkpoint the run resumes from and the
    steps lost."""
    st = t.st
    evicted = _cond(wl, EVICTED) or {}
    cause = f"evicted by Kueue ({evicted.get('reason')}): {evicted.get('message')}"
    attempt = int(st.get("attempt") or 1)
    record: dict[str, Any] = dict(st.get("disruption") or {})
    if record.get("attempt") != attempt or not str(record.get("cause") or "").startswith("evicted by Kueue"):
        step = int((st.get("progress") or {}).get("step") or 0)
        training = (st.get("rayJob") or {}).get("status") == "RUNNING" and st.get(
            "phase"
        ) == Phase.Training.value
        record = {
            "cause": cause[:1024],
            "observedTime": rfc3339(t.now),
            "attempt": attempt,
            "step": step,
            "justInTime": bool(t.live) and t.job.checkpoint_on_disruption and training,
        }
        st["disruption"] = record
        what = "asking for a last checkpoint" if record["justInTime"] else "no checkpoint asked for"
        t.out.events.append(
            Event("Warning", EVENT_PREEMPTED, f"{cause}: {what} at step {step}, then the Ray pods go")
        )
    if record.get("justInTime") and t.live and last_checkpoint(t, Reason.QueuedByKueue, "yielding to Kueue"):
        return Stop("evicted by Kueue: waiting for the last checkpoint")
    if not record.get("completionTime"):
        asked = (st.get("rayJob") or {}).get("checkpointAskedStep")
        reached = int(asked) if asked is not None else int(record.get("step") or 0)
        latest = (st.get("checkpoint") or {}).get("latestStep")
        record.update(
            step=reached,
            checkpointStep=latest,
            stepsLost=max(0, reached - int(latest or 0)),
            completionTime=rfc3339(t.now),
        )
        st["disruption"] = record
        resumes = f"resumes from the checkpoint at step {latest}" if latest is not None else "starts over"
        kind = "Normal" if record["stepsLost"] == 0 else "Warning"
        t.out.events.append(
            Event(
                kind,
                EVENT_PREEMPTED,
                f"{cause}: when admitted again the run {resumes}, {record['stepsLost']} steps lost",
            )
        )
    if t.mine:
        if t.live:
            stop_ray_job(t)
            delete_pods(t)
        _queued(t, f"{cause}; the Ray pods are being deleted")
        t.out.requeue = "evicted by Kueue: waiting for the pods to go"
        return Stop("evicted by Kueue: waiting for the pods to go")
    try:
        _set_status(
            t,
            wl,
            [
                _condition(t, QUOTA_RESERVED, False, "Pending", str(evicted.get("message") or "evicted")),
                _condition(t, ADMITTED, False, "NoReservation", "The workload has no reservation"),
            ],
            clear_admission=True,
        )
    except ApiError as e:
        _queued(t, cause)
        t.out.requeue = f"evicted by Kueue: clearing the Workload's admission failed ({e.status}): retrying"
        return Stop("evicted by Kueue")
    return _queued(t, f"{cause}; the quota is handed back and the Workload queued again")


def _readmitted(t: Tick) -> None:
    """Admitted again after an eviction whose pods went: a new attempt, resuming from the
    newest checkpoint (recorded in ``status.disruption``)."""
    st = t.st
    record = st.get("disruption") or {}
    attempt = int(st.get("attempt") or 1)
    if record.get("attempt") != attempt or not record.get("completionTime"):
        return
    if not str(record.get("cause") or "").startswith("evicted by Kueue"):
        return
    st["attempt"] = attempt + 1
    st["attemptStartTime"] = rfc3339(t.now)
    t.rec._children_made.discard(t.uid)
    t.rec._spec_synced.pop(t.uid, None)
    t.out.events.append(
        Event(
            "Normal",
            Reason.Resumed.value,
            f"admitted again by Kueue: attempt {st['attempt']} resumes from the checkpoint at step "
            f"{record.get('checkpointStep')}",
        )
    )


def _condition(t: Tick, ctype: str, status: bool, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": ctype,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": rfc3339(t.now),
    }


def _set_status(
    t: Tick, wl: Mapping[str, Any], conditions: list[dict[str, Any]], clear_admission: bool = False
) -> None:
    """Merge ``conditions`` into the Workload's status (a merge patch replaces the whole
    list; the resourceVersion makes a concurrent write by Kueue a 409, retried next tick)."""
    meta = wl.get("metadata") or {}
    kept = [
        c
        for c in (wl.get("status") or {}).get("conditions") or ()
        if c.get("type") not in {c["type"] for c in conditions}
    ]
    for c in conditions:
        c["observedGeneration"] = meta.get("generation")
    status: dict[str, Any] = {"conditions": kept + conditions}
    if clear_admission:
        status["admission"] = None
    t.rec.api.patch_status(
        "Workload",
        meta.get("namespace", ""),
        meta["name"],
        {"metadata": {"resourceVersion": meta.get("resourceVersion")}, "status": status},
    )
