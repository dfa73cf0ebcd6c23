"""Every object the chart renders, for several value sets, accepted by the real apiserver.

``helm template`` with the value sets of tests/unit/test_chart_monitoring.py (default,
namespaced, monitors on, dashboard on); each rendered object, the `helm test` Pod included,
goes through ``kubectl apply --dry-run=server``: the apiserver's schema validation,
admission and, for ServiceMonitor/PodMonitor, prometheus-operator's own CRDs (test-only
copies in tests/monitoring-crds/). A `helm install` with a typo in a value fails before
anything reaches the cluster, naming the key.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from tests.unit.test_chart_monitoring import VALUE_SETS  # noqa: E402

Cluster = Any  # conftest.Cluster

pytestmark = pytest.mark.cluster

CHART = ROOT / "charts" / "llmtrain"
MONITORING_CRDS = ROOT / "tests" / "monitoring-crds"


def _established(cluster: Cluster, name: str) -> bool:
    conds = cluster.apiext.read_custom_resource_definition(name).status.conditions or []
    return any(c.type == "Established" and c.status == "True" for c in conds)


@pytest.fixture(scope="module")
def namespaces(cluster: Cluster) -> Iterator[list[str]]:
    """The release namespace and two watched ones; the CRDs the rendered objects need."""
    for crds in (CHART / "crds", MONITORING_CRDS):
        # Server-side, as Helm 4 applies crds/: the monitoring CRDs are too large for the
        # client-side last-applied annotation.
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds))
    for name in (
        "llmtrainingjobs.llmtrain.dev",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
        "podmonitors.monitoring.coreos.com",
        "servicemonitors.monitoring.coreos.com",
    ):
        cluster.wait_for(
            lambda name=name: _established(cluster, name), timeout=30, what=f"{name} Established"
        )
    names = [f"t-helmvals-{uuid.uuid4().hex[:5]}-{i}" for i in range(3)]
    for n in names:
        cluster.core.create_namespace({"metadata": {"name": n, "labels": {"llmtrain.dev/test": "true"}}})
    yield names
    for n in names:
        cluster.kubectl("delete", "namespace", n, "--wait=false", "--ignore-not-found", check=False)


def value_sets(watched: list[str]) -> dict[str, list[str]]:
    """VALUE_SETS, with namespaces that exist (a dry run cannot create the Namespace first)."""
    sets = dict(VALUE_SETS)
    sets["namespaced"] = ["--set", f"watchNamespaces={{{','.join(watched)}}}"]
    return sets


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_objects_pass_server_side_dry_run(
    cluster: Cluster, namespaces: list[str], name: str
) -> None:
    release_ns, *watched = namespaces
    args = value_sets(watched)[name]
    out = cluster.helm("template", f"v{name[:6]}", str(CHART), "-n", release_ns, *args).stdout
    assert out.strip()
    # Every namespaced object names its namespace (the release's or a watched one).
    r = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=out, check=False)
    assert r.returncode == 0, f"{name}: the apiserver rejected the chart's objects:\n{r.stderr}"
    applied = [line for line in r.stdout.splitlines() if "(server dry run)" in line]
    kinds = {line.split("/", 1)[0] for line in applied}
    assert "pod" in kinds and "deployment.apps" in kinds, r.stdout  # the helm test Pod too
    if name == "monitors":
        assert {"podmonitor.monitoring.coreos.com", "servicemonitor.monitoring.coreos.com"} <= kinds
    if name == "dashboard":
        assert "configmap" in kinds


def test_podmonitor_with_a_wrong_field_is_rejected(cluster: Cluster, namespaces: list[str]) -> None:
    """Negative control: the dry run really validates against the PodMonitor CRD's schema."""
    release_ns = namespaces[0]
    out = cluster.helm("template", "vbad", str(CHART), "-n", release_ns, *VALUE_SETS["monitors"]).stdout
    planted = out.replace("podMetricsEndpoints:", "podMetricEndpoints:", 1)
    r = cluster.kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        release_ns,
        "-f",
        "-",
        input=planted,
        check=False,
    )
    assert r.returncode != 0 and "podMetricEndpoints" in r.stderr, r.stdout + r.stderr


def test_helm_install_with_a_typo_fails_naming_the_key(cluster: Cluster, namespaces: list[str]) -> None:
    r = cluster.helm(
        "install",
        f"typo-{uuid.uuid4().hex[:5]}",
        str(CHART),
        "-n",
        namespaces[0],
        "--force-conflicts",  # Helm 4 applies crds/ first; the fixture applied them already
        "--set",
        "metrics.serviceMonitor.enabeld=true",
        check=False,
    )
    assert r.returncode != 0
    assert "/metrics/serviceMonitor" in r.stderr and "'enabeld' not allowed" in r.stderr, r.stderr
    r = cluster.helm(
        "install",
        "typo2",
        str(CHART),
        "-n",
        namespaces[0],
        "--force-conflicts",
        "--set",
        "livenessPort=http",
        check=False,
    )
    assert r.returncode != 0 and "/livenessPort" in r.stderr, r.stderr
    assert cluster.helm("list", "-n", namespaces[0], "-q").stdout.strip() == ""
