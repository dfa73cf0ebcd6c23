"""The Helm chart (charts/llmtrain) and the Dockerfile, checked without a cluster.

The chart is rendered by the real ``helm`` binary (built by tests/cluster/build.sh; the
tests are skipped with the reason when it is missing). What the operator needs from RBAC
is derived from the operator's own code, not restated here: the kinds of
``llmtrain.operator.kube._KINDS`` and the calls of its ``RestApi``, the resources
its Kopf handlers are registered on, and what Kopf itself calls. The chart must grant
exactly that: a missing rule would fail at run time with a 403, an extra one would be a
needless privilege. tests/integration/test_helm_install.py then runs the operator on the
installed rules against a real API server.

Every checker here is a plain function that returns its problems, and each has a
negative control: a planted bug (a dropped verb, an extra one, a privileged container,
a stale CRD copy, torch in the operator image) must be reported.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "llmtrain"
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import controlplane  # noqa: E402

HELM = controlplane.binaries()["helm"]
RELEASE_NS = "llmtrain-system"

needs_helm = pytest.mark.skipif(
    not os.access(HELM, os.X_OK), reason=f"helm not built ({HELM}): run tests/cluster/build.sh tools"
)

Rule = tuple[str, str, str]  # (apiGroup, resource, verb)


# ------------------------------------------------------------------- what the operator needs

# The REST resource of each kind the operator's RestApi handles.
KIND_RESOURCES: dict[str, tuple[str, str]] = {
    "Pod": ("", "pods"),
    "Service": ("", "services"),
    "Secret": ("", "secrets"),
    "ConfigMap": ("", "configmaps"),
    "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
    "Deployment": ("apps", "deployments"),
    "PodDisruptionBudget": ("policy", "poddisruptionbudgets"),
    "Workload": ("kueue.x-k8s.io", "workloads"),
}


def _annotated_kinds() -> set[str]:
    """Kinds the reconciler annotates or patches (``self.api.annotate("Pod", ...)``,
    ``self.api.patch("ConfigMap", ...)``): those need patch."""
    from llmtrain.operator.manifests import SERVE_KINDS

    # The reconciler: reconcile.py and the operator modules it imports (its steps), less
    # the API client itself, whose verbs these calls are.
    trees: dict[str, ast.Module] = {}
    todo = ["reconcile.py"]
    while todo:
        f = todo.pop()
        if f in trees or f == "kube.py" or not (ROOT / "operator" / f).exists():
            continue
        trees[f] = ast.parse((ROOT / "operator" / f).read_text())
        for n in ast.walk(trees[f]):
            if isinstance(n, ast.ImportFrom) and n.module == "llmtrain.operator":
                todo += [f"{a.name}.py" for a in n.names]
            elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("llmtrain.operator."):
                todo.append(f"{(n.module or '').rsplit('.', 1)[1]}.py")
    kinds: set[str] = set()
    # The one computed kind allowed: the model server's objects, patched to spec.serve.
    ensure_server = next(
        n
        for tree in trees.values()
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef) and n.name == "_ensure_server"
    )
    in_ensure_server = {id(n) for n in ast.walk(ensure_server)}
    for source, node in ((f, n) for f, tree in trees.items() for n in ast.walk(tree)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("annotate", "patch")
            and node.args
        ):
            first = node.args[0]
            if id(node) in in_ensure_server and node.func.attr == "patch":
                kinds |= set(SERVE_KINDS)
                continue
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                pytest.fail(
                    f"operator/{source}:{node.lineno}: {node.func.attr}() with a computed kind; "
                    "the RBAC check needs a literal kind to know what gets patched"
                )
            kinds.add(first.value)
    return kinds


def operator_needs(namespaced: bool, peering: bool = True) -> tuple[set[Rule], set[Rule]]:
    """(rules needed in each watched namespace, cluster-scoped rules), from the code."""
    import kopf
    from llmtrain.operator import kube
    from llmtrain.operator.handlers import register
    from llmtrain.operator.metrics import OperatorMetrics
    from llmtrain.operator.podwatch import PodStore
    from llmtrain.operator.reconcile import Reconciler

    ns: set[Rule] = set()
    unknown = set(kube._KINDS) - set(KIND_RESOURCES)
    assert not unknown, (
        f"operator/kube.py handles {sorted(unknown)}: add their REST resource to KIND_RESOURCES "
        "here and a rule to charts/llmtrain/templates/_helpers.tpl"
    )
    # RestApi.create/get/delete take any kind of _KINDS (reconcile passes them through
    # variables); annotate and patch are merge patches; scheduler_events lists Events.
    for kind in kube._KINDS:
        group, resource = KIND_RESOURCES[kind]
        ns |= {(group, resource, v) for v in ("create", "get", "delete")}
    for kind in _annotated_kinds():
        group, resource = KIND_RESOURCES[kind]
        ns.add((group, resource, "patch"))
    ns.add(("", "events", "list"))
    # RestApi.patch_status: a Kueue Workload's conditions and admission (operator/kueue.py).
    ns.add(("kueue.x-k8s.io", "workloads/status", "patch"))
    ns.add(("", "pods/log", "get"))  # RestApi.pod_log: a crashed container's last lines
    # The operator's own pod watch (podwatch.PodWatch over kube.RestPods).
    ns |= {("", "pods", "list"), ("", "pods", "watch")}

    # What RestApi can do, verb by verb: a new method must be added here (and its rule to
    # the chart), or this fails.
    methods = {n for n in vars(kube.RestApi) if not n.startswith("_")}
    assert methods == {
        "create",
        "get",
        "delete",
        "annotate",
        "patch",
        "scheduler_events",
        "pod_log",
        "list_pods",
        "patch_job",
        "post_event",
        "peering_status",
        "node",
        "patch_status",
        "workload_priority",
    }, f"operator/kube.py RestApi has new calls {sorted(methods)}: derive their RBAC rules here"

    # Kopf lists + watches every resource a handler is registered on (the jobs); the
    # controller patches those jobs (annotations, an old finalizer: RestApi.patch_job) and
    # their status subresource, and posts core v1 Events about them (RestApi.post_event).
    from llmtrain.operator.controller import Controller

    registry = kopf.OperatorRegistry()
    register(registry, Controller(Reconciler(object()), object(), PodStore(), OperatorMetrics()))  # type: ignore[arg-type]
    for reg, writes in (
        (registry._indexing, False),
        (registry._watching, True),
        (registry._spawning, True),
        (registry._changing, True),
    ):
        for h in reg.get_all_handlers():
            sel = h.selector
            assert sel is not None and sel.any_name, f"handler {h.id} has no resource selector"
            group, plural = sel.group or "", str(sel.any_name)
            ns |= {(group, plural, "list"), (group, plural, "watch")}
            if writes:
                ns |= {(group, plural, "patch"), (group, f"{plural}/status", "patch")}
    ns.add(("", "events", "create"))

    cluster: set[Rule] = {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }
    # RestApi.node: a node of a job's pods, listed by name (is it cordoned? disruption.py).
    cluster.add(("", "nodes", "list"))
    # RestApi.workload_priority: a Kueue WorkloadPriorityClass's value (operator/kueue.py).
    cluster.add(("kueue.x-k8s.io", "workloadpriorityclasses", "get"))
    if namespaced:
        cluster |= {("", "namespaces", "list"), ("", "namespaces", "watch")}
    if peering:
        target = ns if namespaced else cluster
        plural = "kopfpeerings" if namespaced else "clusterkopfpeerings"
        target |= {("kopf.dev", plural, v) for v in ("list", "watch", "patch")}
    return ns, cluster


# ------------------------------------------------------------------------------ rendering


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{r.stderr}")
    return r


def render(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "t", str(CHART), "-n", RELEASE_NS, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def of_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def expand(rules: Iterable[dict[str, Any]]) -> set[Rule]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule.get("apiGroups", [])
        for r in rule.get("resources", [])
        for v in rule.get("verbs", [])
    }


def granted(docs: list[dict[str, Any]], sa: str) -> tuple[dict[str, set[Rule]], set[Rule]]:
    """What the ServiceAccount ``sa`` (in RELEASE_NS) is bound to: per namespace, cluster-wide."""
    roles = {(d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs if d["kind"] == "Role"}
    croles = {d["metadata"]["name"]: d for d in of_kind(docs, "ClusterRole")}
    per_ns: dict[str, set[Rule]] = {}
    cluster: set[Rule] = set()

    def binds_sa(b: dict[str, Any]) -> bool:
        return any(
            s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace") == RELEASE_NS
            for s in b.get("subjects", [])
        )

    for b in of_kind(docs, "ClusterRoleBinding"):
        if binds_sa(b):
            cluster |= expand(croles[b["roleRef"]["name"]]["rules"])
    for b in of_kind(docs, "RoleBinding"):
        if binds_sa(b):
            ns = b["metadata"]["namespace"]
            ref = b["roleRef"]
            role = roles[(ns, ref["name"])] if ref["kind"] == "Role" else croles[ref["name"]]
            per_ns.setdefault(ns, set()).update(expand(role["rules"]))
    return per_ns, cluster


def rbac_problems(docs: list[dict[str, Any]], watch: list[str], peering: bool = True) -> list[str]:
    """Every difference between what the chart grants the operator and what it needs."""
    (dep,) = of_kind(docs, "Deployment")
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    per_ns, cluster = granted(docs, sa)
    need_ns, need_cluster = operator_needs(namespaced=bool(watch), peering=peering)
    problems: list[str] = []
    for rule in sorted(expand_wildcards(per_ns, cluster)):
        problems.append(f"wildcard in {rule}")
    if watch:
        if set(per_ns) != set(watch):
            problems.append(f"Roles bound in {sorted(per_ns)}, watchNamespaces is {watch}")
        for ns in watch:
            have = per_ns.get(ns, set())
            problems += [f"{ns}: missing {r}" for r in sorted(need_ns - have)]
            problems += [f"{ns}: not needed {r}" for r in sorted(have - need_ns)]
        want_cluster = need_cluster
    else:
        if per_ns:
            problems.append(f"cluster-wide install binds Roles in {sorted(per_ns)}")
        want_cluster = need_ns | need_cluster
    problems += [f"cluster: missing {r}" for r in sorted(want_cluster - cluster)]
    problems += [f"cluster: not needed {r}" for r in sorted(cluster - want_cluster)]
    return problems


def expand_wildcards(per_ns: dict[str, set[Rule]], cluster: set[Rule]) -> set[Rule]:
    rules = set(cluster).union(*per_ns.values()) if per_ns else set(cluster)
    return {r for r in rules if "*" in r}


def security_problems(docs: list[dict[str, Any]]) -> list[str]:
    """The operator pod against the `restricted` Pod Security Standard and the brief."""
    (dep,) = of_kind(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    problems: list[str] = []
    if psc.get("runAsNonRoot") is not True:
        problems.append("pod securityContext.runAsNonRoot is not true")
    if psc.get("runAsUser") == 0:
        problems.append("pod runs as uid 0")
    if (psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("pod has no RuntimeDefault seccomp profile")
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root filesystem is writable")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if "ALL" not in (sc.get("capabilities") or {}).get("drop", []):
            problems.append(f"{name}: capabilities not dropped (ALL)")
        if (sc.get("capabilities") or {}).get("add"):
            problems.append(f"{name}: adds capabilities")
        res = c.get("resources") or {}
        if not (res.get("requests") or {}).get("memory") or not (res.get("limits") or {}).get("memory"):
            problems.append(f"{name}: no memory request/limit")
        probe = (c.get("livenessProbe") or {}).get("httpGet") or {}
        if probe.get("path") != "/healthz":
            problems.append(f"{name}: no liveness probe on /healthz")
    return problems


# ------------------------------------------------------------------------------- the tests


@needs_helm
def test_helm_lint() -> None:
    r = helm("lint", "--strict", str(CHART), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    r = helm("lint", "--strict", str(CHART), "--set", "watchNamespaces={team-a,team-b}", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_helm
def test_default_install_is_cluster_wide_and_grants_exactly_what_the_operator_needs() -> None:
    docs = render()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "ClusterRole",  # the operator's
            "ClusterRoleBinding",
            "ClusterRole",  # aggregated edit
            "ClusterRole",  # aggregated view
            "Service",
            "Deployment",
            "ClusterKopfPeering",
            "ValidatingAdmissionPolicy",  # the operator writes only its own objects
            "ValidatingAdmissionPolicyBinding",
            "FlowSchema",  # API Priority and Fairness for the operator's requests (apipriority.yaml)
            "Pod",  # the `helm test` hook (templates/tests/), run only by `helm test`
        ]
    ), kinds
    assert rbac_problems(docs, watch=[]) == []
    (peer,) = of_kind(docs, "ClusterKopfPeering")
    from llmtrain.operator.main import PEERING_NAME

    assert peer["metadata"]["name"] == PEERING_NAME


@needs_helm
def test_watch_namespaces_gives_roles_there_and_only_read_only_discovery_cluster_wide() -> None:
    watch = ["team-a", "team-b"]
    docs = render("--set", "watchNamespaces={team-a,team-b,team-a}")
    assert rbac_problems(docs, watch=watch) == []
    assert sorted(d["metadata"]["namespace"] for d in of_kind(docs, "KopfPeering")) == watch
    assert of_kind(docs, "ClusterKopfPeering") == []
    (dep,) = of_kind(docs, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]
    # Nothing cluster-scoped that writes: the discovery ClusterRole only reads (a Kueue
    # WorkloadPriorityClass by name: get).
    for cr in of_kind(docs, "ClusterRole"):
        if not cr["metadata"]["labels"].get("rbac.authorization.k8s.io/aggregate-to-view") and not cr[
            "metadata"
        ]["labels"].get("rbac.authorization.k8s.io/aggregate-to-edit"):
            assert {v for _, _, v in expand(cr["rules"])} <= {"get", "list", "watch"}, cr

    # Without clusterDiscovery the install has no cluster-scoped RBAC for the operator at all.
    docs = render("--set", "watchNamespaces={team-a}", "--set", "rbac.clusterDiscovery=false")
    assert of_kind(docs, "ClusterRoleBinding") == []


@needs_helm
def test_rbac_check_catches_a_missing_and_an_extra_rule() -> None:
    """Negative control for rbac_problems: a dropped verb and an added one are both reported."""
    docs = render()
    (cr,) = [d for d in of_kind(docs, "ClusterRole") if d["metadata"]["name"] == "t-llmtrain"]
    pods = next(r for r in cr["rules"] if "pods" in r["resources"])
    pods["verbs"].remove("delete")
    pods["verbs"].append("update")
    problems = rbac_problems(docs, watch=[])
    assert "cluster: missing ('', 'pods', 'delete')" in problems
    assert "cluster: not needed ('', 'pods', 'update')" in problems
    # Without peering the chart drops the peering rules, and the operator runs --standalone.
    docs = render("--set", "peering.enabled=false")
    assert rbac_problems(docs, watch=[], peering=False) == []
    assert of_kind(docs, "ClusterKopfPeering") == []
    (dep,) = of_kind(docs, "Deployment")
    assert "--standalone" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(
        a.startswith("--priority") for a in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    )


@needs_helm
def test_replicas_above_one_get_a_priority_per_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kopf pauses every replica sharing the highest priority: with peering, each pod draws
    its own (--priority=random), so replicas: 2 renders with one active replica."""
    from llmtrain.operator import main as opmain
    from typer.testing import CliRunner

    from llmtrain.cli import app

    (dep,) = of_kind(render("--set", "replicas=2"), "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert dep["spec"]["replicas"] == 2
    assert "--priority=random" in args and "--standalone" not in args
    # The command the chart runs (`llmtrain operator ARGS`) takes them and draws a priority.
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(opmain, "run", lambda *a, **k: seen.append(k))
    assert container["command"] == ["llmtrain", "operator"]
    for _ in range(2):
        r = CliRunner().invoke(app, ["operator", *args])
        assert r.exit_code == 0, r.output
    assert seen[0]["peering_name"] == opmain.PEERING_NAME
    assert seen[0]["priority"] != seen[1]["priority"] and all(1 <= k["priority"] < 2**31 for k in seen)


@needs_helm
def test_operator_pod_is_locked_down_and_probed() -> None:
    docs = render()
    assert security_problems(docs) == []
    (dep,) = of_kind(docs, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["llmtrain", "operator"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9090}
    assert "--liveness-port=8080" in c["args"] and "--metrics-port=9090" in c["args"]
    assert f"--operator-namespace={RELEASE_NS}" in c["args"]
    # Alive: Kopf's /healthz; ready: the pods listed in every namespace (/readyz, metrics port).
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    (plain,) = of_kind(render("--set", "metrics.enabled=false"), "Deployment")
    assert (
        plain["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/healthz"
    )
    # The read-only root filesystem needs a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    (svc,) = of_kind(docs, "Service")
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]

    # Negative control: a privileged, writable container is reported.
    bad = render(
        "--set", "securityContext.privileged=true", "--set", "securityContext.readOnlyRootFilesystem=false"
    )
    assert set(security_problems(bad)) == {"operator: privileged", "operator: root filesystem is writable"}


@needs_helm
def test_cli_options_the_chart_passes_exist() -> None:
    """Every --flag the Deployment passes is an option of `llmtrain operator`."""
    from typer.main import get_command

    from llmtrain.cli import app

    cmd = get_command(app).commands["operator"]  # type: ignore[attr-defined]
    known = {o for p in cmd.params for o in p.opts}
    docs = render("--set", "watchNamespaces={a}", "--set", "peering.enabled=false")
    (dep,) = of_kind(docs, "Deployment")
    flags = {a.split("=", 1)[0] for a in dep["spec"]["template"]["spec"]["containers"][0]["args"]}
    assert flags <= known, f"the chart passes flags `llmtrain operator` lacks: {sorted(flags - known)}"


@needs_helm
def test_service_monitor_and_bad_values_fail_with_a_clear_message() -> None:
    docs = render(
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=prometheus",
        "--api-versions",
        "monitoring.coreos.com/v1/ServiceMonitor",
    )
    (sm,) = of_kind(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"

    def fails(*args: str) -> str:
        r = helm("template", "t", str(CHART), *args, check=False)
        assert r.returncode != 0, f"helm template {args} should fail"
        return r.stderr

    assert "install prometheus-operator first" in fails("--set", "metrics.serviceMonitor.enabled=true")
    assert "replicas: 2 > 1 needs peering.enabled" in fails(
        "--set", "replicas=2", "--set", "peering.enabled=false"
    )
    assert "not a namespace name" in fails("--set", "watchNamespaces={Team_A}")
    assert "serviceAccount.name is required" in fails("--set", "serviceAccount.create=false")


# ------------------------------------------------------------------------------ CRD copies


def crd_copy_problems(chart_crds: Path) -> list[str]:
    from llmtrain.operator.main import peering_crds

    from llmtrain.api.crd import crd_yaml

    problems = []
    ltj = chart_crds / "llmtrainingjobs.llmtrain.dev.yaml"
    if not ltj.exists() or ltj.read_text() != crd_yaml():
        problems.append(f"{ltj.name} differs from `llmtrain crd`")
    kopf_file = chart_crds / "kopf-peerings.yaml"
    docs = [d for d in yaml.safe_load_all(kopf_file.read_text()) if d] if kopf_file.exists() else []
    if docs != peering_crds():
        problems.append(f"{kopf_file.name} differs from peering_crds()")
    extra = {p.name for p in chart_crds.iterdir()} - {ltj.name, kopf_file.name}
    if extra:
        problems.append(f"unexpected files in {chart_crds}: {sorted(extra)}")
    return problems


def test_chart_crds_are_the_generated_ones(tmp_path: Path) -> None:
    problems = crd_copy_problems(CHART / "crds")
    assert problems == [], "; ".join(problems) + ": regenerate with charts/llmtrain/update-crds.sh"
    # The repository's copy is the same text (llmtrain crd --check guards it elsewhere).
    assert (CHART / "crds" / "llmtrainingjobs.llmtrain.dev.yaml").read_text() == (
        ROOT / "crds" / "llmtrainingjobs.llmtrain.dev.yaml"
    ).read_text()

    # Negative control: a copy with one changed line is stale.
    stale = tmp_path / "crds"
    stale.mkdir()
    for f in (CHART / "crds").iterdir():
        (stale / f.name).write_text(f.read_text())
    ltj = stale / "llmtrainingjobs.llmtrain.dev.yaml"
    ltj.write_text(ltj.read_text().replace("v1alpha1", "v1alpha2", 1))
    (stale / "kopf-peerings.yaml").write_text(
        (stale / "kopf-peerings.yaml").read_text().replace("Namespaced", "Cluster")
    )
    assert len(crd_copy_problems(stale)) == 2


# ------------------------------------------------------------------------------ Dockerfile


def dockerfile_stages(text: str) -> dict[str, list[str]]:
    """Stage name → its instructions (continuation lines joined, comments dropped)."""
    lines: list[str] = []
    buf = ""
    for raw in text.splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append(buf + s)
        buf = ""
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = stages.setdefault(m.group(1) or f"stage{len(stages)}", [])
        elif current is not None:
            current.append(line)
    return stages


def makefile_torch() -> str:
    m = re.search(r"^TORCH\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile has no TORCH := torch==X line"
    return m.group(1)


def dockerfile_problems(text: str) -> list[str]:
    stages = dockerfile_stages(text)
    problems: list[str] = []
    for target in ("operator", "runtime"):
        if target not in stages:
            problems.append(f"no `{target}` target")
    if problems:
        return problems
    torch_pin = makefile_torch()
    op = " ".join(stages["operator"])
    rt = " ".join(stages["runtime"])
    if re.search(r"\btorch\b", op):
        problems.append("the operator stage installs torch")
    if "[operator]" not in op:
        problems.append("the operator stage does not install the `operator` extra")
    if "[runtime]" not in rt:
        problems.append("the runtime stage does not install the `runtime` extra")
    pins = re.findall(r"torch==[\w.+]+", rt)
    if pins != [torch_pin]:
        problems.append(f"the runtime stage pins {pins}, the Makefile's TORCH is {torch_pin}")
    elif rt.index(torch_pin) > rt.index("[runtime]"):
        problems.append("torch must be installed before the runtime extra (so pip never swaps it)")
    if "ray --version" not in rt:
        problems.append("the runtime stage does not check that `ray` is on PATH")
    # The base is a build arg (tools/images.sh passes a local Debian base; users keep the
    # default), and each image installs its dependencies before the project's wheel, so a
    # Python-only change rebuilds one small layer (tests/integration/test_images.py checks
    # the built layers).
    if not re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M) or not re.search(
        r"^FROM \$\{BASE_IMAGE\} AS base$", text, re.M
    ):
        problems.append("the base image is not the BASE_IMAGE build arg (default python:3.11-slim-bookworm)")
    for target in ("operator", "runtime"):
        steps = stages[target]
        deps = [i for i, s in enumerate(steps) if s.startswith("RUN") and "-r /tmp/requirements.txt" in s]
        wheel = [i for i, s in enumerate(steps) if s.startswith("COPY --from=wheel /wheels")]
        if not deps or not wheel or deps[0] > wheel[0]:
            problems.append(
                f"the {target} stage does not install its dependencies before the project's wheel"
            )
    for target in ("operator", "runtime"):
        users = [i.split(None, 1)[1] for i in stages[target] if i.upper().startswith("USER ")]
        if not users or users[-1].split(":")[0] in ("0", "root"):
            problems.append(f"the {target} image runs as root")
    return problems


def test_dockerfile_structure() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert dockerfile_problems(text) == []
    # pyproject's runtime extra pins the same torch as the Makefile and the Dockerfile, and
    # neither the base dependencies nor the operator extra pull torch or ray.
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert makefile_torch() in project["optional-dependencies"]["runtime"]
    for dep in project["dependencies"] + project["optional-dependencies"]["operator"]:
        assert not re.match(r"(torch|ray)\b", dep), dep

    # Negative controls: torch in the operator stage, a different pin, a root runtime image.
    planted = text.replace(
        'RUN pip install "$(ls /wheels/llmtrain-*.whl)[operator]"',
        'RUN pip install torch && pip install "$(ls /wheels/llmtrain-*.whl)[operator]"',
    )
    assert dockerfile_problems(planted) == ["the operator stage installs torch"]
    other = makefile_torch().replace("==", "==0.")
    assert any("pins" in p for p in dockerfile_problems(text.replace(makefile_torch(), other)))
    rooted = (
        text[: text.rindex("USER 65532:65532")] + "USER root" + text[text.rindex("USER 65532:65532") + 16 :]
    )
    assert dockerfile_problems(rooted) == ["the runtime image runs as root"]
    fixed_base = text.replace("FROM ${BASE_IMAGE} AS base", "FROM python:3.11-slim-bookworm AS base")
    assert dockerfile_problems(fixed_base) == [
        "the base image is not the BASE_IMAGE build arg (default python:3.11-slim-bookworm)"
    ]
    deps_with_code = text.replace("-r /tmp/requirements.txt", "-r /tmp/reqs.txt")
    assert dockerfile_problems(deps_with_code) == [
        f"the {t} stage does not install its dependencies before the project's wheel"
        for t in ("operator", "runtime")
    ]


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [
        s for s in (ROOT / ".dockerignore").read_text().splitlines() if s.strip() and not s.startswith("#")
    ]
    assert lines[0] == "**", "the context must start from nothing and add what the wheel stage copies"
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M))
    allowed = {s[1:].rstrip("/") for s in lines if s.startswith("!")}
    for c in copied:
        for path in c.split():
            assert path.rstrip("/") in allowed, f"Dockerfile copies {path}, .dockerignore excludes it"


def test_operator_runs_without_the_runtime_packages() -> None:
    """The `operator` image has no torch/ray/boto3: `llmtrain operator` must start without them."""
    blocked = [
        "torch",
        "ray",
        "tokenizers",
        "boto3",
        "safetensors",
        "pyarrow",
        "datasets",
        "transformers",
        "numpy",
    ]
    code = (
        "import sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        "import llmtrain.operator.main, llmtrain.operator.handlers\n"
        "from llmtrain.cli import app\n"
        "from typer.main import get_command\n"
        "print(sorted(get_command(app).commands))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "operator" in json.loads(r.stdout.strip().replace("'", '"'))


# Written by the operator but not its children: its own jobs (and their status), Events on
# them, Kopf's peering heartbeats. Everything else it may write is held to its own objects.
NOT_CHILDREN = {"llmtrainingjobs", "llmtrainingjobs/status", "events", "kopfpeerings", "clusterkopfpeerings"}


@needs_helm
def test_admission_policy_holds_every_child_kind_the_operator_writes_to_its_own() -> None:
    """The policy's resources are exactly the kinds the operator may create, patch or delete
    (derived from its code, as the RBAC check is) minus its own jobs, Events and peerings;
    it matches the operator's ServiceAccount only. The apiserver's verdicts are tested in
    tests/integration/test_helm_install.py."""
    ns_rules, _ = operator_needs(namespaced=False)
    written = {(g, r) for g, r, v in ns_rules if v in ("create", "patch", "delete") and r not in NOT_CHILDREN}
    docs = render("--set", "serviceAccount.name=op")
    (policy,) = of_kind(docs, "ValidatingAdmissionPolicy")
    (binding,) = of_kind(docs, "ValidatingAdmissionPolicyBinding")
    covered = {
        (g, r)
        for rule in policy["spec"]["matchConstraints"]["resourceRules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        if set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE"}
    }
    assert covered == written
    (cond,) = policy["spec"]["matchConditions"]
    assert cond["expression"] == f'request.userInfo.username == "system:serviceaccount:{RELEASE_NS}:op"'
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    assert not of_kind(render("--set", "admissionPolicy.enabled=false"), "ValidatingAdmissionPolicy")
