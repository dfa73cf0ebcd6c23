"""Reconcile step 4b — a node of the job's pods is drained — over the in-memory API and
Jobs API, and the job's PodDisruptionBudget (a pure manifest). On the test cluster with
``kubectl drain``: tests/integration/test_operator_drain.py."""

from __future__ import annotations

from typing import Any

from llmtrain.operator import disruption
from llmtrain.operator import manifests as m

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import CheckpointEntry
from llmtrain.api.status import ConditionType, Phase
from tests.unit.test_operator_fakes import NOW, job_body, set_all
from tests.unit.test_operator_reconcile import Harness
from tests.unit.test_operator_run import running, snapshot

CKPT = {"uri": "s3://bucket/ck", "everySteps": 2}
T0 = NOW.timestamp()


def training(step: int, checkpoint_step: int, **checkpoint: Any) -> Harness:
    """A job training at ``step`` with a periodic checkpoint at ``checkpoint_step``; the
    reconciler's clock is the harness' (the node cache's TTL)."""
    h = running(checkpoint={**CKPT, **checkpoint})
    h.rec.clock = lambda: h.now.timestamp()
    h.tick(1)
    h.ray.jobs["demo-1"] = h.ray.JobInfo("RUNNING")
    h.ray.snapshot = snapshot(step)
    h.ray.snapshot.add_checkpoint(
        CheckpointEntry(checkpoint_step, f"s3://bucket/ck/step_{checkpoint_step}", T0)
    )
    h.tick(5)
    assert h.status["phase"] == Phase.Training
    return h


def cordon(h: Harness, node: str = "gpu-node-0", how: str = "spec") -> None:
    spec: dict[str, Any] = (
        {"unschedulable": True}
        if how == "spec"
        else {"taints": [{"key": disruption.UNSCHEDULABLE_TAINT, "effect": "NoSchedule"}]}
    )
    h.api.objects[("Node", "", node)] = {"kind": "Node", "metadata": {"name": node}, "spec": spec}


def evict(h: Harness, node: str = "gpu-node-0") -> None:
    """What the drain does once the budget is lifted: the pods on its node go."""
    for name, pod in list(h.api.pods().items()):
        if pod["spec"].get("nodeName") == node:
            del h.api.objects[("Pod", "ns1", name)]


def test_a_drained_node_gets_a_just_in_time_checkpoint_then_a_new_attempt_elsewhere() -> None:
    h = training(5, 2)
    h.api.pods()["demo-worker-1"]["spec"]["nodeName"] = "gpu-node-1"  # not on the drained node
    h.api.objects[("Node", "", "gpu-node-0")] = {
        "kind": "Node",
        "metadata": {"name": "gpu-node-0"},
        "spec": {},
    }
    h.tick(10)
    assert h.ray.checkpoints_asked == 0 and "disruption" not in h.status
    cordon(h)
    h.tick(10)  # past the node cache's TTL
    # Asked, through the suspend path (rayJob.checkpointAsked*); the pods and the budget stay.
    assert h.ray.checkpoints_asked == 1 and h.ray.stopped == [] and len(h.api.names("Pod")) == 3
    assert h.api.names("PodDisruptionBudget") == {"demo-ray"}
    d = h.status["disruption"]
    assert d["node"] == "gpu-node-0" and d["justInTime"] and d["step"] == 5 and "completionTime" not in d
    assert h.status["rayJob"]["checkpointAskedStep"] == 5
    running_cond = h.cond(ConditionType.Running)
    assert running_cond["reason"] == "Disrupted" and "node gpu-node-0 is drained" in running_cond["message"]
    assert "spec.unschedulable" in h.outs[-1].events[0].message
    h.ray.snapshot = snapshot(10)
    h.ray.snapshot.add_checkpoint(CheckpointEntry(10, "s3://bucket/ck/step_10", T0 + 30))
    out = h.tick(2)
    # The checkpoint is there: the Ray job stopped, the budget lifted, the pod elsewhere
    # deleted; those on the drained node are left to the drain's eviction.
    assert h.ray.stopped == ["demo-1"] and h.api.names("PodDisruptionBudget") == set()
    assert h.api.names("Pod") == {"demo-head", "demo-worker-0"}
    d = h.status["disruption"]
    assert d["checkpointStep"] == 10 and d["stepsLost"] == 0 and d["completionTime"]
    (ev,) = [e for e in out.events if e.reason == "Disrupted"]
    assert ev.type == "Normal" and "resumes from the checkpoint at step 10, 0 steps lost" in ev.message
    h.tick(2)
    assert (
        h.status["attempt"] == 1
        and "may evict demo-head, demo-worker-0" in h.cond(ConditionType.Running)["message"]
    )
    evict(h)
    h.tick(2)
    assert h.status["attempt"] == 2 and h.status["restarts"] == 0  # not counted against backoffLimit
    # The new attempt: its budget and pods are made (the scheduler puts them on other
    # nodes), and the finished disruption is not taken up again.
    h.api.objects.pop(("Node", "", "gpu-node-0"))
    h.tick(1)
    assert len(h.api.names("Pod")) == 3 and h.status["disruption"]["attempt"] == 1
    assert h.api.names("PodDisruptionBudget") == {"demo-ray"}


def test_without_the_jit_checkpoint_the_steps_since_the_periodic_one_are_lost() -> None:
    """spec.checkpoint.onDisruption: false — the negative control of the step above."""
    h = training(5, 2, onDisruption=False)
    cordon(h, how="taint")
    out = h.tick(6)  # past the node cache's TTL
    assert h.ray.checkpoints_asked == 0 and h.ray.stopped == ["demo-1"]
    d = h.status["disruption"]
    assert not d["justInTime"] and d["checkpointStep"] == 2 and d["stepsLost"] == 3
    assert "node.kubernetes.io/unschedulable taint" in d["cause"]
    warnings = [e for e in out.events if e.reason == "Disrupted" and e.type == "Warning"]
    assert any("3 steps lost" in e.message for e in warnings)
    assert h.status["checkpointContract"]["checkpointOnDisruption"] is False
    # Nobody evicts (a node only cordoned): the operator deletes the pods itself after the wait.
    h.tick(20)
    assert len(h.api.names("Pod")) == 3 and h.status["attempt"] == 1
    h.tick(disruption.EVICTION_WAIT_SECONDS)
    assert h.api.names("Pod") == set() and h.status["attempt"] == 2


def test_no_checkpoint_in_time_lets_the_pods_go_with_the_steps_lost() -> None:
    h = training(5, 2)
    cordon(h)
    h.tick(6)
    h.ray.snapshot = snapshot(9)  # trains on, no checkpoint
    h.tick(30)
    assert h.ray.stopped == []
    out = h.tick(31)  # over OperatorSettings.suspend_checkpoint_seconds
    assert h.ray.stopped == ["demo-1"] and h.status["disruption"]["stepsLost"] == 3
    assert any("no checkpoint within 60s" in e.message and "drained anyway" in e.message for e in out.events)


def test_a_drain_before_training_restarts_at_once_and_a_node_is_read_once_per_ttl() -> None:
    h = Harness(checkpoint=CKPT)
    h.rec.clock = lambda: h.now.timestamp()
    h.tick()
    set_all(h.api, "scheduled")
    h.tick(1)
    h.tick(1)
    assert h.api.verbs("list", "Node") == ["gpu-node-0"]  # cached between the two ticks
    cordon(h)
    h.tick(10)
    d = h.status["disruption"]
    assert not d["justInTime"] and d["stepsLost"] == 0 and "checkpointStep" not in d
    evict(h)
    h.tick(1)
    assert h.status["attempt"] == 2


def test_disruption_budget_holds_every_ray_pod_and_is_a_static_child() -> None:
    job = LLMTrainingJob.model_validate(job_body())
    pdb = m.disruption_budget(job)
    assert pdb["apiVersion"] == "policy/v1" and pdb["metadata"]["name"] == "demo-ray"
    assert pdb["spec"]["maxUnavailable"] == 0
    assert pdb["spec"]["selector"] == {"matchLabels": {m.LABEL_JOB: "demo"}}
    assert "unhealthyPodEvictionPolicy" not in pdb["spec"]  # a not-Ready head is held too
    # The selector selects exactly the job's pods.
    for pod in m.pods(job, m.OperatorSettings()):
        assert pod["metadata"]["labels"][m.LABEL_JOB] == "demo"
    kinds = [c["kind"] for c in m.static_children(job, m.OperatorSettings(), "t" * 64)]
    assert kinds[-1] == "PodDisruptionBudget"
    h = Harness()
    h.tick()
    assert h.api.names("PodDisruptionBudget") == {"demo-ray"}


def test_another_yields_pending_record_is_not_taken_for_a_drain() -> None:
    h = training(5, 2)
    h.body["status"]["disruption"] = {"cause": "evicted by Kueue", "observedTime": "x", "attempt": 1}
    h.tick(6)
    assert h.ray.checkpoints_asked == 0 and h.ray.stopped == [] and len(h.api.names("Pod")) == 3


def test_cordoned_reads_the_node_body() -> None:
    assert disruption.cordoned({"spec": {}}) is None
    assert disruption.cordoned({}) is None
    assert disruption.cordoned({"spec": {"unschedulable": True}}) == "is cordoned (spec.unschedulable)"
    taint = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
    assert "taint" in (disruption.cordoned({"spec": {"taints": [taint]}}) or "")
    assert disruption.cordoned({"spec": {"taints": [{"key": "other", "effect": "NoSchedule"}]}}) is None
    for key in ("ToBeDeletedByClusterAutoscaler", "karpenter.sh/disrupted"):
        assert key in (
            disruption.cordoned({"spec": {"taints": [{"key": key, "effect": "NoSchedule"}]}}) or ""
        )
    assert disruption.steps_lost(10, 10) == 0 and disruption.steps_lost(10, None) == 10
    assert disruption.steps_lost(7, 10) == 0
