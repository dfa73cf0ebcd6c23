"""The operator's own watch over the jobs' pods: a few hundred bytes per pod, nothing else.

It replaces a Kopf index over pods. Kopf keeps per-object state for every watched object,
runs one worker task per pod with events, and wraps each full body (with ``managedFields``)
per event, on the same event loop that handles the jobs; at 1000 jobs that is 4000 more
objects' worth of state and CPU (which competes with the API server on a small node).
Here one thread per watched namespace (or one cluster-wide) lists and watches the
pods carrying ``llmtrain.dev/job`` (filtered by the API server), turns each event's body
into a :class:`~llmtrain.operator.diagnose.PodView` at once and drops the body.

* :class:`PodStore` — the views by (namespace, job) → pod name; pure, thread-safe.
* :class:`PodWatch` — list (paged) → watch from that resourceVersion (with bookmarks) →
  on 410 Gone or a broken stream, watch again from the last version seen, relisting
  when the version is too old. Over a :class:`PodSource`, so it is tested without a server.

The reconcile threads wait for the first full list (:meth:`PodStore.wait_synced`):
before it a job's pods would look missing, and the reconciler would try to recreate
them (409s) and report the job as Pending.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from llmtrain.operator.diagnose import PodView, pod_view
from llmtrain.operator.manifests import LABEL_JOB

log = logging.getLogger("llmtrain.operator.pods")

Key = tuple[str, str]  # (namespace, job)


class PodStore:
    """The pods of every job, as :class:`PodView`, updated from watch events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_job: dict[Key, dict[str, PodView]] = {}
        self._key_of: dict[tuple[str, str], Key] = {}  # (namespace, pod) → its job's key
        self._synced = threading.Event()

    # -- writers (the watch thread)

    def replace(self, views: Iterable[PodView]) -> None:
        """A full list: everything not in it is gone (events missed while relisting)."""
        by_job: dict[Key, dict[str, PodView]] = {}
        key_of: dict[tuple[str, str], Key] = {}
        for v in views:
            key = (v.namespace, v.job)
            by_job.setdefault(key, {})[v.name] = v
            key_of[(v.namespace, v.name)] = key
        with self._lock:
            self._by_job, self._key_of = by_job, key_of

    def replace_namespace(self, namespace: str | None, views: Iterable[PodView]) -> None:
        """A full list of one namespace (``None``: all of them); other namespaces are kept."""
        if namespace is None:
            self.replace(views)
            return
        fresh = list(views)
        with self._lock:
            for key in [k for k in self._by_job if k[0] == namespace]:
                del self._by_job[key]
            for pk in [k for k in self._key_of if k[0] == namespace]:
                del self._key_of[pk]
            for v in fresh:
                key = (v.namespace, v.job)
                self._by_job.setdefault(key, {})[v.name] = v
                self._key_of[(v.namespace, v.name)] = key

    def apply(self, kind: str, body: Mapping[str, Any]) -> None:
        """One watch event (ADDED, MODIFIED, DELETED) with the pod's body."""
        view = pod_view(body)
        pk = (view.namespace, view.name)
        with self._lock:
            old = self._key_of.get(pk)
            if old is not None:  # drop the old entry (the job label could have changed)
                pods = self._by_job.get(old)
                if pods is not None:
                    pods.pop(view.name, None)
                    if not pods:
                        del self._by_job[old]
                del self._key_of[pk]
            if kind != "DELETED" and view.job:
                key = (view.namespace, view.job)
                self._by_job.setdefault(key, {})[view.name] = view
                self._key_of[pk] = key

    def mark_synced(self) -> None:
        self._synced.set()

    # -- readers (the handlers)

    def pods(self, namespace: str, job: str) -> dict[str, PodView]:
        """A copy of one job's pods by name (PodViews are immutable)."""
        with self._lock:
            return dict(self._by_job.get((namespace, job), {}))

    def __len__(self) -> int:
        with self._lock:
            return len(self._key_of)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Block until the first full list (True), or ``timeout`` (False)."""
        return self._synced.wait(timeout)


class PodSource(Protocol):
    def list(self, namespace: str | None, selector: str, limit: int, cont: str | None) -> dict[str, Any]:
        """One page of a pod list: ``{"metadata": {"resourceVersion", "continue"}, "items": [...]}``."""
        ...

    def watch(self, namespace: str | None, selector: str, resource_version: str) -> Iterator[dict[str, Any]]:
        """Watch events (``{"type", "object"}``) from ``resource_version``, bookmarks included,
        until the server ends the stream."""
        ...


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


class PodWatch:
    """List + watch the job pods of one namespace (``None``: all) into a :class:`PodStore`."""

    PAGE = 500  # a page of pod bodies parsed at a time: bounds the memory of a (re)list

    def __init__(
        self,
        source: PodSource,
        store: PodStore,
        namespace: str | None,
        *,
        selector: str = LABEL_JOB,
        on_synced: Callable[[], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
        retry_delay: float = 1.0,
    ) -> None:
        self.source = source
        self.store = store
        self.namespace = namespace
        self.selector = selector
        self.on_synced = on_synced
        self.retry_delay = retry_delay
        self.on_failure = on_failure
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.relists = 0
        # Why the last list or watch failed, and since when (monotonic); None while it works.
        self.failure: str | None = None
        self.failing_since: float | None = None

    def relist(self) -> str:
        """A full, paged list into the store; the list's resourceVersion."""
        views: list[PodView] = []
        cont: str | None = None
        rv = ""
        while True:
            page = self.source.list(self.namespace, self.selector, self.PAGE, cont)
            meta = page.get("metadata") or {}
            rv = rv or str(meta.get("resourceVersion") or "")
            views.extend(pod_view(item) for item in page.get("items") or [])
            cont = meta.get("continue") or None
            if not cont:
                break
        self.store.replace_namespace(self.namespace, views)
        self.relists += 1
        return rv

    def watch_once(self, rv: str) -> str:
        """Follow one watch stream; the last resourceVersion seen. Raises :class:`Gone`."""
        for ev in self.source.watch(self.namespace, self.selector, rv):
            if self._stop.is_set():
                break
            kind = ev.get("type")
            obj = ev.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone(str(obj.get("message", "")))
                raise RuntimeError(f"watch error: {obj.get('message', obj)}")
            rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
            self._working()
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self.store.apply(kind, obj)
        return rv

    def run(self) -> None:
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self.relist()
                    self._working()
                    if self.on_synced is not None:
                        self.on_synced()
                rv = self.watch_once(rv)
            except Gone:
                log.info("pod watch: resourceVersion %s expired, listing again", rv)
                rv = None
            except Exception as e:  # a dropped connection, a timeout, an apiserver restart, a 403
                if self._stop.is_set():
                    break
                self._failed(e)
                time.sleep(self.retry_delay)

    def _working(self) -> None:
        if self.failure is not None:
            log.info("pod watch (namespace %s) works again", self.namespace or "*")
        self.failure = self.failing_since = None

    def _failed(self, error: Exception) -> None:
        """Logged once per distinct reason (a 403 retried every second would flood the log at
        WARNING and say nothing new), counted every time, shown by :meth:`unhealthy`."""
        reason = failure_reason(error)
        if reason != self.failure:
            where = f"namespace {self.namespace}" if self.namespace else "all namespaces"
            level = logging.ERROR if reason.startswith(("http_401", "http_403")) else logging.WARNING
            log.log(level, "pod watch (%s) failed, retrying every %.0fs: %s", where, self.retry_delay, error)
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        self.failure = reason
        if self.on_failure is not None:
            self.on_failure(reason.split(" ", 1)[0].rstrip(":"))  # http_403, or the error's type

    def unhealthy(self, grace: float) -> str | None:
        """Why this watch cannot be trusted, or None. A failure shorter than ``grace`` seconds
        is a dropped connection being retried; one the server refuses (401, 403) is not."""
        if self.failure is None or self.failing_since is None:
            return None
        refused = self.failure.startswith(("http_401", "http_403"))
        if not refused and time.monotonic() - self.failing_since < grace:
            return None
        return f"pods in {self.namespace or 'all namespaces'}: {self.failure}"

    def start(self) -> PodWatch:
        self._thread = threading.Thread(
            target=self.run, name=f"podwatch-{self.namespace or 'all'}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        # The thread is a daemon blocked in a read of at most the server timeout; it is not
        # joined (the process is ending, or a test is done with it).
        self._stop.set()


def failure_reason(error: Exception) -> str:
    """``http_<status> <message>`` for an API error, else the exception's type and message."""
    status = getattr(error, "status", None)
    if isinstance(status, int):
        message = str(getattr(error, "message", "") or error)
        hint = " (the operator's RBAC must allow list and watch on pods)" if status == 403 else ""
        return f"http_{status} {message}{hint}"[:300]
    return f"{type(error).__name__}: {error}"[:300]


def start_watches(
    source: PodSource,
    store: PodStore,
    namespaces: list[str] | None,
    on_failure: Callable[[str], None] | None = None,
) -> list[PodWatch]:
    """One watch per namespace (or one for all); the store is synced once every one listed."""
    targets: list[str | None] = list(namespaces) if namespaces else [None]
    left = {"n": len(targets)}
    lock = threading.Lock()

    def one_synced() -> None:
        with lock:
            left["n"] -= 1
            if left["n"] <= 0:
                store.mark_synced()

    watches = []
    for ns in targets:
        done = {"once": False}

        def synced(done: dict[str, bool] = done) -> None:
            if not done["once"]:  # relists after a 410 do not count again
                done["once"] = True
                one_synced()

        watches.append(PodWatch(source, store, ns, on_synced=synced, on_failure=on_failure).start())
    return watches


def not_ready(store: PodStore, watches: Iterable[PodWatch], grace: float = 10.0) -> str | None:
    """The operator's readiness: why it cannot reconcile yet (None: it can). Until every
    namespace's pods are listed the reconcilers wait; a watch the server refuses (RBAC) would
    keep them waiting forever behind a green liveness probe, so it is said here."""
    problems = [why for w in watches if (why := w.unhealthy(grace))]
    if not store.synced:
        return "the jobs' pods are not listed yet" + (f": {'; '.join(problems)}" if problems else "")
    return "; ".join(problems) or None


def iter_lines(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Newline-delimited JSON (a watch response body) → one dict per line."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)
    if buf.strip():
        yield json.loads(buf)
