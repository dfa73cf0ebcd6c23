"""The operator's own Prometheus metrics (``/metrics``).

A private registry (not the process-global one) so that tests can make a fresh set and
two operators in one process never collide. ``llmtrain_operator_jobs`` is computed at
scrape time from the phase last reconciled per job, so a deleted job disappears from it
instead of leaving a stale gauge behind.
"""

from __future__ import annotations

import threading
from collections import Counter as _Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
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

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
