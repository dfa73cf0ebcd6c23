"""The operator's own pod watch: the store's bookkeeping and the list → watch → relist loop,
over a scripted source (no server)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from llmtrain.operator.manifests import LABEL_JOB
from llmtrain.operator.podwatch import PodStore, PodWatch, iter_lines, start_watches


def pod(
    name: str, job: str = "demo", ns: str = "ns1", phase: str = "Pending", rv: str = "1"
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": f"uid-{name}",
            "resourceVersion": rv,
            "labels": {LABEL_JOB: job},
            "managedFields": [{"manager": "x" * 1000}],
        },
        "spec": {"nodeName": "n1"},
        "status": {"phase": phase},
    }


def test_store_apply_modify_delete_and_label_change() -> None:
    s = PodStore()
    s.apply("ADDED", pod("demo-head"))
    s.apply("ADDED", pod("demo-worker-0"))
    s.apply("ADDED", pod("other-head", job="other"))
    assert set(s.pods("ns1", "demo")) == {"demo-head", "demo-worker-0"}
    s.apply("MODIFIED", pod("demo-head", phase="Running"))
    assert s.pods("ns1", "demo")["demo-head"].running
    # A copy: a reader's dict does not change under it.
    snap = s.pods("ns1", "demo")
    s.apply("DELETED", pod("demo-worker-0"))
    assert set(snap) == {"demo-head", "demo-worker-0"}
    assert set(s.pods("ns1", "demo")) == {"demo-head"}
    # The job label changed: the pod moves, it is not listed under both jobs.
    s.apply("MODIFIED", pod("demo-head", job="other"))
    assert s.pods("ns1", "demo") == {}
    assert set(s.pods("ns1", "other")) == {"demo-head", "other-head"}
    assert s.pods("ns2", "other") == {} and len(s) == 2


def test_store_keeps_views_not_bodies() -> None:
    s = PodStore()
    s.apply("ADDED", pod("demo-head"))
    v = s.pods("ns1", "demo")["demo-head"]
    assert not hasattr(v, "__dict__")  # slots: no room for anything but the view's fields
    assert "managedFields" not in repr(v)


def test_replace_namespace_drops_what_the_list_lacks_and_keeps_other_namespaces() -> None:
    from llmtrain.operator.diagnose import pod_view

    s = PodStore()
    s.apply("ADDED", pod("demo-head"))
    s.apply("ADDED", pod("gone-head", job="gone"))
    s.apply("ADDED", pod("demo-head", ns="ns2"))
    s.replace_namespace("ns1", [pod_view(pod("demo-head", phase="Running"))])
    assert s.pods("ns1", "gone") == {}
    assert s.pods("ns1", "demo")["demo-head"].running
    assert set(s.pods("ns2", "demo")) == {"demo-head"}
    s.apply("DELETED", pod("demo-head"))  # its index entry was rebuilt by the relist
    assert s.pods("ns1", "demo") == {}


class Source:
    """A scripted PodSource: list pages, then one scripted stream per watch call."""

    def __init__(self, pages: list[dict[str, Any]], streams: list[list[dict[str, Any]] | Exception]) -> None:
        self.pages = pages
        self.streams = streams
        self.lists: list[tuple[str | None, str, int, str | None]] = []
        self.watches: list[str] = []

    def list(self, namespace: str | None, selector: str, limit: int, cont: str | None) -> dict[str, Any]:
        self.lists.append((namespace, selector, limit, cont))
        i = 0 if cont is None else int(cont)
        return self.pages[i % len(self.pages)]

    def watch(self, namespace: str | None, selector: str, resource_version: str) -> Iterator[dict[str, Any]]:
        self.watches.append(resource_version)
        if not self.streams:
            time.sleep(0.05)
            return iter(())
        s = self.streams.pop(0)
        if isinstance(s, Exception):
            raise s
        return iter(s)


def test_watch_lists_in_pages_then_follows_events_and_relists_on_410() -> None:
    pages = [
        {"metadata": {"resourceVersion": "10", "continue": "1"}, "items": [pod("demo-head")]},
        {"metadata": {"resourceVersion": "", "continue": ""}, "items": [pod("demo-worker-0")]},
    ]
    streams: list[list[dict[str, Any]] | Exception] = [
        [
            {"type": "MODIFIED", "object": pod("demo-head", phase="Running", rv="11")},
            {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}},
        ],
        ConnectionResetError("reset by peer"),
        [{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}],
    ]
    src = Source(pages, streams)
    store = PodStore()
    synced: list[int] = []
    w = PodWatch(src, store, "ns1", on_synced=lambda: synced.append(1), retry_delay=0.01)
    w.start()
    deadline = time.monotonic() + 5
    while w.relists < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    w.stop()
    assert w.relists >= 2
    # Paged: the second page asked for with the first page's continue token, selector set.
    assert src.lists[:2] == [("ns1", LABEL_JOB, PodWatch.PAGE, None), ("ns1", LABEL_JOB, PodWatch.PAGE, "1")]
    # Watched from the list's version; after the reset, from the bookmark's; after 410, relisted.
    assert src.watches[:3] == ["10", "15", "15"]
    assert set(store.pods("ns1", "demo")) == {"demo-head", "demo-worker-0"}
    assert synced and synced[0] == 1


def test_watch_error_other_than_410_retries_from_the_same_version() -> None:
    pages = [{"metadata": {"resourceVersion": "7"}, "items": []}]
    streams: list[list[dict[str, Any]] | Exception] = [
        [{"type": "ERROR", "object": {"code": 500, "message": "boom"}}],
        [{"type": "ADDED", "object": pod("demo-head", rv="8")}],
    ]
    src = Source(pages, streams)
    store = PodStore()
    w = PodWatch(src, store, None, retry_delay=0.01).start()
    deadline = time.monotonic() + 5
    while not store.pods("ns1", "demo") and time.monotonic() < deadline:
        time.sleep(0.01)
    w.stop()
    assert src.watches[:2] == ["7", "7"] and w.relists == 1
    assert set(store.pods("ns1", "demo")) == {"demo-head"}


def test_start_watches_syncs_once_every_namespace_listed() -> None:
    gate = threading.Event()

    class Slow(Source):
        def list(self, namespace: str | None, selector: str, limit: int, cont: str | None) -> dict[str, Any]:
            if namespace == "b":
                gate.wait(5)
            return {
                "metadata": {"resourceVersion": "1"},
                "items": [pod(f"{namespace}-head", ns=str(namespace))],
            }

    store = PodStore()
    watches = start_watches(Slow([], []), store, ["a", "b"])
    time.sleep(0.2)
    assert not store.synced  # "b" has not listed yet
    gate.set()
    deadline = time.monotonic() + 5
    while not store.synced and time.monotonic() < deadline:
        time.sleep(0.01)
    for w in watches:
        w.stop()
    assert store.synced
    assert set(store.pods("a", "demo")) == {"a-head"} and set(store.pods("b", "demo")) == {"b-head"}


@pytest.mark.parametrize("cut", [1, 7, 50])
def test_iter_lines_splits_json_lines_across_chunks(cut: int) -> None:
    events = [{"type": "ADDED", "object": {"metadata": {"name": f"p{i}"}}} for i in range(3)]
    raw = b"".join(json.dumps(e).encode() + b"\n" for e in events)
    chunks = [raw[i : i + cut] for i in range(0, len(raw), cut)]
    assert list(iter_lines(chunks)) == events
    assert list(iter_lines([raw.rstrip(b"\n")])) == events  # a last line without newline


def test_a_refused_list_makes_the_operator_not_ready_at_once_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RBAC without `list pods`: the reconcilers would wait forever for the first list behind a
    green liveness probe. Readiness says why at once; each failure is counted; the log has one
    line per distinct reason, not one a second; once allowed, the operator is ready."""
    from llmtrain.operator.kube import ApiError
    from llmtrain.operator.podwatch import not_ready

    allowed = threading.Event()

    class Refusing(Source):
        def list(self, namespace: str | None, selector: str, limit: int, cont: str | None) -> dict[str, Any]:
            if not allowed.is_set():
                raise ApiError(403, 'pods is forbidden: User "system:serviceaccount:x:op" cannot list')
            return super().list(namespace, selector, limit, cont)

    store, kinds = PodStore(), []
    (w,) = start_watches(Refusing([{"metadata": {"resourceVersion": "1"}, "items": []}], []), store, None)
    w.retry_delay = 0.01
    w.on_failure = kinds.append
    deadline = time.monotonic() + 5
    while len(kinds) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    why = not_ready(store, [w])
    assert why is not None and why.startswith(
        "the jobs' pods are not listed yet: pods in all namespaces: http_403"
    )
    assert "cannot list" in why and "RBAC must allow list and watch on pods" in why
    assert set(kinds) == {"http_403"} and len(kinds) >= 5
    refusals = [r for r in caplog.records if "pod watch" in r.getMessage() and r.levelname == "ERROR"]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]

    allowed.set()
    assert store.wait_synced(5)
    deadline = time.monotonic() + 5
    while not_ready(store, [w]) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    w.stop()
    assert not_ready(store, [w]) is None


def test_a_dropped_connection_is_not_unready_until_it_lasts() -> None:
    """A reset stream retried at once is normal; only one failing longer than the grace counts."""
    from llmtrain.operator.podwatch import not_ready

    store = PodStore()
    store.mark_synced()
    w = PodWatch(Source([], []), store, "ns1")
    w._failed(ConnectionResetError("reset by peer"))
    assert w.failure == "ConnectionResetError: reset by peer"
    assert not_ready(store, [w], grace=10) is None
    assert not_ready(store, [w], grace=0) == "pods in ns1: ConnectionResetError: reset by peer"
    w._working()
    assert not_ready(store, [w], grace=0) is None
