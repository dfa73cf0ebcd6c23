"""A node hosting the job's pods is drained: a just-in-time checkpoint, then the Ray
cluster is made again elsewhere and resumes from it.

The job's PodDisruptionBudget (``manifests.disruption_budget``, ``maxUnavailable: 0``)
refuses every eviction of its Ray pods, so ``kubectl drain`` (or the cluster autoscaler,
a node upgrade, a spot-termination handler) cordons the node and then waits. This step
sees the cordon (``spec.unschedulable``, the ``node.kubernetes.io/unschedulable``
taint, or the cluster autoscaler's or Karpenter's taint before they drain: DRAIN_TAINTS) on a node that hosts one of the job's live pods, asks the run for a last
checkpoint through the same path ``spec.suspend`` uses (:func:`lifecycle.last_checkpoint`:
the driver channel, bounded by ``suspend_checkpoint_seconds``), and then restarts the Ray
cluster as a new attempt (:func:`recovery.restart`, not counted against
``backoffLimit``): the operator deletes the pods itself, which the budget does not block,
the drain finishes, and the new pods are scheduled on nodes that are not cordoned. The
outcome — the checkpoint the run resumes from and the steps lost — is an Event and
``status.disruption``.

Why the cordon and not only the eviction: an eviction the budget refuses leaves no trace
on the pod (the ``DisruptionTarget`` condition is set only on evictions that go through),
and a cordon is the first thing every drain does. A cordon alone (no drain following)
costs one restart from a checkpoint taken for it, no steps.

``spec.checkpoint.onDisruption: false`` skips the checkpoint: the pods go at once and the
run resumes from its newest periodic checkpoint (the steps since then are lost and said).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from llmtrain.operator import lifecycle, recovery
from llmtrain.operator.kube import ApiError
from llmtrain.operator.outcome import Event, rfc3339
from llmtrain.operator.tick import Stop, Tick

from llmtrain.api.status import Reason

UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"
# What the node removers put on a node before they evict its pods: the cluster autoscaler's
# scale-down and Karpenter's disruption (both then evict through the eviction API, which the
# job's PodDisruptionBudget holds).
DRAIN_TAINTS = (UNSCHEDULABLE_TAINT, "ToBeDeletedByClusterAutoscaler", "karpenter.sh/disrupted")
# A node's cordon is read at most this often per operator process (not per job and tick).
NODE_TTL_SECONDS = 5.0


def drain(t: Tick) -> Stop | None:
    """4b. A node of the job's live pods is cordoned: a just-in-time checkpoint (while
    training, ``spec.checkpoint.onDisruption``), then a new attempt on other nodes. Ends
    the tick while it waits or once it restarted."""
    if t.finished:
        return None
    st = t.st
    attempt = int(st.get("attempt") or 1)
    old = st.get("disruption") or {}
    # A drain of this attempt still waiting for its checkpoint (a record without a node is
    # another yield's, e.g. a Kueue eviction's: that step handles it).
    pending = bool(old.get("node")) and not old.get("completionTime") and old.get("attempt") == attempt
    if not pending:
        found = draining(t, (p.node for p in t.live.values() if p.node and not p.deleting))
        if found is None:
            return None
        node, cause = found
        step = int((st.get("progress") or {}).get("step") or 0)
        old = {
            "node": node,
            "cause": cause,
            "observedTime": rfc3339(t.now),
            "attempt": attempt,
            "step": step,
            "justInTime": t.job.checkpoint_on_disruption and _training(t),
        }
        st["disruption"] = old
        what = "asking for a just-in-time checkpoint" if old["justInTime"] else "no checkpoint asked for"
        t.out.events.append(
            Event("Warning", Reason.Disrupted.value, f"{cause}: {what} at step {step}, then the Ray pods go")
        )
    doing = f"node {old.get('node')} is drained"
    if old.get("justInTime") and lifecycle.last_checkpoint(t, Reason.Disrupted, doing):
        return Stop(f"{doing}: waiting for the just-in-time checkpoint")
    _let_go(t, dict(old))
    return Stop(f"{doing}: the Ray cluster is made again elsewhere")


def _let_go(t: Tick, record: dict[str, Any]) -> None:
    """The checkpoint is there (or not asked for, or late): the outcome into status and an
    Event, then a new attempt (the operator deletes the pods: the budget holds only
    evictions, so the drain then finishes)."""
    st = t.st
    asked = (st.get("rayJob") or {}).get("checkpointAskedStep")
    # The step the run had reached when asked is the driver's own answer (the snapshot in
    # status may lag it by a poll); without an ask, the step the status showed.
    reached = int(asked) if asked is not None else int(record.get("step") or 0)
    latest = (st.get("checkpoint") or {}).get("latestStep")
    record.update(
        step=reached,
        checkpointStep=latest,
        stepsLost=steps_lost(reached, latest),
        completionTime=rfc3339(t.now),
    )
    st["disruption"] = record
    resumes = f"resumes from the checkpoint at step {latest}" if latest is not None else "starts over"
    why = f"{record['cause']}: the run {resumes}, {record['stepsLost']} steps lost"
    kind = "Normal" if record["stepsLost"] == 0 else "Warning"
    t.out.events.append(Event(kind, Reason.Disrupted.value, why))
    recovery.restart(t, why, Reason.BackoffLimitExceeded, counted=False)


def steps_lost(reached: int, checkpoint_step: int | None) -> int:
    """Steps the run had done when the disruption was noticed that no checkpoint holds (0:
    the just-in-time checkpoint held them all). Steps trained in the grace window after
    that checkpoint are not counted: they were done on borrowed time."""
    return max(0, reached - (checkpoint_step or 0))


def draining(t: Tick, nodes: Iterable[str]) -> tuple[str, str] | None:
    """The first of ``nodes`` that is cordoned, with what says so; None if none is (or a
    node cannot be read: without the nodes' list right, drains are not seen)."""
    for node in sorted(set(nodes)):
        cause = _cordon(t, node)
        if cause is not None:
            return node, cause
    return None


def _cordon(t: Tick, node: str) -> str | None:
    rec = t.rec
    seen = rec._nodes.get(node)
    now = rec.clock()
    if seen is not None and now - seen[0] < NODE_TTL_SECONDS:
        return seen[1]
    try:
        body = rec.api.node(node)
    except ApiError:
        body = None
    cause = cordoned(body) if body is not None else None
    if cause is not None:
        cause = f"node {node} {cause}"
    rec.remember(rec._nodes, node, (now, cause))
    return cause


def cordoned(node: dict[str, Any]) -> str | None:
    """Why a node is being drained, from its body; None if it is not."""
    spec = node.get("spec") or {}
    if spec.get("unschedulable"):
        return "is cordoned (spec.unschedulable)"
    for taint in spec.get("taints") or ():
        if taint.get("key") in DRAIN_TAINTS:
            return f"has the {taint['key']} taint"
    return None


def _training(t: Tick) -> bool:
    return t.st.get("phase") == "Training" and (t.st.get("rayJob") or {}).get("status") == "RUNNING"
