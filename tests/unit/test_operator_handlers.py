"""The Kopf wiring: which handlers exist on what, that they stay thin, and the operator's metrics."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from typing import Any

import kopf
import pytest
from llmtrain.operator import main as opmain
from llmtrain.operator.diagnose import pod_view
from llmtrain.operator.handlers import needs_action_now, pods_of, register, write_outcome
from llmtrain.operator.kube import ApiError
from llmtrain.operator.manifests import LABEL_JOB, OperatorSettings
from llmtrain.operator.metrics import OperatorMetrics
from llmtrain.operator.reconcile import Event, Outcome, Reconciler
from prometheus_client import generate_latest

from llmtrain.api.spec import GROUP, PLURAL
from tests.unit.test_operator_fakes import NOW, FakeApi, job_body, set_all, views

LOG = logging.getLogger("test")


def _body(raw: Any) -> kopf.Body:
    return kopf.Body(raw)


def call(handler: Any, **kwargs: Any) -> Any:
    """Run a (coroutine) handler the way Kopf does: awaited on an event loop."""
    return asyncio.run(handler.fn(**kwargs))


def build(api: FakeApi | None = None) -> tuple[kopf.OperatorRegistry, OperatorMetrics, list[tuple[Any, ...]]]:
    registry = kopf.OperatorRegistry()
    metrics = OperatorMetrics()
    events: list[tuple[Any, ...]] = []
    rec = Reconciler(api or FakeApi(), OperatorSettings(), token=lambda: "t" * 64)

    def emit(body: Any, *, type: str, reason: str, message: str) -> None:
        events.append((type, reason, message))

    register(registry, rec, metrics, interval=2.0, clock=lambda: NOW, emit=emit)
    return registry, metrics, events


def handlers(registry: kopf.OperatorRegistry) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for reg in (registry._changing, registry._spawning, registry._indexing):
        for h in reg.get_all_handlers():
            out[str(h.id)] = h
    return out


def test_one_timer_on_the_job_and_an_index_over_pods_without_finalizers() -> None:
    registry, _, _ = build()
    hs = handlers(registry)
    timers = [h for h in registry._spawning.get_all_handlers()]
    assert len(timers) == 1
    (timer,) = timers
    assert timer.selector is not None
    assert timer.selector.group == GROUP and timer.selector.any_name == PLURAL
    assert getattr(timer, "interval", None) == 2.0
    (index,) = registry._indexing.get_all_handlers()
    assert index.selector is not None
    assert index.selector.any_name == "pods" and index.selector.group in (None, "")
    assert index.labels == {LABEL_JOB: kopf.PRESENT}
    # Kopf hands the index to the timer as the kwarg named by its id: the timer reads that name.
    assert index.id == "pod_index"
    pod = {"metadata": {"name": "demo-head", "namespace": "ns1", "labels": {LABEL_JOB: "demo"}}}
    entry = call(index, body=_body(pod), namespace="ns1")
    assert list(entry) == [("ns1", "demo")] and entry[("ns1", "demo")].name == "demo-head"
    # Nothing on pods may need a finalizer (no daemons/timers/non-optional delete handlers).
    for h in hs.values():
        if "pods" in str(h.selector):
            assert not getattr(h, "requires_finalizer", False)
    # No change-detecting handlers: Kopf would write progress/diffbase annotations per change.
    assert list(registry._changing.get_all_handlers()) == []
    (react,) = registry._watching.get_all_handlers()
    assert react.selector is not None and react.selector.any_name == PLURAL


def test_timer_handler_runs_the_reconciler_and_writes_the_patch() -> None:
    api = FakeApi()
    registry, metrics, events = build(api)
    (timer,) = registry._spawning.get_all_handlers()
    body = _body(job_body())
    patch = kopf.Patch()
    call(timer, body=body, patch=patch, logger=LOG, pod_index={})
    assert api.names("Pod") == {"demo-head", "demo-worker-0", "demo-worker-1"}
    assert patch["status"]["phase"] == "Pending"
    assert isinstance(patch["status"]["conditions"], list)
    # The common path writes status only: no metadata patch (one PATCH per change, not two).
    assert "metadata" not in patch
    assert ("Normal", "PodsCreated", "created 3 Ray pods") in events
    text = generate_latest(metrics.registry).decode()
    assert 'llmtrain_operator_jobs{phase="Pending"} 1.0' in text
    assert "llmtrain_operator_reconcile_duration_seconds_count 1.0" in text


def test_api_errors_become_temporary_errors() -> None:
    api = FakeApi()
    registry, metrics, _ = build(api)
    (timer,) = registry._spawning.get_all_handlers()
    body = job_body()
    call(timer, body=_body(body), patch=kopf.Patch(), logger=LOG, pod_index={})
    body["spec"]["suspend"] = True
    body["metadata"]["generation"] = 2
    api.fail["delete"] = ApiError(500, "etcdserver: request timed out")
    index = {("ns1", "demo"): list(views(api).values())}
    with pytest.raises(kopf.TemporaryError) as e:
        call(timer, body=_body(body), patch=kopf.Patch(), logger=LOG, pod_index=index)
    assert e.value.delay == 5
    assert (
        'llmtrain_operator_reconcile_errors_total{kind="http_500"} 1.0'
        in generate_latest(metrics.registry).decode()
    )


def test_metrics_provisioning_restarts_and_forget() -> None:
    api = FakeApi()
    registry, metrics, _ = build(api)
    (timer,) = registry._spawning.get_all_handlers()
    body = job_body()
    call(timer, body=_body(body), patch=kopf.Patch(), logger=LOG, pod_index={})
    set_all(api, "running")
    index = {("ns1", "demo"): list(views(api).values())}
    patch = kopf.Patch()
    body["metadata"]["annotations"]["llmtrain.dev/attempt-started-at"] = "2026-11-26T11:59:50Z"
    call(timer, body=_body(body), patch=patch, logger=LOG, pod_index=index)
    text = generate_latest(metrics.registry).decode()
    assert "llmtrain_operator_provisioning_duration_seconds_count 1.0" in text
    assert "llmtrain_operator_provisioning_duration_seconds_sum 10.0" in text
    metrics.forget("ns1", "demo")
    assert 'llmtrain_operator_jobs{phase="Pending"} 0.0' in generate_latest(metrics.registry).decode()


def test_pods_of_reads_the_index_by_namespace_and_job() -> None:
    pod = {"metadata": {"name": "demo-head", "namespace": "ns1", "labels": {LABEL_JOB: "demo"}}}
    v = pod_view(pod)
    index = {
        ("ns1", "demo"): [v],
        ("ns2", "demo"): [pod_view({**pod, "metadata": {**pod["metadata"], "name": "x"}})],
    }
    assert pods_of(index, "ns1", "demo") == {"demo-head": v}
    assert pods_of(index, "ns3", "demo") == {}
    assert pods_of(None, "ns1", "demo") == {}


def test_write_outcome_replaces_conditions_whole() -> None:
    patch = kopf.Patch()
    conds = [
        {
            "type": "Running",
            "status": "False",
            "reason": "Provisioning",
            "message": "",
            "lastTransitionTime": "2026-11-26T12:00:00Z",
        }
    ]
    seen: list[Any] = []
    write_outcome(
        Outcome(
            status={"phase": "Pending", "conditions": conds},
            annotations={"a": None},
            events=[Event("Warning", "Unschedulable", "x" * 5000)],
        ),
        _body({}),
        patch,
        lambda *a, **k: seen.append(k),
    )
    assert patch["status"]["conditions"] == conds
    assert patch["metadata"]["annotations"] == {"a": None}
    assert len(seen[0]["message"]) == 1024


def test_settings_are_set_with_reasons() -> None:
    settings = kopf.OperatorSettings()
    opmain.configure(settings, opmain.Options(namespaces=["a"], worker_limit=50))
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    assert settings.queueing.worker_limit == 50 and settings.queueing.idle_timeout == 1.0
    assert settings.watching.server_timeout == 300 and settings.watching.client_timeout == 330
    assert settings.peering.mandatory and settings.peering.name == "llmtrain"
    assert settings.peering.clusterwide is False
    assert settings.persistence.finalizer.startswith("llmtrain.dev/")
    standalone = kopf.OperatorSettings()
    opmain.configure(standalone, opmain.Options(peering_name=None))
    assert standalone.peering.standalone


def test_peering_crds_shape() -> None:
    kinds = {c["spec"]["names"]["kind"]: c["spec"]["scope"] for c in opmain.peering_crds()}
    assert kinds == {"ClusterKopfPeering": "Cluster", "KopfPeering": "Namespaced"}


def test_operator_never_imports_torch_or_ray() -> None:
    code = (
        "import sys, llmtrain.operator.main, llmtrain.operator.handlers, llmtrain.operator.reconcile;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_job_events_act_at_once_only_for_new_jobs_and_suspend_flips() -> None:
    new = job_body()
    assert needs_action_now(new)
    running = {**job_body(), "status": {"phase": "Provisioning"}}
    assert not needs_action_now(running)  # the echo of our own status write
    suspending = {**running, "spec": {**running["spec"], "suspend": True}}
    assert needs_action_now(suspending)
    suspended = {**suspending, "status": {"phase": "Suspended"}}
    assert not needs_action_now(suspended)
    resumed = {**suspended, "spec": {**suspended["spec"], "suspend": False}}
    assert needs_action_now(resumed)
    assert not needs_action_now({**suspending, "status": {"phase": "Failed"}})
    deleting = {**new, "metadata": {**new["metadata"], "deletionTimestamp": "2026-11-26T12:00:00Z"}}
    assert not needs_action_now(deleting)


def test_event_handler_creates_at_once_and_forgets_deleted_jobs() -> None:
    api = FakeApi()
    registry, metrics, _ = build(api)
    (handler,) = registry._watching.get_all_handlers()
    react: Any = handler
    body = job_body()
    patch = kopf.Patch()
    call(react, body=_body(body), patch=patch, type="ADDED", logger=LOG, pod_index={})
    assert api.names("Pod") == {"demo-head", "demo-worker-0", "demo-worker-1"}
    body["status"] = dict(patch["status"])
    api.calls.clear()
    call(react, body=_body(body), patch=kopf.Patch(), type="MODIFIED", logger=LOG, pod_index={})
    assert api.calls == []  # the echo of our own status write does nothing
    call(react, body=_body(body), patch=kopf.Patch(), type="DELETED", logger=LOG, pod_index={})
    assert 'llmtrain_operator_jobs{phase="Pending"} 0.0' in generate_latest(metrics.registry).decode()
