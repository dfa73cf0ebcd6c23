"""The operator on the real control plane with KWOK GPU nodes (tests/cluster).

The operator runs as a subprocess (``python -m llmtrain.operator``), watching one
test namespace, so it can be killed and restarted like a pod. Nothing here connects to a
pod or service IP: everything is observed through the API server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.manifests import gpu_job

# conftest.Cluster (tests/integration is not a package, so it is not importable by name).
Cluster = Any

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "llmtrain.dev", "v1alpha1", "llmtrainingjobs"
TEST_EXIT = "llmtrain.dev/test-exit"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


job_manifest = gpu_job


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> None:
    """The LLMTrainingJob CRD as ``llmtrain crd`` generates it, and Kopf's peering CRDs."""
    from llmtrain.operator.main import peering_crds

    from llmtrain.api.crd import crd_yaml

    r = cluster.kubectl("apply", "-f", "-", input=crd_yaml(), check=False)
    assert r.returncode == 0, f"the generated CRD was rejected by the apiserver:\n{r.stderr}"
    items = {"apiVersion": "v1", "kind": "List", "items": peering_crds()}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(items))
    for crd in ("llmtrainingjobs.llmtrain.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        # Polled, not `kubectl wait`: that errors out while status.conditions is still absent.
        cluster.wait_for(
            lambda crd=crd: any(
                c.type == "Established" and c.status == "True"
                for c in (cluster.apiext.read_custom_resource_definition(crd).status.conditions or [])
            ),
            timeout=30,
            what=f"CRD {crd} Established",
        )


class Operator:
    """One operator process; ``start()``/``kill()`` as often as a test likes."""

    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        tmp: Path,
        peering: bool = False,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.env = env or {}  # on top of the cluster's, read at each start
        self.namespace = namespace
        self.tmp = tmp
        self.peering = peering
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.metrics_port = _free_port()

    def start(self) -> None:
        live = _free_port()
        self.metrics_port = _free_port()
        args = [
            sys.executable,
            "-m",
            "llmtrain.operator",
            "--namespace",
            self.namespace,
            "--interval",
            "0.5",
            "--liveness-port",
            str(live),
            "--metrics-port",
            str(self.metrics_port),
            "--bind-address",
            "127.0.0.1",
            "--kubeconfig",
            str(self.cluster.kubeconfig),
        ]
        if not self.peering:
            args.append("--standalone")
        args.extend(self.extra)
        self.starts += 1
        log = open(self.tmp / f"operator-{self.starts}.log", "wb")
        # Not from the repository root: its operator/ folder would shadow the standard
        # library's ``operator`` module (llmtrain.operator comes from the editable install).
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**self.cluster.env, **self.env}, cwd=self.tmp
        )

        def alive() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{live}/healthz", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        self.cluster.wait_for(alive, timeout=60, what="operator liveness endpoint")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
            return str(r.read().decode())

    def full_log(self) -> str:
        """Every line every start of this operator wrote."""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("operator-*.log")))

    def log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp.glob("operator-*.log"))
        )


def serve(op: Operator) -> Iterator[Operator]:
    """Run ``op`` for a test. At the end the namespace's jobs are deleted while an operator
    still runs: a job whose Ray job may run holds the operator's finalizer
    (llmtrain.dev/stop-ray-job), and the namespace would otherwise hang in Terminating."""
    op.start()
    yield op
    if op.proc is None:
        op.start()
    op.cluster.kubectl(
        "delete", PLURAL, "--all", "-n", op.namespace, "--wait=true", "--timeout=60s", check=False
    )
    op.kill(signal.SIGTERM)


@pytest.fixture
def operator(cluster: Cluster, namespace: str, crds: None, tmp_path: Path) -> Iterator[Operator]:
    yield from serve(Operator(cluster, namespace, tmp_path))


# ------------------------------------------------------------------------------ helpers


class Api:
    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.c = cluster
        self.ns = namespace

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self.c.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.ns, PLURAL, body
        )
        return out

    def job(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.c.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.ns, PLURAL, name
        )
        return out

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.c.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec})

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.job(name).get("status") or {})

    def cond(self, name: str, ctype: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == ctype), {})

    def pods(self, name: str) -> list[Any]:
        return list(self.c.core.list_namespaced_pod(self.ns, label_selector=f"llmtrain.dev/job={name}").items)

    def wait(self, fn: Callable[[], Any], what: str, timeout: float = 30) -> Any:
        return self.c.wait_for(fn, timeout=timeout, interval=0.2, what=what)

    def wait_phase(self, name: str, phase: str, timeout: float = 30) -> dict[str, Any]:
        st: dict[str, Any] = self.wait(
            lambda: (s := self.status(name)).get("phase") == phase and s, f"{name} phase {phase}", timeout
        )
        return st

    def running(self, name: str, n: int) -> bool:
        ps = self.pods(name)
        return len(ps) == n and all(p.status.phase == "Running" for p in ps)

    def events(self, name: str) -> list[Any]:
        return list(
            self.c.core.list_namespaced_event(
                self.ns, field_selector=f"involvedObject.kind=LLMTrainingJob,involvedObject.name={name}"
            ).items
        )

    def children(self, name: str) -> dict[str, list[str]]:
        sel = f"llmtrain.dev/job={name}"
        core, net = self.c.core, _networking(self.c)
        return {
            "pods": [p.metadata.name for p in core.list_namespaced_pod(self.ns, label_selector=sel).items],
            "services": [
                s.metadata.name for s in core.list_namespaced_service(self.ns, label_selector=sel).items
            ],
            "secrets": [
                s.metadata.name for s in core.list_namespaced_secret(self.ns, label_selector=sel).items
            ],
            "configmaps": [
                c.metadata.name for c in core.list_namespaced_config_map(self.ns, label_selector=sel).items
            ],
            "networkpolicies": [
                n.metadata.name for n in net.list_namespaced_network_policy(self.ns, label_selector=sel).items
            ],
        }


def _networking(cluster: Cluster) -> Any:
    from kubernetes import client

    return client.NetworkingV1Api(cluster.api_client)


@pytest.fixture
def api(cluster: Cluster, namespace: str) -> Api:
    return Api(cluster, namespace)


# --------------------------------------------------------------------------------- tests


def test_create_runs_pods_on_gpu_nodes_with_status_and_printer_columns(
    api: Api, operator: Operator, cluster: Cluster
) -> None:
    job = api.create(job_manifest("demo"))
    api.wait(lambda: api.running("demo", 4), "4 pods Running", timeout=40)
    pods = {p.metadata.name: p for p in api.pods("demo")}
    assert sorted(pods) == ["demo-head", "demo-worker-0", "demo-worker-1", "demo-worker-2"]
    for n in ("demo-worker-0", "demo-worker-1", "demo-worker-2"):
        assert pods[n].spec.node_name.startswith("gpu-node-")
        assert pods[n].spec.containers[0].resources.limits["nvidia.com/gpu"] == "8"
    assert pods["demo-head"].spec.node_name.startswith("cpu-node-")  # the head needs no GPU
    st = api.wait(
        lambda: (
            (s := api.status("demo")).get("conditions")
            and any(c["type"] == "Scheduled" and c["status"] == "True" for c in s["conditions"])
            and "Ray cluster ready" in api.cond("demo", "Running").get("message", "")
            and s
        ),
        "status: all scheduled, Ray cluster ready",
    )
    assert st["phase"] == "Provisioning"
    assert st["rayClusterName"] == "demo"
    assert st["observedGeneration"] == 1
    assert st["startTime"]
    # Printer columns: Phase and Reason (from the Running condition).
    out = cluster.kubectl("get", "ltj", "demo", "-n", api.ns).stdout
    header, row = out.splitlines()[:2]
    assert header.split()[:2] == ["NAME", "PHASE"] and header.split()[-1] == "REASON"
    assert row.split()[1] == "Provisioning" and row.split()[-1] == "Provisioning"
    described = cluster.kubectl("describe", "ltj", "demo", "-n", api.ns).stdout
    assert "Ray cluster ready: 1 head + 3 workers Running" in described
    assert "PodsCreated" in described and "RayClusterReady" in described
    # Every child exists, was accepted by the apiserver, and is owned by the job.
    kids = api.children("demo")
    assert kids == {
        "pods": ["demo-head", "demo-worker-0", "demo-worker-1", "demo-worker-2"],
        "services": ["demo-head-svc"],
        "secrets": ["demo-ray-auth"],
        "configmaps": ["demo-spec"],
        "networkpolicies": ["demo-ray"],
    }
    uid = job["metadata"]["uid"]
    secret = cluster.core.read_namespaced_secret("demo-ray-auth", api.ns)
    netpol = _networking(cluster).read_namespaced_network_policy("demo-ray", api.ns)
    svc = cluster.core.read_namespaced_service("demo-head-svc", api.ns)
    for obj in [secret, netpol, svc, *pods.values()]:
        (ref,) = obj.metadata.owner_references
        assert ref.uid == uid and ref.controller is True
    import base64

    assert len(bytes.fromhex(base64.b64decode(secret.data["token"]).decode())) == 32
    assert netpol.spec.pod_selector.match_labels == {"llmtrain.dev/job": "demo"}
    assert svc.spec.cluster_ip == "None" and svc.spec.publish_not_ready_addresses is True
    m = operator.metrics()
    assert 'llmtrain_operator_jobs{phase="Provisioning"} 1.0' in m
    assert "llmtrain_operator_provisioning_duration_seconds_count 1.0" in m


def test_unschedulable_job_is_pending_with_the_reason_then_fails_at_the_deadline(
    api: Api, operator: Operator, cluster: Cluster
) -> None:
    api.create(job_manifest("big", resources={"gpusPerWorker": 16}, preRunningDeadlineSeconds=6))
    # Level-based: the scheduler marks the three workers one after another, and a status
    # written between two of them says "1/4"; it must converge to all three.
    api.wait(
        lambda: (
            api.cond("big", "Scheduled").get("reason") == "Unschedulable"
            and "3/4 pods unschedulable" in api.cond("big", "Scheduled").get("message", "")
        ),
        "Scheduled=Unschedulable for all three workers",
    )
    st = api.status("big")
    assert st["phase"] == "Pending"
    msg = api.cond("big", "Scheduled")["message"]
    assert "3/4 pods unschedulable" in msg and "Insufficient nvidia.com/gpu" in msg, msg
    assert api.cond("big", "Running")["reason"] == "Unschedulable"
    row = cluster.kubectl("get", "ltj", "big", "-n", api.ns).stdout.splitlines()[1].split()
    assert row[1] == "Pending" and row[-1] == "Unschedulable"
    api.wait_phase("big", "Failed", timeout=20)
    failed = api.cond("big", "Failed")
    assert failed["reason"] == "PreRunningDeadlineExceeded"
    assert "Insufficient nvidia.com/gpu" in failed["message"]
    assert api.cond("big", "Running")["reason"] == "PreRunningDeadlineExceeded"
    api.wait(lambda: api.pods("big") == [], "pods deleted after failure")
    reasons = {e.reason for e in api.events("big")}
    assert {"Unschedulable", "PreRunningDeadlineExceeded"} <= reasons


def test_suspend_deletes_pods_and_resume_recreates_them(api: Api, operator: Operator) -> None:
    api.create(job_manifest("sus", resources={"workers": 1}))
    api.wait(lambda: api.running("sus", 2), "2 pods Running")
    api.patch_spec("sus", {"suspend": True})
    api.wait_phase("sus", "Suspended")
    api.wait(lambda: api.pods("sus") == [], "pods deleted")
    assert api.cond("sus", "Suspended")["reason"] == "SuspendedByUser"
    assert api.cond("sus", "Running")["reason"] == "SuspendedByUser"
    assert api.children("sus")["services"] == ["sus-head-svc"]  # only the pods go
    api.patch_spec("sus", {"suspend": False})
    api.wait(lambda: api.running("sus", 2), "pods back")
    api.wait(lambda: api.cond("sus", "Suspended").get("reason") == "Resumed", "Suspended=False/Resumed")
    assert api.status("sus")["phase"] in ("Pending", "Provisioning")


def test_ttl_after_finished_deletes_the_ray_cluster_and_keeps_the_job(api: Api, operator: Operator) -> None:
    api.create(
        job_manifest("ttl", resources={"workers": 1}, activeDeadlineSeconds=3, ttlSecondsAfterFinished=2)
    )
    api.wait_phase("ttl", "Failed", timeout=20)
    assert api.cond("ttl", "Failed")["reason"] == "DeadlineExceeded"
    api.wait(
        lambda: (
            api.children("ttl")
            == {k: [] for k in ("pods", "services", "secrets", "configmaps", "networkpolicies")}
        ),
        "Ray cluster deleted by TTL",
        timeout=20,
    )
    assert api.job("ttl")["status"]["phase"] == "Failed"  # the CR stays


def test_deleting_the_job_deletes_every_child(api: Api, operator: Operator, cluster: Cluster) -> None:
    api.create(job_manifest("gone", resources={"workers": 1}))
    api.wait(lambda: api.running("gone", 2), "2 pods Running")
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, api.ns, PLURAL, "gone")
    # The garbage collector follows the ownerReferences; no finalizer of ours.
    api.wait(lambda: not any(api.children("gone").values()), "children garbage-collected", timeout=40)


def test_pod_failure_restarts_the_cluster_until_the_backoff_limit(
    api: Api, operator: Operator, cluster: Cluster
) -> None:
    api.create(job_manifest("flaky", resources={"workers": 1}, backoffLimit=1))
    api.wait(lambda: api.running("flaky", 2), "2 pods Running")
    first = {p.metadata.uid for p in api.pods("flaky")}
    cluster.core.patch_namespaced_pod(
        "flaky-worker-0", api.ns, {"metadata": {"annotations": {TEST_EXIT: "137"}}}
    )
    api.wait(lambda: api.status("flaky").get("restarts") == 1, "restarts=1")
    api.wait(
        lambda: api.running("flaky", 2) and not ({p.metadata.uid for p in api.pods("flaky")} & first),
        "a fresh Ray cluster",
    )
    cluster.core.patch_namespaced_pod("flaky-head", api.ns, {"metadata": {"annotations": {TEST_EXIT: "1"}}})
    api.wait_phase("flaky", "Failed")
    failed = api.cond("flaky", "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "flaky-head (head) ended Failed (exit code 1" in failed["message"]
    assert api.status("flaky")["restarts"] == 1
    assert "Restarting" in {e.reason for e in api.events("flaky")}


@pytest.mark.slow
def test_operator_killed_repeatedly_converges_without_duplicates(
    api: Api, operator: Operator, cluster: Cluster
) -> None:
    """SIGKILL the operator at every stage of a lifecycle; children stay unique, status converges."""
    api.create(job_manifest("chaos", resources={"workers": 2}))
    operator.kill()  # possibly mid-create
    operator.start()
    api.wait(lambda: api.running("chaos", 3), "3 pods Running")
    uids = {p.metadata.name: p.metadata.uid for p in api.pods("chaos")}
    for _ in range(3):
        operator.kill()
        operator.start()
        time.sleep(1.0)
        # The same pods: nothing recreated, nothing duplicated.
        assert {p.metadata.name: p.metadata.uid for p in api.pods("chaos")} == uids
    api.wait(lambda: "Ray cluster ready" in api.cond("chaos", "Running").get("message", ""), "ready")
    api.patch_spec("chaos", {"suspend": True})
    time.sleep(0.3)
    operator.kill()
    operator.start()
    api.wait_phase("chaos", "Suspended")
    api.wait(lambda: api.pods("chaos") == [], "pods deleted")
    api.patch_spec("chaos", {"suspend": False})
    operator.kill()
    operator.start()
    api.wait(lambda: api.running("chaos", 3), "pods back")
    kids = api.children("chaos")
    assert kids["pods"] == ["chaos-head", "chaos-worker-0", "chaos-worker-1"]
    assert kids["secrets"] == ["chaos-ray-auth"] and kids["services"] == ["chaos-head-svc"]
    api.wait(lambda: "Ray cluster ready" in api.cond("chaos", "Running").get("message", ""), "converged")
    assert api.status("chaos")["restarts"] == 0
    assert api.cond("chaos", "Suspended")["reason"] == "Resumed"


def test_invalid_spec_for_the_pods_fails_with_the_field(api: Api, operator: Operator) -> None:
    api.create(job_manifest("bad", resources={"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}))
    api.wait_phase("bad", "Failed")
    failed = api.cond("bad", "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.resources.volumeMounts[0].name" in failed["message"]
    assert api.pods("bad") == []


def test_operator_with_peering_heartbeats_and_reconciles(
    cluster: Cluster, namespace: str, crds: None, tmp_path: Path, api: Api
) -> None:
    """The default (non-standalone) mode: the operator announces itself in the KopfPeering
    object, which is how a second replica knows to pause."""
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "llmtrain"}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(peering))
    a = Operator(cluster, namespace, tmp_path / "a", peering=True)
    (tmp_path / "a").mkdir()
    a.start()
    try:
        api.wait(
            lambda: (
                cluster.custom.get_namespaced_custom_object(
                    "kopf.dev", "v1", namespace, "kopfpeerings", "llmtrain"
                ).get("status")
                or {}
            ),
            "the operator's heartbeat in the KopfPeering",
        )
        api.create(job_manifest("peer", resources={"workers": 1}))
        api.wait(lambda: api.running("peer", 2), "pods Running under peering")
    finally:
        cluster.kubectl(
            "delete", PLURAL, "--all", "-n", namespace, "--wait=true", "--timeout=60s", check=False
        )
        a.kill(signal.SIGTERM)
    assert os.path.exists(tmp_path / "a" / "operator-1.log")


def test_two_replicas_with_random_priorities_one_acts_and_the_other_takes_over(
    cluster: Cluster, namespace: str, crds: None, tmp_path: Path, api: Api
) -> None:
    """What the chart runs with replicas: 2 (--priority=random): the replica with the lower
    draw stays paused and reconciles nothing; when the active one leaves, it takes over."""
    import re

    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "llmtrain"}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(peering))
    ops = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        ops.append(
            Operator(cluster, namespace, tmp_path / name, peering=True, extra=("--priority", "random"))
        )
    for op in ops:
        op.start()

    def full_log(op: Operator) -> str:
        return (op.tmp / f"operator-{op.starts}.log").read_text(errors="replace")

    def priority(op: Operator) -> int:
        m = re.search(r"with priority (\d+)", full_log(op))
        assert m, full_log(op)
        return int(m.group(1))

    def acting(op: Operator) -> bool:
        # Kopf starts paused until peering is resolved and logs each change after that.
        changes = re.findall(r"(Resuming operations|Pausing operations)", full_log(op))
        return bool(changes) and changes[-1] == "Resuming operations"

    def reconciles(op: Operator) -> float:
        m = re.search(r"^llmtrain_operator_reconcile_duration_seconds_count (\S+)$", op.metrics(), re.M)
        return float(m.group(1)) if m else 0.0

    try:
        prios = {op.tmp.name: priority(op) for op in ops}
        assert len(set(prios.values())) == 2, prios  # drawn per process
        active, standby = sorted(ops, key=priority, reverse=True)
        api.wait(lambda: acting(active) and not acting(standby), "the higher draw acting, the lower paused")
        api.create(job_manifest("ha1", resources={"workers": 1}))
        api.wait(lambda: api.running("ha1", 2), "pods Running with one active replica")
        assert reconciles(active) > 0 and reconciles(standby) == 0
        active.kill(signal.SIGTERM)  # a clean exit takes its heartbeat out of the peering
        api.wait(lambda: acting(standby), "the standby taking over")
        api.create(job_manifest("ha2", resources={"workers": 1}))
        api.wait(lambda: api.running("ha2", 2), "pods Running after the failover")
        assert reconciles(standby) > 0
    finally:
        cluster.kubectl(
            "delete", PLURAL, "--all", "-n", namespace, "--wait=true", "--timeout=60s", check=False
        )
        for op in ops:
            op.kill(signal.SIGTERM)
