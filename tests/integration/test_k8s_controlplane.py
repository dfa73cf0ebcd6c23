"""The local control plane is real Kubernetes: scheduling, taints, GC, RBAC, versions.

Pods run on kwok's fake nodes: they get fake private IPs that nothing may connect to.
A pod completes only when the test sets the ``llmtrain.dev/test-exit`` annotation.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # the fixture's type; never imported at run time
    from conftest import Cluster

pytestmark = pytest.mark.cluster

GPU = "nvidia.com/gpu"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def pod_manifest(
    name: str,
    *,
    gpus: int = 0,
    tolerate_gpu: bool = False,
    node_selector: dict[str, str] | None = None,
    owner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    resources: dict[str, Any] = {"requests": {"cpu": "100m", "memory": "64Mi"}}
    if gpus:
        resources["limits"] = {GPU: str(gpus)}
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": "llmtrain/fake:test", "resources": resources}],
    }
    if tolerate_gpu:
        spec["tolerations"] = [GPU_TOLERATION]
    if node_selector:
        spec["nodeSelector"] = node_selector
    meta: dict[str, Any] = {"name": name}
    if owner:
        meta["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def phase(cluster: Cluster, ns: str, name: str) -> str:
    return str(cluster.core.read_namespaced_pod(name, ns).status.phase)


def wait_phase(cluster: Cluster, ns: str, name: str, want: str, timeout: float = 30) -> Any:
    def check() -> Any:
        p = cluster.core.read_namespaced_pod(name, ns)
        return p if p.status.phase == want else None

    return cluster.wait_for(check, timeout=timeout, what=f"pod {ns}/{name} phase {want}")


def scheduled_condition(pod: Any) -> Any:
    for c in pod.status.conditions or []:
        if c.type == "PodScheduled":
            return c
    return None


def wait_unschedulable(cluster: Cluster, ns: str, name: str) -> Any:
    def check() -> Any:
        p = cluster.core.read_namespaced_pod(name, ns)
        c = scheduled_condition(p)
        return p if c is not None and c.status == "False" and c.reason == "Unschedulable" else None

    return cluster.wait_for(check, timeout=30, what=f"pod {ns}/{name} Unschedulable")


def test_versions(cluster: Cluster) -> None:
    out = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"].startswith("v1.35."), out
    assert out["serverVersion"]["major"] == "1" and out["serverVersion"]["minor"] == "35"
    assert out["clientVersion"]["gitVersion"].startswith("v1.35."), out
    helm = cluster.helm("version", "--short").stdout
    assert helm.startswith("v4."), helm
    # helm reaches the apiserver through KUBECONFIG too
    assert cluster.helm("list", "--all-namespaces").returncode == 0


def test_node_pool(cluster: Cluster) -> None:
    nodes = cluster.core.list_node(label_selector="type=kwok").items
    gpu = [n for n in nodes if n.metadata.labels.get("llmtrain.dev/pool") == "gpu"]
    cpu = [n for n in nodes if n.metadata.labels.get("llmtrain.dev/pool") == "cpu"]
    assert len(gpu) == 4 and len(cpu) == 2
    for n in gpu:
        assert n.status.allocatable[GPU] == "8" and n.status.capacity[GPU] == "8"
        assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in n.spec.taints)
    for n in nodes:
        ready = [c for c in n.status.conditions if c.type == "Ready"]
        assert ready and ready[0].status == "True"
    out = cluster.kubectl("get", "nodes", "-l", "llmtrain.dev/pool=gpu", "--no-headers").stdout
    assert out.count(" Ready ") == 4, out


def test_gpu_pod_runs_on_gpu_node(cluster: Cluster, namespace: str) -> None:
    cluster.core.create_namespaced_pod(namespace, pod_manifest("gpu", gpus=2, tolerate_gpu=True))
    pod = wait_phase(cluster, namespace, "gpu", "Running")
    node = cluster.core.read_node(pod.spec.node_name)
    assert node.metadata.labels["llmtrain.dev/pool"] == "gpu"
    assert pod.status.pod_ip  # fake (kwok) address: never connect to it
    # and it stays Running: kwok never completes a pod on its own
    time.sleep(2)
    assert phase(cluster, namespace, "gpu") == "Running"


def test_pods_without_toleration_avoid_gpu_nodes(cluster: Cluster, namespace: str) -> None:
    names = [f"plain-{i}" for i in range(6)]
    for n in names:
        cluster.core.create_namespaced_pod(namespace, pod_manifest(n))
    for n in names:
        pod = wait_phase(cluster, namespace, n, "Running")
        assert pod.spec.node_name.startswith("cpu-node-"), pod.spec.node_name
    # forced towards the GPU pool without the toleration: the taint keeps it off
    cluster.core.create_namespaced_pod(
        namespace, pod_manifest("no-toleration", gpus=1, node_selector={"llmtrain.dev/pool": "gpu"})
    )
    pod = wait_unschedulable(cluster, namespace, "no-toleration")
    assert "untolerated taint" in scheduled_condition(pod).message, scheduled_condition(pod).message
    assert pod.spec.node_name is None


def test_too_many_gpus_stays_pending(cluster: Cluster, namespace: str) -> None:
    cluster.core.create_namespaced_pod(namespace, pod_manifest("greedy", gpus=9, tolerate_gpu=True))
    pod = wait_unschedulable(cluster, namespace, "greedy")
    assert "Insufficient nvidia.com/gpu" in scheduled_condition(pod).message
    time.sleep(2)
    pod = cluster.core.read_namespaced_pod("greedy", namespace)
    assert pod.status.phase == "Pending" and pod.spec.node_name is None


def test_exit_annotation_completes_pods(cluster: Cluster, namespace: str) -> None:
    for name in ("ok", "bad"):
        cluster.core.create_namespaced_pod(namespace, pod_manifest(name))
    for name in ("ok", "bad"):
        wait_phase(cluster, namespace, name, "Running")
    cluster.core.patch_namespaced_pod(
        "ok", namespace, {"metadata": {"annotations": {"llmtrain.dev/test-exit": "0"}}}
    )
    cluster.core.patch_namespaced_pod(
        "bad", namespace, {"metadata": {"annotations": {"llmtrain.dev/test-exit": "1"}}}
    )
    ok = wait_phase(cluster, namespace, "ok", "Succeeded")
    bad = wait_phase(cluster, namespace, "bad", "Failed")
    assert ok.status.container_statuses[0].state.terminated.exit_code == 0
    assert bad.status.container_statuses[0].state.terminated.exit_code == 1
    assert bad.status.container_statuses[0].state.terminated.reason == "Error"


def test_job_pod_completes_only_on_annotation(cluster: Cluster, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "train"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "llmtrain/fake:test"}],
                }
            },
        },
    }
    cluster.batch.create_namespaced_job(namespace, job)

    def job_pod() -> Any:
        pods = cluster.core.list_namespaced_pod(namespace, label_selector="job-name=train").items
        return pods[0] if pods and pods[0].status.phase == "Running" else None

    pod = cluster.wait_for(job_pod, what="the Job's pod Running")
    time.sleep(3)  # kwok's default stages would complete a Job's pod here; ours must not
    assert phase(cluster, namespace, pod.metadata.name) == "Running"
    assert not cluster.batch.read_namespaced_job("train", namespace).status.succeeded
    cluster.core.patch_namespaced_pod(
        pod.metadata.name, namespace, {"metadata": {"annotations": {"llmtrain.dev/test-exit": "0"}}}
    )

    def complete() -> bool:
        st = cluster.batch.read_namespaced_job("train", namespace).status
        return any(c.type == "Complete" and c.status == "True" for c in st.conditions or [])

    cluster.wait_for(complete, what="Job Complete (job controller)")


def test_garbage_collector_deletes_children(cluster: Cluster, namespace: str) -> None:
    owner = cluster.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "owner"}, "data": {"k": "v"}}
    )
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    cluster.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "child", "ownerReferences": [ref]}, "data": {}}
    )
    cluster.core.create_namespaced_pod(namespace, pod_manifest("child-pod", owner=ref))
    wait_phase(cluster, namespace, "child-pod", "Running")
    cluster.core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def gone() -> bool:
        cms = {c.metadata.name for c in cluster.core.list_namespaced_config_map(namespace).items}
        pods = cluster.core.list_namespaced_pod(namespace).items
        return "child" not in cms and not pods

    cluster.wait_for(gone, timeout=60, what="garbage collection of the owner's children")


def test_foreground_deletion_of_job(cluster: Cluster, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "fg"},
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "llmtrain/fake:test"}],
                }
            }
        },
    }
    cluster.batch.create_namespaced_job(namespace, job)
    cluster.wait_for(
        lambda: cluster.core.list_namespaced_pod(namespace, label_selector="job-name=fg").items,
        what="the Job's pod",
    )
    cluster.batch.delete_namespaced_job("fg", namespace, propagation_policy="Foreground")

    def gone() -> bool:
        jobs = cluster.batch.list_namespaced_job(namespace).items
        pods = cluster.core.list_namespaced_pod(namespace).items
        return not jobs and not pods

    cluster.wait_for(gone, timeout=60, what="Job and its pods deleted (foreground)")


def test_rbac_can_i(cluster: Cluster, namespace: str) -> None:
    cluster.core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    cluster.rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        },
    )
    cluster.rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader-pod-reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    who = f"--as=system:serviceaccount:{namespace}:reader"

    def can_i(*args: str) -> str:
        r = cluster.kubectl("auth", "can-i", *args, who, check=False)
        return r.stdout.strip()

    assert can_i("list", "pods", "-n", namespace) == "yes"
    assert can_i("get", "pods", "-n", namespace) == "yes"
    assert can_i("delete", "pods", "-n", namespace) == "no"
    assert can_i("list", "secrets", "-n", namespace) == "no"
    assert can_i("list", "pods", "-n", "default") == "no"
    # the service-account token path works too (TokenRequest, signed with the generated key)
    token = cluster.kubectl("create", "token", "reader", "-n", namespace).stdout.strip()
    assert token.count(".") == 2


def test_namespace_deletion(cluster: Cluster) -> None:
    from kubernetes import client

    cluster.core.create_namespace({"metadata": {"name": "t-ns-delete"}})
    cluster.core.create_namespaced_config_map("t-ns-delete", {"metadata": {"name": "x"}})
    cluster.core.delete_namespace("t-ns-delete")

    def gone() -> bool:
        try:
            cluster.core.read_namespace("t-ns-delete")
            return False
        except client.ApiException as e:
            return e.status == 404

    cluster.wait_for(gone, timeout=60, what="namespace controller to delete t-ns-delete")


def test_pod_and_service_ips_are_never_connected(cluster: Cluster, namespace: str) -> None:
    """The guard in conftest refuses a connect() to a fake pod/service IP before any packet is sent."""
    import socket

    cluster.core.create_namespaced_pod(namespace, pod_manifest("target"))
    pod = wait_phase(cluster, namespace, "target", "Running")
    svc = cluster.core.create_namespaced_service(
        namespace, {"metadata": {"name": "svc"}, "spec": {"ports": [{"port": 80}], "selector": {"app": "x"}}}
    )
    for ip, port in ((pod.status.pod_ip, 8265), (svc.spec.cluster_ip, 80)):
        with pytest.raises(ConnectionRefusedError, match="fake"):
            socket.create_connection((ip, port), timeout=0.1)
