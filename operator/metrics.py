"""The operator's own Prometheus metrics (``/metrics``).

A private registry (not the process-global one) so that tests can make a fresh set and
two operators in one process never collide. ``llmtrain_operator_jobs`` is computed at
scrape time from the phase last reconciled per job, so a deleted job disappears from it
instead of leaving a stale gauge behind.
"""

from __future__ import annotations

import threading
from collections import Counter as _Tally
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmtrain.api.status import Phase


class _JobsByPhase(Collector):
    def __init__(self, phases: dict[tuple[str, str], Phase], lock: threading.Lock) -> None:
        self._phases = phases
        self._lock = lock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            tally = _Tally(p.value for p in self._phases.values())
        g = GaugeMetricFamily("llmtrain_operator_jobs", "LLMTrainingJobs by phase.", labels=["phase"])
        for phase in Phase:
            g.add_metric([phase.value], tally.get(phase.value, 0))
        yield g


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], Phase] = {}
        self.registry.register(_JobsByPhase(self._phases, self._lock))
        self.reconcile_seconds = Histogram(
            "llmtrain_operator_reconcile_duration_seconds",
            "Time of one reconcile of one job (API calls included).",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "llmtrain_operator_queue_wait_seconds",
            "Time a job waited in the work queue before its reconcile started, by lane: urgent "
            "(a new job, a suspend flip, a deletion to act on), routine (the resync).",
            ["lane"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "llmtrain_operator_reconcile_errors",
            "Reconciles that failed, once per try (retried with backoff), by kind: http_<status>, "
            "connection, create (a child refused or someone else's), unexpected.",
            ["kind"],
            registry=self.registry,
        )
        self.provisioning_seconds = Histogram(
            "llmtrain_operator_provisioning_duration_seconds",
            "From the pods' creation (start, resume or restart) until every pod of the job is Running.",
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
            registry=self.registry,
        )
        self.restarts = Counter(
            "llmtrain_operator_ray_cluster_restarts",
            "Ray cluster restarts after a pod ended.",
            registry=self.registry,
        )
        # Exposed as llmtrain_operator_pod_watch_failures_total.
        self.pod_watch_failures = Counter(
            "llmtrain_operator_pod_watch_failures",
            "Failed lists or watches of the jobs' pods, by kind (http_<status>, or the error's "
            "type); each is retried every second, and a refused one (401, 403) makes /readyz fail.",
            ["kind"],
            registry=self.registry,
        )
        # Exposed as llmtrain_operator_foreign_snapshots_total.
        self.foreign_snapshots = Counter(
            "llmtrain_operator_foreign_snapshots",
            "Run snapshots refused because another Ray job's driver sent them (never written into "
            "a job's status), by source: progress (the live endpoint), log (the final snapshot), "
            "checkpoint (a suspend's checkpoint request).",
            ["source"],
            registry=self.registry,
        )

    def set_phase(self, namespace: str, name: str, phase: Phase) -> None:
        with self._lock:
            self._phases[(namespace, name)] = phase

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)

    def serve(self, port: int, addr: str = "0.0.0.0", readiness: Readiness | None = None) -> None:
        """``/metrics`` (prometheus_client's app) and ``/readyz`` (200 ``ok``, or 503 and why)
        on one port, in a daemon thread."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/readyz":
                return cast(Iterable[bytes], metrics_app(environ, start_response))
            why = readiness() if readiness is not None else None
            status = "503 Service Unavailable" if why else "200 OK"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [(why or "ok").encode() + b"\n"]

        server = make_server(addr, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()


# Why the operator is not ready to reconcile (None: it is); asked per /readyz request.
Readiness = Callable[[], str | None]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    # As prometheus_client's own server: a slow scraper never blocks a probe.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    timeout = 10  # a probe or scrape that connects and sends nothing does not keep a thread

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per probe and scrape would drown the operator's log
