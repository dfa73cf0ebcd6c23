"""Prometheus metrics of one training worker, served on ``spec.metrics.port`` (+ local rank),
and of a hyperparameter search, served by the driver (:class:`TuneMetrics`).

Every series carries ``namespace``, ``job`` and ``rank`` labels. Each worker has its own
registry (not the process-global one) so several trainers in one process, as in tests, never
collide. ``prometheus_client`` is imported lazily: the GPU benchmark machine has only torch and
runs with ``spec.metrics.enabled: false``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from prometheus_client import CollectorRegistry

    from llmtrain.api.progress import TuningInfo

# Step-time buckets from 10 ms to ~20 min: a tiny CPU model and a large GPU model both fit.
STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)


@dataclass(frozen=True)
class MetricLabels:
    namespace: str
    job: str
    rank: int


class TrainMetrics:
    """The worker's series; updated at log and validation steps (values are already on the host)."""

    def __init__(self, labels: MetricLabels) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError(
                "prometheus-client is not installed: install llmtrain[runtime] or set spec.metrics.enabled: false"
            ) from e
        self.registry: CollectorRegistry = CollectorRegistry()
        self.labels = labels
        names = ("namespace", "job", "rank")
        values = (labels.namespace, labels.job, str(labels.rank))
        r = self.registry

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, names, registry=r).labels(*values)

        self.train_loss = gauge(
            "llmtrain_train_loss", "Training loss (mean token cross-entropy) at the last log step."
        )
        self.val_loss = gauge("llmtrain_val_loss", "Validation loss (mean token cross-entropy).")
        self.val_perplexity = gauge("llmtrain_val_perplexity", "Validation perplexity, exp(val loss).")
        # Labelled on first use: a loader that cannot count bytes (synthetic data) exports
        # no series rather than a 0 that reads as a perfect model.
        self._val_bits_per_byte = Gauge(
            "llmtrain_val_bits_per_byte",
            "Validation bits per UTF-8 byte of text (comparable across tokenizers).",
            names,
            registry=r,
        )
        self.validation_set_info = Gauge(
            "llmtrain_validation_set_info",
            "1 for the validation set the llmtrain_val_* series measure.",
            (*names, "validation_set"),
            registry=r,
        )
        self._validation_set: str | None = None
        # spec.validation.task only: labelled on first use (no task, no series).
        self._val_task_exact_match = Gauge(
            "llmtrain_val_task_exact_match_ratio",
            "Share of held-out task answers (greedy) equal to the reference.",
            names,
            registry=r,
        )
        self._val_task_score = Gauge(
            "llmtrain_val_task_score_ratio",
            "Share of held-out task answers (greedy) passing spec.validation.task.checker.",
            (*names, "checker"),
            registry=r,
        )
        self.tokens_per_second = gauge(
            "llmtrain_train_tokens_per_second",
            "Training tokens per second, all ranks, over the last log window.",
        )
        self.data_wait_ratio = gauge(
            "llmtrain_train_data_wait_ratio", "Fraction of the last log window spent waiting for batches."
        )
        self.step = gauge("llmtrain_train_step", "Optimizer steps completed.")
        self.epoch = gauge("llmtrain_train_epoch", "Epoch of the training data being read.")
        self.step_seconds = Histogram(
            "llmtrain_train_step_seconds",
            "Wall time of one optimizer step, averaged over each log window.",
            names,
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        ).labels(*values)
        self.tokens_total = Counter(
            "llmtrain_train_tokens", "Training tokens processed, all ranks.", names, registry=r
        ).labels(*values)
        self.steps_total = Counter(
            "llmtrain_train_steps", "Optimizer steps taken by this process.", names, registry=r
        ).labels(*values)
        self._peak_memory = Gauge(
            "llmtrain_train_peak_memory_bytes",
            "Peak memory of this worker: CUDA allocator peak on GPU, max RSS on CPU.",
            (*names, "device"),
            registry=r,
        )
        # Created on first use: absent on CPU, where MFU is unknown rather than guessed.
        self._mfu: Any = None
        self._gauge_cls = Gauge
        self._label_values = values
        self._server: Any = None

    def serve(self, port: int, addr: str) -> int:
        """Start /metrics on ``addr:port`` in a daemon thread; returns the port."""
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def log_window(
        self,
        *,
        loss: float,
        steps: int,
        tokens: int,
        seconds: float,
        data_wait_seconds: float,
        mfu: float | None,
        peak_memory_bytes: int,
        device: str,
        step: int,
        epoch: int,
    ) -> None:
        """Record a log window of ``steps`` optimizer steps that took ``seconds``."""
        self.train_loss.set(loss)
        self.tokens_per_second.set(tokens / seconds if seconds > 0 else 0.0)
        self.data_wait_ratio.set(data_wait_seconds / seconds if seconds > 0 else 0.0)
        for _ in range(steps):
            self.step_seconds.observe(seconds / steps)
        self.tokens_total.inc(tokens)
        self.steps_total.inc(steps)
        self.step.set(step)
        self.epoch.set(epoch)
        self._peak_memory.labels(*self._label_values, device).set(peak_memory_bytes)
        if mfu is not None:
            if self._mfu is None:
                self._mfu = self._gauge_cls(
                    "llmtrain_train_mfu_ratio",
                    "Model FLOPs utilisation of one device (6N + 12LdT FLOPs/token over the bf16 peak).",
                    ("namespace", "job", "rank"),
                    registry=self.registry,
                ).labels(*self._label_values)
            self._mfu.set(mfu)

    def task(self, *, exact_match: float, score: float, checker: str) -> None:
        """The task metric of one validation (spec.validation.task)."""
        self._val_task_exact_match.labels(*self._label_values).set(exact_match)
        self._val_task_score.labels(*self._label_values, checker).set(score)

    def validation(
        self,
        *,
        loss: float,
        perplexity: float,
        bits_per_byte: float | None = None,
        validation_set: str | None = None,
    ) -> None:
        self.val_loss.set(loss)
        self.val_perplexity.set(perplexity)
        if bits_per_byte is not None:
            self._val_bits_per_byte.labels(*self._label_values).set(bits_per_byte)
        if validation_set is not None and validation_set != self._validation_set:
            # An info series (value 1) saying which text the val_* series measure.
            if self._validation_set is not None:
                self.validation_set_info.remove(*self._label_values, self._validation_set)
            self.validation_set_info.labels(*self._label_values, validation_set).set(1)
            self._validation_set = validation_set


class TuneMetrics:
    """The search's series (``spec.tuning``), served by the driver while the tuning stage
    runs, on ``spec.metrics.port``: no training worker holds that port then (trials serve no
    metrics, they share hosts), and on a cluster the driver runs on the head, which trains
    nothing. Closed before the final run, whose rank 0 takes the port.

    Per-trial series are bounded like ``status.tuning``: the trials of its table (the best
    finished ones and the running ones), so 1,000 trials are not 1,000 series; a trial that
    leaves the table loses its series."""

    # The longest close() waits for a scrape of the final state (Prometheus' intervals are
    # 15–60 s; a scraper slower than this misses the last seconds of the search).
    FINAL_SCRAPE_SECONDS = 90.0

    def __init__(self, namespace: str, job: str, metric: str) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        # Registered first, so it counts a scrape before the scrape reads the gauges.
        self.scrapes = _ScrapeCounter()
        self.registry.register(self.scrapes)
        self.values = (namespace, job, metric)
        names = ("namespace", "job", "metric")
        self.trial_metric = Gauge(
            "llmtrain_tune_trial_metric",
            "The tuning metric (spec.tuning.metric) of a trial at its last validation: the best "
            "finished trials and the running ones.",
            (*names, "trial"),
            registry=self.registry,
        )
        self.best_metric = Gauge(
            "llmtrain_tune_best_metric",
            "The tuning metric of the best finished trial so far.",
            names,
            registry=self.registry,
        )
        self.trials = Gauge(
            "llmtrain_tune_trials",
            "Trials of the search by state (running, completed, stopped early, failed).",
            ("namespace", "job", "state"),
            registry=self.registry,
        )
        self._shown: set[str] = set()
        self._server: Any = None

    def update(self, info: TuningInfo) -> None:
        import math

        ns, job, _ = self.values
        for state in ("running", "completed", "stopped", "failed"):
            self.trials.labels(ns, job, state).set(getattr(info, state))
        if info.best is not None and info.best.metric is not None and math.isfinite(info.best.metric):
            self.best_metric.labels(*self.values).set(info.best.metric)
        shown = set()
        for t in info.trials:
            if t.metric is not None and math.isfinite(t.metric):
                self.trial_metric.labels(*self.values, str(t.number)).set(t.metric)
                shown.add(str(t.number))
        for gone in self._shown - shown:
            self.trial_metric.remove(*self.values, gone)
        self._shown = shown

    def serve(self, port: int, addr: str) -> int:
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return port

    def close(self, final_scrape_seconds: float | None = None) -> None:
        """Stop serving, once a scraper has seen the final state: the driver closes the port
        when the search ends (the final run's rank 0 takes it), and the last trials, counts
        and best would otherwise never reach Prometheus. Nobody scraping: no wait."""
        if self._server is None:
            return
        wait = self.FINAL_SCRAPE_SECONDS if final_scrape_seconds is None else final_scrape_seconds
        if self.scrapes.count > 0:
            self.scrapes.wait_for_next(wait)
        self._server.shutdown()
        self._server.server_close()
        self._server = None


class _ScrapeCounter:
    """A collector that yields nothing and counts the scrapes of its registry."""

    def __init__(self) -> None:
        import threading

        self.count = 0
        self._changed = threading.Condition()

    def describe(self) -> list[Any]:  # no series: registering it does not call collect()
        return []

    def collect(self) -> list[Any]:
        with self._changed:
            self.count += 1
            self._changed.notify_all()
        return []

    def wait_for_next(self, timeout: float) -> bool:
        """Until a scrape starts after this call (True), at most ``timeout`` seconds."""
        with self._changed:
            seen = self.count
            return self._changed.wait_for(lambda: self.count > seen, timeout=timeout)
