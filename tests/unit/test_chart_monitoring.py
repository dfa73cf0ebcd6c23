"""The chart's scrape objects, values schema and `helm test` hook, rendered by the real helm.

* The PodMonitor selects exactly the pods the operator creates and scrapes ports those pods
  declare: both read from ``operator/manifests.py`` (``m.pods``), not restated here.
* values.schema.json rejects a typo or a wrong type naming the key, and covers every value
  (``helm lint --strict`` on the defaults and on every value set below).
* The `helm test` Pod is a hook, not selected by the operator's Service or Deployment, and
  asks the Service ports the chart renders.

Each checker returns its problems and has a negative control.
"""

from __future__ import annotations

from typing import Any

import pytest
from llmtrain.operator import manifests as m

from llmtrain.api.job import LLMTrainingJob
from tests.unit.test_helm_chart import CHART, helm, needs_helm, of_kind, render
from tests.unit.test_operator_fakes import job_body

MONITORING = ("--api-versions", "monitoring.coreos.com/v1/PodMonitor")
MONITORING_SM = ("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
# The value sets the chart is linted and (tests/integration/test_helm_values.py) dry-run
# applied with.
VALUE_SETS: dict[str, list[str]] = {
    "default": [],
    "namespaced": ["--set", "watchNamespaces={team-a,team-b}", "--set", "createWatchNamespaces=true"],
    "monitors": [
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "jobMetrics.podMonitor.enabled=true",
        "--set",
        "jobMetrics.podMonitor.labels.release=prometheus",
        "--set",
        "jobMetrics.scrapeAnnotations=true",
        "--set-json",
        'jobMetrics.prometheus.podLabels={"app.kubernetes.io/name": "prometheus", "shard": "0"}',
        *MONITORING,
        *MONITORING_SM,
    ],
    "dashboard": ["--set", "dashboard.enabled=true", "--set", "dashboard.annotations.grafana_folder=LLM"],
}


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        op, key, values = e["operator"], e["key"], e.get("values") or []
        if (
            (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
            or (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and labels.get(key) in values)
        ):
            return False
    return True


def job_pods(workers: int = 2) -> list[dict[str, Any]]:
    job = LLMTrainingJob.model_validate(job_body(resources={"workers": workers}))
    return m.pods(job, m.OperatorSettings())


def pod_monitor_problems(pm: dict[str, Any], pods: list[dict[str, Any]]) -> list[str]:
    """What the PodMonitor would miss on the operator's pods."""
    problems = []
    spec = pm["spec"]
    selected = [p for p in pods if _matches(spec["selector"], p["metadata"]["labels"])]
    if len(selected) != len(pods):
        missed = sorted(p["metadata"]["name"] for p in pods if p not in selected)
        problems.append(f"selector misses {missed}")
    declared = {port["name"] for p in pods for c in p["spec"]["containers"] for port in c.get("ports", [])}
    for ep in spec["podMetricsEndpoints"]:
        if ep["port"] not in declared:
            problems.append(f"endpoint port {ep['port']!r} is no container port of the job pods")
    train = [ep for ep in spec["podMetricsEndpoints"] if ep["port"] == "train-metrics"]
    if not train:
        problems.append("no endpoint for the training metrics (train-metrics)")
    elif train[0].get("honorLabels") is not True:
        # Without it Prometheus renames the series' own `job`/`namespace` to exported_*,
        # and the dashboard's $job/$namespace select nothing.
        problems.append("train-metrics endpoint without honorLabels")
    return problems


@needs_helm
def test_pod_monitor_scrapes_the_operators_pods() -> None:
    (pm,) = of_kind(render(*VALUE_SETS["monitors"]), "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "prometheus"
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    pods = job_pods()
    assert pod_monitor_problems(pm, pods) == []
    assert {ep["port"] for ep in pm["spec"]["podMetricsEndpoints"]} == {"train-metrics", "metrics"}
    # Namespaced installs scrape the watched namespaces; rayMetrics=false drops Ray's port.
    (pm2,) = of_kind(
        render(
            "--set",
            "watchNamespaces={team-a}",
            "--set",
            "jobMetrics.podMonitor.enabled=true",
            "--set",
            "jobMetrics.podMonitor.rayMetrics=false",
            *MONITORING,
        ),
        "PodMonitor",
    )
    assert pm2["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert [ep["port"] for ep in pm2["spec"]["podMetricsEndpoints"]] == ["train-metrics"]

    # Negative controls: a selector on a label the pods lack, a port they do not declare,
    # honorLabels dropped.
    bad = {**pm, "spec": {**pm["spec"], "selector": {"matchLabels": {"app.kubernetes.io/name": "ray"}}}}
    assert pod_monitor_problems(bad, pods)[0].startswith("selector misses")
    eps = [
        {**ep, "port": "metric"} if ep["port"] == "metrics" else ep
        for ep in pm["spec"]["podMetricsEndpoints"]
    ]
    assert pod_monitor_problems({"spec": {**pm["spec"], "podMetricsEndpoints": eps}}, pods) == [
        "endpoint port 'metric' is no container port of the job pods"
    ]
    eps = [{k: v for k, v in ep.items() if k != "honorLabels"} for ep in pm["spec"]["podMetricsEndpoints"]]
    assert pod_monitor_problems({"spec": {**pm["spec"], "podMetricsEndpoints": eps}}, pods) == [
        "train-metrics endpoint without honorLabels"
    ]


@needs_helm
def test_monitors_need_their_crds() -> None:
    r = helm("template", "t", str(CHART), "--set", "jobMetrics.podMonitor.enabled=true", check=False)
    assert r.returncode != 0 and "install prometheus-operator first" in r.stderr


def schema_error(*args: str) -> str:
    r = helm("template", "t", str(CHART), *args, check=False)
    assert r.returncode != 0, f"helm template {args} should fail"
    return r.stderr


@needs_helm
def test_schema_rejects_typos_and_wrong_types_naming_the_key() -> None:
    assert "additional properties 'serviceMonitr' not allowed" in schema_error(
        "--set", "metrics.serviceMonitr.enabled=true"
    )
    assert "/metrics" in schema_error("--set", "metrics.serviceMonitr.enabled=true")
    assert "'replica' not allowed" in schema_error("--set", "replica=2")
    err = schema_error("--set", "replicas=two")
    assert "/replicas" in err and "want integer" in err
    err = schema_error("--set", "image.pullPolicy=Sometimes")
    assert "/image/pullPolicy" in err and "IfNotPresent" in err
    err = schema_error("--set", "jobMetrics.podMonitor.interval=30")
    assert "/jobMetrics/podMonitor/interval" in err
    assert "/dashboard/enabled" in schema_error("--set-string", "dashboard.enabled=yes")


@needs_helm
@pytest.mark.parametrize("name", sorted(set(VALUE_SETS) - {"monitors"}))
def test_lint_strict_clean(name: str) -> None:
    """The schema covers every value: with additionalProperties false a key missing from it
    fails lint on the defaults themselves. (`helm lint` takes no --api-versions, so the
    monitors, which need their CRDs, are checked by `helm template` and the apiserver.)"""
    r = helm("lint", "--strict", str(CHART), *VALUE_SETS[name], check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_helm
def test_helm_test_hook_checks_healthz_and_metrics_through_the_service() -> None:
    docs = render()
    (pod,) = of_kind(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (dep,) = of_kind(docs, "Deployment")
    (svc,) = of_kind(docs, "Service")
    assert not _matches({"matchLabels": svc["spec"]["selector"]}, pod["metadata"]["labels"])
    assert not _matches(dep["spec"]["selector"], pod["metadata"]["labels"])
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert env["HEALTHZ_URL"] == f"http://{host}:{ports['healthz']}/healthz"
    assert env["METRICS_URL"] == f"http://{host}:{ports['metrics']}/metrics"
    # The Service's healthz port reaches the container's.
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert {"healthz", "metrics"} <= {p["name"] for p in c["ports"]}
    assert pod["spec"]["containers"][0]["command"][:2] == ["python", "-c"]
    # Off with tests.enabled=false, and without metrics (nothing to check through).
    assert of_kind(render("--set", "tests.enabled=false"), "Pod") == []
    assert of_kind(render("--set", "metrics.enabled=false"), "Pod") == []


def operator_settings_from_chart(monkeypatch: pytest.MonkeyPatch, *values: str) -> m.OperatorSettings:
    """The OperatorSettings `llmtrain operator` builds from the args the chart's Deployment
    passes (``python -m llmtrain.operator`` is the same command line)."""
    from llmtrain.operator import main as opmain
    from typer.testing import CliRunner

    from llmtrain.cli import app

    (dep,) = of_kind(render(*values), "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    seen: list[Any] = []
    monkeypatch.setattr(opmain, "run", lambda *a, **k: seen.append(k["job_metrics"]))
    r = CliRunner().invoke(app, ["operator", *args])
    assert r.exit_code == 0, r.output
    return m.OperatorSettings(**seen[0].settings())


@needs_helm
def test_network_policy_admits_the_prometheus_selected_in_values(monkeypatch: pytest.MonkeyPatch) -> None:
    job = LLMTrainingJob.model_validate(job_body(resources={"workers": 1}))

    def prometheus_peer(settings: m.OperatorSettings) -> list[dict[str, Any]]:
        (peer,) = [
            rule
            for rule in m.network_policy(job, settings)["spec"]["ingress"]
            if {"protocol": "TCP", "port": m.PORT_METRICS} in rule.get("ports", [])
        ]
        return list(peer["from"])

    # The chart's defaults are the operator's own.
    defaults = operator_settings_from_chart(monkeypatch)
    assert defaults == m.OperatorSettings()
    assert not defaults.prometheus_scrape_annotations
    # Another Prometheus in values: the NetworkPolicy admits exactly that one.
    chosen = operator_settings_from_chart(
        monkeypatch,
        "--set-json",
        'jobMetrics.prometheus.namespaceLabels={"team": "obs"}',
        "--set-json",
        'jobMetrics.prometheus.podLabels={"app": "prom", "shard": "0"}',
        "--set",
        "jobMetrics.scrapeAnnotations=true",
    )
    assert prometheus_peer(chosen) == [
        {
            "namespaceSelector": {"matchLabels": {"team": "obs"}},
            "podSelector": {"matchLabels": {"app": "prom", "shard": "0"}},
        }
    ]
    assert chosen.prometheus_scrape_annotations
    head = m.head_pod(job, chosen)
    assert head["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    # Negative control: the default policy does not admit that Prometheus.
    assert prometheus_peer(defaults) != prometheus_peer(chosen)
    # A label value of the wrong type is refused by the schema, naming it.
    assert "/jobMetrics/prometheus/podLabels/app" in schema_error(
        "--set-json", 'jobMetrics.prometheus.podLabels={"app": 1}'
    )
