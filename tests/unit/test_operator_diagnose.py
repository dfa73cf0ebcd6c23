"""Pod bodies → PodView → the cluster's state and a message a user can act on."""

from __future__ import annotations

import copy
from typing import Any

from llmtrain.operator.diagnose import ClusterState, PodView, diagnose, pod_view

from tests.unit.test_operator_fakes import UNSCHEDULABLE_MSG

# A worker as kube-apiserver v1.35.4 returned it on the KWOK control plane (trimmed spec).
RECORDED_UNSCHEDULABLE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "creationTimestamp": "2026-11-26T12:31:40Z",
        "labels": {
            "app.kubernetes.io/managed-by": "llmtrain-operator",
            "llmtrain.dev/job": "big",
            "llmtrain.dev/role": "worker",
            "llmtrain.dev/worker-index": "0",
            "ray.io/cluster": "big",
            "ray.io/node-type": "worker",
        },
        "name": "big-worker-0",
        "namespace": "default",
        "ownerReferences": [
            {
                "apiVersion": "llmtrain.dev/v1alpha1",
                "blockOwnerDeletion": True,
                "controller": True,
                "kind": "LLMTrainingJob",
                "name": "big",
                "uid": "5f0f3f0e-9a43-4c0e-a3c4-5d0a3c7b8e11",
            }
        ],
        "uid": "0b7d1c53-3c2e-4d2a-9f0e-2f6d2e1f9a10",
    },
    "spec": {"containers": [{"name": "ray", "image": "ghcr.io/llmtrain/llmtrain:0.1.0"}]},
    "status": {
        "conditions": [
            {
                "lastProbeTime": None,
                "lastTransitionTime": "2026-11-26T12:31:40Z",
                "message": UNSCHEDULABLE_MSG,
                "observedGeneration": 1,
                "reason": "Unschedulable",
                "status": "False",
                "type": "PodScheduled",
            }
        ],
        "phase": "Pending",
        "qosClass": "Guaranteed",
    },
}


def view(**over: Any) -> PodView:
    body = copy.deepcopy(RECORDED_UNSCHEDULABLE)
    for k, v in over.items():
        body[k] = v
    return pod_view(body)


def running(name: str, role: str = "worker") -> PodView:
    body = copy.deepcopy(RECORDED_UNSCHEDULABLE)
    body["metadata"]["name"] = name
    body["metadata"]["labels"]["llmtrain.dev/role"] = role
    body["spec"]["nodeName"] = "gpu-node-1"
    body["status"] = {
        "phase": "Running",
        "conditions": [{"type": "PodScheduled", "status": "True"}],
        "containerStatuses": [{"name": "ray", "state": {"running": {"startedAt": "2026-11-26T12:31:45Z"}}}],
    }
    return pod_view(body)


def test_pod_view_reads_the_recorded_pod() -> None:
    v = pod_view(RECORDED_UNSCHEDULABLE)
    assert (v.name, v.namespace, v.job, v.role) == ("big-worker-0", "default", "big", "worker")
    assert v.owner_uid == "5f0f3f0e-9a43-4c0e-a3c4-5d0a3c7b8e11"
    assert (v.scheduled, v.sched_reason) == ("False", "Unschedulable")
    assert v.sched_message == UNSCHEDULABLE_MSG
    assert v.phase == "Pending" and not v.running and not v.finished and not v.deleting


def test_only_the_ray_containers_exit_counts() -> None:
    body = copy.deepcopy(RECORDED_UNSCHEDULABLE)
    body["status"] = {
        "phase": "Failed",
        "initContainerStatuses": [{"name": "wait-gcs-ready", "state": {"terminated": {"exitCode": 0}}}],
        "containerStatuses": [
            {"name": "ray", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
        ],
    }
    v = pod_view(body)
    assert (v.exit_code, v.exit_reason, v.finished) == (137, "OOMKilled", True)


def test_state_priority_worst_first() -> None:
    names = ["big-head", "big-worker-0"]
    head = running("big-head", "head")
    unsched = view()
    assert diagnose(names, {"big-head": head, "big-worker-0": unsched}).state == ClusterState.Unschedulable
    gated = view(spec={"schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]})
    assert diagnose(names, {"big-head": head, "big-worker-0": gated}).state == ClusterState.Queued
    failed = pod_view({**RECORDED_UNSCHEDULABLE, "status": {"phase": "Failed"}})
    d = diagnose(names, {"big-head": failed, "big-worker-0": unsched})
    assert d.state == ClusterState.Failed and d.failed_pod == "big-worker-0"
    assert "ended Failed (no exit code)" in d.message
    assert diagnose(names, {"big-head": head}).state == ClusterState.Waiting
    d = diagnose(names, {"big-head": head, "big-worker-0": running("big-worker-0")})
    assert d.state == ClusterState.Ready and (d.running, d.expected) == (2, 2)


def test_deleting_pods_count_as_missing() -> None:
    body = copy.deepcopy(RECORDED_UNSCHEDULABLE)
    body["metadata"]["deletionTimestamp"] = "2026-11-26T12:40:00Z"
    d = diagnose(["big-worker-0"], {"big-worker-0": pod_view(body)})
    assert d.state == ClusterState.Waiting and "1/1 pods not created yet" in d.message


def test_event_lookup_only_when_the_condition_is_silent() -> None:
    asked: list[str] = []

    def lookup(p: PodView) -> str | None:
        asked.append(p.name)
        return "from the event"

    diagnose(["big-worker-0"], {"big-worker-0": view()}, lookup)
    assert asked == []  # the condition had the message: no API call
    silent = copy.deepcopy(RECORDED_UNSCHEDULABLE)
    silent["status"]["conditions"][0]["message"] = ""
    d = diagnose(["big-worker-0"], {"big-worker-0": pod_view(silent)}, lookup)
    assert asked == ["big-worker-0"] and "from the event" in d.message
