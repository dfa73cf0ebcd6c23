"""The operator's own API client (llmtrain.operator.kube), against a recording HTTP server.

The integration tests run it against the real API server; here each REST detail is pinned
(paths, verbs, content types, how statuses map to results) so that a wrong one fails with
its name, and the kubeconfig reader is checked on the forms kubectl accepts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from llmtrain.operator.kube import ApiError, Http, RestApi, RestPods, load_connection

Reply = tuple[int, Any]


class Recorder:
    """A loopback HTTP server answering from a table; every request is recorded."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.replies: dict[tuple[str, str], Reply | list[bytes]] = {}
        rec = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                path = self.path.split("?", 1)[0]
                rec.requests.append(
                    {
                        "method": self.command,
                        "path": path,
                        "query": self.path.split("?", 1)[1] if "?" in self.path else "",
                        "type": self.headers.get("Content-Type"),
                        "auth": self.headers.get("Authorization"),
                        "body": json.loads(raw) if raw else None,
                    }
                )
                reply = rec.replies.get(
                    (self.command, path), (404, {"kind": "Status", "message": "not found"})
                )
                if isinstance(reply, list):  # a watch stream: chunked lines
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for chunk in reply:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                status, body = reply
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def server() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.server.shutdown()


def _http(server: Recorder) -> Http:
    return Http(kopf.ConnectionInfo(server=server.url, token="tok"), pool=2)


def test_create_get_delete_annotate_map_to_rest(server: Recorder) -> None:
    api = RestApi(_http(server))
    pods = "/api/v1/namespaces/ns1/pods"
    server.replies[("POST", pods)] = (201, {"metadata": {"name": "j-head", "uid": "u1"}})
    server.replies[("GET", pods + "/j-head")] = (200, {"metadata": {"name": "j-head"}})
    server.replies[("DELETE", pods + "/j-head")] = (200, {"kind": "Status"})
    netpol = "/apis/networking.k8s.io/v1/namespaces/ns1/networkpolicies"
    server.replies[("POST", netpol)] = (
        409,
        {"kind": "Status", "message": 'networkpolicies "j" already exists'},
    )
    server.replies[("PATCH", pods + "/j-head")] = (200, {})

    pod = {"kind": "Pod", "metadata": {"name": "j-head", "namespace": "ns1"}}
    assert api.create(pod)["metadata"]["uid"] == "u1"
    assert api.get("Pod", "ns1", "j-head") == {"metadata": {"name": "j-head"}}
    assert api.get("Pod", "ns1", "absent") is None
    with pytest.raises(ApiError) as err:
        api.create({"kind": "NetworkPolicy", "metadata": {"name": "j", "namespace": "ns1"}})
    assert err.value.status == 409 and "already exists" in err.value.message
    assert api.delete("Pod", "ns1", "j-head", uid="u1") is True
    assert api.delete("Pod", "ns1", "gone") is False
    api.annotate("Pod", "ns1", "j-head", {"a/b": "c"})
    api.annotate("Pod", "ns1", "gone", {"a/b": "c"})  # absent: ignored

    reqs = server.requests
    assert [(r["method"], r["path"]) for r in reqs] == [
        ("POST", pods),
        ("GET", pods + "/j-head"),
        ("GET", pods + "/absent"),
        ("POST", netpol),
        ("DELETE", pods + "/j-head"),
        ("DELETE", pods + "/gone"),
        ("PATCH", pods + "/j-head"),
        ("PATCH", pods + "/gone"),
    ]
    assert all(r["auth"] == "Bearer tok" for r in reqs)
    assert reqs[0]["body"] == pod and reqs[0]["type"] == "application/json"
    assert reqs[4]["body"]["preconditions"] == {"uid": "u1"}
    assert reqs[4]["body"]["propagationPolicy"] == "Background"
    assert reqs[6]["type"] == "application/merge-patch+json"
    assert reqs[6]["body"] == {"metadata": {"annotations": {"a/b": "c"}}}


def test_delete_of_a_newer_incarnation_is_not_ours(server: Recorder) -> None:
    api = RestApi(_http(server))
    path = "/api/v1/namespaces/ns1/pods/p"
    server.replies[("DELETE", path)] = (409, {"kind": "Status", "message": "Precondition failed: UID"})
    assert api.delete("Pod", "ns1", "p", uid="old") is False
    with pytest.raises(ApiError):  # without a uid a conflict is a real error
        api.delete("Pod", "ns1", "p")
    server.replies[("GET", path)] = (500, {"kind": "Status", "message": "etcd is down"})
    with pytest.raises(ApiError, match="HTTP 500: etcd is down"):
        api.get("Pod", "ns1", "p")
    with pytest.raises(ValueError, match="unsupported kind 'CronJob'"):
        api.get("CronJob", "ns1", "p")


def test_scheduler_events_are_filtered_by_the_server_and_sorted(server: Recorder) -> None:
    api = RestApi(_http(server))
    server.replies[("GET", "/api/v1/namespaces/ns1/events")] = (
        200,
        {
            "items": [
                {"lastTimestamp": "2026-01-02T00:00:00Z", "n": 2},
                {"lastTimestamp": "2026-01-01T00:00:00Z", "n": 1},
            ]
        },
    )
    assert [e["n"] for e in api.scheduler_events("ns1", "j-head")] == [1, 2]
    q = server.requests[0]["query"]
    assert (
        "fieldSelector=involvedObject.kind%3DPod%2CinvolvedObject.name%3Dj-head%2Creason%3DFailedScheduling"
        in q
    )


def test_pod_list_pages_and_watch_lines(server: Recorder) -> None:
    pods = RestPods(_http(server))
    server.replies[("GET", "/api/v1/namespaces/ns1/pods")] = (
        200,
        {"metadata": {"continue": ""}, "items": []},
    )
    server.replies[("GET", "/api/v1/pods")] = [
        b'{"type": "ADDED", "object": {"metadata": {"name": "a"}}}\n{"type": "MOD',
        b'IFIED", "object": {"metadata": {"name": "a"}}}\n',
    ]
    assert pods.list("ns1", "llmtrain.dev/job", 500, "tok123")["items"] == []
    events = list(pods.watch(None, "llmtrain.dev/job", "42"))
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED"]
    list_q, watch_q = server.requests[0]["query"], server.requests[1]["query"]
    assert (
        "labelSelector=llmtrain.dev%2Fjob" in list_q and "limit=500" in list_q and "continue=tok123" in list_q
    )
    assert (
        "watch=true" in watch_q and "resourceVersion=42" in watch_q and "allowWatchBookmarks=true" in watch_q
    )


def _kubeconfig(tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any] | None = None) -> Path:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "dev",
        "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
        "clusters": [{"name": "c", "cluster": cluster or {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": user}],
    }
    path = tmp_path / "conf" / "kubeconfig"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_kubeconfig_paths_are_relative_to_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    path = _kubeconfig(
        tmp_path,
        {"client-certificate": "pki/admin.crt", "client-key": "/abs/admin.key"},
        {"server": "https://127.0.0.1:6443", "certificate-authority": "pki/ca.crt"},
    )
    info = load_connection(str(path))
    assert info.server == "https://127.0.0.1:6443" and info.default_namespace == "team"
    assert info.ca_path == str(tmp_path / "conf" / "pki" / "ca.crt")
    assert info.certificate_path == str(tmp_path / "conf" / "pki" / "admin.crt")
    assert info.private_key_path == "/abs/admin.key"
    monkeypatch.setenv("KUBECONFIG", f"{path}:/elsewhere")
    token = _kubeconfig(
        tmp_path, {"token": "abc"}, {"server": "https://h:1", "insecure-skip-tls-verify": True}
    )
    info = load_connection()
    assert info.token == "abc" and info.insecure is True and token == path


def test_kubeconfig_errors_name_the_problem(tmp_path: Path) -> None:
    path = _kubeconfig(tmp_path, {"exec": {"command": "aws", "args": ["eks", "get-token"]}})
    with pytest.raises(ValueError, match="user 'u' authenticates with an exec plugin"):
        load_connection(str(path))
    cfg = yaml.safe_load(path.read_text())
    cfg["current-context"] = "prod"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="no context named 'prod'"):
        load_connection(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        load_connection(str(tmp_path / "missing"))


def test_pod_log_asks_the_api_server_for_a_containers_tail_and_returns_its_text(server: Recorder) -> None:
    api = RestApi(_http(server))
    path = "/api/v1/namespaces/ns1/pods/j-worker-0/log"
    # The recorder answers JSON; what comes back is the body's text as it was sent.
    server.replies[("GET", path)] = (200, "last line")
    assert api.pod_log("ns1", "j-worker-0", "ray", tail_lines=20) == '"last line"'
    q = server.requests[-1]["query"]
    assert "container=ray" in q and "tailLines=20" in q and f"limitBytes={16 * 1024}" in q
    assert "previous" not in q
    api.pod_log("ns1", "j-worker-0", "ray", tail_lines=5, previous=True)
    assert "previous=true" in server.requests[-1]["query"]
    server.replies[("GET", path)] = (
        400,
        {"kind": "Status", "message": 'container "ray" is waiting to start'},
    )
    with pytest.raises(ApiError, match="HTTP 400: container"):
        api.pod_log("ns1", "j-worker-0", "ray", tail_lines=20)
