"""The reconciler over an in-memory API and recorded pod states: no cluster, no Kopf loop."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from llmtrain.operator import manifests as m
from llmtrain.operator.kube import ApiError
from llmtrain.operator.outcome import Outcome, apply_merge_patch, rfc3339
from llmtrain.operator.reconcile import Reconciler
from llmtrain.operator.tick import ANN_CLEANED_UP, ANN_SUSPENDED_SECONDS

from llmtrain.api.status import CONDITION_REASONS, ConditionType, LLMTrainingJobStatus, Phase
from tests.unit.test_operator_fakes import (
    JOB_UID,
    NOW,
    TAINT_MSG,
    UNSCHEDULABLE_MSG,
    FakeApi,
    FakeRayJobs,
    job_body,
    set_all,
    set_status,
    views,
)


class Harness:
    """One job, the fake API, and Kopf's part: apply the outcome's patch to the body."""

    def __init__(self, **top: Any) -> None:
        self.api = FakeApi()
        self.ray = FakeRayJobs()
        self.rec = Reconciler(self.api, m.OperatorSettings(), token=lambda: "t" * 64, ray=self.ray)  # type: ignore[arg-type]
        self.body = job_body(**top)
        self.now = NOW
        self.outs: list[Outcome] = []
        self._spec: str | None = None

    def tick(self, seconds: float = 0, pods: dict[str, Any] | None = None) -> Outcome:
        self.now += dt.timedelta(seconds=seconds)
        # Like the API server: a spec change bumps metadata.generation.
        spec = json.dumps(self.body["spec"], sort_keys=True)
        if spec != self._spec:
            if self._spec is not None:
                self.body["metadata"]["generation"] += 1
            self._spec = spec
        out = self.rec.reconcile(self.body, views(self.api) if pods is None else pods, self.now)
        if out.status is not None:  # a merge patch, applied as the API server does
            apply_merge_patch(self.body.setdefault("status", {}), out.status)
        ann = self.body["metadata"]["annotations"]
        for k, v in out.annotations.items():
            if v is None:
                ann.pop(k, None)
            else:
                ann[k] = v
        # Every status written must be valid for the CRD's status schema.
        LLMTrainingJobStatus.model_validate(self.body.get("status") or {})
        self.outs.append(out)
        return out

    @property
    def status(self) -> dict[str, Any]:
        return dict(self.body.get("status") or {})

    def cond(self, t: ConditionType) -> dict[str, Any]:
        return next(c for c in self.status["conditions"] if c["type"] == t.value)

    def event_reasons(self) -> list[str]:
        return [e.reason for o in self.outs for e in o.events]


# ----------------------------------------------------------------------------- create


def test_create_makes_every_child_owned_by_the_job() -> None:
    h = Harness()
    out = h.tick()
    assert h.api.names("Pod") == {"demo-head", "demo-worker-0", "demo-worker-1"}
    assert h.api.names("Secret") == {"demo-ray-auth"}
    assert h.api.names("ConfigMap") == {"demo-spec"}
    assert h.api.names("Service") == {"demo-head-svc"}
    assert h.api.names("NetworkPolicy") == {"demo-ray"}
    for obj in h.api.objects.values():
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["uid"] == JOB_UID and ref["kind"] == "LLMTrainingJob" and ref["controller"] is True
    # Children before pods: the pods mount the ConfigMap and read the Secret.
    creates = h.api.verbs("create")
    assert creates.index("demo-ray-auth") < creates.index("demo-head")
    assert creates.index("demo-spec") < creates.index("demo-head")
    assert h.status["phase"] == Phase.Provisioning
    assert h.cond(ConditionType.Scheduled)["message"] == "3 pods waiting for the scheduler"
    assert h.status["rayClusterName"] == "demo"
    assert h.status["startTime"] == rfc3339(NOW)
    assert h.status["observedGeneration"] == 1
    assert "llmtrain.dev/attempt-started-at" not in h.body["metadata"]["annotations"]  # clock: startTime
    assert "PodsCreated" in [e.reason for e in out.events]


def test_steady_job_costs_no_api_calls() -> None:
    h = Harness()
    h.tick()
    set_all(h.api, "running")
    h.tick(5)
    h.api.calls.clear()
    out = h.tick(5)
    assert h.api.calls == []
    assert out.status is None  # nothing changed: no status write either
    assert out.events == []


def test_index_lag_does_not_duplicate_children() -> None:
    h = Harness()
    h.tick()
    before = dict(h.api.objects)
    h.api.calls.clear()
    out = h.tick(1, pods={})  # the watch has not delivered the new pods yet
    # This process just made them: no API call at all (no 409 + GET storm while the index lags).
    assert h.api.calls == []
    assert h.cond(ConditionType.Scheduled)["message"] == "3 pods waiting for the scheduler"
    # A restarted operator has no such memory: create-if-absent, 409, owner checked, no duplicates.
    h.rec = Reconciler(h.api, m.OperatorSettings(), token=lambda: "t" * 64)
    out = h.tick(1, pods={})
    assert h.api.objects.keys() == before.keys()
    assert out.error is None
    assert len(h.api.verbs("create", "Pod")) == 3 and len(h.api.verbs("get", "Pod")) == 3
    assert "PodsCreated" not in [e.reason for e in out.events]  # nothing was created
    # Still not in the index a minute later: look again rather than trust the memory.
    t = [0.0]
    h2 = Harness()
    h2.rec.clock = lambda: t[0]
    h2.tick()
    h2.api.calls.clear()
    t[0] = 30.0
    h2.tick(30, pods={})
    assert h2.api.verbs("create", "Pod") == []
    t[0] = 61.0
    h2.tick(31, pods={})
    assert len(h2.api.verbs("create", "Pod")) == 3


def test_foreign_object_with_our_name_is_reported_not_adopted() -> None:
    h = Harness()
    h.api.objects[("Pod", "ns1", "demo-head")] = {
        "kind": "Pod",
        "metadata": {
            "name": "demo-head",
            "namespace": "ns1",
            "uid": "x",
            "ownerReferences": [{"uid": "another-job", "controller": True}],
        },
    }
    out = h.tick()
    assert out.error and "not owned by this job" in out.error
    assert "NameConflict" in [e.reason for e in out.events]


def test_create_error_is_surfaced() -> None:
    h = Harness()
    h.api.fail["create"] = ApiError(403, 'pods "demo-head" is forbidden: exceeded quota')
    out = h.tick()
    assert out.error and "exceeded quota" in out.error
    assert any(e.type == "Warning" and e.reason == "CreateFailed" for e in out.events)


# ------------------------------------------------------------------------- diagnosis


def test_unschedulable_job_is_pending_with_the_schedulers_words() -> None:
    h = Harness(resources={"gpusPerWorker": 16})
    h.tick()
    set_status(h.api.pods()["demo-head"], "running")
    for n in ("demo-worker-0", "demo-worker-1"):
        set_status(h.api.pods()[n], "unschedulable", message=UNSCHEDULABLE_MSG)
    h.tick(2)
    assert h.status["phase"] == Phase.Pending
    sched = h.cond(ConditionType.Scheduled)
    assert (sched["status"], sched["reason"]) == ("False", "Unschedulable")
    assert "2/3 pods unschedulable" in sched["message"]
    assert "demo-worker-0, demo-worker-1: 0/6 nodes are available" in sched["message"]
    assert "4 Insufficient nvidia.com/gpu" in sched["message"]
    running = h.cond(ConditionType.Running)
    assert (running["status"], running["reason"]) == ("False", "Unschedulable")
    assert any(e.type == "Warning" and e.reason == "Unschedulable" for o in h.outs for e in o.events)


def test_distinct_messages_are_listed_per_pod_group() -> None:
    h = Harness()
    h.tick()
    set_status(h.api.pods()["demo-head"], "running")
    set_status(h.api.pods()["demo-worker-0"], "unschedulable", message=UNSCHEDULABLE_MSG)
    set_status(h.api.pods()["demo-worker-1"], "unschedulable", message=TAINT_MSG)
    h.tick(1)
    msg = h.cond(ConditionType.Scheduled)["message"]
    assert "demo-worker-0: 0/6" in msg and "demo-worker-1: 0/6" in msg and "untolerated taint" in msg


def test_scheduler_event_is_read_when_the_condition_has_no_message() -> None:
    h = Harness()
    h.tick()
    set_all(h.api, "unschedulable", message="")
    h.api.events["demo-worker-0"] = [{"message": "old"}, {"message": TAINT_MSG}]
    h.tick(1)
    msg = h.cond(ConditionType.Scheduled)["message"]
    assert "demo-worker-0: " + TAINT_MSG in msg
    assert "no message yet" in msg  # the pods without events say so


def test_stuck_container_is_named() -> None:
    h = Harness()
    h.tick()
    set_all(h.api, "imagepull")
    h.tick(1)
    assert h.status["phase"] == Phase.Provisioning
    assert h.cond(ConditionType.Scheduled)["reason"] == "AllPodsScheduled"
    assert "ray ImagePullBackOff" in h.cond(ConditionType.Running)["message"]


def test_all_running_means_ray_cluster_ready() -> None:
    h = Harness()
    h.tick()
    set_all(h.api, "scheduled")
    h.tick(1)
    assert h.status["phase"] == Phase.Provisioning
    assert h.cond(ConditionType.Running)["message"].startswith("all 3 pods scheduled, 0/3 Running")
    set_all(h.api, "running")
    out = h.tick(9)
    assert h.cond(ConditionType.Scheduled)["reason"] == "AllPodsScheduled"
    assert h.cond(ConditionType.Running)["message"].startswith(
        "Ray cluster ready: 1 head + 2 workers Running"
    )
    assert out.provisioning_seconds == pytest.approx(10)
    assert "RayClusterReady" in [e.reason for e in out.events]
    again = h.tick(5)
    assert again.provisioning_seconds is None and again.events == [] and again.status is None


def test_phase_written_by_the_training_run_is_kept() -> None:
    h = Harness()
    h.tick()
    set_all(h.api, "running")
    h.tick(1)
    h.body["status"]["phase"] = "Training"
    out = h.tick(1)
    # Only the checkpoint contract, which follows the phase (now training: work at risk).
    assert out.status is not None and set(out.status) == {"checkpointContract"}
    assert out.status["checkpointContract"]["training"] is True
    assert h.status["phase"] == "Training"
    assert h.tick(1).status is None


def test_last_transition_time_moves_only_when_status_changes() -> None:
    h = Harness()
    h.tick()
    set_all(h.api, "unschedulable", message=UNSCHEDULABLE_MSG)
    h.tick(1)
    t0 = h.cond(ConditionType.Scheduled)["lastTransitionTime"]
    set_all(h.api, "unschedulable", message=TAINT_MSG)
    h.tick(10)
    assert h.cond(ConditionType.Scheduled)["lastTransitionTime"] == t0  # still False
    set_all(h.api, "running")
    h.tick(10)
    assert h.cond(ConditionType.Scheduled)["lastTransitionTime"] == rfc3339(h.now)


def test_conditions_of_other_owners_are_kept() -> None:
    h = Harness()
    h.body["status"] = {
        "conditions": [
            {
                "type": "DataReady",
                "status": "True",
                "reason": "DataReused",
                "message": "",
                "lastTransitionTime": "2026-11-26T11:00:00Z",
            }
        ]
    }
    h.tick()
    types = [c["type"] for c in h.status["conditions"]]
    assert types[0] == "DataReady" and "Scheduled" in types and "Running" in types


def test_every_reason_written_is_documented_for_its_type() -> None:
    """Drive a job through every state and check each condition against CONDITION_REASONS."""
    h = Harness(preRunningDeadlineSeconds=30, resources={"queueName": "q"})
    h.tick()  # queued by Kueue (operator/kueue.py): its Workload made, no pod yet; then admitted
    h.api.objects[("Workload", "ns1", "llmtrainingjob-demo")]["status"] = {
        "conditions": [
            {
                "type": t,
                "status": "True",
                "reason": t,
                "message": "",
                "lastTransitionTime": "2026-11-26T12:00:00Z",
            }
            for t in ("QuotaReserved", "Admitted")
        ]
    }
    for state in ("gated", "unschedulable", "scheduled", "running"):
        set_all(h.api, state, message=UNSCHEDULABLE_MSG)
        h.tick(1)
    h.body["spec"]["suspend"] = True
    h.tick(1)
    h.body["spec"]["suspend"] = False
    h.tick(1)
    set_all(h.api, "unschedulable", message=UNSCHEDULABLE_MSG)
    h.tick(60)
    assert h.status["phase"] == Phase.Failed
    for o in h.outs:
        for c in (o.status or {}).get("conditions", []):
            assert c["reason"] in {r.value for r in CONDITION_REASONS[ConditionType(c["type"])]}, c


# --------------------------------------------------------------------------- deadlines


def test_pre_running_deadline_fails_with_the_diagnosis() -> None:
    h = Harness(preRunningDeadlineSeconds=60)
    h.tick()
    set_all(h.api, "unschedulable", message=UNSCHEDULABLE_MSG)
    h.tick(59)
    assert h.status["phase"] == Phase.Pending  # negative control: not yet
    h.tick(1)
    assert h.status["phase"] == Phase.Failed
    failed = h.cond(ConditionType.Failed)
    assert failed["reason"] == "PreRunningDeadlineExceeded"
    assert "spec.preRunningDeadlineSeconds=60" in failed["message"]
    assert "4 Insufficient nvidia.com/gpu" in failed["message"]
    running = h.cond(ConditionType.Running)
    assert (running["status"], running["reason"]) == ("False", "PreRunningDeadlineExceeded")
    assert h.status["completionTime"] == rfc3339(h.now)
    assert h.api.names("Pod") == set()  # GPUs freed; Service/Secret stay until the TTL
    assert h.api.names("Service") == {"demo-head-svc"}


def test_pre_running_deadline_does_not_apply_once_running() -> None:
    h = Harness(preRunningDeadlineSeconds=10)
    h.tick()
    set_all(h.api, "running")
    h.tick(5)
    h.tick(100)
    assert h.status["phase"] == Phase.Provisioning


def test_active_deadline() -> None:
    h = Harness(activeDeadlineSeconds=100)
    h.tick()
    set_all(h.api, "running")
    h.tick(99)
    assert h.status["phase"] != Phase.Failed
    h.tick(1)
    assert h.status["phase"] == Phase.Failed
    assert h.cond(ConditionType.Failed)["reason"] == "DeadlineExceeded"
    assert h.api.names("Pod") == set()


def test_active_deadline_does_not_count_time_suspended() -> None:
    h = Harness(activeDeadlineSeconds=100)
    h.tick()
    h.tick(50)
    h.body["spec"]["suspend"] = True
    h.tick(0)
    h.tick(1000)  # suspended for a long time
    h.body["spec"]["suspend"] = False
    h.tick(0)
    assert h.status["suspendedSeconds"] == 1000
    assert ANN_SUSPENDED_SECONDS not in h.body["metadata"]["annotations"]  # status: users cannot write it
    assert h.status["phase"] != Phase.Failed
    h.tick(49)
    assert h.status["phase"] != Phase.Failed
    h.tick(1)
    assert h.status["phase"] == Phase.Failed


# ----------------------------------------------------------------------------- suspend


def test_suspend_deletes_pods_keeps_status_and_resume_recreates() -> None:
    h = Harness()
    h.tick()
    set_all(h.api, "running")
    h.tick(1)
    start = h.status["startTime"]
    h.body["spec"]["suspend"] = True
    h.tick(1)
    assert h.api.names("Pod") == set()
    assert h.api.names("Secret") == {"demo-ray-auth"}  # only the pods go
    assert h.status["phase"] == Phase.Suspended
    assert h.cond(ConditionType.Suspended)["reason"] == "SuspendedByUser"
    assert h.cond(ConditionType.Running)["reason"] == "SuspendedByUser"
    assert h.status["startTime"] == start
    h.tick(5)
    assert h.api.names("Pod") == set()  # stays suspended
    h.body["spec"]["suspend"] = False
    h.tick(1)
    assert h.api.names("Pod") == {"demo-head", "demo-worker-0", "demo-worker-1"}
    assert h.cond(ConditionType.Suspended)["status"] == "False"
    assert h.cond(ConditionType.Suspended)["reason"] == "Resumed"
    assert "Resumed" in h.event_reasons() and "SuspendedByUser" in h.event_reasons()


def test_created_suspended_creates_no_pods_and_no_start_time() -> None:
    h = Harness(suspend=True)
    h.tick()
    assert h.api.names("Pod") == set()
    assert "startTime" not in h.status
    assert h.status["phase"] == Phase.Suspended


# ------------------------------------------------------------------------------ restarts


def test_failed_pod_restarts_the_cluster_then_backoff_limit_fails_the_job() -> None:
    h = Harness(backoffLimit=1)
    h.tick()
    set_all(h.api, "running")
    h.tick(1)
    set_status(h.api.pods()["demo-worker-1"], "failed", exit_code=137)
    stale = views(h.api)
    out = h.tick(1)
    assert out.restarted and h.status["restarts"] == 1
    assert any(e.type == "Warning" and e.reason == "Restarting" for e in out.events)
    assert h.cond(ConditionType.Running)["reason"] == "Restarting"
    assert "demo-worker-1 (worker) ended Failed (exit code 137" in h.cond(ConditionType.Running)["message"]
    assert h.api.names("Pod") == set()
    # The index may still show the failed pod: it must not be counted twice.
    out = h.tick(1, pods=stale)
    assert not out.restarted and h.status["restarts"] == 1
    h.tick(1)
    assert h.api.names("Pod") == {"demo-head", "demo-worker-0", "demo-worker-1"}
    set_status(h.api.pods()["demo-head"], "failed", exit_code=1)
    h.tick(1)
    assert h.status["phase"] == Phase.Failed
    assert h.cond(ConditionType.Failed)["reason"] == "BackoffLimitExceeded"
    assert "spec.backoffLimit=1" in h.cond(ConditionType.Failed)["message"]


def test_backoff_limit_zero_fails_on_first_pod_exit() -> None:
    h = Harness(backoffLimit=0)
    h.tick()
    set_all(h.api, "running")
    set_status(h.api.pods()["demo-head"], "failed", exit_code=1)
    h.tick(1)
    assert h.status["phase"] == Phase.Failed
    assert h.status["restarts"] == 0


# ----------------------------------------------------------------------------------- TTL


def test_ttl_after_finished_deletes_the_ray_cluster_and_keeps_the_job() -> None:
    h = Harness(activeDeadlineSeconds=10, ttlSecondsAfterFinished=30)
    h.tick()
    h.tick(10)
    assert h.status["phase"] == Phase.Failed
    h.tick(29)
    assert h.api.names("Service") == {"demo-head-svc"}  # not yet
    out = h.tick(1)
    assert h.api.objects == {}
    assert ANN_CLEANED_UP in h.body["metadata"]["annotations"]
    assert "RayClusterDeleted" in [e.reason for e in out.events]
    h.api.calls.clear()
    h.tick(100)
    assert h.api.calls == []  # done once
    assert h.status["phase"] == Phase.Failed


def test_ttl_deletes_only_this_jobs_own_children() -> None:
    """After the TTL the children go by name only when this job owns them, and only that
    incarnation (uid precondition): a same-named Secret someone else made stays."""
    h = Harness(activeDeadlineSeconds=10, ttlSecondsAfterFinished=30)
    h.tick()
    h.tick(10)
    foreign = h.api.objects[("Secret", "ns1", "demo-ray-auth")]
    foreign["metadata"]["ownerReferences"] = [{"uid": "someone-else"}]
    out = h.tick(30)
    assert set(h.api.objects) == {("Secret", "ns1", "demo-ray-auth")}
    assert [e.message for e in out.events if e.reason == "NotOwned"] == [
        "Secret demo-ray-auth is not this job's: left in place after the TTL"
    ]
    assert ("delete", "Secret", "demo-ray-auth") not in h.api.calls


def test_no_ttl_keeps_the_ray_cluster_objects() -> None:
    h = Harness(activeDeadlineSeconds=10)
    h.tick()
    h.tick(10)
    h.tick(10_000)
    assert h.api.names("Service") == {"demo-head-svc"}


# ---------------------------------------------------------------------------- bad input


def test_invalid_spec_fails_with_the_field_to_fix() -> None:
    h = Harness(
        resources={
            "env": [{"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "a", "key": "b"}}}]
        }
    )
    h.tick()
    assert h.status["phase"] == Phase.Failed
    failed = h.cond(ConditionType.Failed)
    assert failed["reason"] == "InvalidSpec"
    assert "spec.resources.env[0].name" in failed["message"]
    assert h.api.names("Pod") == set()


def test_pods_of_a_previous_incarnation_are_not_ours() -> None:
    h = Harness()
    h.tick()
    set_all(h.api, "running")
    old = views(h.api)
    h.body["metadata"]["uid"] = "new-uid"
    h.api.objects.clear()
    h.body.pop("status")
    out = h.tick(1, pods=old)  # old pods still in the index, being GC'd
    assert h.status["phase"] == Phase.Provisioning
    assert out.requeue and "not owned by this job" in out.requeue
    assert h.api.names("Pod") == set()  # nothing created under the old pods' names
