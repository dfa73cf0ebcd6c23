"""Shared helpers of the operator unit tests: a job body, an in-memory API, pod states.

The pod statuses are shaped like what kube-scheduler 1.35 and the kubelet write (the
unschedulable message is the scheduler's verbatim format, recorded from the KWOK control
plane of tests/cluster).
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
from typing import Any

import pytest
from llmtrain.operator.diagnose import PodView, pod_view
from llmtrain.operator.kube import ApiError
from llmtrain.operator.outcome import apply_merge_patch

NOW = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)
JOB_UID = "11111111-2222-3333-4444-555555555555"

UNSCHEDULABLE_MSG = (  # recorded from kube-scheduler v1.35.4 on the KWOK control plane
    "0/6 nodes are available: 2 node(s) didn't match Pod's node affinity/selector, "
    "4 Insufficient nvidia.com/gpu. no new claims to deallocate, preemption: 0/6 nodes are available: "
    "6 Preemption is not helpful for scheduling."
)
TAINT_MSG = (
    "0/6 nodes are available: 2 node(s) didn't match Pod's node affinity/selector, "
    "4 node(s) had untolerated taint {nvidia.com/gpu: present}. preemption: 0/6 nodes are available: "
    "6 Preemption is not helpful for scheduling."
)


def spec(**resources: Any) -> dict[str, Any]:
    return {
        "data": {
            "sources": [{"name": "s", "pythonStdlib": {}}],
            "tokenizer": {"train": {"vocabSize": 512}},
            "outputUri": "s3://bucket/data",
        },
        "model": {
            "architecture": {"layers": 2, "dModel": 64, "heads": 4, "contextLength": 64},
            "init": {"random": {"seed": 0}},
        },
        "training": {
            "optimizer": {"type": "adamw", "lr": 0.001},
            "batch": {"globalBatchSize": 8, "microBatchSize": 4},
            "duration": {"maxSteps": 10},
        },
        "resources": {"workers": 2, **resources},
    }


def job_body(name: str = "demo", namespace: str = "ns1", **top: Any) -> dict[str, Any]:
    """A job as the API server returns it (uid, generation, creationTimestamp)."""
    resources = top.pop("resources", {})
    s = spec(**resources)
    s.update(top)
    return {
        "apiVersion": "llmtrain.dev/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": JOB_UID,
            "generation": 1,
            "creationTimestamp": "2026-11-26T11:59:00Z",
            "annotations": {},
        },
        "spec": s,
    }


class FakeApi:
    """An in-memory :class:`~llmtrain.operator.kube.KubeApi`: objects by (kind, ns, name)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.logs: dict[str, str] = {}  # pod → its Ray container's log (pod_log)
        self.fail: dict[str, ApiError] = {}  # verb → error raised once
        self._uids = (f"uid-{i}" for i in itertools.count())

    def _maybe_fail(self, verb: str) -> None:
        if verb in self.fail:
            raise self.fail.pop(verb)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        self.calls.append(("create", obj["kind"], obj["metadata"]["name"]))
        self._maybe_fail("create")
        if key in self.objects:
            raise ApiError(409, f"{key[0]} {key[2]} already exists")
        stored = copy.deepcopy(obj)
        stored["metadata"]["uid"] = next(self._uids)
        stored["metadata"]["creationTimestamp"] = "2026-11-26T12:00:00Z"
        self.objects[key] = stored
        return stored

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", kind, name))
        return self.objects.get((kind, namespace, name))

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        self.calls.append(("delete", kind, name))
        self._maybe_fail("delete")
        obj = self.objects.get((kind, namespace, name))
        if obj is None or (uid and obj["metadata"]["uid"] != uid):
            return False
        del self.objects[(kind, namespace, name)]
        return True

    def annotate(self, kind: str, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self.calls.append(("annotate", kind, name))
        obj = self.objects.get((kind, namespace, name))
        if obj is not None:
            obj["metadata"].setdefault("annotations", {}).update(annotations)

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        self.calls.append(("patch", kind, name))
        self._maybe_fail("patch")
        obj = self.objects.get((kind, namespace, name))
        if obj is None:
            return False
        apply_merge_patch(obj, copy.deepcopy(patch))
        return True

    def patch_status(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.calls.append(("patch_status", kind, name))
        obj = self.objects.get((kind, namespace, name))
        if obj is None:
            raise ApiError(404, f"{kind} {name} not found")
        apply_merge_patch(obj, copy.deepcopy({"status": patch.get("status")}))

    def workload_priority(self, name: str) -> int | None:
        self.calls.append(("get", "WorkloadPriorityClass", name))
        obj = self.objects.get(("WorkloadPriorityClass", "", name))
        return None if obj is None else int(obj["value"])

    def scheduler_events(self, namespace: str, pod: str) -> list[dict[str, Any]]:
        self.calls.append(("events", "Event", pod))
        return self.events.get(pod, [])

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        self.calls.append(("list", "Pod", selector))
        key, _, value = selector.partition("=")
        return [
            o
            for (k, ns, _), o in self.objects.items()
            if k == "Pod" and ns == namespace and (o["metadata"].get("labels") or {}).get(key) == value
        ]

    def node(self, name: str) -> dict[str, Any] | None:
        self.calls.append(("list", "Node", name))
        return self.objects.get(("Node", "", name))

    def pod_log(
        self, namespace: str, pod: str, container: str, *, tail_lines: int, previous: bool = False
    ) -> str:
        self.calls.append(("log", "Pod", pod))
        self._maybe_fail("log")
        return "\n".join(self.logs.get(pod, "").splitlines()[-tail_lines:])

    # ---- test helpers
    def put(self, kind: str, namespace: str, name: str, data: dict[str, str]) -> None:
        """A user's Secret or ConfigMap (values base64 for a Secret, as the API returns them)."""
        import base64

        if kind == "Secret":
            data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        self.objects[(kind, namespace, name)] = {
            "kind": kind,
            "metadata": {"name": name, "namespace": namespace, "uid": next(self._uids)},
            "data": data,
        }

    def pods(self) -> dict[str, dict[str, Any]]:
        return {k[2]: v for k, v in self.objects.items() if k[0] == "Pod"}

    def names(self, kind: str) -> set[str]:
        return {k[2] for k in self.objects if k[0] == kind}

    def verbs(self, verb: str, kind: str | None = None) -> list[str]:
        return [n for v, k, n in self.calls if v == verb and (kind is None or k == kind)]


def set_status(pod: dict[str, Any], state: str, *, message: str = "", exit_code: int = 1) -> dict[str, Any]:
    """Give a created pod the status the scheduler/kubelet would write for ``state``."""
    st: dict[str, Any]
    if state == "unschedulable":
        st = {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
            ],
        }
    elif state == "gated":
        pod["spec"]["schedulingGates"] = [{"name": "kueue.x-k8s.io/admission"}]
        st = {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "SchedulingGated",
                    "message": "Scheduling is blocked due to non-empty scheduling gates",
                }
            ],
        }
    elif state == "scheduled":
        pod["spec"]["nodeName"] = "gpu-node-0"
        st = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}
    elif state == "imagepull":
        pod["spec"]["nodeName"] = "gpu-node-0"
        st = {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [
                {
                    "name": "ray",
                    "state": {
                        "waiting": {
                            "reason": "ImagePullBackOff",
                            "message": 'Back-off pulling image "nope:1"',
                        }
                    },
                }
            ],
        }
    elif state == "running":
        pod["spec"]["nodeName"] = "gpu-node-0"
        st = {
            "phase": "Running",
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
            "containerStatuses": [
                {"name": "ray", "state": {"running": {"startedAt": "2026-11-26T12:00:30Z"}}}
            ],
        }
    elif state == "failed":
        pod["spec"]["nodeName"] = "gpu-node-0"
        st = {
            "phase": "Failed",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [
                {"name": "ray", "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}
            ],
        }
    else:
        raise ValueError(state)
    pod["status"] = st
    return pod


def views(api: FakeApi) -> dict[str, PodView]:
    """The pod index as the operator would hold it."""
    return {n: pod_view(p) for n, p in api.pods().items()}


def set_all(api: FakeApi, state: str, **kw: Any) -> None:
    for p in api.pods().values():
        set_status(p, state, **kw)


def test_fake_api_conflict_and_uid_guarded_delete() -> None:
    api = FakeApi()
    obj = {"kind": "Pod", "metadata": {"name": "p", "namespace": "n"}}
    created = api.create(copy.deepcopy(obj))
    with pytest.raises(ApiError) as e:
        api.create(copy.deepcopy(obj))
    assert e.value.status == 409
    assert api.delete("Pod", "n", "p", uid="other") is False
    assert api.delete("Pod", "n", "p", uid=created["metadata"]["uid"]) is True


class FakeRayJobs:
    """Ray's Jobs API and the driver's progress endpoint of one head, in memory
    (:class:`~llmtrain.operator.rayjobs.RayJobs`'s interface). ``down`` makes every call
    fail as a head that does not answer — the state right after the pods turn Running."""

    def __init__(self, down: bool = True) -> None:
        from llmtrain.operator.rayjobs import JobInfo

        self.JobInfo = JobInfo
        self.down = down
        self.jobs: dict[str, Any] = {}  # submission id → JobInfo
        self.posts: list[str] = []  # every submission POST, created or not
        self.bodies: dict[str, dict[str, Any]] = {}
        self.tokens: list[str] = []
        self.snapshot: Any = None  # RunSnapshot the driver serves, None: not serving
        self.logs_text: dict[str, str] = {}
        self.stopped: list[str] = []
        self.checkpoints_asked = 0

    def _check(self, token: str) -> None:
        from llmtrain.operator.rayjobs import HeadError

        if self.down:
            raise HeadError("connection refused")
        self.tokens.append(token)

    def submit(self, head: Any, token: str, body: dict[str, Any]) -> bool:
        self._check(token)
        sid = body["submission_id"]
        self.posts.append(sid)
        if sid in self.jobs:
            return False
        self.jobs[sid] = self.JobInfo("PENDING")
        self.bodies[sid] = body
        return True

    def status(self, head: Any, token: str, sid: str) -> Any:
        self._check(token)
        return self.jobs.get(sid)

    def progress(self, head: Any, token: str, sid: str) -> Any:
        from llmtrain.operator.rayjobs import HeadError, check_snapshot

        self._check(token)
        if self.snapshot is None:
            raise HeadError("connection refused (the driver is not serving yet)")
        # The driver refuses a request for another attempt (409 with its own id), as
        # RayJobs.progress turns into ForeignSnapshot.
        return check_snapshot(self.snapshot, sid, "progress")

    def checkpoint(self, head: Any, token: str, sid: str) -> int:
        from llmtrain.operator.rayjobs import ForeignSnapshot, HeadError

        self._check(token)
        if self.snapshot is not None and self.snapshot.submission_id != sid:
            raise ForeignSnapshot(sid, self.snapshot.submission_id, "checkpoint")
        if self.snapshot is None or self.snapshot.progress is None:
            raise HeadError("POST checkpoint: HTTP 409: no training runs")
        self.checkpoints_asked += 1
        return int(self.snapshot.progress.step)

    def logs(self, head: Any, token: str, sid: str) -> str:
        self._check(token)
        return self.logs_text.get(sid, "")

    def stop(self, head: Any, token: str, sid: str) -> None:
        self._check(token)
        self.stopped.append(sid)
        self.jobs[sid] = self.JobInfo("STOPPED")

    def end(self, sid: str, status: str, log: str = "") -> None:
        """The driver exits: the Ray job ends with ``status`` and ``log``."""
        self.jobs[sid] = self.JobInfo(status)
        self.logs_text[sid] = log
        self.snapshot = None
