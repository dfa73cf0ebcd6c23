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
from llmtrain.operator.handlers import FINALIZER, needs_action_now, register, write_outcome
from llmtrain.operator.kube import ApiError
from llmtrain.operator.manifests import OperatorSettings
from llmtrain.operator.metrics import OperatorMetrics
from llmtrain.operator.podwatch import PodStore
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


def build(
    api: FakeApi | None = None, store: PodStore | None = None
) -> tuple[kopf.OperatorRegistry, OperatorMetrics, list[tuple[Any, ...]]]:
    registry = kopf.OperatorRegistry()
    metrics = OperatorMetrics()
    events: list[tuple[Any, ...]] = []
    rec = Reconciler(api or FakeApi(), OperatorSettings(), token=lambda: "t" * 64)
    if store is None:
        store = PodStore()
        store.mark_synced()

    def emit(body: Any, *, type: str, reason: str, message: str) -> None:
        events.append((type, reason, message))

    register(registry, rec, metrics, store, interval=2.0, clock=lambda: NOW, emit=emit)
    return registry, metrics, events


def handlers(registry: kopf.OperatorRegistry) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for reg in (registry._changing, registry._spawning, registry._indexing):
        for h in reg.get_all_handlers():
            out[str(h.id)] = h
    return out


def test_one_timer_on_the_job_and_nothing_of_kopf_on_pods() -> None:
    registry, _, _ = build()
    hs = handlers(registry)
    timers = [h for h in registry._spawning.get_all_handlers()]
    assert len(timers) == 1
    (timer,) = timers
    assert timer.selector is not None
    assert timer.selector.group == GROUP and timer.selector.any_name == PLURAL
    assert getattr(timer, "interval", None) == 2.0
    # Pods are watched by the operator's own PodWatch: Kopf must not watch them at all
    # (its per-object state and body copies were most of the RSS at 1000 jobs).
    assert list(registry._indexing.get_all_handlers()) == []
    assert not any("pods" in str(h.selector) for h in hs.values())
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
    call(timer, body=body, patch=patch, logger=LOG)
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
    store = PodStore()
    store.mark_synced()
    registry, metrics, _ = build(api, store)
    (timer,) = registry._spawning.get_all_handlers()
    body = job_body()
    call(timer, body=_body(body), patch=kopf.Patch(), logger=LOG)
    body["spec"]["suspend"] = True
    body["metadata"]["generation"] = 2
    api.fail["delete"] = ApiError(500, "etcdserver: request timed out")
    store.replace(views(api).values())
    with pytest.raises(kopf.TemporaryError) as e:
        call(timer, body=_body(body), patch=kopf.Patch(), logger=LOG)
    assert e.value.delay == 5
    assert (
        'llmtrain_operator_reconcile_errors_total{kind="http_500"} 1.0'
        in generate_latest(metrics.registry).decode()
    )


def test_metrics_provisioning_restarts_and_forget() -> None:
    api = FakeApi()
    store = PodStore()
    store.mark_synced()
    registry, metrics, _ = build(api, store)
    (timer,) = registry._spawning.get_all_handlers()
    body = job_body()
    call(timer, body=_body(body), patch=kopf.Patch(), logger=LOG)
    set_all(api, "running")
    store.replace(views(api).values())
    patch = kopf.Patch()
    body["metadata"]["annotations"]["llmtrain.dev/attempt-started-at"] = "2026-11-26T11:59:50Z"
    call(timer, body=_body(body), patch=patch, logger=LOG)
    text = generate_latest(metrics.registry).decode()
    assert "llmtrain_operator_provisioning_duration_seconds_count 1.0" in text
    assert "llmtrain_operator_provisioning_duration_seconds_sum 10.0" in text
    metrics.forget("ns1", "demo")
    assert 'llmtrain_operator_jobs{phase="Pending"} 0.0' in generate_latest(metrics.registry).decode()


def test_handlers_wait_for_the_first_pod_list() -> None:
    """Before the pod watch has listed, every pod would look missing: the reconcile must
    wait, not recreate the pods (409s) and report a running job as Pending."""
    api = FakeApi()
    first, _, _ = build(api)
    (timer,) = first._spawning.get_all_handlers()
    body = job_body()
    call(timer, body=_body(body), patch=kopf.Patch(), logger=LOG)
    set_all(api, "running")
    store = PodStore()  # not synced yet
    registry, _, _ = build(api, store)
    (timer,) = registry._spawning.get_all_handlers()
    api.calls.clear()
    patch = kopf.Patch()

    async def tick_then_list() -> None:
        task = asyncio.ensure_future(timer.fn(body=_body(body), patch=patch, logger=LOG))
        await asyncio.sleep(0.2)
        assert not task.done() and api.calls == []  # waiting for the list
        store.replace(views(api).values())
        store.mark_synced()
        await asyncio.wait_for(task, 5)

    asyncio.run(tick_then_list())
    assert not [c for c in api.calls if c[0] == "create"]
    assert patch["status"]["phase"] == "Provisioning"


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
    registry, metrics, events = build(api)
    (handler,) = registry._watching.get_all_handlers()
    react: Any = handler
    body = job_body()
    patch = kopf.Patch()
    call(react, body=_body(body), patch=patch, type="ADDED", logger=LOG)
    assert api.names("Pod") == {"demo-head", "demo-worker-0", "demo-worker-1"}
    # No status yet: Kopf adds its finalizer in this cycle, and a status PATCH beside it
    # made Kopf add the finalizer twice (the status echo arrives without it).
    assert not patch
    assert ("Normal", "PodsCreated", "created 3 Ray pods") in events
    # The finalizer's echo (still no phase) writes the status, creating nothing again.
    api.calls.clear()
    body["metadata"]["finalizers"] = [FINALIZER]
    patch = kopf.Patch()
    call(react, body=_body(body), patch=patch, type="MODIFIED", logger=LOG)
    assert [c for c in api.calls if c[0] == "create"] == []
    assert patch["status"]["phase"] == "Pending"
    body["status"] = dict(patch["status"])
    api.calls.clear()
    call(react, body=_body(body), patch=kopf.Patch(), type="MODIFIED", logger=LOG)
    assert api.calls == []  # the echo of our own status write does nothing
    call(react, body=_body(body), patch=kopf.Patch(), type="DELETED", logger=LOG)
    assert 'llmtrain_operator_jobs{phase="Pending"} 0.0' in generate_latest(metrics.registry).decode()


def test_kopf_session_has_a_connection_limit_above_its_watches() -> None:
    """Kopf's own session opens a TLS connection per concurrent request (aiohttp limit=0),
    each with a 256 KiB asyncio buffer: the login handler must hand it a limited one."""
    opts = opmain.Options(namespaces=["a", "b"], kopf_requests=8)
    info = kopf.ConnectionInfo(server="https://127.0.0.1:6443", token="t", scheme="Bearer")

    async def make() -> Any:
        ctx = opmain.limited_session(info, opmain.kopf_connection_limit(opts))
        try:
            return ctx.aiohttp_session.connector.limit, ctx.server
        finally:
            await ctx.aiohttp_session.close()

    limit, server = asyncio.run(make())
    # 8 requests in flight + jobs and peering watches in each of 2 namespaces + 2 spare.
    assert limit == 8 + 4 + 2 and server == info.server
    assert opmain.kopf_connection_limit(opmain.Options(namespaces=None)) > opmain.Options().kopf_requests


def test_login_hands_kopf_the_limited_session(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtrain.operator.kube import Http

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    info = kopf.ConnectionInfo(server="https://127.0.0.1:6443", token="t", insecure=True)
    opts = opmain.Options(namespaces=["a"], kopf_requests=4)
    registry, _ = opmain.build(opts, Http(info, 2), info, PodStore())
    (login,) = [h for h in registry._activities.get_all_handlers() if "login" in str(h.id)]

    async def run() -> Any:
        ctx = await login.fn(settings=kopf.OperatorSettings(), logger=LOG)
        try:
            return type(ctx), ctx.aiohttp_session.connector.limit
        finally:
            await ctx.aiohttp_session.close()

    kind, limit = asyncio.run(run())
    assert kind is kopf.AiohttpSession and limit == opmain.kopf_connection_limit(opts) == 8


def test_priority_is_an_integer_or_drawn_per_process() -> None:
    assert opmain.parse_priority("7") == 7 and opmain.parse_priority(None) == 0
    assert opmain.parse_priority("") == 0 and opmain.parse_priority(3) == 3
    draws = {opmain.parse_priority("random") for _ in range(50)}
    assert len(draws) == 50 and all(1 <= d < 2**31 for d in draws)
    with pytest.raises(ValueError, match="integer or 'random'"):
        opmain.parse_priority("high")
    settings = kopf.OperatorSettings()
    opmain.configure(settings, opmain.Options(priority=opmain.parse_priority("41")))
    assert settings.peering.priority == 41
