"""The Ray cluster's manifests, built from a job without a cluster (one test per spec field)."""

from __future__ import annotations

import base64
import secrets
from typing import Any

import pytest
import yaml
from llmtrain.operator import manifests as m

from llmtrain.api.job import LLMTrainingJob
from tests.unit.test_operator_fakes import job_body

SETTINGS = m.OperatorSettings(operator_namespace="llmtrain-system")


def job(**top: Any) -> LLMTrainingJob:
    return LLMTrainingJob.model_validate(job_body(**top))


def ray(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = [c for c in pod["spec"]["containers"] if c["name"] == m.RAY_CONTAINER]
    return c


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def all_pods(j: LLMTrainingJob) -> list[dict[str, Any]]:
    return m.pods(j, SETTINGS)


# ----------------------------------------------------------------------------- shape


def test_names_are_deterministic_and_head_first() -> None:
    j = job(resources={"workers": 3})
    assert m.pod_names(j) == ["demo-head", "demo-worker-0", "demo-worker-1", "demo-worker-2"]
    assert [p["metadata"]["name"] for p in all_pods(j)] == m.pod_names(j)
    for p in all_pods(j):
        assert "generateName" not in p["metadata"]
        assert p["metadata"]["namespace"] == "ns1"


def test_head_runs_no_training_and_serves_dashboard() -> None:
    head = m.head_pod(job(), SETTINGS)
    cmd = " ".join(ray(head)["args"])
    for flag in (
        "ray start --head --block",
        "--dashboard-host=0.0.0.0",
        "--num-cpus=0",
        "--num-gpus=0",
        "--metrics-export-port=8080",
        "--dashboard-agent-listen-port=52365",
    ):
        assert flag in cmd
    assert cmd.startswith(f"{m.RAISE_NOFILE}; exec ")
    assert head["spec"]["restartPolicy"] == "Never"
    probe = ray(head)["readinessProbe"]["httpGet"]
    assert probe == {"path": "/api/healthz", "port": 52365}
    assert ray(head)["livenessProbe"]["httpGet"] == probe
    assert head["metadata"]["labels"][m.LABEL_ROLE] == "head"
    assert head["metadata"]["labels"][m.LABEL_RAY_NODE_TYPE] == "head"
    assert head["metadata"]["labels"][m.LABEL_RAY_CLUSTER] == "demo"


def test_workers_join_head_service_fqdn_after_gcs_is_ready() -> None:
    w = m.worker_pod(job(), SETTINGS, 1)
    addr = "demo-head-svc.ns1.svc.cluster.local:6379"
    assert f"ray start --address={addr} --block" in ray(w)["args"][0]
    (init,) = w["spec"]["initContainers"]
    assert init["name"] == "wait-gcs-ready"
    assert f"ray health-check --address={addr}" in init["args"][0]
    # The health check is authenticated too.
    assert "RAY_AUTH_TOKEN" in env(init)
    assert w["metadata"]["labels"][m.LABEL_WORKER_INDEX] == "1"
    assert w["spec"]["restartPolicy"] == "Never"


def test_every_ray_container_is_locked_down() -> None:
    for p in all_pods(job()):
        for c in p["spec"]["containers"] + p["spec"].get("initContainers", []):
            e = env(c)
            assert e["RAY_AUTH_MODE"] == "token"
            assert e["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": "demo-ray-auth", "key": "token"}}
            assert e["RAY_USAGE_STATS_ENABLED"] == "0"


def test_auth_secret_carries_32_random_bytes() -> None:
    token = secrets.token_hex(32)
    s = m.auth_secret(job(), token)
    assert s["metadata"]["name"] == "demo-ray-auth"
    assert base64.b64decode(s["data"]["token"]).decode() == token
    assert len(bytes.fromhex(token)) == 32
    with pytest.raises(ValueError):
        m.auth_secret(job(), "short")


def test_headless_service_publishes_not_ready_head() -> None:
    svc = m.head_service(job())
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {m.LABEL_JOB: "demo", m.LABEL_ROLE: "head"}
    assert sorted(p["port"] for p in svc["spec"]["ports"]) == [6379, 8080, 8265, 10001]


def test_network_policy_admits_own_pods_operator_and_prometheus_only() -> None:
    np = m.network_policy(job(), SETTINGS)
    spec = np["spec"]
    assert spec["podSelector"] == {"matchLabels": {m.LABEL_JOB: "demo"}}
    assert spec["policyTypes"] == ["Ingress"]
    own, operator, prom = spec["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {m.LABEL_JOB: "demo"}}}]}
    assert operator["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "llmtrain-system"
    }
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}, {"protocol": "TCP", "port": 8266}]
    assert prom["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert {p["port"] for p in prom["ports"]} == {8080, 9400}


def test_spec_configmap_holds_the_job() -> None:
    cm = m.spec_configmap(job())
    doc = yaml.safe_load(cm["data"]["job.yaml"])
    assert doc["kind"] == "LLMTrainingJob"
    assert doc["spec"]["resources"]["workers"] == 2
    assert LLMTrainingJob.model_validate(doc).metadata.name == "demo"
    for p in all_pods(job()):
        assert {"name": "llmtrain-spec", "configMap": {"name": "demo-spec"}} in p["spec"]["volumes"]
        assert env(ray(p))["LLMTRAIN_SPEC_PATH"] == "/etc/llmtrain/job.yaml"


def test_static_children_order_secret_first() -> None:
    kinds = [o["kind"] for o in m.static_children(job(), SETTINGS, "x" * 64)]
    assert kinds == ["Secret", "ConfigMap", "Service", "NetworkPolicy", "PodDisruptionBudget"]


# ------------------------------------------------------------------ spec.resources.*


def test_resources_workers() -> None:
    assert len(all_pods(job(resources={"workers": 5}))) == 6


def test_resources_gpus_per_worker_requests_equal_limits() -> None:
    j = job(resources={"gpusPerWorker": 8})
    w = ray(m.worker_pod(j, SETTINGS, 0))
    assert w["resources"]["limits"][m.GPU_RESOURCE] == "8"
    assert w["resources"]["requests"] == w["resources"]["limits"]
    assert "--num-gpus=8" in w["args"][0]
    assert m.GPU_RESOURCE not in ray(m.head_pod(j, SETTINGS))["resources"]["limits"]
    assert m.GPU_RESOURCE not in ray(m.worker_pod(job(), SETTINGS, 0))["resources"]["limits"]


def test_resources_worker_cpu_memory() -> None:
    j = job(resources={"worker": {"cpu": "1500m", "memory": "3Gi"}})
    w = ray(m.worker_pod(j, SETTINGS, 0))
    assert w["resources"]["limits"] == {"cpu": "1500m", "memory": "3Gi"}
    assert w["resources"]["requests"] == w["resources"]["limits"]
    assert "--num-cpus=2" in w["args"][0]  # rounded up, like KubeRay
    assert f"--memory={3 * 2**30}" in w["args"][0]


def test_resources_head_cpu_memory() -> None:
    h = ray(m.head_pod(job(resources={"head": {"cpu": 3, "memory": "5Gi"}}), SETTINGS))
    assert h["resources"]["requests"] == h["resources"]["limits"] == {"cpu": "3", "memory": "5Gi"}


def test_resources_image() -> None:
    for p in all_pods(job(resources={"image": "registry.example/llmtrain:9"})):
        for c in p["spec"]["containers"] + p["spec"].get("initContainers", []):
            assert c["image"] == "registry.example/llmtrain:9"


def test_resources_image_pull_secrets() -> None:
    for p in all_pods(job(resources={"imagePullSecrets": [{"name": "regcred"}]})):
        assert p["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert "imagePullSecrets" not in m.head_pod(job(), SETTINGS)["spec"]


def test_resources_service_account_name() -> None:
    for p in all_pods(job(resources={"serviceAccountName": "trainer"})):
        assert p["spec"]["serviceAccountName"] == "trainer"
        assert "automountServiceAccountToken" not in p["spec"]  # the user's account, the user's call
    for p in all_pods(job()):
        assert p["spec"]["automountServiceAccountToken"] is False  # no API token to leak


def pod_specs(j: LLMTrainingJob) -> list[dict[str, Any]]:
    """Every pod spec the operator makes for a job: Ray pods and the serve Deployment's."""
    serving = m.serve_deployment(j, "s3://bucket/model")["spec"]["template"]["spec"]
    return [p["spec"] for p in all_pods(j)] + [serving]


def test_every_pod_meets_the_restricted_pod_security_standard() -> None:
    """The fields `restricted` checks, on every pod and container (init containers too); the
    apiserver's own admission is tested in tests/integration/test_pod_security.py."""
    j = job(resources={"workers": 2}, serve={})
    for spec in pod_specs(j):
        assert spec["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
            assert "privileged" not in sc and "runAsUser" not in sc
    # One dict per container, so a later edit of one pod's context cannot change another's.
    a, b = pod_specs(j)[:2]
    assert a["containers"][0]["securityContext"] is not b["containers"][0]["securityContext"]


def test_resources_env() -> None:
    j = job(
        resources={
            "env": [
                {"name": "FOO", "value": "bar"},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
            ]
        }
    )
    for p in all_pods(j):
        e = env(ray(p))
        assert e["FOO"] == "bar"
        assert e["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
        assert e["MODE"] == {"configMapKeyRef": {"name": "cfg", "key": "mode"}}


def test_resources_env_cannot_override_lockdown() -> None:
    j = job(resources={"env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}]})
    with pytest.raises(m.ManifestError) as e:
        all_pods(j)
    assert e.value.field == "spec.resources.env[0].name"


def test_resources_volumes_and_volume_mounts() -> None:
    j = job(
        resources={
            "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}],
            "volumeMounts": [
                {"name": "cache", "mountPath": "/cache", "readOnly": True},
                {"name": "cache", "mountPath": "/models", "subPath": "models"},
            ],
        }
    )
    for p in all_pods(j):
        assert {"name": "cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in p["spec"]["volumes"]
        mounts = ray(p)["volumeMounts"]
        assert {"name": "cache", "mountPath": "/cache", "readOnly": True} in mounts
        assert {"name": "cache", "mountPath": "/models", "readOnly": False, "subPath": "models"} in mounts


def test_resources_volume_mounts_must_name_a_volume() -> None:
    j = job(resources={"volumeMounts": [{"name": "nope", "mountPath": "/x"}]})
    with pytest.raises(m.ManifestError) as e:
        all_pods(j)
    assert e.value.field == "spec.resources.volumeMounts[0].name"
    assert "add it there" in str(e.value)


def test_resources_pod_labels() -> None:
    for p in all_pods(job(resources={"podLabels": {"team": "nlp"}})):
        assert p["metadata"]["labels"]["team"] == "nlp"
    with pytest.raises(m.ManifestError) as e:
        all_pods(job(resources={"podLabels": {m.LABEL_JOB: "other"}}))
    assert e.value.field == f"spec.resources.podLabels.{m.LABEL_JOB}"


@pytest.mark.parametrize(
    "key",
    [m.LABEL_SERVE, m.LABEL_MANAGED_BY, "llmtrain.dev/anything", "ray.io/is-ray-node", "kueue.x-k8s.io/x"],
)
def test_resources_pod_labels_cannot_take_the_operators_labels(key: str) -> None:
    """llmtrain.dev/serve=<other job> would make this job's Ray pods endpoints of that job's
    serve Service; every label of the operator's, KubeRay's and Kueue's prefixes is refused."""
    with pytest.raises(m.ManifestError) as e:
        all_pods(job(resources={"podLabels": {key: "other"}}))
    assert e.value.field == f"spec.resources.podLabels.{key}"
    assert "set by the operator" in str(e.value)


def test_resources_pod_annotations() -> None:
    for p in all_pods(job(resources={"podAnnotations": {"example.com/cost-center": "42"}})):
        assert p["metadata"]["annotations"]["example.com/cost-center"] == "42"


def test_resources_shm_size() -> None:
    for p in all_pods(job(resources={"shmSize": "2Gi"})):
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in p["spec"]["volumes"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in ray(p)["volumeMounts"]


def test_resources_node_selector_on_workers_only() -> None:
    j = job(resources={"nodeSelector": {"llmtrain.dev/pool": "gpu"}})
    assert m.worker_pod(j, SETTINGS, 0)["spec"]["nodeSelector"] == {"llmtrain.dev/pool": "gpu"}
    assert "nodeSelector" not in m.head_pod(j, SETTINGS)["spec"]


def test_resources_tolerations() -> None:
    tols = [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute", "tolerationSeconds": 60},
    ]
    j = job(resources={"tolerations": tols})
    assert m.worker_pod(j, SETTINGS, 0)["spec"]["tolerations"] == tols
    assert "tolerations" not in m.head_pod(j, SETTINGS)["spec"]


def test_resources_affinity() -> None:
    aff = {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"llmtrain.dev/job": "demo"}},
                    },
                }
            ]
        }
    }
    j = job(resources={"affinity": aff})
    assert m.worker_pod(j, SETTINGS, 0)["spec"]["affinity"] == aff


def test_resources_priority_class_name() -> None:
    for p in all_pods(job(resources={"priorityClassName": "training-high"})):
        assert p["spec"]["priorityClassName"] == "training-high"


# ------------------------------------------------------------------ storage / metrics


def test_storage_secret_ref_becomes_aws_env() -> None:
    j = job(
        storage={
            "secretRef": {"name": "s3creds", "accessKeyIdKey": "id", "secretAccessKeyKey": "key"},
            "endpoint": "http://minio.storage:9000",
            "region": "eu-west-1",
        }
    )
    for p in all_pods(j):
        e = env(ray(p))
        assert e["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3creds", "key": "id"}}
        assert e["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3creds", "key": "key"}}
        assert e["AWS_ENDPOINT_URL"] == "http://minio.storage:9000"
        assert e["AWS_REGION"] == "eu-west-1"
    e = env(ray(m.head_pod(job(), SETTINGS)))
    assert "AWS_ACCESS_KEY_ID" not in e and "AWS_ENDPOINT_URL" not in e


def test_metrics_port() -> None:
    j = job(metrics={"port": 9500})
    w = ray(m.worker_pod(j, SETTINGS, 0))
    assert {"name": "train-metrics", "containerPort": 9500} in w["ports"]
    assert env(w)["LLMTRAIN_METRICS_PORT"] == "9500"
    prom = m.network_policy(j, SETTINGS)["spec"]["ingress"][2]
    assert {"protocol": "TCP", "port": 9500} in prom["ports"]
    off = m.network_policy(job(metrics={"enabled": False}), SETTINGS)["spec"]["ingress"][2]
    assert off["ports"] == [{"protocol": "TCP", "port": 8080}]


def test_the_head_names_the_training_metrics_port_only_when_its_driver_tunes() -> None:
    """The driver (on the head) serves llmtrain_tune_* while it tunes; the PodMonitor finds
    ports by name, so without this one the search's series are never scraped."""
    tuning = {
        "search": "random",
        "numTrials": 2,
        "trialBudget": {"maxSteps": 2},
        "space": {"training.optimizer.lr": {"logUniform": [1e-4, 1e-2]}},
    }
    port = {"name": "train-metrics", "containerPort": 9500}
    assert port in ray(m.head_pod(job(metrics={"port": 9500}, tuning=tuning), SETTINGS))["ports"]
    assert port not in ray(m.head_pod(job(metrics={"port": 9500}), SETTINGS))["ports"]
    quiet = job(metrics={"port": 9500, "enabled": False}, tuning=tuning)
    assert all(p["name"] != "train-metrics" for p in ray(m.head_pod(quiet, SETTINGS))["ports"])


def test_prometheus_scrape_annotations_name_each_pods_metrics_port() -> None:
    """OperatorSettings.prometheus_scrape_annotations (Helm: jobMetrics.scrapeAnnotations):
    the worker's training port, the head's Ray port; the job's own podAnnotations win."""
    assert all(
        "prometheus.io/scrape" not in (p["metadata"].get("annotations") or {}) for p in all_pods(job())
    )
    on = m.OperatorSettings(prometheus_scrape_annotations=True)
    j = job(metrics={"port": 9500}, resources={"workers": 2, "podAnnotations": {"prometheus.io/path": "/m"}})
    head, *workers = m.pods(j, on)
    for p, port in ((head, m.PORT_METRICS), *((w, 9500) for w in workers)):
        ann = p["metadata"]["annotations"]
        assert ann == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": "/m",
        }
        declared = {cp["containerPort"] for c in p["spec"]["containers"] for cp in c.get("ports", [])}
        assert port in declared  # the annotated port is one the pod serves
    # Without training metrics a worker points at Ray's port.
    (_, w) = m.pods(job(metrics={"enabled": False}, resources={"workers": 1}), on)
    assert w["metadata"]["annotations"]["prometheus.io/port"] == str(m.PORT_METRICS)


def test_parse_quantity() -> None:
    assert m.parse_quantity("500m") == m.parse_quantity("0.5")
    assert m.parse_quantity("16Gi") == 16 * 2**30
    assert m.parse_quantity("2k") == 2000
    assert m.ray_num_cpus("500m") == 1
    assert m.ray_num_cpus("4") == 4
    with pytest.raises(ValueError):
        m.parse_quantity("lots")
