"""The few Kubernetes API calls the operator makes itself, over plain HTTPS.

The reconciler takes a :class:`KubeApi`; the operator passes :class:`RestApi`, unit tests
an in-memory fake. The pod watch reads through :class:`RestPods`. Both speak JSON over one
urllib3 connection pool made at start-up, with the credentials Kopf uses too
(:func:`load_connection` → a ``kopf.ConnectionInfo``).

Why not the official ``kubernetes`` client: the operator creates five kinds, reads events
and watches pods — a dozen REST paths. Importing the client costs ~40 MB of RSS (its
thousands of model classes; the operator's whole import is ~55 MB without it, ~100 MB
with it), and its model objects are deep trees of Python objects that the operator would
only turn back into dicts. Bodies here go in and come out as plain dicts.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlencode

import urllib3

from llmtrain.api.spec import GROUP, PLURAL, VERSION

if TYPE_CHECKING:  # the reconciler imports this module; Kopf is only needed to connect
    import kopf

# Seconds before an API call gives up; a hung call would otherwise hold a reconcile thread.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0


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

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        """Merge-patch an object; False if absent."""
        ...

    def patch_status(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Merge-patch an object's status subresource (a Kueue Workload's: operator/kueue.py)."""
        ...

    def workload_priority(self, name: str) -> int | None:
        """The value of Kueue's (cluster-scoped) WorkloadPriorityClass ``name``; None if absent."""
        ...

    def scheduler_events(self, namespace: str, pod: str) -> list[dict[str, Any]]:
        """Events of reason FailedScheduling about one pod, oldest first."""
        ...

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """The pods of a namespace that match a label selector (the model server's)."""
        ...

    def node(self, name: str) -> dict[str, Any] | None:
        """A node, or None if absent (operator/disruption.py: is it being drained?)."""
        ...

    def pod_log(
        self, namespace: str, pod: str, container: str, *, tail_lines: int, previous: bool = False
    ) -> str:
        """The last ``tail_lines`` lines of a container's log (``previous``: of its last
        terminated instance), read through the API server from the kubelet."""
        ...


# kind → (API path prefix, resource): every kind the reconciler creates, reads or deletes.
# The Helm chart's RBAC rules are checked against this table (tests/unit/test_helm_chart.py).
_KINDS: dict[str, tuple[str, str]] = {
    "Pod": ("/api/v1", "pods"),
    "Service": ("/api/v1", "services"),
    "Secret": ("/api/v1", "secrets"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "Deployment": ("/apis/apps/v1", "deployments"),  # spec.serve's model server
    "Workload": ("/apis/kueue.x-k8s.io/v1beta2", "workloads"),  # spec.resources.queueName (kueue.py)
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),  # holds a drain (disruption.py)
}

JOBS_PATH = f"/apis/{GROUP}/{VERSION}"
JOBS = PLURAL
REPORTING_COMPONENT = "llmtrain-operator"
# `kubectl describe` shows it; the pod name in a cluster (the chart sets POD_NAME), else the host.
REPORTING_INSTANCE = os.environ.get("POD_NAME") or os.uname().nodename

# In a pod: the service account's files (the token is rotated by the kubelet).
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT / "token").exists()


def load_connection(kubeconfig: str | None = None) -> kopf.ConnectionInfo:
    """The API server and credentials: the pod's service account in a cluster, else the
    kubeconfig's current context (``kubeconfig``, else ``$KUBECONFIG``'s first file, else
    ``~/.kube/config``). File paths in a kubeconfig are relative to the file, as kubectl
    reads them. Exec and auth-provider plugins are refused with the reason."""
    import kopf

    if kubeconfig is None and in_cluster():
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        ns = SERVICE_ACCOUNT / "namespace"
        return kopf.ConnectionInfo(
            server=f"https://{'[' + host + ']' if ':' in host else host}:{port}",
            ca_path=str(SERVICE_ACCOUNT / "ca.crt"),
            token=(SERVICE_ACCOUNT / "token").read_text().strip(),
            default_namespace=ns.read_text().strip() if ns.exists() else None,
        )
    env = (os.environ.get("KUBECONFIG") or "").split(os.pathsep)[0]
    path = Path(kubeconfig or env or "~/.kube/config").expanduser()
    if not path.exists():
        raise ValueError(
            f"no Kubernetes credentials: kubeconfig {path} does not exist and this is not a pod "
            "(pass --kubeconfig or set KUBECONFIG)"
        )
    import yaml

    cfg = yaml.safe_load(path.read_text()) or {}

    def named(section: str, name: str | None) -> dict[str, Any]:
        for item in cfg.get(section) or []:
            if item.get("name") == name:
                return dict(item.get(section[:-1]) or {})
        raise ValueError(f"kubeconfig {path}: no {section[:-1]} named {name!r}")

    ctx = named("contexts", cfg.get("current-context"))
    cluster, user = named("clusters", ctx.get("cluster")), named("users", ctx.get("user"))
    for plugin in ("exec", "auth-provider"):
        if plugin in user:
            raise ValueError(
                f"kubeconfig {path}: user {ctx.get('user')!r} authenticates with an {plugin} plugin, "
                "which the operator does not run; run it in the cluster (service account) or use a "
                "kubeconfig with a token or client certificate"
            )

    def rel(value: str | None) -> str | None:
        return str((path.parent / value).resolve()) if value else None

    return kopf.ConnectionInfo(
        server=str(cluster["server"]),
        ca_path=rel(cluster.get("certificate-authority")),
        ca_data=cluster.get("certificate-authority-data"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")) or None,
        certificate_path=rel(user.get("client-certificate")),
        certificate_data=user.get("client-certificate-data"),
        private_key_path=rel(user.get("client-key")),
        private_key_data=user.get("client-key-data"),
        username=user.get("username"),
        password=user.get("password"),
        token=user.get("token"),
        default_namespace=ctx.get("namespace"),
        proxy_url=cluster.get("proxy-url"),
    )


class Http:
    """JSON requests to one API server over a pool of keep-alive connections.

    ``pool`` connections at most (one per thread that calls at once; a caller over the
    limit waits for a free one rather than opening a new TCP + TLS connection). With
    ``token_file`` (a pod's service account) the token is re-read from it once a minute:
    the kubelet rotates it.
    """

    TOKEN_REFRESH_S = 60.0

    def __init__(self, info: kopf.ConnectionInfo, pool: int, token_file: Path | None = None) -> None:
        self.server = info.server.rstrip("/")
        self.token_file = token_file
        kwargs: dict[str, Any] = {"maxsize": pool, "block": True}
        if self.server.startswith("https://"):
            kwargs["ssl_context"] = info.as_ssl_context()
            if info.insecure:
                kwargs["cert_reqs"] = "CERT_NONE"
                kwargs["assert_hostname"] = False
        self._pool = urllib3.connection_from_url(self.server, **kwargs)
        self._headers = info.as_http_headers()
        self._token_read = time.monotonic()

    def _auth(self) -> dict[str, str]:
        if self.token_file is not None and time.monotonic() - self._token_read > self.TOKEN_REFRESH_S:
            self._headers = {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}
            self._token_read = time.monotonic()
        return self._headers

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, Any] | None = None,
        content_type: str = "application/json",
        stream: bool = False,
        read_timeout: float = READ_TIMEOUT,
    ) -> Any:
        """The decoded JSON response (``stream``: the open urllib3 response). ApiError on ≥ 400."""
        url = path + ("?" + urlencode(query) if query else "")
        headers = {**self._auth(), "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        resp = self._pool.urlopen(
            method,
            url,
            body=data,
            headers=headers,
            preload_content=not stream,
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=read_timeout),
            # Only connection failures are retried (the request never reached the server):
            # a retried POST after a read error could create twice.
            retries=urllib3.Retry(total=2, connect=2, read=0, status=0, redirect=0),
        )
        if resp.status >= 400:
            raw = resp.data if not stream else resp.read()
            if stream:
                resp.release_conn()
            msg = resp.reason or ""
            try:
                msg = json.loads(raw).get("message", msg)
            except (ValueError, AttributeError):
                pass
            raise ApiError(resp.status, str(msg))
        if stream:
            return resp
        return json.loads(resp.data) if resp.data else None


def _path(kind: str, namespace: str, name: str | None = None) -> str:
    try:
        prefix, resource = _KINDS[kind]
    except KeyError:
        raise ValueError(f"unsupported kind {kind!r}") from None
    base = f"{prefix}/namespaces/{quote(namespace, safe='')}/{resource}"
    return f"{base}/{quote(name, safe='')}" if name else base


class RestApi:
    """:class:`KubeApi` over :class:`Http` (synchronous: the handlers call it from their pool)."""

    def __init__(self, http: Http) -> None:
        self.http = http

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self.http.request("POST", _path(obj["kind"], obj["metadata"]["namespace"]), obj)
        return out

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            out: dict[str, Any] = self.http.request("GET", _path(kind, namespace, name))
            return out
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        body: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
        }
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.http.request("DELETE", _path(kind, namespace, name), body)
            return True
        except ApiError as e:
            # 404: already gone; 409 with a uid precondition: a newer incarnation, not ours.
            if e.status == 404 or (uid and e.status == 409):
                return False
            raise

    def annotate(self, kind: str, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self.patch(kind, namespace, name, {"metadata": {"annotations": annotations}})

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        try:
            self.http.request(
                "PATCH", _path(kind, namespace, name), patch, content_type="application/merge-patch+json"
            )
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    def patch_status(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.http.request(
            "PATCH",
            _path(kind, namespace, name) + "/status",
            patch,
            content_type="application/merge-patch+json",
        )

    def workload_priority(self, name: str) -> int | None:
        path = f"/apis/kueue.x-k8s.io/v1beta2/workloadpriorityclasses/{quote(name, safe='')}"
        try:
            out = self.http.request("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return int((out or {}).get("value") or 0)

    def scheduler_events(self, namespace: str, pod: str) -> list[dict[str, Any]]:
        out = self.http.request(
            "GET",
            f"/api/v1/namespaces/{quote(namespace, safe='')}/events",
            query={
                "fieldSelector": f"involvedObject.kind=Pod,involvedObject.name={pod},reason=FailedScheduling"
            },
        )
        items: list[dict[str, Any]] = (out or {}).get("items", [])
        items.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        return items

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        out = self.http.request("GET", _path("Pod", namespace), query={"labelSelector": selector})
        items: list[dict[str, Any]] = (out or {}).get("items", [])
        return items

    def node(self, name: str) -> dict[str, Any] | None:
        # A list by name, not a GET: the verb a namespaced install's read-only cluster role
        # (list, watch) already has the shape of; nodes are cluster-scoped.
        out = self.http.request("GET", "/api/v1/nodes", query={"fieldSelector": f"metadata.name={name}"})
        items: list[dict[str, Any]] = (out or {}).get("items", [])
        return items[0] if items else None

    def pod_log(
        self, namespace: str, pod: str, container: str, *, tail_lines: int, previous: bool = False
    ) -> str:
        query: dict[str, Any] = {
            "container": container,
            "tailLines": tail_lines,
            "limitBytes": POD_LOG_BYTES,
        }
        if previous:
            query["previous"] = "true"
        resp = self.http.request(
            "GET",
            f"{_path('Pod', namespace, pod)}/log",
            query=query,
            stream=True,
            # The API server proxies this to the node's kubelet: an unreachable node must not
            # hold a reconcile thread for the full read timeout.
            read_timeout=10.0,
        )
        try:
            data: bytes = resp.read(POD_LOG_BYTES + 1)
        finally:
            resp.release_conn()
        return data[:POD_LOG_BYTES].decode(errors="replace")

    # -- the jobs themselves (what Kopf's patches did before: see llmtrain.operator.controller)

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any], *, status: bool) -> dict[str, Any]:
        """Merge-patch an LLMTrainingJob (``status``: its status subresource); the object
        as written, or {} when it is gone."""
        path = f"{JOBS_PATH}/namespaces/{quote(namespace, safe='')}/{JOBS}/{quote(name, safe='')}"
        try:
            out: dict[str, Any] = self.http.request(
                "PATCH",
                path + ("/status" if status else ""),
                patch,
                content_type="application/merge-patch+json",
            )
            return out
        except ApiError as e:
            if e.status == 404:
                return {}
            raise

    def post_event(self, involved: dict[str, Any], type: str, reason: str, message: str) -> None:
        """A core v1 Event about ``involved`` (what ``kubectl describe`` lists under Events)."""
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        ns = involved.get("namespace") or "default"
        self.http.request(
            "POST",
            f"/api/v1/namespaces/{quote(ns, safe='')}/events",
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{involved.get('name')}.", "namespace": ns},
                "involvedObject": involved,
                "type": type,
                "reason": reason,
                "message": message,
                "action": reason,
                "source": {"component": REPORTING_COMPONENT},
                "reportingComponent": REPORTING_COMPONENT,
                "reportingInstance": REPORTING_INSTANCE,
                "firstTimestamp": now[:19] + "Z",
                "lastTimestamp": now[:19] + "Z",
                "eventTime": now,
                "count": 1,
            },
        )

    def peering_status(self, name: str, namespace: str | None) -> dict[str, Any] | None:
        """The status (peer → heartbeat) of Kopf's peering object ``name``, None if absent.
        A LIST by name, not a GET: the operator's RBAC grants Kopf list/watch/patch only."""
        path = (
            "/apis/kopf.dev/v1/clusterkopfpeerings"
            if namespace is None
            else f"/apis/kopf.dev/v1/namespaces/{quote(namespace, safe='')}/kopfpeerings"
        )
        out = self.http.request("GET", path, query={"fieldSelector": f"metadata.name={name}"})
        items = (out or {}).get("items") or []
        if not items:
            return None
        status: dict[str, Any] = items[0].get("status") or {}
        return status


# A crashed container's last lines are all a condition needs (and all it can hold).
POD_LOG_BYTES = 16 * 1024

# Watches end server-side after this long (the client waits a bit longer): a silently
# dropped connection costs at most this much staleness before the watch is re-opened.
WATCH_SECONDS = 300


class RestPods:
    """:class:`~llmtrain.operator.podwatch.PodSource` over :class:`Http`: raw JSON pages and
    watch lines, turned into PodViews by the watch and dropped at once."""

    def __init__(self, http: Http) -> None:
        self.http = http

    @staticmethod
    def _pods_path(namespace: str | None) -> str:
        return "/api/v1/pods" if namespace is None else f"/api/v1/namespaces/{quote(namespace, safe='')}/pods"

    def list(self, namespace: str | None, selector: str, limit: int, cont: str | None) -> dict[str, Any]:
        query: dict[str, Any] = {"labelSelector": selector, "limit": limit}
        if cont:
            query["continue"] = cont
        out: dict[str, Any] = self.http.request("GET", self._pods_path(namespace), query=query)
        return out

    def watch(self, namespace: str | None, selector: str, resource_version: str) -> Iterator[dict[str, Any]]:
        from llmtrain.operator.podwatch import iter_lines

        resp = self.http.request(
            "GET",
            self._pods_path(namespace),
            query={
                "labelSelector": selector,
                "watch": "true",
                "resourceVersion": resource_version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": WATCH_SECONDS,
            },
            stream=True,
            read_timeout=WATCH_SECONDS + 30,
        )
        try:
            yield from iter_lines(resp.stream(amt=None, decode_content=True))
        finally:
            resp.release_conn()
