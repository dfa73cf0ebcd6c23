"""The Kueue integration's reconcile (operator/kueue.py) over the fake API: a job with
``spec.resources.queueName`` makes a Workload and no pod until Kueue admits it; an eviction
deletes the pods, then hands the quota back; a finished job's Workload is marked Finished.
The same flow against the real Kueue: tests/integration/test_kueue.py."""

from __future__ import annotations

from typing import Any

from llmtrain.operator import kueue
from llmtrain.operator import manifests as m

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.status import ConditionType, Phase
from tests.unit.test_operator_fakes import JOB_UID, job_body, set_all
from tests.unit.test_operator_reconcile import Harness

WL = "llmtrainingjob-demo"
PENDING_MSG = "couldn't assign flavors to pod set workers: insufficient unused quota for nvidia.com/gpu in flavor gpu, 8 more needed"


def kueue_sets(h: Harness, **conds: tuple[str, str, str]) -> None:
    """Play Kueue: set the Workload's conditions (type → (status, reason, message))."""
    wl = h.api.objects[("Workload", "ns1", WL)]
    st = wl.setdefault("status", {})
    kept = [c for c in st.get("conditions", []) if c["type"] not in conds]
    st["conditions"] = kept + [
        {"type": t, "status": s, "reason": r, "message": msg, "lastTransitionTime": "2026-11-26T12:00:00Z"}
        for t, (s, r, msg) in conds.items()
    ]
    if conds.get("QuotaReserved", ("",))[0] == "True":
        st["admission"] = {"clusterQueue": "cq", "podSetAssignments": []}


def admit(h: Harness) -> None:
    kueue_sets(
        h,
        QuotaReserved=("True", "QuotaReserved", "Quota reserved in ClusterQueue cq"),
        Admitted=("True", "Admitted", "The workload is admitted"),
        Evicted=("False", "QuotaReserved", "Previously: evicted"),
    )


def test_workload_has_the_head_and_workers_with_their_gpus() -> None:
    body = job_body(resources={"workers": 3, "queueName": "team-a", "gpusPerWorker": 2})
    wl = kueue.workload(LLMTrainingJob.model_validate(body), m.OperatorSettings())
    assert wl["spec"]["queueName"] == "team-a"
    head, workers = wl["spec"]["podSets"]
    assert (head["name"], head["count"], workers["name"], workers["count"]) == ("head", 1, "workers", 3)
    (c,) = workers["template"]["spec"]["containers"]
    assert c["resources"]["requests"][m.GPU_RESOURCE] == "2"
    assert m.GPU_RESOURCE not in head["template"]["spec"]["containers"][0]["resources"]["requests"]


def test_queued_job_makes_no_pod_and_says_what_kueue_says() -> None:
    h = Harness(resources={"queueName": "team-a"})
    h.tick()
    wl = h.api.objects[("Workload", "ns1", WL)]
    assert wl["metadata"]["ownerReferences"][0]["uid"] == JOB_UID
    assert h.api.names("Pod") == set()
    kueue_sets(h, QuotaReserved=("False", "Pending", PENDING_MSG))
    h.tick(1)
    assert h.api.names("Pod") == set()
    assert h.status["phase"] == Phase.Pending
    for t in (ConditionType.Scheduled, ConditionType.Running):
        assert h.cond(t)["reason"] == "QueuedByKueue"
        assert PENDING_MSG in h.cond(t)["message"]


def test_admitted_job_makes_its_pods() -> None:
    h = Harness(resources={"queueName": "team-a"})
    h.tick()
    admit(h)
    h.tick(1)
    assert h.api.names("Pod") == {"demo-head", "demo-worker-0", "demo-worker-1"}
    for p in h.api.pods().values():  # admitted through the Workload: no plain-pod group labels
        assert not any(k.startswith("kueue.x-k8s.io/") for k in p["metadata"]["labels"])


def test_eviction_deletes_the_pods_then_hands_the_quota_back_and_resumes_as_a_new_attempt() -> None:
    h = Harness(resources={"queueName": "team-a"})
    h.tick()
    admit(h)
    h.tick(1)
    set_all(h.api, "running")
    h.tick(1)
    kueue_sets(
        h, Evicted=("True", "Preempted", "Preempted to accommodate a workload (UID: x) due to prioritization")
    )
    h.tick(1)
    assert h.api.names("Pod") == set()  # the fake API deletes at once
    assert "EvictedByKueue" in h.event_reasons()
    h.tick(1)
    wl = h.api.objects[("Workload", "ns1", WL)]
    assert "admission" not in wl["status"] or wl["status"]["admission"] is None
    conds = {c["type"]: c for c in wl["status"]["conditions"]}
    assert conds["QuotaReserved"]["status"] == "False" and conds["Admitted"]["status"] == "False"
    d = h.status["disruption"]
    assert d["cause"].startswith("evicted by Kueue (Preempted)") and d["stepsLost"] == 0 and d["attempt"] == 1
    assert h.status["phase"] == Phase.Pending
    assert h.api.names("Pod") == set()
    admit(h)
    h.tick(1)
    assert h.status["attempt"] == 2
    assert h.api.names("Pod") == {"demo-head", "demo-worker-0", "demo-worker-1"}


def test_finished_job_marks_its_workload_finished() -> None:
    h = Harness(resources={"queueName": "team-a"}, activeDeadlineSeconds=5)
    h.tick()
    admit(h)
    h.tick(1)
    h.tick(5)
    assert h.status["phase"] == Phase.Failed
    h.tick(1)
    conds: dict[str, Any] = {
        c["type"]: c for c in h.api.objects[("Workload", "ns1", WL)]["status"]["conditions"]
    }
    assert conds["Finished"]["status"] == "True" and conds["Finished"]["reason"] == "Failed"


def test_priority_class_label_gives_the_workload_its_priority() -> None:
    h = Harness(resources={"queueName": "team-a"})
    h.body["metadata"].setdefault("labels", {})[kueue.PRIORITY_CLASS_LABEL] = "high"
    h.tick()
    assert ("Workload", "ns1", WL) not in h.api.objects  # no such class: said, not guessed
    msg = h.cond(ConditionType.Scheduled)["message"]
    assert "metadata.labels.kueue.x-k8s.io/priority-class" in msg and "'high'" in msg
    h.api.objects[("WorkloadPriorityClass", "", "high")] = {"value": 1000}
    h.tick(1)
    spec = h.api.objects[("Workload", "ns1", WL)]["spec"]
    assert spec["priority"] == 1000
    assert spec["priorityClassRef"] == {
        "group": "kueue.x-k8s.io",
        "kind": "WorkloadPriorityClass",
        "name": "high",
    }


def test_finished_job_reads_its_workload_once() -> None:
    h = Harness(resources={"queueName": "team-a"}, activeDeadlineSeconds=5)
    h.tick()
    admit(h)
    h.tick(1)
    h.tick(5)
    h.tick(1)
    h.api.calls.clear()
    h.tick(30)
    assert ("get", "Workload", WL) not in h.api.calls
