"""A node hosting the job's pods is drained: a just-in-time checkpoint, then the Ray
cluster is made again elsewhere and resumes from it.

The job's PodDisruptionBudget (``manifests.disruption_budget``, ``maxUnavailable: 0``)
refuses every eviction of its Ray pods, so ``kubectl drain`` (or the cluster autoscaler,
a node upgrade, a spot-termination handler) cordons the node and then waits. This step
sees the cordon (``spec.unschedulable``, the ``node.kubernetes.io/unschedulable``
taint, or the cluster autoscaler's or Karpenter's taint before they drain: DRAIN_TAINTS)
on a node that hosts one of the job's live pods and asks the run for a last checkpoint
through the same path ``spec.suspend`` uses (:func:`lifecycle.last_checkpoint`: the
driver channel, bounded by ``suspend_checkpoint_seconds``). Then it stops the Ray job,
lifts the budget (deletes it) so that the drain's own eviction takes the pods on its node,
deletes the pods elsewhere, and once those on the node are evicted restarts the Ray
cluster as a new attempt (:func:`recovery.restart`, not counted against ``backoffLimit``)
on nodes that are not cordoned, its budget made again. The
outcome — the checkpoint the run resumes from and the steps lost — is an Event and
``status.disruption``.

Why the cordon and not only the eviction: an eviction the budget refuses leaves no trace
on the pod (the ``DisruptionTarget`` condition is set only on evictions that go through),
and a cordon is the first thing every drain does. A cordon alone (no drain following)
costs one restart from a checkpoint taken for it, no steps (the pods are deleted
EVICTION_WAIT_SECONDS after the budget is lifted).

``spec.checkpoint.onDisruption: false`` skips the checkpoint: the pods go at once and the
run resumes from its newest periodic checkpoint (the steps since then are lost and said).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from llmtrain.operator import lifecycle, recovery
from llmtrain.operator import manifests as m
from llmtrain.operator.effects import delete_pods, stop_ray_job
from llmtrain.operator.kube import ApiError
from llmtrain.operator.outcome import Event, parse_time, rfc3339
from llmtrain.operator.tick import Stop, Tick

from llmtrain.api.status import ConditionType, Reason

UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"
# What the node removers put on a node before they evict its pods: the cluster autoscaler's
# scale-down and Karpenter's disruption (both then evict through the eviction API, which the
# job's PodDisruptionBudget holds).
DRAIN_TAINTS = (UNSCHEDULABLE_TAINT, "ToBeDeletedByClusterAutoscaler", "karpenter.sh/disrupted")
# How long the drain is given to evict the pods on its node once the budget is lifted; after
# that (a node only cordoned, nobody evicting) the operator deletes them itself.
EVICTION_WAIT_SECONDS = 30.0
# A node's cordon is read at most this often per operator process (not per job and tick).
NODE_TTL_SECONDS = 5.0


def drain(t: Tick) -> Stop | None:
    """4b. A node of the job's live pods is cordoned: a just-in-time checkpoint (while
    training, ``spec.checkpoint.onDisruption``), then the budget is lifted so the drain
    evicts the pods on its node, and a new attempt starts on other nodes. Ends the tick
    while it waits or once it restarted."""
    if t.finished:
        return None
    st = t.st
    attempt = int(st.get("attempt") or 1)
    old = st.get("disruption") or {}
    # A drain of this attempt, not yet ended by a restart (a record without a node is
    # another yield's, e.g. a Kueue eviction's: that step handles it).
    current = bool(old.get("node")) and old.get("attempt") == attempt
    if not current:
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
    if not old.get("completionTime"):
        if old.get("justInTime") and lifecycle.last_checkpoint(t, Reason.Disrupted, doing):
            return Stop(f"{doing}: waiting for the just-in-time checkpoint")
        old = _let_go(t, dict(old))
    return _after_eviction(t, old, doing)


def _let_go(t: Tick, record: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint is there (or not asked for, or late): the outcome into status and an
    Event; the Ray job stopped, the budget lifted so that the drain's own eviction takes the
    pods on its node, and the pods elsewhere deleted."""
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
    kind = "Normal" if record["stepsLost"] == 0 else "Warning"
    t.out.events.append(Event(kind, Reason.Disrupted.value, _outcome(record)))
    stop_ray_job(t)
    # Lifted, not worked around: if the operator deleted the drained node's pods itself, the
    # new attempt's pods (same names) would exist when the drain retries its eviction by name
    # (every 5 s), and the budget would hold the drain on them until the job ends (seen with
    # kubectl drain). The drain's own eviction ends the old pods by uid instead.
    t.rec.api.delete("PodDisruptionBudget", t.job.namespace, m.disruption_budget_name(t.job.name))
    elsewhere = {n: p for n, p in t.live.items() if p.node != record["node"]}
    delete_pods(t, elsewhere, end_group=False)
    return record


def _after_eviction(t: Tick, record: Mapping[str, Any], doing: str) -> Stop:
    """The pods on the drained node evicted (or EVICTION_WAIT_SECONDS passed: a node only
    cordoned, nobody evicting): a new attempt on other nodes, resuming from the checkpoint;
    its budget and pods are made again by the children step."""
    left = sorted(n for n, p in t.live.items() if p.node == record["node"] and not p.deleting)
    released = parse_time(record.get("completionTime")) or t.now
    if left and (t.now - released).total_seconds() < EVICTION_WAIT_SECONDS:
        why = f"{doing}: the checkpoint is taken, the drain may evict {', '.join(left)}"
        t.conds.set(ConditionType.Running, True, Reason.Disrupted, why)
        t.out.requeue = f"{doing}: waiting for the drain to evict {', '.join(left)}"
        return Stop(t.out.requeue)
    recovery.restart(t, _outcome(record), Reason.BackoffLimitExceeded, counted=False)
    return Stop(f"{doing}: the Ray cluster is made again elsewhere")


def _outcome(record: Mapping[str, Any]) -> str:
    latest = record.get("checkpointStep")
    resumes = f"resumes from the checkpoint at step {latest}" if latest is not None else "starts over"
    return f"{record['cause']}: the run {resumes}, {record['stepsLost']} steps lost"


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
