"""`helm install` of charts/llmtrain into the real control plane (tests/cluster).

* Cluster-wide install: the CRDs are Established, the operator's pod is admitted under the
  `restricted` Pod Security Standard and Running on a KWOK node, `kubectl auth can-i` as
  the operator's ServiceAccount says yes to everything the operator needs (derived from
  its code by tests/unit/test_helm_chart.py) and no to what it must not do;
  `helm uninstall` removes every object but the CRDs.
* Namespaced install (`watchNamespaces`): Roles only where asked, and the operator itself,
  run with the ServiceAccount's own token, reconciles a job (Ray pods created, status
  written, Events posted, Kopf's finalizer removed on delete) with no 403 anywhere.

KWOK plays the kubelet: containers never run, so the operator is run here as a process
with the chart's credentials. Nothing connects to a pod or service IP.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.manifests import gpu_job  # noqa: E402
from tests.unit.test_helm_chart import Rule, operator_needs  # noqa: E402

Cluster = Any  # conftest.Cluster (tests/integration is not a package)

pytestmark = pytest.mark.cluster

CHART = ROOT / "charts" / "llmtrain"
GROUP, VERSION, PLURAL = "llmtrain.dev", "v1alpha1", "llmtrainingjobs"
CRDS = ("llmtrainingjobs.llmtrain.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev")

# What the operator must never be able to do, whatever the install mode.
FORBIDDEN: list[tuple[str, ...]] = [
    ("delete", "nodes"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ("impersonate", "serviceaccounts"),
    ("create", "pods", "--subresource=exec"),
    ("create", "serviceaccounts", "--subresource=token"),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io"),
    ("update", "llmtrainingjobs.llmtrain.dev"),
    ("delete", "llmtrainingjobs.llmtrain.dev"),
    ("update", "deployments.apps"),
    ("list", "secrets", "-n", "kube-system"),
]


# ------------------------------------------------------------------------------ helpers


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ns(cluster: Cluster, prefix: str, labels: dict[str, str] | None = None) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace(
        {"metadata": {"name": name, "labels": {"llmtrain.dev/test": "true", **(labels or {})}}}
    )
    return name


def _delete_ns(cluster: Cluster, *names: str) -> None:
    for n in names:
        cluster.kubectl("delete", "namespace", n, "--wait=false", "--ignore-not-found", check=False)


def can_i(cluster: Cluster, sa: str, verb: str, resource: str, *extra: str) -> bool:
    """``kubectl auth can-i`` for a resource the server serves; a SubjectAccessReview (the same
    question, asked of the authorizer directly) for one it does not: kubectl resolves the
    resource through discovery, and for a group no CRD serves here (Kueue's, when Kueue is not
    installed) it drops the group and asks about a resource "workloads.kueue.x-k8s.io" of the
    core group, which RBAC rightly refuses."""
    base, _, group = resource.partition(".")
    if group and not _served(cluster, group, base):
        return _access_review(cluster, sa, verb, group, base, *extra)
    r = cluster.kubectl("auth", "can-i", verb, resource, f"--as={sa}", *extra, check=False)
    answer = r.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i {verb} {resource}: {r.stdout}{r.stderr}"
    return answer == "yes"


def _served(cluster: Cluster, group: str, resource: str) -> bool:
    r = cluster.kubectl("api-resources", f"--api-group={group}", "-o", "name", check=False)
    return f"{resource}.{group}" in r.stdout.split()


def _access_review(cluster: Cluster, sa: str, verb: str, group: str, resource: str, *extra: str) -> bool:
    from kubernetes import client

    namespace = extra[extra.index("-n") + 1] if "-n" in extra else None
    sub = next((e.split("=", 1)[1] for e in extra if e.startswith("--subresource=")), None)
    sa_ns = sa.split(":")[2]
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=sa,
            groups=["system:serviceaccounts", f"system:serviceaccounts:{sa_ns}", "system:authenticated"],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, group=group, resource=resource, subresource=sub, namespace=namespace
            ),
        )
    )
    out = client.AuthorizationV1Api(cluster.api_client).create_subject_access_review(review)
    return bool(out.status.allowed)


def resource_arg(rule: Rule) -> tuple[str, list[str]]:
    group, resource, _ = rule
    base, _, sub = resource.partition("/")
    name = f"{base}.{group}" if group else base
    return name, [f"--subresource={sub}"] if sub else []


def crd_established(cluster: Cluster, name: str) -> bool:
    try:
        conds = cluster.apiext.read_custom_resource_definition(name).status.conditions or []
    except Exception:
        return False
    return any(c.type == "Established" and c.status == "True" for c in conds)


def deployment_pod(cluster: Cluster, ns: str, deploy: str) -> Any:
    """The Deployment's pod once Running. The test control plane runs no deployment or
    replicaset controller (tests/cluster/controlplane.py: --controllers), so when no
    ReplicaSet shows up the test creates the pod from the Deployment's template, owned by
    the Deployment, exactly as the ReplicaSet controller would: it still goes through
    admission (Pod Security), the scheduler and KWOK."""
    from kubernetes import client

    apps = client.AppsV1Api(cluster.api_client)
    dep = apps.read_namespaced_deployment(deploy, ns)
    selector = ",".join(f"{k}={v}" for k, v in dep.spec.selector.match_labels.items())

    def pods() -> list[Any]:
        return list(cluster.core.list_namespaced_pod(ns, label_selector=selector).items)

    try:
        cluster.wait_for(
            lambda: apps.list_namespaced_replica_set(ns, label_selector=selector).items,
            timeout=5,
            what="a ReplicaSet",
        )
    except pytest.fail.Exception:
        template = cluster.api_client.sanitize_for_serialization(dep.spec.template)
        template.update(apiVersion="v1", kind="Pod")
        template["metadata"]["name"] = f"{deploy}-from-template"
        template["metadata"]["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": "Deployment", "name": deploy, "uid": dep.metadata.uid}
        ]
        r = cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(template), check=False)
        assert r.returncode == 0, f"the operator's pod was rejected:\n{r.stderr}"
    return cluster.wait_for(
        lambda: next((p for p in pods() if p.status.phase == "Running"), None),
        timeout=60,
        what=f"a Running pod of deployment {deploy}",
    )


def client_apps(cluster: Cluster) -> Any:
    from kubernetes import client

    return client.AppsV1Api(cluster.api_client)


def sa_kubeconfig(cluster: Cluster, ns: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount with a fresh bound token."""
    token = cluster.kubectl("create", "token", sa, "-n", ns, "--duration=1h").stdout.strip()
    cfg = yaml.safe_load(cluster.kubeconfig.read_text())
    ctx = cfg["contexts"][0]
    ctx["context"]["user"] = "operator"
    cfg["users"] = [{"name": "operator", "user": {"token": token}}]
    cfg["current-context"] = ctx["name"]
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


class Release:
    def __init__(self, cluster: Cluster, name: str, ns: str, *values: str) -> None:
        self.cluster, self.name, self.ns = cluster, name, ns
        self.installed = False
        self.values = values

    def install(self) -> str:
        # Helm 4 server-side-applies crds/ even when they exist; when another field manager
        # (a user's `kubectl apply --server-side`, or an earlier test) owns them, it stops on
        # a conflict unless told to take them over (README: "Install on Kubernetes").
        r = self.cluster.helm(
            "install", self.name, str(CHART), "-n", self.ns, "--force-conflicts", *self.values, timeout=180
        )
        self.installed = True
        return str(r.stdout)

    def uninstall(self) -> None:
        if self.installed:
            self.cluster.helm("uninstall", self.name, "-n", self.ns, "--wait", "--timeout=90s", timeout=120)
            self.installed = False

    def manifest(self) -> list[dict[str, Any]]:
        out = self.cluster.helm("get", "manifest", self.name, "-n", self.ns).stdout
        return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture
def release_ns(cluster: Cluster) -> Iterator[str]:
    # `restricted` enforced: the operator's pod must pass the strictest Pod Security level.
    ns = _ns(cluster, "llmtrain-system", {"pod-security.kubernetes.io/enforce": "restricted"})
    yield ns
    _delete_ns(cluster, ns)


def _object_exists(cluster: Cluster, doc: dict[str, Any], default_ns: str) -> bool:
    ns = doc["metadata"].get("namespace")
    args = ["get", doc["kind"].lower(), doc["metadata"]["name"], "--ignore-not-found", "-o", "name"]
    cluster_scoped = doc["kind"] in ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering", "Namespace")
    if not cluster_scoped:
        args += ["-n", ns or default_ns]
    if doc["kind"] in ("KopfPeering", "ClusterKopfPeering"):
        args[1] = f"{doc['kind'].lower()}s.kopf.dev"
    return bool(cluster.kubectl(*args).stdout.strip())


# ------------------------------------------------------------------------------- the tests


def test_cluster_wide_install(cluster: Cluster, release_ns: str) -> None:
    rel = Release(cluster, f"llmtrain-{uuid.uuid4().hex[:5]}", release_ns)
    try:
        notes = rel.install()
        assert "reconciles LLMTrainingJobs" in notes and "every namespace" in notes
        for crd in CRDS:
            cluster.wait_for(
                lambda crd=crd: crd_established(cluster, crd), timeout=30, what=f"{crd} Established"
            )
        docs = rel.manifest()
        (dep,) = [d for d in docs if d["kind"] == "Deployment"]
        sa_name = dep["spec"]["template"]["spec"]["serviceAccountName"]
        sa = f"system:serviceaccount:{release_ns}:{sa_name}"

        pod = deployment_pod(cluster, release_ns, dep["metadata"]["name"])
        assert pod.spec.node_name, pod.spec
        node = cluster.core.read_node(pod.spec.node_name)
        assert (node.metadata.annotations or {}).get("kwok.x-k8s.io/node") == "fake"
        assert pod.spec.security_context.run_as_non_root is True
        # The namespace enforces `restricted`: the same pod with privilege escalation allowed
        # is refused, so the admission above was a real check.
        bad = cluster.api_client.sanitize_for_serialization(pod)
        bad.update(apiVersion="v1", kind="Pod", metadata={"name": "escalating", "namespace": release_ns})
        bad.pop("status", None)
        bad["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
        bad["spec"].pop("nodeName", None)
        r = cluster.kubectl("create", "-f", "-", input=json.dumps(bad), check=False)
        assert r.returncode != 0 and "PodSecurity" in r.stderr, r.stdout + r.stderr

        # An upgrade with new values rolls the Deployment's arguments.
        cluster.helm(
            "upgrade",
            rel.name,
            str(CHART),
            "-n",
            release_ns,
            "--reuse-values",
            "--set",
            "reconcileInterval=10",
        )
        args = client_apps(cluster).read_namespaced_deployment(dep["metadata"]["name"], release_ns)
        assert "--interval=10" in args.spec.template.spec.containers[0].args

        need_ns, need_cluster = operator_needs(namespaced=False)
        other = _ns(cluster, "t-anywhere")
        try:
            for rule in sorted(need_ns):
                res, extra = resource_arg(rule)
                assert can_i(cluster, sa, rule[2], res, *extra, "-n", other), f"cannot {rule} in {other}"
                assert can_i(cluster, sa, rule[2], res, *extra, "--all-namespaces"), (
                    f"cannot {rule} cluster-wide"
                )
            for rule in sorted(need_cluster):
                res, extra = resource_arg(rule)
                assert can_i(cluster, sa, rule[2], res, *extra), f"cannot {rule}"
            for verb, res, *extra in FORBIDDEN:
                if res == "secrets":  # cluster-wide it does read Secrets (its own, in every namespace)
                    continue
                assert not can_i(cluster, sa, verb, res, *extra, "-n", other), f"may {verb} {res} {extra}"
        finally:
            _delete_ns(cluster, other)

        rel.uninstall()
        left = [
            f"{d['kind']}/{d['metadata']['name']}" for d in docs if _object_exists(cluster, d, release_ns)
        ]
        assert left == [], f"helm uninstall left {left}"
        cluster.wait_for(
            lambda: not cluster.core.list_namespaced_pod(release_ns).items, timeout=30, what="the pod to go"
        )
        assert not can_i(cluster, sa, "list", "pods", "--all-namespaces")
        # Helm never deletes crds/: the jobs (users' data) outlive the operator.
        for crd in CRDS:
            assert crd_established(cluster, crd), f"{crd} was deleted by helm uninstall"
    finally:
        if rel.installed:
            rel.uninstall()


def as_operator(cluster: Cluster, sa: str, *args: str, body: dict[str, Any] | None = None) -> Any:
    """kubectl as the operator's ServiceAccount (impersonated: admission sees its username)."""
    extra = {"input": json.dumps(body)} if body is not None else {}
    return cluster.kubectl(f"--as={sa}", *args, check=False, **extra)


def obj(kind: str, ns: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A Secret, ConfigMap or (KWOK-scheduled) Pod to aim the operator's identity at."""
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": ns, "labels": labels},
    }
    if kind == "Pod":
        doc["spec"] = {"containers": [{"name": "c", "image": "example.invalid/none"}]}
    else:
        doc["stringData" if kind == "Secret" else "data"] = {"k": "v"}
    return doc


def test_admission_policy_holds_the_operator_to_its_own_objects(cluster: Cluster, release_ns: str) -> None:
    """Cluster-wide RBAC lets the operator patch and delete any pod, and delete any Secret; the
    chart's ValidatingAdmissionPolicy refuses it every object not labelled as its own, and
    anything in kube-system. Negative control: with the policy off the same patch goes through."""
    rel = Release(cluster, f"llmtrain-{uuid.uuid4().hex[:5]}", release_ns)
    other = _ns(cluster, "t-vap")
    try:
        rel.install()
        (dep,) = [d for d in rel.manifest() if d["kind"] == "Deployment"]
        sa = f"system:serviceaccount:{release_ns}:{dep['spec']['template']['spec']['serviceAccountName']}"
        ours = {"app.kubernetes.io/managed-by": "llmtrain-operator"}
        for kind in ("Pod", "Secret"):
            cluster.kubectl("create", "-f", "-", input=json.dumps(obj(kind, other, "foreign", {"team": "a"})))
        patch = ["annotate", "pod", "foreign", "-n", other, "llmtrain.dev/x=y"]

        # The policy reaches the apiserver's admission a moment after it is created.
        refused = cluster.wait_for(
            lambda: (r := as_operator(cluster, sa, *patch)).returncode != 0 and r,
            timeout=30,
            what="the admission policy to refuse the operator's patch of a foreign pod",
        )
        assert (
            "own-objects' with binding" in refused.stderr and "managed-by=llmtrain-operator" in refused.stderr
        )
        for kind in ("pod", "secret"):
            r = as_operator(cluster, sa, "delete", kind, "foreign", "-n", other, "--wait=false")
            assert r.returncode != 0 and "may only change or delete objects it made" in r.stderr, r.stderr
        r = as_operator(cluster, sa, "create", "-f", "-", body=obj("Secret", other, "unlabelled", {}))
        assert r.returncode != 0 and "may only write objects labelled" in r.stderr, r.stderr
        r = as_operator(
            cluster, sa, "create", "-f", "-", body=obj("Secret", "kube-system", "llmtrain-x", ours)
        )
        assert r.returncode != 0 and "writes nothing in kube-system" in r.stderr, r.stderr

        # Its own objects: created, patched, deleted...
        for kind in ("Secret", "ConfigMap"):
            r = as_operator(cluster, sa, "create", "-f", "-", body=obj(kind, other, "own", ours))
            assert r.returncode == 0, r.stderr
        r = as_operator(
            cluster, sa, "patch", "configmap", "own", "-n", other, "--type=merge", "-p", '{"data":{"k":"w"}}'
        )
        assert r.returncode == 0, r.stderr
        # ...but never relabelled away from the operator (it would escape the policy).
        r = as_operator(
            cluster, sa, "label", "configmap", "own", "-n", other, "app.kubernetes.io/managed-by-"
        )
        assert r.returncode != 0 and "may only write objects labelled" in r.stderr, r.stderr
        for kind in ("secret", "configmap"):
            assert as_operator(cluster, sa, "delete", kind, "own", "-n", other).returncode == 0

        # Negative control: RBAC alone lets the operator annotate the foreign pod.
        cluster.helm("upgrade", rel.name, str(CHART), "-n", release_ns, "--reuse-values",
                     "--set", "admissionPolicy.enabled=false")  # fmt: skip
        cluster.wait_for(
            lambda: as_operator(cluster, sa, *patch).returncode == 0,
            timeout=30,
            what="the foreign pod's patch to pass once the policy is gone",
        )
    finally:
        _delete_ns(cluster, other)
        rel.uninstall()


class OperatorProcess:
    """``python -m llmtrain.operator`` on a token of the chart's ServiceAccount, watching
    ``namespaces``, its liveness and metrics (+ /readyz) ports on loopback."""

    def __init__(
        self, cluster: Cluster, release_ns: str, sa_name: str, namespaces: list[str], tmp: Path
    ) -> None:
        kcfg = sa_kubeconfig(cluster, release_ns, sa_name, tmp / "operator.kubeconfig")
        self.live, self.metrics = _free_port(), _free_port()
        self.log_path = tmp / "operator.log"
        args = [sys.executable, "-m", "llmtrain.operator", "--interval", "0.5"]
        args += [a for ns in namespaces for a in ("--namespace", ns)]
        args += [
            "--liveness-port",
            str(self.live),
            "--metrics-port",
            str(self.metrics),
            "--bind-address",
            "127.0.0.1",
        ]
        args += ["--kubeconfig", str(kcfg), "--operator-namespace", release_ns, "--verbose"]
        # Not from the repository root: its operator/ folder would shadow the standard library's.
        self.proc = subprocess.Popen(args, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT, cwd=tmp)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, port: int, path: str) -> tuple[int, str]:
        assert self.proc.poll() is None, self.log()[-4000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode()
        except OSError:
            return 0, ""

    def alive(self) -> bool:
        return self.get(self.live, "/healthz")[0] == 200

    def readyz(self) -> tuple[int, str]:
        return self.get(self.metrics, "/readyz")


def test_readiness_says_why_when_the_operator_may_not_list_pods(
    cluster: Cluster, release_ns: str, tmp_path: Path
) -> None:
    """Told to watch a namespace its RBAC does not cover, the operator stays alive (liveness
    200) but not ready: /readyz is 503 naming the namespace and the 403, the failures are
    counted; once the chart grants that namespace, it becomes ready without a restart."""
    granted, forgotten = _ns(cluster, "t-granted"), _ns(cluster, "t-forgotten")
    rel = Release(
        cluster, f"llmtrain-{uuid.uuid4().hex[:5]}", release_ns, "--set", f"watchNamespaces={{{granted}}}"
    )
    op: OperatorProcess | None = None
    try:
        rel.install()
        (dep,) = [d for d in rel.manifest() if d["kind"] == "Deployment"]
        sa_name = dep["spec"]["template"]["spec"]["serviceAccountName"]
        op = OperatorProcess(cluster, release_ns, sa_name, [granted, forgotten], tmp_path)
        cluster.wait_for(op.alive, timeout=60, what="operator liveness endpoint")
        why = cluster.wait_for(
            lambda: (r := op.readyz())[0] == 503 and "http_403" in r[1] and r[1],
            timeout=30,
            what="/readyz 503, a 403",
        )
        assert f"pods in {forgotten}: http_403" in why and "RBAC must allow list and watch on pods" in why, (
            why
        )
        assert granted not in why, why
        assert op.alive()  # liveness stays green: a restart would not grant anything
        metrics = op.get(op.metrics, "/metrics")[1]
        assert 'llmtrain_operator_pod_watch_failures_total{kind="http_403"}' in metrics, metrics[-2000:]

        cluster.helm("upgrade", rel.name, str(CHART), "-n", release_ns, "--reuse-values",
                     "--set", f"watchNamespaces={{{granted},{forgotten}}}")  # fmt: skip
        cluster.wait_for(lambda: op.readyz() == (200, "ok\n"), timeout=30, what="/readyz 200 once granted")
    finally:
        if op is not None:
            op.proc.terminate()
            op.proc.wait(timeout=30)
        rel.uninstall()
        _delete_ns(cluster, granted, forgotten)


def test_namespaced_install_runs_the_operator_on_its_own_rules(
    cluster: Cluster, release_ns: str, tmp_path: Path
) -> None:
    watch = [_ns(cluster, "t-team-a"), _ns(cluster, "t-team-b")]
    outside = _ns(cluster, "t-outside")
    rel = Release(
        cluster,
        f"llmtrain-{uuid.uuid4().hex[:5]}",
        release_ns,
        "--set",
        f"watchNamespaces={{{','.join(watch)}}}",
    )
    proc: subprocess.Popen[bytes] | None = None
    try:
        rel.install()
        for crd in CRDS:
            cluster.wait_for(
                lambda crd=crd: crd_established(cluster, crd), timeout=30, what=f"{crd} Established"
            )
        docs = rel.manifest()
        (dep,) = [d for d in docs if d["kind"] == "Deployment"]
        sa_name = dep["spec"]["template"]["spec"]["serviceAccountName"]
        sa = f"system:serviceaccount:{release_ns}:{sa_name}"
        assert not [d for d in docs if d["kind"] == "ClusterKopfPeering"]

        need_ns, need_cluster = operator_needs(namespaced=True)
        for rule in sorted(need_ns):
            res, extra = resource_arg(rule)
            for ns in watch:
                assert can_i(cluster, sa, rule[2], res, *extra, "-n", ns), f"cannot {rule} in {ns}"
            assert not can_i(cluster, sa, rule[2], res, *extra, "-n", outside), f"may {rule} in {outside}"
        for rule in sorted(need_cluster):
            res, extra = resource_arg(rule)
            assert can_i(cluster, sa, rule[2], res, *extra), f"cannot {rule}"
        assert not can_i(cluster, sa, "list", "pods", "--all-namespaces")
        for verb, res, *extra in FORBIDDEN:
            if "-n" not in extra:
                extra = [*extra, "-n", watch[0]]
            assert not can_i(cluster, sa, verb, res, *extra), f"may {verb} {res} {extra}"

        # The operator, with peering, on exactly these rights: a token of its ServiceAccount.
        op = OperatorProcess(cluster, release_ns, sa_name, watch, tmp_path)
        proc, log = op.proc, op.log
        cluster.wait_for(op.alive, timeout=60, what="operator liveness endpoint")
        assert cluster.wait_for(lambda: op.readyz()[0] == 200, timeout=30, what="/readyz 200")
        ns = watch[0]
        cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, gpu_job("helm-smoke", resources={"workers": 1})
        )

        def job() -> dict[str, Any]:
            out: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, "helm-smoke"
            )
            return out

        def provisioned() -> bool:
            pods = cluster.core.list_namespaced_pod(ns, label_selector="llmtrain.dev/job=helm-smoke").items
            return len(pods) == 2 and (job().get("status") or {}).get("phase") not in (None, "Pending")

        try:
            cluster.wait_for(provisioned, timeout=60, what="head + worker pods and a status written")
        except pytest.fail.Exception:
            pytest.fail(f"the operator did not provision on the chart's rules; its log:\n{log()[-6000:]}")
        # Every kind the chart's namespaced Role lets it create (operator/manifests.py names).
        for kind, name in (
            ("service", "helm-smoke-head-svc"),
            ("secret", "helm-smoke-ray-auth"),
            ("configmap", "helm-smoke-spec"),
            ("networkpolicy", "helm-smoke-ray"),
        ):
            cluster.kubectl("get", kind, name, "-n", ns)  # fails the test when absent
        events = cluster.core.list_namespaced_event(
            ns, field_selector="involvedObject.kind=LLMTrainingJob,involvedObject.name=helm-smoke"
        ).items
        assert events, "the operator posted no Event on the job"
        # Deleting the job needs the operator to remove Kopf's finalizer (a patch).
        cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "helm-smoke")

        def gone() -> bool:
            try:
                job()
                return False
            except Exception as e:
                return getattr(e, "status", None) == 404

        cluster.wait_for(gone, timeout=60, what="the job's finalizer to be removed")
        text = log()
        for sign in ("Forbidden", "forbidden:", "(403)", "Not enough permissions"):
            assert sign not in text, f"the operator hit {sign!r} on the chart's rules:\n{text[-6000:]}"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        proc = None

        rel.uninstall()
        left = [
            f"{d['kind']}/{d['metadata']['name']}" for d in docs if _object_exists(cluster, d, release_ns)
        ]
        assert left == [], f"helm uninstall left {left}"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if rel.installed:
            rel.uninstall()
        _delete_ns(cluster, *watch, outside)
