"""The controller (llmtrain.operator.controller): job cache, work queue, resync, writes,
peering — without a cluster (the integration tests run it against the real one)."""

from __future__ import annotations

import copy
import datetime as dt
import threading
import time
from typing import Any

import pytest
from llmtrain.operator.controller import (
    LEGACY_FINALIZER,
    Controller,
    JobCache,
    KopfPeering,
    WorkQueue,
    needs_action_now,
    slim,
)
from llmtrain.operator.kube import ApiError
from llmtrain.operator.manifests import OperatorSettings
from llmtrain.operator.metrics import OperatorMetrics
from llmtrain.operator.outcome import Event, Outcome, apply_merge_patch
from llmtrain.operator.podwatch import PodStore
from llmtrain.operator.reconcile import Reconciler
from prometheus_client import generate_latest

from tests.unit.test_operator_fakes import NOW, FakeApi, job_body, set_all, views

KEY = ("ns1", "demo")


class FakeWriter:
    """The job writes (:class:`~llmtrain.operator.controller.JobWriter`), applied as JSON
    merge patches to the jobs it holds, each response as the API server would send it."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.patches: list[tuple[str, dict[str, Any]]] = []  # ("status" | "main", patch)
        self.events: list[tuple[str, str, str]] = []
        self.fail: ApiError | None = None
        self.during_patch: Any = None  # called inside a PATCH: a watch event racing the write

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any], *, status: bool) -> dict[str, Any]:
        self.patches.append(("status" if status else "main", copy.deepcopy(patch)))
        if self.fail is not None:
            err, self.fail = self.fail, None
            raise err
        job = self.jobs.get((namespace, name))
        if job is None:
            return {}
        apply_merge_patch(
            job, {"status": patch["status"]} if status else {k: v for k, v in patch.items() if k != "status"}
        )
        job["metadata"]["managedFields"] = [{"manager": "x", "fieldsV1": {"f:status": {}}}]
        job["metadata"]["resourceVersion"] = str(int(job["metadata"].get("resourceVersion") or 0) + 1)
        if self.during_patch is not None:
            self.during_patch()
        return copy.deepcopy(job)

    def post_event(self, involved: dict[str, Any], type: str, reason: str, message: str) -> None:
        assert involved["kind"] == "LLMTrainingJob" and involved["uid"]
        self.events.append((type, reason, message))


class Setup:
    def __init__(self, synced: bool = True, peering: Any = None) -> None:
        self.api = FakeApi()
        self.writer = FakeWriter()
        self.store = PodStore()
        if synced:
            self.store.mark_synced()
        self.metrics = OperatorMetrics()
        self.controller = Controller(
            Reconciler(self.api, OperatorSettings(), token=lambda: "t" * 64),
            self.writer,
            self.store,
            self.metrics,
            interval=0.05,
            threads=2,
            clock=lambda: NOW,
            peering=peering,
        )

    def add(self, body: dict[str, Any], event: str = "ADDED") -> None:
        self.writer.jobs[(body["metadata"]["namespace"], body["metadata"]["name"])] = copy.deepcopy(body)
        self.controller.observe(event, body)

    def metrics_text(self) -> str:
        return generate_latest(self.metrics.registry).decode()


# ------------------------------------------------------------------ cache and queue


def test_cache_keeps_compact_json_without_managed_fields() -> None:
    body = job_body()
    body["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:x": {}}}}] * 20
    body["status"] = {"phase": "Pending"}
    cache = JobCache()
    assert cache.put(body) and cache.keys() == [KEY]
    got = cache.get(KEY)
    assert got == slim(body) and "managedFields" not in got["metadata"]
    assert got["spec"] == body["spec"] and got["status"] == {"phase": "Pending"}
    assert cache.nbytes() < 1500  # ~3 KB for a real job; the managedFields alone were more
    got["spec"]["suspend"] = True  # a copy: reconciles cannot corrupt the cache
    assert "suspend" not in (cache.get(KEY) or {})["spec"]
    cache.forget(KEY)
    assert cache.get(KEY) is None and len(cache) == 0


def test_work_queue_dedups_and_never_hands_a_key_to_two_threads() -> None:
    q = WorkQueue()
    q.add(KEY)
    q.add(KEY)
    q.add(("ns1", "other"))
    assert len(q) == 2
    assert q.get(timeout=0) == KEY
    q.add(KEY)  # changed while being reconciled: not handed out now…
    assert q.get(timeout=0) == ("ns1", "other")
    assert q.get(timeout=0) is None
    q.done(KEY)  # …but queued again when the first reconcile is done
    assert q.get(timeout=0) == KEY
    q.done(KEY)
    assert q.get(timeout=0) is None
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=5)))
    t.start()
    q.close()
    t.join(2)
    assert got == [None]


def test_urgent_keys_go_before_routine_ones_and_are_promoted_never_demoted() -> None:
    """A new job must not wait behind the resync of every job already known (one FIFO
    made it wait p50 20 s at 200 jobs): urgent keys are handed out first, FIFO within a
    lane; an urgent add moves a waiting routine key ahead; a routine add of an urgent key
    (the resync meeting a new job) leaves it urgent; each key is still queued once."""
    q = WorkQueue()
    old = [("ns1", f"old-{i}") for i in range(3)]
    for k in old:  # the resync queues every known job
        q.add(k)
    q.add(("ns1", "new-a"), urgent=True)
    q.add(("ns1", "new-b"), urgent=True)
    q.add(("ns1", "new-a"))  # the resync's add: not demoted, not twice
    q.add(old[2], urgent=True)  # a suspend flip of a job already waiting: promoted
    assert len(q) == 5 and q.urgent() == 3
    order = [q.get(timeout=0) for _ in range(5)]
    assert order == [("ns1", "new-a"), ("ns1", "new-b"), old[2], old[0], old[1]]
    assert q.get(timeout=0) is None
    # Added urgently while being reconciled: queued again as urgent when done.
    q.add(old[0], urgent=True)
    q.add(old[1])
    q.done(old[1])
    q.done(old[0])
    assert q.urgent() == 1 and q.get(timeout=0) == old[0]


def test_threads_kept_for_the_urgent_lane_never_take_routine_keys() -> None:
    q = WorkQueue()
    q.add(("ns1", "resync"))
    assert q.get(timeout=0, urgent_only=True) is None
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=5, urgent_only=True)))
    t.start()
    time.sleep(0.05)
    q.add(("ns1", "new"), urgent=True)  # wakes the waiting urgent-only thread
    t.join(2)
    assert got == [("ns1", "new")]
    assert q.get(timeout=0) == ("ns1", "resync")


def test_a_new_job_is_reconciled_while_every_general_thread_is_busy() -> None:
    """The controller end to end: routine reconciles that hang (a Ray head that does not
    answer) hold every thread that takes routine keys; a new job is still reconciled at
    once by a thread kept for the urgent lane. Negative control: with no thread kept
    (urgent_threads=0) the new job waits until a hung reconcile returns."""
    for kept, reconciled_at_once in ((1, True), (0, False)):
        s = Setup()
        release = threading.Event()
        ctl = s.controller
        ctl.threads, ctl.urgent_threads = 3, kept
        real = ctl.reconcile_key

        def reconcile_key(key: tuple[str, str], real: Any = real, release: threading.Event = release) -> Any:
            if key[1].startswith("steady"):
                release.wait(60)  # a slow routine reconcile (released at the end)
                return None
            return real(key)

        ctl.reconcile_key = reconcile_key  # type: ignore[method-assign]
        for i in range(5):
            ctl.queue.add(("ns1", f"steady-{i}"))
        ctl.start()
        try:
            time.sleep(0.1)  # every general thread is now held
            s.add(job_body())  # ADDED: urgent
            # Generous where it must happen (a loaded machine; the first reconcile imports
            # Kopf), short where it must not: a hung reconcile holds for 60 s.
            patches = s.writer.patches
            done = _poll(lambda p=patches: any(k == "status" for k, _ in p), 30.0 if kept else 2.0)
            assert done is reconciled_at_once, kept
        finally:
            release.set()
            ctl.stop()


def _poll(cond: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_events_queue_new_jobs_and_suspend_flips_only() -> None:
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
    stuck = {**deleting, "metadata": {**deleting["metadata"], "finalizers": [LEGACY_FINALIZER]}}
    assert needs_action_now(stuck)

    s = Setup()
    s.controller.observe("ADDED", new)
    s.controller.observe("MODIFIED", running)
    assert s.controller.queue.get(timeout=0) == KEY and s.controller.queue.get(timeout=0) is None
    assert (s.controller.cache.get(KEY) or {})["status"] == {"phase": "Provisioning"}  # newest kept
    s.controller.observe("DELETED", running)
    assert s.controller.cache.keys() == []


# ------------------------------------------------------------------ one reconcile


def test_reconcile_creates_and_writes_status_events_and_metrics() -> None:
    s = Setup()
    s.add(job_body())
    out = s.controller.reconcile_key(KEY)
    assert out is not None
    assert s.api.names("Pod") == {"demo-head", "demo-worker-0", "demo-worker-1"}
    # The common path writes the status subresource only: one PATCH per change.
    assert [kind for kind, _ in s.writer.patches] == ["status"]
    status = s.writer.patches[0][1]["status"]
    assert status["phase"] == "Provisioning" and isinstance(status["conditions"], list)
    assert ("Normal", "PodsCreated", "created 3 Ray pods") in s.writer.events
    text = s.metrics_text()
    assert 'llmtrain_operator_jobs{phase="Provisioning"} 1.0' in text
    assert "llmtrain_operator_reconcile_duration_seconds_count 1.0" in text
    # The response went into the cache: the next pass, before any watch echo, sees the
    # status it wrote and writes nothing again.
    assert (s.controller.cache.get(KEY) or {})["status"]["phase"] == "Provisioning"
    s.api.calls.clear()
    s.writer.patches.clear()
    s.controller.reconcile_key(KEY)
    assert s.writer.patches == [] and not s.api.verbs("create")


def test_a_write_response_never_overwrites_a_newer_watch_event() -> None:
    """A spec change seen while a status PATCH is in flight must survive that PATCH's
    response (it would be lost until the job's next event)."""
    s = Setup()
    body = job_body()
    body["metadata"]["resourceVersion"] = "1"
    s.add(body)
    s.controller.queue.get(timeout=0)  # being reconciled now
    newer = copy.deepcopy(body)
    newer["spec"]["suspend"] = True
    newer["metadata"].update(resourceVersion="7", generation=2)
    s.writer.during_patch = lambda: s.controller.observe("MODIFIED", newer)
    s.controller.reconcile_key(KEY)
    assert (s.controller.cache.get(KEY) or {})["spec"].get("suspend") is True
    s.controller.queue.done(KEY)
    assert s.controller.queue.get(timeout=0) == KEY  # and it is reconciled again for it
    # Without a race, the response is cached (the next pass sees what was written).
    s.writer.during_patch = None
    s.writer.jobs[KEY] = copy.deepcopy(newer)
    s.controller.reconcile_key(KEY)
    assert (s.controller.cache.get(KEY) or {})["status"]["phase"] == "Suspended"


def test_outcome_writes_annotations_and_cuts_event_messages() -> None:
    s = Setup()
    s.add(job_body())
    s.controller.write(
        job_body(),
        Outcome(
            status={"phase": "Pending", "conditions": []},
            annotations={"llmtrain.dev/a": "1", "llmtrain.dev/b": None},
            events=[Event("Warning", "Unschedulable", "x" * 5000)],
        ),
    )
    assert [k for k, _ in s.writer.patches] == ["status", "main"]
    assert s.writer.patches[1][1] == {
        "metadata": {"annotations": {"llmtrain.dev/a": "1", "llmtrain.dev/b": None}}
    }
    assert len(s.writer.events[0][2]) == 1024


def test_an_event_message_is_clipped_to_1024_utf8_bytes() -> None:
    # The apiserver counts bytes: a message of 1024 characters with a "×" in it was refused
    # (HTTP 422) and the Event lost (a DataError naming "batches × microBatchSize × workers").
    s = Setup()
    s.add(job_body())
    s.controller.write(job_body(), Outcome(status={}, events=[Event("Warning", "DataError", "a × b " * 300)]))
    message = s.writer.events[0][2]
    assert len(message.encode("utf-8")) <= 1024 and message.startswith("a × b ")
    assert len(message.encode("utf-8")) > 1020  # clipped, not dropped


def test_api_errors_are_counted_and_retried_by_the_next_pass() -> None:
    s = Setup()
    s.add(job_body())
    s.writer.fail = ApiError(500, "etcdserver: request timed out")
    assert s.controller.reconcile_key(KEY) is None  # logged, not raised
    assert 'llmtrain_operator_reconcile_errors_total{kind="http_500"} 1.0' in s.metrics_text()
    s.store.replace(views(s.api).values())
    out = s.controller.reconcile_key(KEY)
    assert out is not None and out.status is not None
    assert not s.api.verbs("create", "Pod")[3:]  # the pods were not created twice


def test_provisioning_metric_and_forget_on_delete() -> None:
    s = Setup()
    body = job_body()
    s.add(body)
    s.controller.reconcile_key(KEY)
    set_all(s.api, "running")
    s.store.replace(views(s.api).values())
    s.writer.jobs[KEY]["status"]["attemptStartTime"] = "2026-11-26T11:59:50Z"
    s.controller.observe("MODIFIED", s.writer.jobs[KEY])
    s.controller.reconcile_key(KEY)
    text = s.metrics_text()
    assert "llmtrain_operator_provisioning_duration_seconds_count 1.0" in text
    assert "llmtrain_operator_provisioning_duration_seconds_sum 10.0" in text
    s.controller.observe("DELETED", body)
    assert 'llmtrain_operator_jobs{phase="Provisioning"} 0.0' in s.metrics_text()


def test_a_job_with_the_old_kopf_finalizer_has_it_removed() -> None:
    s = Setup()
    body = job_body()
    body["metadata"].update(finalizers=["other.io/keep", LEGACY_FINALIZER], resourceVersion="41")
    body["metadata"]["deletionTimestamp"] = "2026-11-26T12:00:00Z"
    s.add(body, "MODIFIED")
    assert s.controller.queue.get(timeout=0) == KEY
    assert s.controller.reconcile_key(KEY) is None  # being deleted: nothing else to do
    kind, patch = s.writer.patches[0]
    # A compare-and-swap on the list: never drops a finalizer someone else just added.
    assert kind == "main" and patch == {
        "metadata": {"finalizers": ["other.io/keep"], "resourceVersion": "41"}
    }
    assert s.api.calls == []


# ------------------------------------------------------------------ the loop


def _wait(cond: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.01)


def test_threads_wait_for_the_first_pod_list_then_resync_converges() -> None:
    """Before the pod watch has listed, every pod would look missing: the reconcile must
    wait, not recreate the pods (409s) and report a running job as Pending."""
    first = Setup()
    first.add(job_body())
    first.controller.reconcile_key(KEY)
    set_all(first.api, "running")

    s = Setup(synced=False)
    s.api = first.api
    s.controller.reconciler.api = first.api
    s.writer.jobs = first.writer.jobs
    s.controller.observe("MODIFIED", first.writer.jobs[KEY])
    s.controller.queue.add(KEY)
    first.api.calls.clear()
    s.controller.start()
    try:
        time.sleep(0.3)
        assert first.api.calls == [] and s.writer.patches == []  # waiting for the list
        s.store.replace(views(first.api).values())
        s.store.mark_synced()
        _wait(lambda: any(k == "status" for k, _ in s.writer.patches))
        # No pod made again; a new process checks the Secret, ConfigMap, Service and
        # NetworkPolicy once (each "already exists" and is this job's).
        assert not first.api.verbs("create", "Pod")
        # (NetworkPolicy and PodDisruptionBudget are both demo-ray)
        assert first.api.verbs("create") == [
            "demo-ray-auth",
            "demo-spec",
            "demo-head-svc",
            "demo-ray",
            "demo-ray",
        ]
        assert s.writer.jobs[KEY]["status"]["phase"] == "Provisioning"
        # The resync keeps looking (level-based) without writing what did not change.
        n = len(s.writer.patches)
        time.sleep(0.3)
        assert len(s.writer.patches) == n
    finally:
        s.controller.stop()


def test_resync_only_while_synced_and_active() -> None:
    class Switch:
        on = False

        def active(self) -> bool:
            return self.on

    sw = Switch()
    s = Setup(peering=sw)
    s.add(job_body())
    s.controller.queue.done(s.controller.queue.get(timeout=0) or KEY)  # the ADDED event's entry, handled
    assert s.controller.resync_once() == 0 and len(s.controller.queue) == 0  # paused by peering
    sw.on = True
    assert s.controller.resync_once() == 1 and len(s.controller.queue) == 1
    unsynced = Setup(synced=False)
    unsynced.add(job_body())
    assert unsynced.controller.resync_once() == 0


# ------------------------------------------------------------------ peering


class Peers:
    def __init__(self, status: dict[str, Any] | None) -> None:
        self.status = status
        self.reads = 0
        self.fail: Exception | None = None

    def peering_status(self, name: str, namespace: str | None) -> dict[str, Any] | None:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        return self.status


def _peer(priority: int, seconds_ago: float, lifetime: int = 60) -> dict[str, Any]:
    seen = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


@pytest.mark.parametrize(
    "others,active",
    [
        ({}, True),
        ({"b": (5, 1)}, True),  # a lower priority waits for us
        ({"b": (20, 1)}, False),  # a higher one is active
        ({"b": (10, 1)}, False),  # Kopf pauses both on a tie
        ({"b": (20, 120)}, True),  # dead: its heartbeat expired
    ],
    ids=["alone", "lower", "higher", "tie", "dead"],
)
def test_peering_follows_kopfs_rule(others: dict[str, tuple[int, float]], active: bool) -> None:
    # Heartbeats made here, not at collection: a full suite runs this minutes after that.
    peers = Peers({"me": _peer(10, 0), **{k: _peer(*v) for k, v in others.items()}})
    state = KopfPeering(peers, name="llmtrain", identity="me", priority=10, namespaces=["a"], ttl=0)
    assert state.active() is active


def test_peering_missing_object_pauses_and_answers_are_cached() -> None:
    peers = Peers(None)
    state = KopfPeering(peers, name="llmtrain", identity="me", priority=1, namespaces=["a", "b"], ttl=60)
    assert state.active() is False
    peers.status = {"me": _peer(1, 0)}
    assert state.active() is False and peers.reads == 1  # cached for ttl
    state.ttl = 0
    assert state.active() is True and peers.reads == 3  # one read per namespace
    peers.fail = OSError("connection refused")
    assert state.active() is True  # a failed read keeps the last answer


# ------------------------------------------------------------ failures: counted, backed off


def _drain(s: Setup) -> list[tuple[str, str]]:
    """Reconcile everything queued, as the threads would; the keys, in order."""
    done = []
    while (key := s.controller.queue.get(timeout=0)) is not None:
        s.controller.reconcile_key(key)
        s.controller.queue.done(key)
        done.append(key)
    return done


def test_a_job_whose_reconcile_raises_is_counted_once_per_try_backed_off_and_others_go_on() -> None:
    s = Setup()
    c = s.controller
    clock = [1000.0]
    c.monotonic = lambda: clock[0]
    bad, good = job_body("bad"), job_body("good")
    good["metadata"]["uid"] = "uid-good"
    bad["metadata"]["resourceVersion"] = "7"
    real = c.reconciler.reconcile

    def reconcile(body: Any, pods: Any, now: Any) -> Outcome:
        if body["metadata"]["name"] == "bad":
            raise TypeError("'str' object cannot be interpreted as an integer")
        return real(body, pods, now)

    c.reconciler.reconcile = reconcile  # type: ignore[method-assign]
    s.add(bad)
    s.add(good)
    assert _drain(s) == [("ns1", "bad"), ("ns1", "good")]  # new jobs: queued by their events
    text = s.metrics_text()
    assert 'llmtrain_operator_reconcile_errors_total{kind="unexpected"} 1.0' in text
    assert [e for e in s.writer.events if e[1] == "ReconcileError"] == [
        (
            "Warning",
            "ReconcileError",
            "the operator could not reconcile this job (TypeError: 'str' object cannot be interpreted "
            "as an integer); retrying in 0s",
        )
    ]
    # Resyncs while it backs off queue the others only; each try doubles the wait.
    tries, waits = 1, []
    for _ in range(400):
        clock[0] += 0.01
        c.resync_once()
        if ("ns1", "bad") in _drain(s):
            tries += 1
            waits.append(round(c.backing_off(("ns1", "bad")), 2))
    assert waits[:4] == [0.1, 0.2, 0.4, 0.8] and tries == 7  # 4 s of resyncs every 10 ms
    assert f'kind="unexpected"}} {float(tries)}' in s.metrics_text()  # once per try, no more
    assert s.writer.jobs[("ns1", "good")]["status"]["phase"] == "Provisioning"  # never held up
    # The wait is capped.
    c.interval = 100.0
    c.reconcile_key(("ns1", "bad"))
    assert c.backing_off(("ns1", "bad")) == c.BACKOFF_MAX_SECONDS
    # An edited job is tried at once; fixed, it is no longer backed off.
    c.reconciler.reconcile = real  # type: ignore[method-assign]
    bad2 = copy.deepcopy(bad)
    bad2["metadata"]["resourceVersion"] = "8"
    s.add(bad2, "MODIFIED")
    assert c.backing_off(("ns1", "bad")) == 0
    assert ("ns1", "bad") in _drain(s)
    assert s.writer.jobs[("ns1", "bad")]["status"]["phase"] == "Provisioning"


def test_a_name_conflict_is_retried_with_backoff_not_every_resync() -> None:
    s = Setup()
    c = s.controller
    clock = [0.0]
    c.monotonic = lambda: clock[0]
    s.api.objects[("Service", "ns1", "demo-head-svc")] = {
        "kind": "Service",
        "metadata": {"name": "demo-head-svc", "namespace": "ns1", "uid": "someone-else"},
    }
    s.add(job_body())
    _drain(s)
    assert 'kind="create"} 1.0' in s.metrics_text()
    for _ in range(10):  # a second of resyncs, 0.05 s apart: tries after 0.05, 0.1, 0.2, 0.4 s
        clock[0] += 0.1
        c.resync_once()
        _drain(s)
    assert 'kind="create"} 5.0' in s.metrics_text()
    assert sum(e[1] == "NameConflict" for e in s.writer.events) == 5


def test_a_spec_or_status_that_is_not_an_object_does_not_break_the_watch() -> None:
    for field, value in (("spec", "oops"), ("status", ["x"]), ("spec", None)):
        body = job_body()
        body[field] = value
        assert needs_action_now(body) is True


def test_a_stored_job_the_api_server_refuses_to_write_still_gets_its_events() -> None:
    """A job stored under a looser CRD fails the current CRD's rules: the API server refuses
    the status write (422). The InvalidSpec Event still says which field, and the job is
    retried with backoff, not every resync."""
    s = Setup()
    c = s.controller
    c.monotonic = lambda: 0.0
    body = job_body()
    body["spec"]["resources"]["workers"] = "many"
    s.add(body)
    s.writer.fail = ApiError(
        422, 'LLMTrainingJob "demo" is invalid: spec.resources: expected int, got string'
    )
    assert c.reconcile_key(KEY) is None
    ((kind, reason, message),) = s.writer.events
    assert (kind, reason) == ("Warning", "InvalidSpec") and "spec.resources.workers:" in message
    assert 'kind="http_422"} 1.0' in s.metrics_text() and c.backing_off(KEY) > 0


def reconciler_memory(rec: Reconciler) -> dict[str, int]:
    """The size of every per-job container a reconciler keeps between ticks."""
    return {name: len(v) for name, v in vars(rec).items() if isinstance(v, (dict, set))}


def test_deleted_jobs_leave_nothing_behind_in_the_reconciler_or_controller() -> None:
    """Churn: 300 jobs created, reconciled (pods, children, tokens, caches filled), then
    deleted. Every per-job container of the reconciler and the controller is empty again:
    before, the reconciler's per-uid dicts grew with every job ever seen."""
    s = Setup()
    before = reconciler_memory(s.controller.reconciler)
    for i in range(300):
        body = job_body(name=f"j{i}")
        body["metadata"]["uid"] = f"uid-{i}"
        s.add(body)
        s.controller.reconcile_key(("ns1", f"j{i}"))
        s.controller.reconcile_key(("ns1", f"j{i}"))
    grown = reconciler_memory(s.controller.reconciler)
    assert grown["_children_made"] == 300 and grown["_cache"] == 300 and grown["_recent"] >= 300
    for i in range(300):
        body = s.writer.jobs[("ns1", f"j{i}")]
        s.controller.observe("DELETED", body)
    assert reconciler_memory(s.controller.reconciler) == before
    assert len(s.controller.cache) == 0 and not s.controller._backoff and not s.controller._said
