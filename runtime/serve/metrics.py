"""``GET /metrics``: the server's ``llmtrain_serve_*`` Prometheus series.

The engine keeps plain counters (:class:`EngineStats`) that the gauges read at scrape time; the
HTTP side counts requests by path and status (:func:`observing_middleware`) and observes time
to first token (:class:`FirstToken`). The series carry no job labels: a server serves one model,
and the dashboard's serving panels are fleet-wide (:mod:`llmtrain.dashboard`). No torch here.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Time to first token / request latency: 5 ms (a tiny model on CPU) to 5 min (long generations).
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
THROUGHPUT_WINDOW_SECONDS = 10.0


@dataclass
class EngineStats:
    """Counters the engine keeps for /metrics (read from other threads: plain ints)."""

    steps: int = 0
    max_rows: int = 0
    cancelled: int = 0
    window: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the window: engine vs scrapes

    def generated(self, tokens: int, now: float) -> None:
        with self.lock:
            self.window.append((now, tokens))
            while self.window and now - self.window[0][0] > THROUGHPUT_WINDOW_SECONDS:
                self.window.popleft()

    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self.lock:
            recent = sum(n for t, n in self.window if now - t <= THROUGHPUT_WINDOW_SECONDS)
        return recent / THROUGHPUT_WINDOW_SECONDS


class EngineGauges(Protocol):
    """What the gauges read from the engine at scrape time (the engine, or a stand-in in tests)."""

    @property
    def stats(self) -> EngineStats: ...

    @property
    def active_count(self) -> int: ...

    @property
    def waiting_count(self) -> int: ...


class ServeMetrics:
    """``llmtrain_serve_*`` series in a registry of the server's own."""

    def __init__(self, engine: EngineGauges) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmtrain_serve_requests",
            "HTTP requests answered, by path and status code.",
            ("path", "code"),
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llmtrain_serve_prompt_tokens", "Prompt tokens of accepted requests.", registry=r
        )
        self.completion_tokens = Counter(
            "llmtrain_serve_completion_tokens", "Tokens generated for completed choices.", registry=r
        )
        self.rejected = Counter(
            "llmtrain_serve_rejected_requests",
            "Requests and connections refused before generation, by reason: queue_full (429), "
            "unauthorized (401), body_too_large (413), body_timeout (408), header_timeout and "
            "write_timeout (connection closed).",
            ("reason",),
            registry=r,
        )
        self.ttft = Histogram(
            "llmtrain_serve_time_to_first_token_seconds",
            "From a completion request's arrival to its first generated token.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "llmtrain_serve_request_duration_seconds",
            "Wall time of /v1/completions and /v1/chat/completions requests, arrival to last byte.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "llmtrain_serve_batch_rows",
            "Sequences decoded together by one forward pass (continuous batching).",
            buckets=BATCH_ROWS_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "llmtrain_serve_decode_step_seconds",
            "Wall time of one batched decode step (forward + sampling).",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        _engine_gauges(r, engine)

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.step_seconds.observe(seconds)


def _engine_gauges(r: CollectorRegistry, engine: EngineGauges) -> None:
    """Gauges computed from the engine when scraped (nothing to update on the hot path)."""
    Gauge(
        "llmtrain_serve_generation_tokens_per_second",
        f"Tokens generated per second over the last {THROUGHPUT_WINDOW_SECONDS:g} s.",
        registry=r,
    ).set_function(engine.stats.tokens_per_second)
    Gauge("llmtrain_serve_active_sequences", "Sequences in the running batch.", registry=r).set_function(
        lambda: engine.active_count
    )
    Gauge("llmtrain_serve_waiting_sequences", "Sequences waiting for a batch slot.", registry=r).set_function(
        lambda: engine.waiting_count
    )
    Gauge(
        "llmtrain_serve_batch_rows_max", "Most sequences one decode step has run together.", registry=r
    ).set_function(lambda: engine.stats.max_rows)
    Gauge(
        "llmtrain_serve_cancelled_sequences",
        "Sequences dropped because their client went away (cumulative).",
        registry=r,
    ).set_function(lambda: engine.stats.cancelled)


class FirstToken:
    """Observes time to first token once per request."""

    def __init__(self, metrics: ServeMetrics, arrived: float) -> None:
        self.metrics, self.arrived, self.done = metrics, arrived, False

    def seen(self) -> None:
        if not self.done:
            self.done = True
            self.metrics.ttft.observe(time.perf_counter() - self.arrived)


COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")  # timed in ..._request_duration_seconds


def observing_middleware(app: Any, metrics: ServeMetrics, paths: set[str]) -> Any:
    """Pure ASGI wrapper: count every response by path and status; time the completions."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in paths else "other"
        start = time.perf_counter()
        status = {"code": 500}

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await app(scope, receive, sending)
        finally:
            metrics.requests.labels(path, str(status["code"])).inc()
            if path in COMPLETION_PATHS:
                metrics.latency.observe(time.perf_counter() - start)

    return wrapped
