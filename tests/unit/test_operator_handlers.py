"""The Kopf wiring: which handlers exist on what, that they stay thin, and Kopf's settings."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from typing import Any

import kopf
import pytest
from llmtrain.operator import main as opmain
from llmtrain.operator.controller import Controller
from llmtrain.operator.handlers import register
from llmtrain.operator.manifests import OperatorSettings
from llmtrain.operator.metrics import OperatorMetrics
from llmtrain.operator.podwatch import PodStore
from llmtrain.operator.reconcile import Reconciler

from llmtrain.api.spec import GROUP, PLURAL
from tests.unit.test_operator_controller import FakeWriter
from tests.unit.test_operator_fakes import FakeApi, job_body


def build() -> tuple[kopf.OperatorRegistry, Controller]:
    registry = kopf.OperatorRegistry()
    store = PodStore()
    store.mark_synced()
    api = FakeApi()
    controller = Controller(Reconciler(api, OperatorSettings()), FakeWriter(), store, OperatorMetrics())
    register(registry, controller)
    return registry, controller


def test_one_event_handler_on_jobs_and_nothing_else_of_kopf() -> None:
    registry, _ = build()
    # No timers or daemons (a Kopf timer per job was most of the operator's memory at
    # 1000 jobs, and needs a finalizer per job), no indexes, nothing on pods.
    assert list(registry._spawning.get_all_handlers()) == []
    assert list(registry._indexing.get_all_handlers()) == []
    # No change-detecting handlers: Kopf would write progress/diffbase annotations per change.
    assert list(registry._changing.get_all_handlers()) == []
    (observe,) = registry._watching.get_all_handlers()
    assert observe.selector is not None
    assert observe.selector.group == GROUP and observe.selector.any_name == PLURAL


def test_the_handler_only_hands_the_body_to_the_controller() -> None:
    registry, controller = build()
    (observe,) = registry._watching.get_all_handlers()
    fn: Any = observe.fn
    asyncio.run(fn(body=kopf.Body(job_body()), type="ADDED", patch=kopf.Patch(), logger=None))
    assert controller.cache.keys() == [("ns1", "demo")]
    assert controller.queue.get(timeout=0) == ("ns1", "demo")
    # Nothing was reconciled on the event loop: no API call, no write.
    assert controller.reconciler.api.calls == []  # type: ignore[attr-defined]
    asyncio.run(fn(body=kopf.Body(job_body()), type="DELETED", patch=kopf.Patch(), logger=None))
    assert controller.cache.keys() == []


def test_settings_are_set_with_reasons() -> None:
    settings = kopf.OperatorSettings()
    opmain.configure(settings, opmain.Options(namespaces=["a"], worker_limit=50))
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    assert settings.queueing.worker_limit == 50 and settings.queueing.idle_timeout == 1.0
    assert settings.watching.server_timeout == 300 and settings.watching.client_timeout == 330
    assert settings.peering.mandatory and settings.peering.name == "llmtrain"
    assert settings.peering.clusterwide is False
    standalone = kopf.OperatorSettings()
    opmain.configure(standalone, opmain.Options(peering_name=None))
    assert standalone.peering.standalone


def test_peering_crds_shape() -> None:
    kinds = {c["spec"]["names"]["kind"]: c["spec"]["scope"] for c in opmain.peering_crds()}
    assert kinds == {"ClusterKopfPeering": "Cluster", "KopfPeering": "Namespaced"}


def test_operator_never_imports_torch_or_ray() -> None:
    code = (
        "import sys, llmtrain.operator.main, llmtrain.operator.controller, llmtrain.operator.reconcile;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


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
    registry, _, _ = opmain.build(opts, Http(info, 2), info, PodStore())
    (login,) = [h for h in registry._activities.get_all_handlers() if "login" in str(h.id)]

    async def run() -> Any:
        ctx = await login.fn(settings=kopf.OperatorSettings(), logger=logging.getLogger("test"))
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
