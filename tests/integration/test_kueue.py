# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as arguments)
"""``spec.resources.queueName`` against the real Kueue (``build.sh kueue``, run on the host
by tests/cluster/kueue/kueuerunner.py with its CRDs and webhooks): the operator makes one
Workload per job and no pod until Kueue admits it (operator/kueue.py, docs/kueue.md).

* GPU quota as the KWOK GPU nodes have it (4 × 8): two jobs of 24 GPUs each, one admitted,
  the other ``Pending``/``QueuedByKueue`` with Kueue's own words, and no pod of it at all
  (the gang is admitted whole or not at all: no half-started Ray cluster holds GPUs); the
  first deleted → the second admitted, its pods made.
* CPU quota for one tiny job at a time, trained on the local Ray stand-in: the second job
  waits while the first trains, then is admitted and trains when the first finishes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_operator_lifecycle import Api, Operator, api, crds, job_manifest, operator  # noqa: F401 (fixtures)
from test_operator_run import corpus, run_operator, standin, tiny_job  # noqa: F401 (fixtures)

from tests.data.datahelpers import S3Server, s3_server  # noqa: F401 (fixture)
from tests.raystandin import RayStandIn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster" / "kueue"))
import kueuerunner

Cluster = Any
pytestmark = [pytest.mark.cluster]

GPU_QUOTA = 32  # the KWOK GPU nodes: 4 × 8 nvidia.com/gpu


@pytest.fixture(scope="module")
def kueue(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[kueuerunner.Kueue]:
    why = kueuerunner.missing()
    if why:
        pytest.skip(why)
    k = kueuerunner.Kueue(cluster.cp, tmp_path_factory.mktemp("kueue")).start()
    yield k
    k.stop()


def queues(cluster: Cluster, ns: str, resources: dict[str, Any], **cq_spec: Any) -> Iterator[str]:
    """A ResourceFlavor, a ClusterQueue with ``resources`` as nominal quota (cluster-scoped:
    named after the test's namespace) and the namespace's LocalQueue ``team``."""
    cq = f"cq-{ns}"
    objs = [
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": "default-flavor"},
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": cq},
            "spec": {
                **cq_spec,
                "namespaceSelector": {},
                "resourceGroups": [
                    {
                        "coveredResources": list(resources),
                        "flavors": [
                            {
                                "name": "default-flavor",
                                "resources": [{"name": k, "nominalQuota": v} for k, v in resources.items()],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": "team", "namespace": ns},
            "spec": {"clusterQueue": cq},
        },
    ]
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
    yield cq
    cluster.kubectl(
        "delete", "llmtrainingjobs", "--all", "-n", ns, "--wait=true", "--timeout=60s", check=False
    )
    cluster.kubectl("delete", "localqueue", "team", "-n", ns, "--ignore-not-found", check=False)
    cluster.kubectl("delete", "clusterqueue", cq, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture
def gpu_queue(cluster: Cluster, namespace: str, kueue: kueuerunner.Kueue) -> Iterator[str]:
    yield from queues(cluster, namespace, {"cpu": 1000, "memory": "10Ti", "nvidia.com/gpu": GPU_QUOTA})


def workload(api: Api, job: str) -> dict[str, Any]:
    out: dict[str, Any] = api.c.custom.get_namespaced_custom_object(
        "kueue.x-k8s.io", "v1beta2", api.ns, "workloads", f"llmtrainingjob-{job}"
    )
    return out


def wl_cond(api: Api, job: str, ctype: str) -> dict[str, Any]:
    try:
        conds = (workload(api, job).get("status") or {}).get("conditions") or []
    except Exception:  # not made yet
        return {}
    return next((c for c in conds if c["type"] == ctype), {})


def show(api: Api) -> str:
    """`kubectl get ltj` and `kubectl get workloads`, as the report shows them."""
    ltj = api.c.kubectl("get", "ltj", "-n", api.ns).stdout
    wls = api.c.kubectl("get", "workloads", "-n", api.ns).stdout
    return f"$ kubectl get ltj\n{ltj}$ kubectl get workloads\n{wls}"


def test_over_quota_job_waits_with_kueues_words_and_no_pod_then_runs_when_the_first_goes(
    api: Api, operator: Operator, gpu_queue: str, kueue: kueuerunner.Kueue
) -> None:
    api.create(job_manifest("first", resources={"queueName": "team"}))  # 24 of 32 GPUs
    api.wait(lambda: wl_cond(api, "first", "Admitted").get("status") == "True", "first admitted", timeout=60)
    api.wait(lambda: api.running("first", 4), "first's 4 pods Running", timeout=60)

    api.create(job_manifest("second", resources={"queueName": "team"}))  # 24 more: over quota
    msg = api.wait(
        lambda: (
            "insufficient unused quota" in (m := api.cond("second", "Scheduled").get("message", "")) and m
        ),
        "second queued with Kueue's reason",
        timeout=60,
    )
    st = api.status("second")
    assert st["phase"] == "Pending", show(api)
    assert api.cond("second", "Scheduled")["reason"] == "QueuedByKueue"
    assert api.cond("second", "Running")["reason"] == "QueuedByKueue"
    # Kueue's own words: its QuotaReserved condition on the Workload, verbatim.
    said = wl_cond(api, "second", "QuotaReserved")["message"]
    assert said.startswith("couldn't assign flavors to pod set") and said in msg, msg
    # The gang: not one pod of the queued job, for a while (no half-started Ray cluster).
    for _ in range(10):
        assert api.pods("second") == [], show(api)
        time.sleep(0.3)
    print(show(api))

    api.c.kubectl("delete", "ltj", "first", "-n", api.ns, "--wait=true", "--timeout=60s")
    api.wait(
        lambda: wl_cond(api, "second", "Admitted").get("status") == "True", "second admitted", timeout=60
    )
    api.wait(lambda: api.running("second", 4), "second's 4 pods Running", timeout=60)
    assert api.cond("second", "Scheduled")["reason"] != "QueuedByKueue"
    print(show(api))


def test_a_gang_is_admitted_whole_or_not_at_all(
    api: Api, operator: Operator, gpu_queue: str, kueue: kueuerunner.Kueue
) -> None:
    """Three workers of 12 GPUs (36) never fit the 32 the queue has: no pod is ever made,
    not even the head and the two workers that would fit."""
    api.create(job_manifest("toobig", resources={"queueName": "team", "gpusPerWorker": 12}))
    api.wait(
        lambda: wl_cond(api, "toobig", "QuotaReserved").get("reason") == "Pending",
        "toobig pending",
        timeout=60,
    )
    said = wl_cond(api, "toobig", "QuotaReserved")["message"]
    assert "nvidia.com/gpu" in said, said
    api.wait(
        lambda: said in api.cond("toobig", "Scheduled").get("message", ""), "Kueue's words in the condition"
    )
    for _ in range(10):
        assert api.pods("toobig") == [], show(api)
        time.sleep(0.3)
    print(said)


# ------------------------------------------------------------------ trained on the Ray stand-in


@pytest.fixture
def cpu_queue(cluster: Cluster, namespace: str, kueue: kueuerunner.Kueue) -> Iterator[str]:
    # One tiny job at a time: its head and one worker (tiny_job's resources) fit, two do not.
    yield from queues(cluster, namespace, {"cpu": 3, "memory": "64Gi"})


@pytest.mark.ray
def test_queued_job_trains_when_the_first_finishes(
    api: Api,
    run_operator: Operator,
    cpu_queue: str,
    standin: RayStandIn,
    corpus: str,
    s3_server: S3Server,
) -> None:
    for name in ("qa", "qb"):
        job = tiny_job(name, corpus, s3_server.endpoint)
        job["spec"]["resources"]["queueName"] = "team"
        api.create(job)
    api.wait(lambda: api.status("qa").get("phase") == "Training", "qa training", timeout=120)
    assert api.status("qb")["phase"] == "Pending" and api.pods("qb") == [], show(api)
    assert "insufficient unused quota for cpu" in api.cond("qb", "Scheduled")["message"]
    print(show(api))
    api.wait_phase("qa", "Succeeded", timeout=300)
    api.wait(lambda: wl_cond(api, "qa", "Finished").get("status") == "True", "qa's Workload Finished")
    api.wait_phase("qb", "Succeeded", timeout=300)
    st = api.status("qb")
    assert st["progress"]["step"] == 120 and st["attempt"] == 1
    print(show(api))


# ------------------------------------------------------- preemption with a last checkpoint


@pytest.fixture
def preempting_queue(cluster: Cluster, namespace: str, kueue: kueuerunner.Kueue) -> Iterator[str]:
    """One tiny job's CPU; a higher WorkloadPriorityClass preempts a lower one."""
    classes = [
        {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "WorkloadPriorityClass",
            "metadata": {"name": f"{p}-{namespace}"[:63]},
            "value": v,
        }
        for p, v in (("low", 100), ("high", 1000))
    ]
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": classes})
    )
    yield from queues(
        cluster, namespace, {"cpu": 3, "memory": "64Gi"}, preemption={"withinClusterQueue": "LowerPriority"}
    )
    for c in classes:
        cluster.kubectl(
            "delete", "workloadpriorityclass", c["metadata"]["name"], "--ignore-not-found", check=False
        )


def preempted_then_resumed(
    api: Api, corpus: str, endpoint: str, on_disruption: bool, low: str = "low", high: str = "high"
) -> dict[str, Any]:
    """A low-priority job trains past its first periodic checkpoint (step 40); a high one
    arrives and Kueue preempts the low one; the high one trains to the end, then the low one
    is admitted again and trains. The low one's status then. ``low``, ``high``: their names (and S3
    prefix: the module's tests share one bucket, and a prefix holds one job's output)."""
    name = low
    job = tiny_job(name, corpus, endpoint)
    job["metadata"]["labels"] = {"kueue.x-k8s.io/priority-class": f"low-{api.ns}"[:63]}
    job["spec"]["resources"]["queueName"] = "team"
    job["spec"]["training"]["duration"] = {"maxSteps": 400}
    job["spec"]["checkpoint"]["onDisruption"] = on_disruption
    api.create(job)

    def past_a_checkpoint() -> bool:
        st = api.status(name)
        latest = (st.get("checkpoint") or {}).get("latestStep")
        return latest is not None and (st.get("progress") or {}).get("step", 0) >= latest + 15

    api.wait(past_a_checkpoint, "low 15 steps past a periodic checkpoint", timeout=480)
    hjob = tiny_job(high, corpus, endpoint)
    hjob["metadata"]["labels"] = {"kueue.x-k8s.io/priority-class": f"high-{api.ns}"[:63]}
    hjob["spec"]["resources"]["queueName"] = "team"
    api.create(hjob)
    api.wait(
        lambda: wl_cond(api, name, "Evicted").get("status") == "True", "low evicted by Kueue", timeout=60
    )
    api.wait(lambda: api.status(high).get("phase") == "Training", "high training", timeout=180)
    print(show(api))  # during the preemption
    assert api.status(name)["phase"] == "Pending" and api.pods(name) == [], show(api)
    api.wait_phase(high, "Succeeded", timeout=300)
    api.wait(lambda: api.status(name).get("attempt") == 2, "low admitted again (attempt 2)", timeout=120)
    api.wait(lambda: api.status(name).get("phase") == "Training", "low training again", timeout=180)
    print(show(api))  # after readmission
    return api.status(name)


@pytest.mark.ray
@pytest.mark.slow
def test_preempted_job_checkpoints_yields_and_resumes_from_it(
    api: Api,
    run_operator: Operator,
    preempting_queue: str,
    standin: RayStandIn,
    corpus: str,
    s3_server: S3Server,
) -> None:
    st = preempted_then_resumed(api, corpus, s3_server.endpoint, on_disruption=True)
    d = st["disruption"]
    print("status.disruption:", json.dumps(d, indent=1))
    assert d["cause"].startswith("evicted by Kueue (Preempted)"), d
    assert d["justInTime"] is True
    # The last checkpoint holds every step done when Kueue preempted: none lost.
    assert d["checkpointStep"] >= d["step"] > 40 and d["stepsLost"] == 0, d
    resumed = api.wait(
        lambda: (api.status("low")["checkpoint"].get("resumedFrom") or {}).get("step"), "resumed"
    )
    # Attempt 2 started from it (a later periodic one may have been taken and used since).
    assert resumed >= d["checkpointStep"], api.status("low")["checkpoint"]
    said = [e.message for e in api.events("low") if e.reason == "Resumed"]
    assert any(f"resumes from the checkpoint at step {d['checkpointStep']}" in m for m in said), said
    st = api.wait_phase("low", "Succeeded", timeout=300)
    assert st["progress"]["step"] == 400 and st["attempt"] == 2


@pytest.mark.ray
@pytest.mark.slow
def test_preempted_job_without_the_last_checkpoint_loses_the_steps_since_the_periodic_one(
    api: Api,
    run_operator: Operator,
    preempting_queue: str,
    standin: RayStandIn,
    corpus: str,
    s3_server: S3Server,
) -> None:
    """The negative control: spec.checkpoint.onDisruption: false — the run resumes from its
    periodic checkpoint at step 40 and the steps past it are lost, and said."""
    st = preempted_then_resumed(
        api, corpus, s3_server.endpoint, on_disruption=False, low="low-no-jit", high="high-no-jit"
    )
    d = st["disruption"]
    print("status.disruption:", json.dumps(d, indent=1))
    assert d["justInTime"] is False and d["checkpointStep"] % 40 == 0
    assert d["stepsLost"] == d["step"] - d["checkpointStep"] > 0, d
