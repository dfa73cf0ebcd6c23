"""Pure functions from an ``LLMTrainingJob`` to the Kubernetes objects of its Ray cluster.

Nothing here talks to the API server: every function takes the parsed job (plus the
operator's settings) and returns plain dicts, so each manifest is unit-tested without a
cluster. The pod builder follows KubeRay's (``ray start --head --block`` on a head that
runs no training, workers joining the head Service's FQDN, a ``wait-gcs-ready`` init
container, probes on the dashboard agent's ``/api/healthz``), locked down with a per-job
Ray auth token (CVE-2023-48022: Ray has no authentication by default) and a per-job
NetworkPolicy.

Child names are deterministic (``<job>-head``, ``<job>-worker-<i>``; never
``generateName``) so create-if-absent is idempotent across operator restarts.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from llmtrain.api.job import API_VERSION, LLMTrainingJob
from llmtrain.api.quantity import parse_quantity, ray_num_cpus
from llmtrain.api.s3 import storage_env
from llmtrain.api.spec import KIND, EnvVar, StorageSpec, Toleration, VolumeMount

# ---------------------------------------------------------------------------- constants

LABEL_JOB = "llmtrain.dev/job"
LABEL_ROLE = "llmtrain.dev/role"
LABEL_WORKER_INDEX = "llmtrain.dev/worker-index"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "llmtrain-operator"
# KubeRay's labels: dashboards, `kubectl get pods -l ray.io/cluster=...` and tooling know them.
LABEL_RAY_CLUSTER = "ray.io/cluster"
LABEL_RAY_NODE_TYPE = "ray.io/node-type"
ROLE_HEAD = "head"
ROLE_WORKER = "worker"
RESERVED_LABELS = (LABEL_JOB, LABEL_ROLE, LABEL_WORKER_INDEX, LABEL_RAY_CLUSTER, LABEL_RAY_NODE_TYPE)
# Every label under these prefixes is the operator's (or KubeRay's, or Kueue's) to set: a user
# label such as llmtrain.dev/serve=<other job> would make this job's Ray pods endpoints of
# another job's Service, and app.kubernetes.io/managed-by would claim them for another tool.
RESERVED_LABEL_PREFIXES = ("llmtrain.dev/", "ray.io/", "kueue.x-k8s.io/")

# Kueue's scheduling gate on a pod it manages (a plain pod or a pod group; not this
# operator's pods: a job with spec.resources.queueName is admitted through its Workload,
# operator/kueue.py); diagnose still names it on a pod someone else's Kueue setup gates.
KUEUE_ADMISSION_GATE = "kueue.x-k8s.io/admission"
# Pods made by an operator before that (Kueue plain-pod groups) carry the group's total count;
# marking them not retriable ends their group, so an upgrade still frees their quota.
KUEUE_TOTAL_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_RETRIABLE_ANNOTATION = "kueue.x-k8s.io/retriable-in-group"

GPU_RESOURCE = "nvidia.com/gpu"

# Ray ports (KubeRay's defaults).
PORT_GCS = 6379
PORT_DASHBOARD = 8265  # dashboard + Jobs API
PORT_CLIENT = 10001  # Ray client
PORT_METRICS = 8080  # --metrics-export-port
PORT_DASHBOARD_AGENT = 52365  # health checks (/api/healthz)
PORT_PROGRESS = 8266  # the driver's progress endpoint (llmtrain driver --progress-port)

AUTH_TOKEN_KEY = "token"
SPEC_FILE = "job.yaml"
SPEC_MOUNT = "/etc/llmtrain"
RAY_CONTAINER = "ray"

# KubeRay-style probe timing: readiness flips quickly, liveness tolerates a slow GCS
# (a Ray node is only restarted after ~10 minutes of failed checks).
_PROBE_READINESS = {
    "initialDelaySeconds": 10,
    "periodSeconds": 5,
    "timeoutSeconds": 2,
    "failureThreshold": 10,
}
_PROBE_LIVENESS = {
    "initialDelaySeconds": 30,
    "periodSeconds": 5,
    "timeoutSeconds": 2,
    "failureThreshold": 120,
}


class ManifestError(ValueError):
    """The spec cannot be turned into manifests; ``field`` is the spec path to fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class OperatorSettings:
    """Operator-wide settings that shape the manifests (from the Helm values / CLI)."""

    # Namespace the operator runs in: admitted to the dashboard/Jobs port by the NetworkPolicy.
    operator_namespace: str = "llmtrain-system"
    # Prometheus' namespace and pods, admitted to the metrics ports.
    prometheus_namespace_labels: dict[str, str] = field(
        default_factory=lambda: {"kubernetes.io/metadata.name": "monitoring"}
    )
    prometheus_pod_labels: dict[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "prometheus"}
    )
    # prometheus.io/{scrape,port,path} on every Ray pod, for a Prometheus that finds pods by
    # annotation rather than by PodMonitor (Helm: jobMetrics.scrapeAnnotations).
    prometheus_scrape_annotations: bool = False
    cluster_domain: str = "cluster.local"
    # Where the operator reaches a job's head: its Service's DNS name (None), or one fixed
    # host, for a stand-in Ray cluster on 127.0.0.1 (tests, `make k8s-demo`).
    head_host: str | None = None
    dashboard_port: int = 8265
    progress_port: int = 8266
    # A head that does not answer for this long ends the attempt (KubeRay: 300 s).
    head_timeout_seconds: float = 300.0
    # `suspend: true` during training: the driver is asked for a checkpoint and the pods go
    # once it is complete, or after this long without one (then the newest periodic
    # checkpoint is where the run resumes).
    suspend_checkpoint_seconds: float = 60.0
    # Where the driver on the head reads the job: the spec ConfigMap's mount. A stand-in Ray
    # cluster (tests, `make k8s-demo`) mirrors each ConfigMap to its own path, as a kubelet
    # would: ``{namespace}`` and ``{name}`` (the job's) are filled in.
    driver_spec_path: str = f"{SPEC_MOUNT}/{SPEC_FILE}"


# -------------------------------------------------------------------------------- names


def head_name(job: str) -> str:
    return f"{job}-head"


def worker_name(job: str, index: int) -> str:
    return f"{job}-worker-{index}"


def service_name(job: str) -> str:
    return f"{job}-head-svc"


def auth_secret_name(job: str) -> str:
    return f"{job}-ray-auth"


def spec_configmap_name(job: str) -> str:
    return f"{job}-spec"


def disruption_budget_name(job: str) -> str:
    return f"{job}-ray"


def network_policy_name(job: str) -> str:
    return f"{job}-ray"


def pod_names(job: LLMTrainingJob) -> list[str]:
    """Every pod of the job's Ray cluster, head first."""
    name = job.metadata.name
    return [head_name(name)] + [worker_name(name, i) for i in range(job.spec.resources.workers)]


def head_address(job: LLMTrainingJob, settings: OperatorSettings) -> str:
    """``<svc>.<ns>.svc.<domain>:6379``: what workers join (resolved by cluster DNS, not by us)."""
    ns = _namespace(job)
    return f"{service_name(job.metadata.name)}.{ns}.svc.{settings.cluster_domain}:{PORT_GCS}"


# ------------------------------------------------------------------------------ helpers


def _namespace(job: LLMTrainingJob) -> str:
    return job.metadata.namespace or "default"


def _meta(job: LLMTrainingJob, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    base = {
        LABEL_JOB: job.metadata.name,
        LABEL_RAY_CLUSTER: job.metadata.name,
        LABEL_MANAGED_BY: MANAGED_BY,
    }
    return {"name": name, "namespace": _namespace(job), "labels": {**base, **(labels or {})}}


def selector_labels(job_name: str) -> dict[str, str]:
    """Labels that select every pod of one job (the pod index, NetworkPolicy, deletes)."""
    return {LABEL_JOB: job_name}


def _dump(model: Any) -> Any:
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


def _env(job: LLMTrainingJob) -> list[dict[str, Any]]:
    """Environment of every Ray container: lockdown first, then storage, then the user's."""
    name = job.metadata.name
    spec = job.spec
    env: list[dict[str, Any]] = [
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        # Token authentication (Ray >= 2.52): every GCS/dashboard/client call carries it.
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {
            "name": "RAY_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": auth_secret_name(name), "key": AUTH_TOKEN_KEY}},
        },
        {"name": "RAY_CLUSTER_NAME", "value": name},
        {"name": "LLMTRAIN_JOB_NAME", "value": name},
        {"name": "LLMTRAIN_SPEC_PATH", "value": f"{SPEC_MOUNT}/{SPEC_FILE}"},
        {"name": "LLMTRAIN_METRICS_PORT", "value": str(spec.metrics.port)},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    return _with_user_env(job, env + storage_env(job.spec.storage))


def _with_user_env(job: LLMTrainingJob, env: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The operator's variables, then spec.resources.env (which may not override them)."""
    spec = job.spec
    ours = {e["name"] for e in env}
    for i, user in enumerate(spec.resources.env):
        if user.name in ours:
            raise ManifestError(
                f"spec.resources.env[{i}].name",
                f"{user.name} is set by the operator; remove it (storage credentials go in "
                "spec.storage.secretRef)",
            )
        env.append(_user_env(user))
    return env


def _user_env(e: EnvVar) -> dict[str, Any]:
    out: dict[str, Any] = {"name": e.name}
    if e.value is not None:
        out["value"] = e.value
    if e.value_from is not None:
        src = e.value_from
        if src.secret_key_ref is not None:
            out["valueFrom"] = {"secretKeyRef": _dump(src.secret_key_ref)}
        elif src.config_map_key_ref is not None:
            out["valueFrom"] = {"configMapKeyRef": _dump(src.config_map_key_ref)}
    return out


def _toleration(t: Toleration) -> dict[str, Any]:
    out: dict[str, Any] = _dump(t)
    return out


def _volume_mount(m: VolumeMount) -> dict[str, Any]:
    out: dict[str, Any] = _dump(m)
    return out


def _volumes_and_mounts(job: LLMTrainingJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    res = job.spec.resources
    volumes: list[dict[str, Any]] = [
        # Ray's object store and NCCL live in /dev/shm; the container default is 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
        {"name": "llmtrain-spec", "configMap": {"name": spec_configmap_name(job.metadata.name)}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "llmtrain-spec", "mountPath": SPEC_MOUNT, "readOnly": True},
    ]
    ours = {v["name"] for v in volumes}
    user_volumes = [_dump(v) for v in res.volumes]
    for i, v in enumerate(user_volumes):
        if not isinstance(v.get("name"), str) or not v["name"]:
            raise ManifestError(f"spec.resources.volumes[{i}].name", "every volume needs a name")
        if v["name"] in ours:
            raise ManifestError(
                f"spec.resources.volumes[{i}].name", f"{v['name']!r} is used by the operator; rename it"
            )
    names = {v["name"] for v in user_volumes}
    for i, m in enumerate(res.volume_mounts):
        if m.name not in names:
            raise ManifestError(
                f"spec.resources.volumeMounts[{i}].name",
                f"no volume named {m.name!r} in spec.resources.volumes; add it there",
            )
        if m.mount_path in ("/dev/shm", SPEC_MOUNT):
            raise ManifestError(
                f"spec.resources.volumeMounts[{i}].mountPath",
                f"{m.mount_path} is mounted by the operator; choose another path",
            )
    return volumes + user_volumes, mounts + [_volume_mount(m) for m in res.volume_mounts]


def _labels(job: LLMTrainingJob, role: str, index: int | None) -> dict[str, str]:
    res = job.spec.resources
    for key in res.pod_labels:
        if key in RESERVED_LABELS or key == LABEL_MANAGED_BY or key.startswith(RESERVED_LABEL_PREFIXES):
            raise ManifestError(f"spec.resources.podLabels.{key}", f"{key} is set by the operator; remove it")
    labels = {
        **res.pod_labels,
        LABEL_JOB: job.metadata.name,
        LABEL_ROLE: role,
        LABEL_RAY_CLUSTER: job.metadata.name,
        LABEL_RAY_NODE_TYPE: role,
        LABEL_MANAGED_BY: MANAGED_BY,
    }
    if index is not None:
        labels[LABEL_WORKER_INDEX] = str(index)
    return labels


def _annotations(job: LLMTrainingJob) -> dict[str, str]:
    res = job.spec.resources
    ann = dict(res.pod_annotations)
    return ann


def _scrape_annotations(job: LLMTrainingJob, settings: OperatorSettings, role: str) -> dict[str, str]:
    """The annotations name one port per pod: a worker's training metrics, the head's Ray
    metrics (Ray's own series; the PodMonitor scrapes both ports of every pod)."""
    if not settings.prometheus_scrape_annotations:
        return {}
    m = job.spec.metrics
    port = m.port if role == ROLE_WORKER and m.enabled else PORT_METRICS
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    # Requests equal limits: Guaranteed QoS, so the kubelet never evicts a Ray node for
    # memory pressure caused by a neighbour, and GPUs must be equal anyway.
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
    return {"requests": dict(limits), "limits": limits}


def _probe() -> dict[str, Any]:
    return {"httpGet": {"path": "/api/healthz", "port": PORT_DASHBOARD_AGENT}}


# Ray opens a file per connection and object; container runtimes often default to 1024. A
# non-root container can raise its soft limit only up to the hard limit the runtime gave it
# (a sandboxed node may cap that below 65536): then take the hard limit, silently.
RAISE_NOFILE = 'ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"'


def _shell(cmd: str) -> dict[str, Any]:
    return {"command": ["/bin/bash", "-c", "--"], "args": [f"{RAISE_NOFILE}; exec {cmd}"]}


# ------------------------------------------------------------------------------- pods


# The `restricted` Pod Security Standard, on every pod and container the operator makes: the
# pods run only Python and Ray as the image's numeric non-root user (65532 in ours; an image
# whose USER is a name or root is refused by the kubelet with a clear CreateContainerConfigError).
POD_SECURITY_CONTEXT: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


def _restricted(container: dict[str, Any]) -> dict[str, Any]:
    container["securityContext"] = copy.deepcopy(CONTAINER_SECURITY_CONTEXT)
    return container


def _pod_identity(job: LLMTrainingJob) -> dict[str, Any]:
    """Pull secrets, service account, API token, priority class and the pod's security
    context: the same for every pod of the job."""
    res = job.spec.resources
    out: dict[str, Any] = {"securityContext": copy.deepcopy(POD_SECURITY_CONTEXT)}
    if res.image_pull_secrets:
        out["imagePullSecrets"] = [_dump(s) for s in res.image_pull_secrets]
    if res.service_account_name:
        out["serviceAccountName"] = res.service_account_name
    else:
        # Ray and `llmtrain serve` never call the Kubernetes API: without a ServiceAccount the
        # user chose, a pod gets no API token to leak (the namespace default's would be mounted).
        out["automountServiceAccountToken"] = False
    if res.priority_class_name:
        out["priorityClassName"] = res.priority_class_name
    return out


def _pod(
    job: LLMTrainingJob,
    settings: OperatorSettings,
    *,
    name: str,
    role: str,
    index: int | None,
    container: dict[str, Any],
    init_containers: list[dict[str, Any]],
) -> dict[str, Any]:
    res = job.spec.resources
    volumes, mounts = _volumes_and_mounts(job)
    container["volumeMounts"] = [dict(v) for v in mounts]
    for c in init_containers:
        c["volumeMounts"] = [dict(v) for v in mounts]
    spec: dict[str, Any] = {
        # A Ray node that exits is a lost rank: the operator restarts the whole cluster
        # (status.restarts, spec.backoffLimit), never the kubelet behind its back.
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "containers": [_restricted(container)],
        "volumes": volumes,
    }
    if init_containers:
        spec["initContainers"] = [_restricted(c) for c in init_containers]
    spec.update(_pod_identity(job))
    if role == ROLE_WORKER:
        # Placement targets the GPU pool; the head runs no training and stays off it.
        if res.node_selector:
            spec["nodeSelector"] = dict(res.node_selector)
        if res.tolerations:
            spec["tolerations"] = [_toleration(t) for t in res.tolerations]
        if res.affinity is not None:
            spec["affinity"] = _dump(res.affinity)
    # The job's own podAnnotations win over the operator-wide scrape annotations.
    annotations = {**_scrape_annotations(job, settings, role), **_annotations(job)}
    meta: dict[str, Any] = {
        "name": name,
        "namespace": _namespace(job),
        "labels": _labels(job, role, index),
    }
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def head_pod(job: LLMTrainingJob, settings: OperatorSettings) -> dict[str, Any]:
    """The Ray head: GCS, dashboard, Jobs API; ``--num-cpus=0 --num-gpus=0`` so no task lands on it."""
    res = job.spec.resources
    cmd = (
        "ray start --head --block --dashboard-host=0.0.0.0 --num-cpus=0 --num-gpus=0 "
        f"--port={PORT_GCS} --ray-client-server-port={PORT_CLIENT} --dashboard-port={PORT_DASHBOARD} "
        f"--metrics-export-port={PORT_METRICS} --dashboard-agent-listen-port={PORT_DASHBOARD_AGENT}"
    )
    container: dict[str, Any] = {
        "name": RAY_CONTAINER,
        "image": res.image,
        **_shell(cmd),
        "env": _env(job),
        "resources": _resources(res.head.cpu, res.head.memory),
        "ports": [
            {"name": "gcs", "containerPort": PORT_GCS},
            {"name": "dashboard", "containerPort": PORT_DASHBOARD},
            {"name": "client", "containerPort": PORT_CLIENT},
            {"name": "metrics", "containerPort": PORT_METRICS},
            # The driver runs here: while it tunes, it serves the llmtrain_tune_* series on
            # the training metrics port (the PodMonitor scrapes ports by this name).
            *_tune_metrics_port(job),
            {"name": "dashboard-agent", "containerPort": PORT_DASHBOARD_AGENT},
        ],
        "readinessProbe": {**_probe(), **_PROBE_READINESS},
        "livenessProbe": {**_probe(), **_PROBE_LIVENESS},
    }
    return _pod(
        job,
        settings,
        name=head_name(job.metadata.name),
        role=ROLE_HEAD,
        index=None,
        container=container,
        init_containers=[],
    )


def _tune_metrics_port(job: LLMTrainingJob) -> list[dict[str, Any]]:
    if job.spec.tuning is None or not job.spec.metrics.enabled:
        return []
    return [{"name": "train-metrics", "containerPort": job.spec.metrics.port}]


def worker_pod(job: LLMTrainingJob, settings: OperatorSettings, index: int) -> dict[str, Any]:
    """Ray worker ``index``: joins the head Service and advertises exactly its pod's resources."""
    res = job.spec.resources
    address = head_address(job, settings)
    memory_bytes = int(parse_quantity(res.worker.memory))
    cmd = (
        f"ray start --address={address} --block --num-cpus={ray_num_cpus(res.worker.cpu)} "
        f"--num-gpus={res.gpus_per_worker} --memory={memory_bytes} "
        f"--metrics-export-port={PORT_METRICS} --dashboard-agent-listen-port={PORT_DASHBOARD_AGENT}"
    )
    env = _env(job)
    container: dict[str, Any] = {
        "name": RAY_CONTAINER,
        "image": res.image,
        **_shell(cmd),
        "env": env,
        "resources": _resources(res.worker.cpu, res.worker.memory, res.gpus_per_worker),
        "ports": [
            {"name": "metrics", "containerPort": PORT_METRICS},
            {"name": "train-metrics", "containerPort": job.spec.metrics.port},
            {"name": "dashboard-agent", "containerPort": PORT_DASHBOARD_AGENT},
        ],
        "readinessProbe": {**_probe(), **_PROBE_READINESS},
        "livenessProbe": {**_probe(), **_PROBE_LIVENESS},
    }
    # Joining before the GCS answers makes `ray start` fail; wait for it (KubeRay's
    # wait-gcs-ready). The token is needed: health-check is authenticated too.
    wait_gcs = {
        "name": "wait-gcs-ready",
        "image": res.image,
        "command": ["/bin/bash", "-c", "--"],
        "args": [
            f"until ray health-check --address={address} >/dev/null 2>&1; do "
            f"echo 'waiting for the Ray GCS at {address}'; sleep 2; done"
        ],
        "env": env,
        "resources": _resources("200m", "256Mi"),
    }
    return _pod(
        job,
        settings,
        name=worker_name(job.metadata.name, index),
        role=ROLE_WORKER,
        index=index,
        container=container,
        init_containers=[wait_gcs],
    )


def pods(job: LLMTrainingJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Every pod, head first; names match :func:`pod_names`."""
    return [head_pod(job, settings)] + [
        worker_pod(job, settings, i) for i in range(job.spec.resources.workers)
    ]


# ------------------------------------------------------------------------ the rest


def head_service(job: LLMTrainingJob) -> dict[str, Any]:
    """Headless Service of the head: a stable DNS name for workers and clients."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, service_name(job.metadata.name)),
        "spec": {
            "clusterIP": "None",
            # Workers resolve the head before it is Ready (its GCS is up long before the
            # dashboard probe passes); without this they would wait on DNS.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: job.metadata.name, LABEL_ROLE: ROLE_HEAD},
            "ports": [
                {"name": "gcs", "port": PORT_GCS, "targetPort": PORT_GCS},
                {"name": "dashboard", "port": PORT_DASHBOARD, "targetPort": PORT_DASHBOARD},
                {"name": "client", "port": PORT_CLIENT, "targetPort": PORT_CLIENT},
                {"name": "metrics", "port": PORT_METRICS, "targetPort": PORT_METRICS},
            ],
        },
    }


def auth_secret(job: LLMTrainingJob, token: str) -> dict[str, Any]:
    """The per-job Ray auth token (the caller draws it: ``secrets.token_hex(32)``, 32 random bytes)."""
    if len(token) < 32:
        raise ValueError("the Ray auth token must carry at least 32 random bytes")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(job, auth_secret_name(job.metadata.name)),
        "type": "Opaque",
        "immutable": True,
        "data": {AUTH_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def spec_document(job: LLMTrainingJob) -> dict[str, Any]:
    """The job as its driver reads it: the spec ConfigMap's file, and the Ray job's runtime env.
    ``metadata.uid`` goes with it: the driver's owner record at the output prefix names the job
    by it, so a job created again under the same name is another owner (runtime/owner.py)."""
    meta = {"name": job.metadata.name, "namespace": _namespace(job)}
    uid = (job.metadata.model_extra or {}).get("uid")
    if uid:
        meta["uid"] = str(uid)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": meta,
        "spec": job.spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
    }


def spec_text(job: LLMTrainingJob) -> str:
    """The spec ConfigMap's file, byte for byte (what the driver reads and checks the digest of)."""
    return yaml.safe_dump(spec_document(job), sort_keys=False)


def spec_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def spec_configmap(job: LLMTrainingJob) -> dict[str, Any]:
    """The job spec as the pods read it (``LLMTRAIN_SPEC_PATH``); kept equal to the spec
    before each submission (the mutable fields may have changed since the pods were made)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, spec_configmap_name(job.metadata.name)),
        "data": {SPEC_FILE: spec_text(job)},
    }


def driver_spec_path(settings: OperatorSettings, namespace: str, name: str) -> str:
    return settings.driver_spec_path.format(namespace=namespace, name=name)


def network_policy(job: LLMTrainingJob, settings: OperatorSettings) -> dict[str, Any]:
    """Ingress to the job's pods: its own pods (all ports: Ray's object and worker ports are
    dynamic), the operator's namespace (Jobs API, driver progress) and Prometheus (metrics ports).

    It only narrows what a namespace default-deny lets through and is enforced by the CNI;
    the default-deny itself is the cluster admin's part.
    """
    name = job.metadata.name
    metrics_ports = [{"protocol": "TCP", "port": PORT_METRICS}]
    if job.spec.metrics.enabled:
        metrics_ports.append({"protocol": "TCP", "port": job.spec.metrics.port})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(job, network_policy_name(name)),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": selector_labels(name)}}]},
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": settings.operator_namespace}
                            }
                        }
                    ],
                    # The Jobs API and the driver's progress endpoint: the operator polls both.
                    "ports": [
                        {"protocol": "TCP", "port": PORT_DASHBOARD},
                        {"protocol": "TCP", "port": PORT_PROGRESS},
                    ],
                },
                {
                    "from": [
                        {
                            "namespaceSelector": {"matchLabels": dict(settings.prometheus_namespace_labels)},
                            "podSelector": {"matchLabels": dict(settings.prometheus_pod_labels)},
                        }
                    ],
                    "ports": metrics_ports,
                },
            ],
        },
    }


def disruption_budget(job: LLMTrainingJob) -> dict[str, Any]:
    """The PodDisruptionBudget of the job's Ray pods: no voluntary eviction at all
    (``maxUnavailable: 0``), so ``kubectl drain`` (and any evicting controller) waits while
    the operator takes a just-in-time checkpoint and then deletes the pods itself
    (operator/disruption.py); the new attempt's pods land elsewhere. A Ray cluster loses its
    whole attempt with any one pod, so there is no partial budget to give. Not Ready pods
    are held too (no ``unhealthyPodEvictionPolicy: AlwaysAllow``): a head whose readiness
    probe misses once must not lose its run to a drain without its checkpoint; a drain
    never hangs on them, since the operator lifts the budget for every drain it sees."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(job, disruption_budget_name(job.metadata.name)),
        "spec": {
            "maxUnavailable": 0,
            "selector": {"matchLabels": selector_labels(job.metadata.name)},
        },
    }


def static_children(job: LLMTrainingJob, settings: OperatorSettings, token: str) -> list[dict[str, Any]]:
    """Everything but the pods, in creation order (pods reference the Secret and ConfigMap;
    the PodDisruptionBudget is there before any pod can be evicted)."""
    return [
        auth_secret(job, token),
        spec_configmap(job),
        head_service(job),
        network_policy(job, settings),
        disruption_budget(job),
    ]


# ---------------------------------------------------------------------------- serving
# spec.serve on a Succeeded job: `llmtrain serve` over the export in a Deployment, a Service
# and a NetworkPolicy. Their pods carry LABEL_SERVE, never LABEL_JOB: the pod index and the
# diagnosis see the Ray cluster's pods only.

LABEL_SERVE = "llmtrain.dev/serve"
ANN_SERVE_HASH = "llmtrain.dev/spec-hash"  # what each serving object was last made from
SERVE_CONTAINER = "serve"
SERVE_KINDS = ("Deployment", "Service", "NetworkPolicy")
# Every key serve_deployment may set in its pod template's spec: one it leaves out is removed
# from the live Deployment on the next patch (serving.replacing).
SERVE_POD_KEYS = (
    "enableServiceLinks",
    "containers",
    "volumes",
    "nodeSelector",
    "tolerations",
    "securityContext",
    "imagePullSecrets",
    "serviceAccountName",
    "automountServiceAccountToken",
    "priorityClassName",
)
# spec.serve.apiKeySecretRef's key, as a file the server reads (--api-key-file).
SERVE_KEY_VOLUME = "serve-api-key"
SERVE_KEY_MOUNT = "/var/run/llmtrain/serve-key"
SERVE_KEY_FILE = "api-key"


def serve_name(job: str) -> str:
    return f"{job}-serve"


def serve_url(namespace: str, job: str, port: int, settings: OperatorSettings) -> str:
    """The OpenAI-compatible base URL inside the cluster (the Service's DNS name)."""
    return f"http://{serve_name(job)}.{namespace}.svc.{settings.cluster_domain}:{port}/v1"


def _serve_meta(job: LLMTrainingJob, body: dict[str, Any]) -> dict[str, Any]:
    name = serve_name(job.metadata.name)
    labels = {LABEL_SERVE: job.metadata.name, LABEL_MANAGED_BY: MANAGED_BY}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "name": name,
        "namespace": _namespace(job),
        "labels": labels,
        "annotations": {ANN_SERVE_HASH: digest},
    }


def serve_storage(job: LLMTrainingJob) -> StorageSpec:
    """spec.storage as the server pods see it: spec.serve.storageSecretRef's credentials (meant
    to be read-only: the server only reads the export) in place of spec.storage.secretRef's."""
    serve = job.spec.serve
    storage = job.spec.storage
    if serve is None or serve.storage_secret_ref is None:
        return storage
    return storage.model_copy(update={"secret_ref": serve.storage_secret_ref})


def serve_deployment(job: LLMTrainingJob, model_uri: str) -> dict[str, Any]:
    """``llmtrain serve`` over the exported model, on the training pool unless spec.serve says
    otherwise; ready once ``/health`` answers (the model is loaded before the port opens)."""
    serve = job.spec.serve
    assert serve is not None
    res = job.spec.resources
    selector = {LABEL_SERVE: job.metadata.name}
    command = [
        "llmtrain",
        "serve",
        "--model",
        model_uri,
        "--host",
        "0.0.0.0",
        "--port",
        str(serve.port),
        "--served-model-name",
        job.metadata.name,
    ]
    if serve.max_waiting is not None:
        command += ["--max-waiting", str(serve.max_waiting)]
    # Always a list, even empty: the Deployment is kept to the spec by a JSON merge patch, where
    # a key left out keeps its old value, so unsetting apiKeySecretRef would leave its volume.
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if serve.api_key_secret_ref is not None:
        ref = serve.api_key_secret_ref
        # A file, not an environment variable: it stays out of `kubectl describe` and the
        # environment of every process the server starts. One item under a fixed name, so the
        # path never depends on the key's spelling.
        volumes.append(
            {
                "name": SERVE_KEY_VOLUME,
                "secret": {
                    "secretName": ref.name,
                    "items": [{"key": ref.key, "path": SERVE_KEY_FILE}],
                    "defaultMode": 0o444,
                },
            }
        )
        mounts.append({"name": SERVE_KEY_VOLUME, "mountPath": SERVE_KEY_MOUNT, "readOnly": True})
        command += ["--api-key-file", f"{SERVE_KEY_MOUNT}/{SERVE_KEY_FILE}"]
    container: dict[str, Any] = {
        "name": SERVE_CONTAINER,
        "image": res.image,
        "command": command,
        "env": _with_user_env(job, storage_env(serve_storage(job))),
        "resources": _resources(serve.resources.cpu, serve.resources.memory, serve.gpus),
        "ports": [{"name": "http", "containerPort": serve.port}],
        # Loading the model from S3 takes a while: readiness gates traffic, liveness only
        # restarts a server that stopped answering for a minute.
        "readinessProbe": {"httpGet": {"path": "/health", "port": serve.port}, **_PROBE_READINESS},
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": serve.port},
            "initialDelaySeconds": 120,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
    }
    if mounts:
        container["volumeMounts"] = mounts
    pod: dict[str, Any] = {
        "enableServiceLinks": False,
        "containers": [_restricted(container)],
        "volumes": volumes,
    }
    node_selector = res.node_selector if serve.node_selector is None else serve.node_selector
    tolerations = res.tolerations if serve.tolerations is None else serve.tolerations
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = [_toleration(t) for t in tolerations]
    pod.update(_pod_identity(job))
    spec = {
        "replicas": serve.replicas,
        "revisionHistoryLimit": 2,
        "selector": {"matchLabels": selector},
        "template": {"metadata": {"labels": {**selector, LABEL_MANAGED_BY: MANAGED_BY}}, "spec": pod},
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _serve_meta(job, spec), "spec": spec}


def serve_service(job: LLMTrainingJob) -> dict[str, Any]:
    serve = job.spec.serve
    assert serve is not None
    spec = {
        "selector": {LABEL_SERVE: job.metadata.name},
        "ports": [{"name": "http", "port": serve.port, "targetPort": "http", "protocol": "TCP"}],
    }
    return {"apiVersion": "v1", "kind": "Service", "metadata": _serve_meta(job, spec), "spec": spec}


def serve_network_policy(job: LLMTrainingJob, settings: OperatorSettings) -> dict[str, Any]:
    """Ingress to the server's port from the namespaces/pods spec.serve names (unset: the job's
    own namespace) and from Prometheus (its /metrics is on the same port); nothing else."""
    serve = job.spec.serve
    assert serve is not None
    client: dict[str, Any] = {}
    if serve.allowed_namespaces is not None:
        client["namespaceSelector"] = {"matchLabels": dict(serve.allowed_namespaces)}
    client["podSelector"] = {"matchLabels": dict(serve.allowed_pods or {})}
    prometheus = {
        "namespaceSelector": {"matchLabels": dict(settings.prometheus_namespace_labels)},
        "podSelector": {"matchLabels": dict(settings.prometheus_pod_labels)},
    }
    spec = {
        "podSelector": {"matchLabels": {LABEL_SERVE: job.metadata.name}},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [client, prometheus], "ports": [{"protocol": "TCP", "port": serve.port}]}],
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _serve_meta(job, spec),
        "spec": spec,
    }


def serving_objects(job: LLMTrainingJob, settings: OperatorSettings, model_uri: str) -> list[dict[str, Any]]:
    """In creation order: the NetworkPolicy before anything listens, the Deployment last."""
    return [serve_network_policy(job, settings), serve_service(job), serve_deployment(job, model_uri)]
