"""The reconcile loop: a job cache fed by Kopf's watch, a work queue, a resync, N threads.

The controller-runtime shape (informer cache → rate-free work queue → reconcile, with a
periodic resync), in place of a Kopf timer per job. Measured at 1000 jobs on 2 cores
(bench/operator_scale.py, bench/RESULTS.md), a Kopf timer per job cost the operator
more memory than everything else it keeps: Kopf holds each timed object's latest full
body (~31 KB of Python objects, over half of it ``managedFields``) for the timer, a task,
a stopper and a cause per timer, a worker task per job while a handler waits for a
reconcile thread, and a finalizer (one more PATCH per job) so that it can stop the timer.
Here:

* :class:`JobCache` — each job as the watch last showed it, as compact JSON without
  ``managedFields`` (~3 KB per job), parsed again per reconcile (~50 µs).
* :class:`WorkQueue` — client-go's workqueue semantics: a key is queued at most once,
  never reconciled by two threads at once, and queued again if it changed meanwhile; in
  two lanes, so that a new job (or a suspend flip) never waits behind the resync of every
  known job, and with threads kept for the urgent lane.
* :class:`Controller` — ``observe()`` is called by the thin Kopf event handler (new jobs
  and ``spec.suspend`` flips are queued at once, urgently); a resync queues every cached job each
  ``interval`` seconds (the level-based loop; a steady job costs no API call); threads
  reconcile and write the outcome themselves: the status subresource (merge patch; the
  conditions list is replaced whole), the job's annotations, Events. A job whose
  reconcile fails (API error, a create refused, an exception on an object this code cannot
  read) is counted once per try in ``llmtrain_operator_reconcile_errors`` and left out of
  the resync for interval·2^(n-1) s (at most 300 s), or until it is edited: never a hot
  loop, never a crash, never in the way of the other jobs.

Peering: Kopf pauses this replica's job watch while another replica is active; the
resync asks :class:`PeeringState` too, so a paused replica reconciles nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import urllib3
from llmtrain.operator.kube import ApiError
from llmtrain.operator.metrics import OperatorMetrics
from llmtrain.operator.outcome import Event, Outcome, parse_time
from llmtrain.operator.podwatch import PodStore
from llmtrain.operator.reconcile import Reconciler
from llmtrain.operator.tick import FINALIZER

from llmtrain.api.spec import GROUP, KIND, VERSION

log = logging.getLogger("llmtrain.operator")

Key = tuple[str, str]  # (namespace, name)
Clock = Callable[[], dt.datetime]

# The finalizer older operator versions (a Kopf timer per job) put on every job. Nothing
# needs it now; it is removed from any job that still carries it, so deleting such a job
# never hangs.
LEGACY_FINALIZER = "llmtrain.dev/kopf-finalizer"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the reconciler reads of a job: everything but ``metadata.managedFields``."""
    meta = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    out: dict[str, Any] = {"metadata": meta}
    for k in ("apiVersion", "kind", "spec", "status"):
        if k in body:
            out[k] = body[k]
    return out


class JobCache:
    """Each job as last seen (watch event or our own write's response), as compact JSON."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._raw: dict[Key, bytes] = {}
        self._version: dict[Key, str] = {}

    def put(self, body: Mapping[str, Any], *, replacing: str | None = None) -> bool:
        """Store ``body``. With ``replacing`` (a resourceVersion) only if the cached job is
        still that version: a write's response must not overwrite a newer watch event
        that arrived meanwhile (a spec change would be lost until the next event).
        resourceVersions are compared for equality only, as the API allows."""
        key = key_of(body)
        raw = json.dumps(slim(body), separators=(",", ":")).encode()
        rv = _version(body)
        with self._lock:
            if replacing is not None and self._version.get(key) != replacing:
                return False
            self._raw[key] = raw
            self._version[key] = rv
        return True

    def get(self, key: Key) -> dict[str, Any] | None:
        with self._lock:
            raw = self._raw.get(key)
        return json.loads(raw) if raw is not None else None

    def forget(self, key: Key) -> None:
        with self._lock:
            self._raw.pop(key, None)
            self._version.pop(key, None)

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._raw)

    def __len__(self) -> int:
        with self._lock:
            return len(self._raw)

    def nbytes(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._raw.values())


class WorkQueue:
    """Keys waiting for a reconcile (client-go's workqueue, without rate limits), in two
    lanes: *urgent* before *routine*.

    A key is in the queue at most once however often it is added; a key being reconciled
    is not handed to a second thread; added while being reconciled, it is queued again
    when :meth:`done` is called (the change it was added for is seen by the next run).

    Why two lanes: the resync queues every cached job each interval, and one FIFO put a
    new job behind all of them (and behind their status writes and Ray polls, which
    take seconds each when a head is slow). Urgent is what a user waits for (a new job,
    a suspend flip, a deletion to act on); routine is the level-based resync and
    requeues. What the lanes do not remove, measured (bench/operator_scale.py with a
    trace of this queue, bench/RESULTS.md): in a burst of new jobs, each waits behind
    the new jobs before it — 200 applied in ~10 s waited p50 20-34 s from Kopf's
    delivery (~1-2 s) to their reconcile, with or without the lanes, because the API
    server creates their children no faster than the bench's direct creation does.
    An urgent add of a key already waiting in the routine lane moves it ahead; a routine
    add never demotes an urgent key. ``get(urgent_only=True)`` is for the threads kept
    for the urgent lane, so that a new job never waits for a thread held by a slow
    routine reconcile (a Ray head that answers slowly).
    """

    def __init__(self, on_wait: Callable[[str, float], None] | None = None) -> None:
        lock = threading.Lock()
        self._any = threading.Condition(lock)  # threads that take either lane
        self._urgent_cv = threading.Condition(lock)  # threads kept for the urgent lane
        # key → when it was queued (monotonic); insertion-ordered: FIFO within a lane
        self._urgent: dict[Key, float] = {}
        self._routine: dict[Key, float] = {}
        # (lane, seconds a key waited): the controller's llmtrain_operator_queue_wait_seconds
        self._on_wait = on_wait
        self._processing: set[Key] = set()
        self._dirty: dict[Key, bool] = {}  # added while processing → urgent?
        self._closed = False

    def add(self, key: Key, *, urgent: bool = False) -> None:
        with self._any:
            if key in self._processing:
                self._dirty[key] = self._dirty.get(key, False) or urgent
            else:
                self._enqueue(key, urgent)

    def _enqueue(self, key: Key, urgent: bool) -> None:
        """With the lock held."""
        if key in self._urgent or (not urgent and key in self._routine):
            return
        if urgent:
            # A promoted key keeps its place in time: its wait counts from the first add.
            queued = self._routine.pop(key, None)
            self._urgent[key] = queued if queued is not None else time.monotonic()
            self._urgent_cv.notify()
        else:
            self._routine[key] = time.monotonic()
        self._any.notify()

    def get(self, timeout: float | None = None, *, urgent_only: bool = False) -> Key | None:
        """The next key (now being processed), urgent ones first; None on timeout / after
        :meth:`close`. ``urgent_only``: never a routine key."""
        cv = self._urgent_cv if urgent_only else self._any
        with cv:
            if not cv.wait_for(
                lambda: self._urgent or (self._routine and not urgent_only) or self._closed, timeout
            ):
                return None
            if self._closed:
                return None
            lane = "urgent" if self._urgent else "routine"
            queued = self._urgent if self._urgent else self._routine
            key = next(iter(queued))
            since = queued.pop(key)
            self._processing.add(key)
        if self._on_wait is not None:
            self._on_wait(lane, time.monotonic() - since)
        return key

    def done(self, key: Key) -> None:
        with self._any:
            self._processing.discard(key)
            if key in self._dirty:
                self._enqueue(key, self._dirty.pop(key))

    def close(self) -> None:
        with self._any:
            self._closed = True
            self._any.notify_all()
            self._urgent_cv.notify_all()

    def __len__(self) -> int:
        with self._any:
            return len(self._urgent) + len(self._routine)

    def urgent(self) -> int:
        """Keys waiting in the urgent lane."""
        with self._any:
            return len(self._urgent)


class JobWriter(Protocol):
    """The writes the controller makes to jobs (:class:`~llmtrain.operator.kube.RestApi`)."""

    def patch_job(
        self, namespace: str, name: str, patch: dict[str, Any], *, status: bool
    ) -> dict[str, Any]: ...

    def post_event(self, involved: dict[str, Any], type: str, reason: str, message: str) -> None: ...


def needs_action_now(body: Mapping[str, Any]) -> bool:
    """Whether a watch event on a job asks for more than the next resync: a new job (no
    status yet) gets its Ray cluster at once, and so does a change of ``spec.suspend``.
    Everything else (including the echo of our own status writes) waits for the resync.
    A spec or status that is not an object (stored under a looser CRD) reads as empty: the
    reconcile says what is wrong with it, this must not raise on the watch's event loop."""
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return bool({LEGACY_FINALIZER, FINALIZER} & set(meta.get("finalizers") or ()))
    status, spec = body.get("status"), body.get("spec")
    phase = status.get("phase") if isinstance(status, Mapping) else None
    if phase is None:
        return True
    if phase in ("Succeeded", "Failed"):
        return False
    return bool(spec.get("suspend") if isinstance(spec, Mapping) else False) != (phase == "Suspended")


def clip_utf8(text: str, limit: int) -> str:
    """At most ``limit`` UTF-8 bytes of ``text``, cut at a character boundary: the apiserver
    bounds an Event's message in bytes (Go's len), so 1024 characters of "×" are refused."""
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def involved_object(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "uid": meta.get("uid"),
    }


class PeeringState(Protocol):
    def active(self) -> bool: ...


class AlwaysActive:
    """Standalone: no peering, always the active replica."""

    def active(self) -> bool:
        return True


class PeeringReader(Protocol):
    def peering_status(self, name: str, namespace: str | None) -> dict[str, Any] | None: ...


class KopfPeering:
    """Whether this replica is the active one, read from Kopf's peering objects with Kopf's
    own rule: paused while another live peer (``lastseen + lifetime`` in the future) has a
    higher priority, or the same one. Kopf pauses its watches by that rule; this makes
    the resync and the reconcile threads pause with them. Read at most once per ``ttl``
    seconds (a LIST of one object per watched namespace, or of the ClusterKopfPeering)."""

    def __init__(
        self,
        reader: PeeringReader,
        *,
        name: str,
        identity: str,
        priority: int,
        namespaces: list[str] | None,
        ttl: float = 5.0,
    ) -> None:
        self.reader = reader
        self.name = name
        self.identity = identity
        self.priority = priority
        self.namespaces: list[str | None] = list(namespaces) if namespaces else [None]
        self.ttl = ttl
        self._lock = threading.Lock()
        self._checked = -float("inf")
        self._active = False

    def active(self) -> bool:
        with self._lock:
            if time.monotonic() - self._checked < self.ttl:
                return self._active
            try:
                self._active = all(self._ours(ns) for ns in self.namespaces)
            except (ApiError, OSError) as e:
                log.warning("cannot read peering %r, keeping the last answer: %s", self.name, e)
            self._checked = time.monotonic()
            return self._active

    def _ours(self, namespace: str | None) -> bool:
        status = self.reader.peering_status(self.name, namespace)
        if status is None:  # Kopf pauses without its peering object too
            return False
        now = dt.datetime.now(dt.UTC)
        for identity, info in status.items():
            if identity == self.identity or not isinstance(info, dict):
                continue
            try:
                lastseen = parse_time(info.get("lastseen"))
                dead = (
                    lastseen is None or lastseen + dt.timedelta(seconds=int(info.get("lifetime", 60))) <= now
                )
            except (ValueError, TypeError):  # an unreadable heartbeat counts for nothing
                dead = True
            if dead:
                continue
            if int(info.get("priority", 0)) >= self.priority:
                return False
        return True


@dataclass
class Backoff:
    """A job whose last reconciles failed: how many in a row, and when to try again."""

    failures: int
    until: float  # monotonic
    version: str  # the resourceVersion that failed: a changed object is tried at once


class Controller:
    # A job whose reconcile fails (API error, a create refused, an exception) is tried
    # again interval·2^(n-1) seconds later, at most this long: a stored object the code
    # cannot handle costs a few attempts (each counted once in the error metric, each
    # logged) an hour, not one per resync for ever; the other jobs are not held up.
    BACKOFF_MAX_SECONDS = 300.0

    def __init__(
        self,
        reconciler: Reconciler,
        writer: JobWriter,
        pods: PodStore,
        metrics: OperatorMetrics,
        *,
        interval: float = 5.0,
        threads: int = 16,
        urgent_threads: int = 4,
        clock: Clock = _now,
        peering: PeeringState | None = None,
    ) -> None:
        self.reconciler = reconciler
        self.writer = writer
        self.pods = pods
        self.metrics = metrics
        self.interval = interval
        self.threads = threads
        # Of ``threads``, how many take urgent keys only (see WorkQueue): at least one
        # thread is always left for the resync.
        self.urgent_threads = max(0, min(urgent_threads, threads - 1))
        self.clock = clock
        self.peering = peering or AlwaysActive()
        self.cache = JobCache()
        self.queue = WorkQueue(
            on_wait=lambda lane, s: metrics.queue_wait_seconds.labels(lane=lane).observe(s)
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._said: dict[Key, str] = {}  # the last requeue reason logged per job
        self._foreign_said: dict[Key, str] = {}  # the other Ray job last logged per job
        self._backoff: dict[Key, Backoff] = {}
        self._backoff_lock = threading.Lock()
        self.monotonic: Callable[[], float] = time.monotonic

    # -- fed by the Kopf event handler (on the event loop: cheap, never blocks)

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = key_of(body)
        if event_type == "DELETED":
            self.cache.forget(key)
            self.metrics.forget(*key)
            self.reconciler.forget(str((body.get("metadata") or {}).get("uid") or ""))
            self._said.pop(key, None)
            self._foreign_said.pop(key, None)
            with self._backoff_lock:
                self._backoff.pop(key, None)
            return
        self.cache.put(body)
        with self._backoff_lock:
            b = self._backoff.get(key)
            if b is not None and b.version != _version(body):  # edited since it failed: try it now
                del self._backoff[key]
                b = None
        if b is None and needs_action_now(body):
            self.queue.add(key, urgent=True)

    def backing_off(self, key: Key) -> float:
        """Seconds until a failed job is tried again (0: not backing off)."""
        with self._backoff_lock:
            b = self._backoff.get(key)
        return max(0.0, b.until - self.monotonic()) if b is not None else 0.0

    # -- the loop

    def start(self) -> Controller:
        for i in range(self.threads):
            urgent_only = i < self.urgent_threads
            t = threading.Thread(
                target=self._work,
                args=(urgent_only,),
                name=f"reconcile-{'urgent-' if urgent_only else ''}{i}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._resync, name="resync", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.queue.close()

    def resync_once(self) -> int:
        """Queue every cached job (when this replica is the active one); how many."""
        if not self.pods.synced or not self.peering.active():
            return 0
        keys = [k for k in self.cache.keys() if not self.backing_off(k)]
        for key in keys:
            self.queue.add(key)
        return len(keys)

    def _resync(self) -> None:
        # The first pass waits one interval: new jobs were queued by their ADDED events.
        while not self._stop.wait(self.interval):
            try:
                self.resync_once()
            except Exception:  # never let the loop die
                log.exception("resync failed")

    def _work(self, urgent_only: bool = False) -> None:
        while not self._stop.is_set():
            key = self.queue.get(timeout=1.0, urgent_only=urgent_only)
            if key is None:
                continue
            try:
                # Until the first full pod list every job's pods would look missing
                # (recreated as 409s, the job reported Pending).
                while not self.pods.wait_synced(timeout=0.5) and not self._stop.is_set():
                    pass
                if self.peering.active():
                    self.reconcile_key(key)
            except Exception:
                log.exception("reconcile of %s/%s failed", *key)
            finally:
                self.queue.done(key)

    # -- one reconcile

    def reconcile_key(self, key: Key) -> Outcome | None:
        """Reconcile one job from the cache and write what the reconciler decided. API
        failures are counted and logged; the next resync tries again."""
        body = self.cache.get(key)
        if body is None:  # deleted meanwhile
            return None
        ns, name = key
        meta = body.get("metadata") or {}
        try:
            if LEGACY_FINALIZER in (meta.get("finalizers") or ()):
                self._drop_legacy_finalizer(body)
            if meta.get("deletionTimestamp"):
                # Children go through ownerReferences; a Ray job that may run is stopped first.
                if FINALIZER not in (meta.get("finalizers") or ()):
                    return None
                out = self.reconciler.stop_for_deletion(body)
                self.write(body, out)
                return out
            t0 = time.perf_counter()
            try:
                out = self.reconciler.reconcile(body, self.pods.pods(ns, name), self.clock())
            finally:
                self.metrics.reconcile_seconds.observe(time.perf_counter() - t0)
            self.write(body, out)
        except ApiError as e:
            delay = self._failed(key, body, f"http_{e.status}")
            log.warning("reconcile %s/%s: API error, retried in %.0fs: %s", ns, name, delay, e)
            return None
        except (OSError, urllib3.exceptions.HTTPError) as e:  # connection refused/reset, timeouts
            delay = self._failed(key, body, "connection")
            log.warning(
                "reconcile %s/%s: cannot reach the API server, retried in %.0fs: %s", ns, name, delay, e
            )
            return None
        except Exception as e:  # a bug, or a stored object this code cannot read: never a crash
            delay = self._failed(key, body, "unexpected")
            log.exception("reconcile %s/%s failed, retried in %.0fs", ns, name, delay)
            self._event(
                body,
                Event(
                    "Warning",
                    "ReconcileError",
                    f"the operator could not reconcile this job ({type(e).__name__}: {e}); "
                    f"retrying in {delay:.0f}s",
                ),
            )
            return None
        if out.error:
            self._failed(key, body, "create")
        else:
            with self._backoff_lock:
                self._backoff.pop(key, None)
        self._account(key, out)
        return out

    def _account(self, key: Key, out: Outcome) -> None:
        """What one reconcile decided, into metrics and the log (each requeue reason and
        each other run's snapshot logged when it changes, not on every tick)."""
        ns, name = key
        self.metrics.set_phase(ns, name, out.phase)
        if out.provisioning_seconds is not None:
            self.metrics.provisioning_seconds.observe(out.provisioning_seconds)
        if out.restarted:
            self.metrics.restarts.inc()
        for source, other in out.foreign:
            self.metrics.foreign_snapshots.labels(source=source).inc()
            # Once per other run, not on every poll while it lasts (the metric counts those).
            if self._foreign_said.get(key) != other:
                log.warning(
                    "%s/%s: ignored a %s snapshot of Ray job %s, not this job's (the condition "
                    "says ForeignProgress if it lasts)",
                    ns,
                    name,
                    source,
                    other or "(unnamed)",
                )
            self._foreign_said[key] = other
        if out.requeue:
            # Every requeue states its reason; logged when it changes, not on every tick.
            said = out.requeue.split(" (")[0]
            if self._said.get(key) != said:
                log.info("%s/%s: %s", ns, name, out.requeue)
            self._said[key] = said
        else:
            self._said.pop(key, None)

    def _failed(self, key: Key, body: Mapping[str, Any], kind: str) -> float:
        """Count one failed reconcile and back the job off; the delay until the next try."""
        self.metrics.reconcile_errors.labels(kind=kind).inc()
        with self._backoff_lock:
            n = (b.failures if (b := self._backoff.get(key)) is not None else 0) + 1
            delay = min(self.interval * 2 ** min(n - 1, 30), self.BACKOFF_MAX_SECONDS)
            self._backoff[key] = Backoff(n, self.monotonic() + delay, _version(body))
        return delay

    def write(self, body: Mapping[str, Any], out: Outcome) -> None:
        """The outcome onto the job: status (its subresource), annotations, Events. The
        cache takes each response (unless a newer event arrived meanwhile), so a resync
        before the watch echo sees what was written and does not write it again."""
        ns, name = key_of(body)
        version: str | None = _version(body)
        if out.status is not None:
            try:
                resp = self.writer.patch_job(ns, name, {"status": out.status}, status=True)
            except ApiError as e:
                if e.status == 422:
                    # A job stored under a looser CRD fails the current one's rules, and
                    # the API server refuses every write to it, status included: the
                    # Events (InvalidSpec naming the field) are then all that can say so.
                    for ev in out.events:
                        self._event(body, ev)
                raise
            version = self._took(resp, version)
        if out.annotations:
            resp = self.writer.patch_job(
                ns, name, {"metadata": {"annotations": out.annotations}}, status=False
            )
            version = self._took(resp, version)
        if out.finalizer is not None:
            self._set_finalizer(ns, name, out.finalizer, self.cache.get((ns, name)) or body)
        for ev in out.events:
            self._event(body, ev)

    def _took(self, resp: Mapping[str, Any], version: str | None) -> str | None:
        """Cache a write's response if the cache still holds the version it was made from;
        the version the next write of this reconcile may replace (None: stop caching)."""
        if resp and version is not None and self.cache.put(resp, replacing=version):
            return _version(resp)
        return None

    def _event(self, body: Mapping[str, Any], ev: Event) -> None:
        try:
            self.writer.post_event(involved_object(body), ev.type, ev.reason, clip_utf8(ev.message, 1024))
        # An Event is informative: never fail a reconcile for it. (urllib3's own errors, as
        # for a refused connection, are not OSErrors.)
        except (ApiError, OSError, urllib3.exceptions.HTTPError) as e:
            log.warning("cannot post event %s on %s/%s: %s", ev.reason, *key_of(body), e)

    def _set_finalizer(self, ns: str, name: str, present: bool, body: Mapping[str, Any]) -> None:
        """Add or remove FINALIZER. The resourceVersion makes the merge patch (which replaces
        the list whole) a compare-and-swap: another controller's finalizer is never lost;
        a conflict is retried by the next reconcile."""
        meta = body.get("metadata") or {}
        current = list(meta.get("finalizers") or ())
        wanted = [f for f in current if f != FINALIZER] + ([FINALIZER] if present else [])
        if wanted == current:
            return
        resp = self.writer.patch_job(
            ns,
            name,
            {"metadata": {"finalizers": wanted, "resourceVersion": meta.get("resourceVersion")}},
            status=False,
        )
        self._took(resp, _version(body))

    def _drop_legacy_finalizer(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        keep = [f for f in meta.get("finalizers") or () if f != LEGACY_FINALIZER]
        # The resourceVersion makes it a compare-and-swap: a merge patch replaces the
        # list whole, and must not drop a finalizer another controller just added.
        resp = self.writer.patch_job(
            *key_of(body),
            {"metadata": {"finalizers": keep, "resourceVersion": meta.get("resourceVersion")}},
            status=False,
        )
        self._took(resp, _version(body))


def _version(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("resourceVersion") or "")
