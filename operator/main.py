"""Start the operator: ``llmtrain operator`` calls :func:`run`.

Everything that shapes the operator's behaviour under load is set here, each with the
reason it has the value it has.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import kopf
from llmtrain.operator.controller import AlwaysActive, Controller, KopfPeering, PeeringState
from llmtrain.operator.handlers import register
from llmtrain.operator.kube import SERVICE_ACCOUNT, Http, RestApi, RestPods, in_cluster, load_connection
from llmtrain.operator.manifests import SPEC_FILE, SPEC_MOUNT, OperatorSettings
from llmtrain.operator.metrics import OperatorMetrics
from llmtrain.operator.podwatch import PodStore, PodWatch, not_ready, start_watches
from llmtrain.operator.reconcile import Reconciler

log = logging.getLogger("llmtrain.operator")

PREFIX = "llmtrain.dev"
PEERING_NAME = "llmtrain"


@dataclass
class Options:
    namespaces: list[str] | None = None  # None: cluster-wide
    liveness_port: int = 8080
    metrics_port: int | None = 9090
    bind_address: str = "0.0.0.0"
    reconcile_interval: float = 5.0
    # One active replica: the others see its heartbeat in the KopfPeering object and pause.
    # None runs standalone (tests, or a single-replica install without the peering CRDs).
    peering_name: str | None = PEERING_NAME
    priority: int = 0
    kubeconfig: str | None = None
    settings: OperatorSettings = field(default_factory=OperatorSettings)
    worker_limit: int = 2000
    executor_threads: int = 16
    # Of those, the threads that reconcile only new jobs, suspend flips and deletions (the
    # work queue's urgent lane): a new job starts even while every other thread waits on a
    # slow Ray head.
    urgent_threads: int = 4
    # Kopf's own requests in flight at once besides its watches: peering heartbeats and
    # re-lists only (the controller makes the writes, over its own pool), so a few.
    kopf_requests: int = 4
    # New jobs' Ray token from this file instead of drawn at random: for a stand-in Ray
    # cluster started with a fixed token (tests, `make k8s-demo`), never in production.
    ray_token_file: str | None = None


PRIORITY_ENV = "LLMTRAIN_OPERATOR_PRIORITY"
LOG_LEVEL_ENV = "LLMTRAIN_LOG_LEVEL"


def parse_priority(value: str | int | None) -> int:
    """``--priority`` (or ``$LLMTRAIN_OPERATOR_PRIORITY``): an integer, or ``random``.

    Kopf peering lets the live replica with the highest priority act and pauses the
    others — and pauses *all* replicas that share the highest priority. Replicas of one
    Deployment run the same arguments, so ``random`` draws a priority per process
    (1 … 2**31-1) at start: one replica acts, the rest wait in the peering object and the
    highest of them takes over when it goes. Two equal draws (1 in ~2**31 per pair) only
    pause both until one restarts: never two acting at once.
    """
    if value is None or value == "":
        return 0
    if isinstance(value, int):
        return value
    if value.strip().lower() == "random":
        import secrets

        return 1 + secrets.randbelow(2**31 - 1)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"priority must be an integer or 'random', not {value!r}") from None


def configure(settings: kopf.OperatorSettings, opts: Options) -> None:
    # Kopf's own records live in annotations under our prefix, never in status, so the
    # status schema (and `kubectl get`) stays ours; both are annotations from day one so
    # that no migration is ever needed.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    # Kopf runs one worker (an asyncio task) per object with pending events, and a worker
    # keeps its slot for idle_timeout after the object's last event. The limit therefore
    # caps throughput at worker_limit / idle_timeout objects per second: 100 with the 5 s
    # default let Kopf fall minutes behind at 1000 jobs. The only handler hands the body
    # to the controller and returns, so a worker lives ~1 s per burst of events: 2000
    # never binds, and a 1 s idle timeout frees each as soon as its job is quiet.
    settings.queueing.worker_limit = opts.worker_limit
    settings.queueing.idle_timeout = 1.0
    # Kopf's thread pool runs sync handlers only (the start-up one); the blocking API calls
    # run on the controller's own threads.
    settings.execution.max_workers = 2
    # A watch on a silently dropped TCP connection never ends by itself; the apiserver
    # closes ours after 5 min (server_timeout) and the client gives up 30 s later, so a
    # dead stream costs at most ~5.5 min of missed events (the inactivity timeout, with
    # bookmarks every 60 s, usually notices sooner).
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    # Events are posted by the controller for transitions and problems; logs are not.
    settings.posting.loggers = False
    settings.posting.reporting_component = "llmtrain-operator"
    settings.networking.request_timeout = 60
    if opts.peering_name is None:
        settings.peering.standalone = True
    else:
        settings.peering.name = opts.peering_name
        settings.peering.priority = opts.priority
        settings.peering.mandatory = True
        settings.peering.clusterwide = opts.namespaces is None


def build(
    opts: Options,
    http: Http,
    info: kopf.ConnectionInfo,
    store: PodStore | None = None,
    peering: PeeringState | None = None,
) -> tuple[kopf.OperatorRegistry, OperatorMetrics, Controller]:
    registry = kopf.OperatorRegistry()
    metrics = OperatorMetrics()
    api = RestApi(http)
    reconciler = Reconciler(api, opts.settings)
    if opts.ray_token_file:
        path = Path(opts.ray_token_file)
        reconciler.token = lambda: path.read_text().strip()
    controller = Controller(
        reconciler,
        api,
        store if store is not None else PodStore(),
        metrics,
        interval=opts.reconcile_interval,
        threads=opts.executor_threads,
        urgent_threads=opts.urgent_threads,
        peering=peering,
    )
    register(registry, controller)

    @kopf.on.startup(registry=registry)
    def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, opts)

    @kopf.on.login(registry=registry)
    async def _login(**kwargs: Any) -> kopf.AiohttpSession | None:
        # Kopf's watches use the same credentials as our own calls; in a pod the service
        # account token is re-read on every re-login (tokens are rotated).
        fresh = kopf.login_with_service_account(**kwargs) if _uses_service_account(opts) else info
        if fresh is None:
            return None
        return limited_session(fresh, kopf_connection_limit(opts))

    return registry, metrics, controller


def kopf_connection_limit(opts: Options) -> int:
    """Kopf's connections: ``kopf_requests`` for requests in flight, plus one per watch
    stream it holds open (jobs and peering per namespace; cluster-wide also namespaces and
    CRDs), so that the watches can never take every slot."""
    watches = 2 * len(opts.namespaces) if opts.namespaces else 4
    return opts.kopf_requests + watches + 2


def limited_session(info: kopf.ConnectionInfo, limit: int) -> kopf.AiohttpSession:
    """Kopf's HTTP session as Kopf builds it, but with at most ``limit`` connections.

    Kopf's own session has no limit (aiohttp ``limit=0``): every concurrent PATCH or Event
    opens one more TLS connection, and asyncio gives each a 256 KiB read buffer. At 300
    jobs the operator held ~420 of them (110 MB of its 316 MB peak, measured with a
    gc/malloc_stats dump), plus a TLS handshake each for the API server. Requests over
    the limit wait for a free connection instead.
    """
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),  # token or basic auth, as Kopf sends them
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(
        server=info.server,
        priority=info.priority,
        default_namespace=info.default_namespace,
        expiration=info.expiration,
        aiohttp_session=session,
    )


def _uses_service_account(opts: Options) -> bool:
    return opts.kubeconfig is None and in_cluster()


async def serve(
    opts: Options, info: kopf.ConnectionInfo, stop_flag: Any = None, ready_flag: Any = None
) -> None:
    """Run until ``stop_flag`` (an asyncio.Event/threading.Event/Future) is set."""
    token_file = SERVICE_ACCOUNT / "token" if _uses_service_account(opts) else None
    # One connection per reconcile thread. The pod watches get pools of their own: each
    # holds its connection for a whole watch stream, and must never starve the reconcilers.
    http = Http(info, opts.executor_threads, token_file=token_file)
    watch_http = Http(info, len(opts.namespaces or [None]), token_file=token_file)
    store = PodStore()
    identity = own_identity()
    peering: PeeringState = (
        AlwaysActive()
        if opts.peering_name is None
        else KopfPeering(
            RestApi(http),
            name=opts.peering_name,
            identity=identity,
            priority=opts.priority,
            namespaces=opts.namespaces,
            ttl=min(opts.reconcile_interval, 5.0),
        )
    )
    registry, metrics, controller = build(opts, http, info, store, peering)
    # The pod watch runs while this replica is paused by peering too: it only reads, and a
    # replica that takes over then starts with its pods already known.
    watches: list[PodWatch] = start_watches(
        RestPods(watch_http),
        store,
        opts.namespaces,
        on_failure=lambda kind: metrics.pod_watch_failures.labels(kind=kind).inc(),
    )
    if opts.metrics_port is not None:
        metrics.serve(opts.metrics_port, opts.bind_address, readiness=lambda: not_ready(store, watches))
    controller.start()
    try:
        await kopf.operator(
            identity=cast(Any, identity),  # Kopf's Identity is a NewType of str
            registry=registry,
            clusterwide=opts.namespaces is None,
            namespaces=opts.namespaces or (),
            liveness_endpoint=f"http://{opts.bind_address}:{opts.liveness_port}/healthz",
            standalone=opts.peering_name is None,
            peering_name=opts.peering_name,
            priority=opts.priority,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        controller.stop()
        for w in watches:
            w.stop()


def own_identity() -> str:
    """This replica's peering identity, as Kopf makes one: the pod's name in a cluster
    (the chart sets POD_NAME), else user@host/start-time/random. Passed to Kopf, so the
    controller knows which heartbeat in the peering object is its own."""
    pod = os.environ.get("POD_NAME") or os.environ.get("POD_ID")
    if pod:
        return pod
    import getpass
    import secrets
    import socket
    import time

    return f"{getpass.getuser()}@{socket.gethostname()}/{time.strftime('%Y%m%d%H%M%S', time.gmtime())}/{secrets.token_hex(2)}"


def run(
    namespaces: Sequence[str] | None,
    liveness_port: int = 8080,
    metrics_port: int | None = 9090,
    *,
    reconcile_interval: float = 5.0,
    peering_name: str | None = PEERING_NAME,
    kubeconfig: str | None = None,
    operator_namespace: str = "llmtrain-system",
    bind_address: str = "0.0.0.0",
    stop_flag: threading.Event | None = None,
    verbose: bool = False,
    priority: int = 0,
    ray: RayHeadOptions | None = None,
    job_metrics: JobMetricsOptions | None = None,
) -> None:
    """Run the operator in this thread until SIGINT/SIGTERM (or ``stop_flag``)."""
    # $LLMTRAIN_LOG_LEVEL (e.g. DEBUG) for a closer look at a live operator without a new
    # image; both entry points (``llmtrain operator``, ``python -m``) come through here.
    level = os.environ.get(LOG_LEVEL_ENV, "").upper()
    if level:
        logging.getLogger().setLevel(level)
    if not verbose:
        # Kopf logs every successful handler call at INFO: at 1000 jobs, hundreds of lines
        # a second of "Handler 'observe' succeeded" and a measurable share of the CPU.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        # Kopf's liveness endpoint is aiohttp's: an access line for every kubelet probe (two
        # every 10 s in a pod) buries the operator's own lines in `kubectl logs`.
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    opts = Options(
        namespaces=list(namespaces) if namespaces else None,
        liveness_port=liveness_port,
        metrics_port=metrics_port,
        bind_address=bind_address,
        reconcile_interval=reconcile_interval,
        peering_name=peering_name,
        priority=priority,
        kubeconfig=kubeconfig,
        settings=OperatorSettings(
            operator_namespace=operator_namespace,
            head_host=ray.head_host if ray else None,
            dashboard_port=ray.dashboard_port if ray else 8265,
            progress_port=ray.progress_port if ray else 8266,
            driver_spec_path=ray.driver_spec_path if ray else f"{SPEC_MOUNT}/{SPEC_FILE}",
            **(job_metrics or JobMetricsOptions()).settings(),
        ),
        ray_token_file=ray.token_file if ray else None,
    )
    try:
        info = load_connection(kubeconfig)
    except (ValueError, OSError, KeyError) as e:
        raise SystemExit(f"llmtrain operator: {e}") from None
    if peering_name is not None:
        log.info("peering %r with priority %d", peering_name, priority)
    asyncio.run(serve(opts, info, stop_flag=stop_flag))


@dataclass(frozen=True)
class RayHeadOptions:
    """Where the operator reaches jobs' heads; the defaults are the in-cluster ones."""

    head_host: str | None = None  # None: <job>-head-svc.<ns>.svc.<domain>
    dashboard_port: int = 8265
    progress_port: int = 8266
    token_file: str | None = None
    driver_spec_path: str = f"{SPEC_MOUNT}/{SPEC_FILE}"  # {namespace}, {name}: a stand-in's copy


@dataclass(frozen=True)
class JobMetricsOptions:
    """How Prometheus reaches the jobs' pods (the Helm chart's ``jobMetrics`` values)."""

    scrape_annotations: bool = False  # prometheus.io/* on every Ray pod
    # The Prometheus the per-job NetworkPolicy admits to the metrics ports; None: the default.
    prometheus_namespace_labels: dict[str, str] | None = None
    prometheus_pod_labels: dict[str, str] | None = None

    def settings(self) -> dict[str, Any]:
        """OperatorSettings' fields these set (the unset ones keep their defaults)."""
        out: dict[str, Any] = {"prometheus_scrape_annotations": self.scrape_annotations}
        if self.prometheus_namespace_labels:
            out["prometheus_namespace_labels"] = dict(self.prometheus_namespace_labels)
        if self.prometheus_pod_labels:
            out["prometheus_pod_labels"] = dict(self.prometheus_pod_labels)
        return out


def parse_labels(pairs: Sequence[str] | None, flag: str) -> dict[str, str] | None:
    """``["k=v", ...]`` (a repeatable flag) as a dict; None when the flag was not given."""
    if not pairs:
        return None
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def peering_crds() -> list[dict[str, Any]]:
    """Kopf's peering CRDs (KopfPeering, ClusterKopfPeering): install them with the operator."""

    def crd(kind: str, plural: str, scope: str) -> dict[str, Any]:
        return {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.kopf.dev"},
            "spec": {
                "scope": scope,
                "group": "kopf.dev",
                "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "schema": {
                            "openAPIV3Schema": {
                                "type": "object",
                                "properties": {
                                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                                },
                            }
                        },
                    }
                ],
            },
        }

    return [
        crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
        crd("KopfPeering", "kopfpeerings", "Namespaced"),
    ]
