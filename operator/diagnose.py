"""What the job's pods say about why the job waits: pure functions over pod bodies.

The pod store (:mod:`llmtrain.operator.podwatch`) keeps a :class:`PodView` per pod, a few
hundred bytes instead of the whole body, so the operator's memory stays flat at
thousands of pods. The reconciler then asks :func:`diagnose` for the cluster's state and
a message a user can act on — the scheduler's own words ("0/6 nodes are available:
4 Insufficient nvidia.com/gpu, 2 node(s) had untolerated taint …") read from the pods'
``PodScheduled`` condition, or from their ``FailedScheduling`` events when the condition
has no message yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from llmtrain.operator.manifests import KUEUE_ADMISSION_GATE, LABEL_JOB, LABEL_ROLE, RAY_CONTAINER

from llmtrain.api.status import Reason

# Container waiting reasons that will not fix themselves: surfaced at once.
IMAGE_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName"})
CONFIG_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})
STUCK_WAITING_REASONS = IMAGE_REASONS | CONFIG_REASONS | {"CrashLoopBackOff"}
# What the user can do about each kind, appended to the kubelet's own words.
IMAGE_HINT = "fix spec.resources.image (or its pull secret): the stuck pods are made again with it"
CONFIG_HINT = (
    "a Secret, ConfigMap or key the pod references is missing: create it and the kubelet starts the container"
)


@dataclass(frozen=True, slots=True)
class PodView:
    """The parts of a pod the reconciler needs."""

    name: str
    namespace: str
    job: str
    role: str
    uid: str
    owner_uid: str | None
    phase: str
    created: str | None
    deleting: bool
    node: str | None
    scheduled: str | None  # PodScheduled condition status: True/False/None (no condition yet)
    sched_reason: str | None
    sched_message: str | None
    gates: tuple[str, ...]
    waiting: tuple[tuple[str, str, str], ...]  # (container, reason, message) of stuck containers
    exit_code: int | None  # the Ray container's, once terminated
    exit_reason: str | None
    running_since: str | None  # latest container start: when the pod as a whole was Running
    annotations: tuple[tuple[str, str], ...]
    image: str | None = None  # the Ray container's image, as the pod spec says
    # The Ray container ran in a container runtime (its status has a containerID), so the
    # kubelet has a log of it; KWOK's played containers have none.
    ran: bool = False

    @property
    def running(self) -> bool:
        return self.phase == "Running" and not self.deleting

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def queued_by_kueue(self) -> bool:
        return KUEUE_ADMISSION_GATE in self.gates

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)


def pod_view(body: Mapping[str, Any]) -> PodView:
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    labels = meta.get("labels") or {}
    owner_uid = next(
        (o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("controller")),
        None,
    )
    sched = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    waiting: list[tuple[str, str, str]] = []
    exit_code: int | None = None
    exit_reason: str | None = None
    ran = False
    started: list[str] = []
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        state = cs.get("state") or {}
        w = state.get("waiting")
        if w and w.get("reason") in STUCK_WAITING_REASONS:
            waiting.append((cs.get("name", "?"), w["reason"], w.get("message", "")))
        r = state.get("running")
        if r and r.get("startedAt"):
            started.append(r["startedAt"])
        t = state.get("terminated")
        if t and cs.get("name") == RAY_CONTAINER:
            exit_code = t.get("exitCode")
            exit_reason = t.get("reason")
        if cs.get("name") == RAY_CONTAINER and (cs.get("containerID") or (t or {}).get("containerID")):
            ran = True
    image = next(
        (c.get("image") for c in spec.get("containers") or [] if c.get("name") == RAY_CONTAINER), None
    )
    return PodView(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        job=labels.get(LABEL_JOB, ""),
        role=labels.get(LABEL_ROLE, ""),
        uid=meta.get("uid", ""),
        owner_uid=owner_uid,
        phase=status.get("phase") or "Pending",
        created=meta.get("creationTimestamp"),
        deleting=bool(meta.get("deletionTimestamp")),
        node=spec.get("nodeName"),
        scheduled=sched.get("status") if sched else None,
        sched_reason=sched.get("reason") if sched else None,
        sched_message=sched.get("message") if sched else None,
        gates=tuple(g.get("name", "") for g in spec.get("schedulingGates") or []),
        waiting=tuple(waiting),
        exit_code=exit_code,
        exit_reason=exit_reason,
        running_since=max(started) if started and status.get("phase") == "Running" else None,
        annotations=tuple(sorted((meta.get("annotations") or {}).items())),
        image=image,
        ran=ran,
    )


class ClusterState(StrEnum):
    """The Ray cluster as a whole, worst first."""

    Failed = "Failed"  # a pod terminated
    Stuck = "Stuck"  # a container cannot start (image pull, config error)
    Queued = "Queued"  # Kueue holds the pod group
    Unschedulable = "Unschedulable"  # the scheduler cannot place a pod
    Waiting = "Waiting"  # pods missing, being created, or not yet looked at by the scheduler
    Starting = "Starting"  # all scheduled, containers starting
    Ready = "Ready"  # every pod Running


@dataclass(frozen=True)
class Diagnosis:
    state: ClusterState
    message: str
    scheduled: int
    running: int
    expected: int
    failed_pod: str | None = None
    reason: Reason | None = None  # the Running condition's reason when it is not the state's own


def _group(items: Iterable[tuple[str, str]]) -> str:
    """'a, b: msg1; c: msg2' — pods with the same message listed once."""
    by_msg: dict[str, list[str]] = {}
    for pod, msg in items:
        by_msg.setdefault(msg, []).append(pod)
    return "; ".join(f"{', '.join(sorted(names))}: {msg}" for msg, names in by_msg.items())


EventLookup = Callable[[PodView], str | None]


def diagnose(
    expected: list[str],
    pods: Mapping[str, PodView],
    scheduler_event: EventLookup | None = None,
) -> Diagnosis:
    """State and a message for the pods ``expected`` (by name) given the observed ``pods``.

    ``scheduler_event`` returns the latest ``FailedScheduling`` event message of a pod;
    it costs an API call, so it is only asked for unschedulable pods whose condition
    carries no message.
    """
    present = [pods[n] for n in expected if n in pods and not pods[n].deleting]
    missing = [n for n in expected if n not in pods or pods[n].deleting]
    scheduled = sum(1 for p in present if p.scheduled == "True" or p.node)
    running = sum(1 for p in present if p.running)
    n = len(expected)

    def d(
        state: ClusterState, message: str, failed: str | None = None, reason: Reason | None = None
    ) -> Diagnosis:
        return Diagnosis(state, message, scheduled, running, n, failed, reason)

    finished = [p for p in present if p.finished]
    if finished:
        p = finished[0]
        why = f"exit code {p.exit_code}" if p.exit_code is not None else "no exit code"
        if p.exit_reason:
            why += f", {p.exit_reason}"
        return d(ClusterState.Failed, f"pod {p.name} ({p.role}) ended {p.phase} ({why})", p.name)

    stuck = [(p.name, c, r, m, p.image) for p in present for c, r, m in p.waiting]
    if stuck:
        return stuck_diagnosis(stuck, d)

    queued = [p.name for p in present if p.queued_by_kueue]
    if queued:
        return d(
            ClusterState.Queued,
            f"{len(queued)}/{n} pods wait for admission by Kueue (scheduling gate {KUEUE_ADMISSION_GATE})",
        )

    unschedulable = [p for p in present if p.scheduled == "False" and p.sched_reason == "Unschedulable"]
    if unschedulable:
        msgs: list[tuple[str, str]] = []
        for p in unschedulable:
            msg = p.sched_message or (scheduler_event(p) if scheduler_event else None)
            msgs.append((p.name, msg or "the scheduler found no node (no message yet)"))
        return d(
            ClusterState.Unschedulable,
            f"{len(unschedulable)}/{n} pods unschedulable: {_group(msgs)}",
        )

    if missing or scheduled < n:
        parts = []
        if missing:
            parts.append(f"{len(missing)}/{n} pods not created yet")
        if scheduled < n - len(missing):
            parts.append(f"{n - len(missing) - scheduled} pods waiting for the scheduler")
        return d(ClusterState.Waiting, ", ".join(parts))

    if running < n:
        return d(ClusterState.Starting, f"all {n} pods scheduled, {running}/{n} Running")

    return d(ClusterState.Ready, f"Ray cluster ready: 1 head + {n - 1} workers Running")


Stuck = tuple[str, str, str, str, str | None]  # (pod, container, waiting reason, message, image)


def stuck_message(container: str, reason: str, message: str, image: str | None) -> str:
    """One stuck container in the kubelet's words; an image error names the image even when
    the kubelet's message does not (InvalidImageName's, for one)."""
    head = f"container {container} {reason}"
    if reason in IMAGE_REASONS and image and f'"{image}"' not in message:
        head += f' (image "{image}")'
    return f"{head}: {message}" if message else head


def stuck_diagnosis(stuck: list[Stuck], d: Callable[..., Diagnosis]) -> Diagnosis:
    """State Stuck, the kubelet's messages grouped by pod, and a reason and hint by kind:
    an image that cannot be pulled, or a configuration the kubelet cannot assemble."""
    reasons = {r for _, _, r, _, _ in stuck}
    if reasons & IMAGE_REASONS:
        reason, hint = Reason.ImagePullFailed, IMAGE_HINT
    elif reasons & CONFIG_REASONS:
        reason, hint = Reason.ContainerConfigError, CONFIG_HINT
    else:  # CrashLoopBackOff only (a Ray pod never restarts a container: restartPolicy Never)
        reason, hint = Reason.Provisioning, "the container keeps exiting"
    text = _group((pod, stuck_message(c, r, m, image)) for pod, c, r, m, image in stuck)
    return d(ClusterState.Stuck, f"{text} ({hint})", reason=reason)


def server_trouble(pods: Iterable[PodView]) -> tuple[str, tuple[str, str] | None] | None:
    """Why spec.serve's pods have no ready replica, when a container cannot start or keeps
    crashing (a Deployment restarts it: CrashLoopBackOff): the kubelet's words grouped by pod,
    and the (pod, container) of the first crash-looping one, whose last log lines say why.
    None when no container is stuck (the server is still loading the model)."""
    stuck = [(p.name, c, r, m) for p in pods if not p.deleting for c, r, m in p.waiting]
    if not stuck:
        return None
    looping = next(((pod, c) for pod, c, r, _ in stuck if r == "CrashLoopBackOff"), None)
    return _group((pod, stuck_message(c, r, m, None)) for pod, c, r, m in stuck), looping
