"""The few Kubernetes API calls the reconciler makes, behind a small protocol.

The reconciler takes a :class:`KubeApi`; the operator passes :class:`KubernetesApi`
(the official client, made once at start-up), unit tests pass an in-memory fake.
Bodies go in and come out as plain dicts: responses are read with
``_preload_content=False`` and ``json.loads`` so the client never builds its model
objects (each is a deep tree of Python objects; at thousands of pods that costs both
CPU and RSS).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

# Seconds before an API call gives up; a hung call would otherwise hold a Kopf worker.
REQUEST_TIMEOUT = (5.0, 30.0)  # (connect, read)


class ApiError(Exception):
    """A failed API call; ``status`` is the HTTP status (409 conflict, 404 not found, …)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class KubeApi(Protocol):
    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj`` (kind from ``obj['kind']``); ApiError(409) if the name exists."""
        ...

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None if absent."""
        ...

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete (background propagation); with ``uid`` only that incarnation. False if absent."""
        ...

    def annotate(self, kind: str, namespace: str, name: str, annotations: dict[str, str]) -> None:
        """Merge-patch annotations onto an object (absent: ignored)."""
        ...

    def scheduler_events(self, namespace: str, pod: str) -> list[dict[str, Any]]:
        """Events of reason FailedScheduling about one pod, oldest first."""
        ...


# kind → (API class attribute, method suffix)
_KINDS: dict[str, tuple[str, str]] = {
    "Pod": ("core", "pod"),
    "Service": ("core", "service"),
    "Secret": ("core", "secret"),
    "ConfigMap": ("core", "config_map"),
    "NetworkPolicy": ("networking", "network_policy"),
}


class KubernetesApi:
    """:class:`KubeApi` over the official ``kubernetes`` client (synchronous; Kopf runs sync
    handlers in its thread pool)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self._client = client
        self.core = client.CoreV1Api(api_client)
        self.networking = client.NetworkingV1Api(api_client)

    def _method(self, verb: str, kind: str) -> Any:
        try:
            api, suffix = _KINDS[kind]
        except KeyError:
            raise ValueError(f"unsupported kind {kind!r}") from None
        return getattr(getattr(self, api), f"{verb}_namespaced_{suffix}")

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except self._client.ApiException as e:
            msg = e.reason or ""
            if e.body:
                try:
                    msg = json.loads(e.body).get("message", msg)
                except (ValueError, AttributeError):
                    pass
            raise ApiError(int(e.status or 0), str(msg)) from None
        data = resp.data
        return json.loads(data) if data else None

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        ns = obj["metadata"]["namespace"]
        out: dict[str, Any] = self._call(self._method("create", obj["kind"]), ns, obj)
        return out

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            out: dict[str, Any] = self._call(self._method("read", kind), name, namespace)
            return out
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self._call(self._method("delete", kind), name, namespace, body=body)
            return True
        except ApiError as e:
            # 404: already gone; 409 with a uid precondition: a newer incarnation, not ours.
            if e.status == 404 or (uid and e.status == 409):
                return False
            raise

    def annotate(self, kind: str, namespace: str, name: str, annotations: dict[str, str]) -> None:
        try:
            self._call(
                self._method("patch", kind), name, namespace, {"metadata": {"annotations": annotations}}
            )
        except ApiError as e:
            if e.status != 404:
                raise

    def scheduler_events(self, namespace: str, pod: str) -> list[dict[str, Any]]:
        out = self._call(
            self.core.list_namespaced_event,
            namespace,
            field_selector=f"involvedObject.kind=Pod,involvedObject.name={pod},reason=FailedScheduling",
        )
        items: list[dict[str, Any]] = (out or {}).get("items", [])
        items.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        return items


# Watches end server-side after this long (the client waits a bit longer): a silently
# dropped connection costs at most this much staleness before the watch is re-opened.
WATCH_SECONDS = 300


class KubernetesPods:
    """:class:`~llmtrain.operator.podwatch.PodSource` over the official client: raw JSON, no
    model objects (a pod model is a deep tree of Python objects; these bodies are turned
    into PodViews and dropped at once)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self._client = client
        self.core = client.CoreV1Api(api_client)

    def _list_fn(self, namespace: str | None) -> tuple[Any, tuple[Any, ...]]:
        if namespace is None:
            return self.core.list_pod_for_all_namespaces, ()
        return self.core.list_namespaced_pod, (namespace,)

    def list(self, namespace: str | None, selector: str, limit: int, cont: str | None) -> dict[str, Any]:
        fn, args = self._list_fn(namespace)
        kwargs: dict[str, Any] = {"label_selector": selector, "limit": limit}
        if cont:
            kwargs["_continue"] = cont
        resp = fn(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        out: dict[str, Any] = json.loads(resp.data)
        return out

    def watch(self, namespace: str | None, selector: str, resource_version: str) -> Any:
        from llmtrain.operator.podwatch import iter_lines

        fn, args = self._list_fn(namespace)
        resp = fn(
            *args,
            label_selector=selector,
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=(REQUEST_TIMEOUT[0], WATCH_SECONDS + 30),
        )
        try:
            yield from iter_lines(resp.stream(amt=None, decode_content=False))
        finally:
            resp.release_conn()
