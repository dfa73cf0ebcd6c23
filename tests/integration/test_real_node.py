"""A real node (tests/cluster/node.py) runs real containers beside a node-mode control plane.

The module starts its own control plane in node mode and the node ``llmtrain-node`` inside the
network namespace of the same name (no default route; one veth to the host, 172.31.200.1/2), and
checks what the product's pods will rely on: the node becomes Ready; a pod from the locally
built pause image runs as uid 65532 with a real IP from 10.245.0.0/24; a ClusterIP Service
reaches a pod through kube-proxy, and the ``kubernetes`` Service (10.96.0.1:443) reaches the
apiserver, from inside the namespace; ``kubectl logs`` goes apiserver -> kubelet; a missing
image fails fast (ErrImagePull: no registry has a route); and the stop leaves no namespace,
no lt-* interface, no process and no mount behind.

Negative control of the teardown check (run by hand on 2026-12-07, /tmp/negctl.py): with
``NodeNetwork.delete`` planted as a no-op (the stop forgets the namespace and the veth),
``test_teardown_leaves_nothing`` failed: the namespace ``llmtrain-node`` still existed, owned by the
test's own PID (``assert (not True or 20954 != 20954)``); ``NodeNetwork().remove_stale()`` then
removed the leftovers.

Skipped, with the reason, when not root or when the binaries/packages are missing
(``tests/cluster/build.sh all``, ``make apt``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import controlplane  # noqa: E402
import node as node_mod  # noqa: E402
import ociimage  # noqa: E402

pytestmark = pytest.mark.cluster

POD_NET = ipaddress.ip_network(node_mod.POD_CIDR)
ECHO_IMAGE = "llmtrain.dev/test-echo:1"
# A static HTTP responder for the Service check (the pause image listens on nothing): it logs
# one line at start (the `kubectl logs` check) and answers every request with its hostname and uid.
ECHO_C = r"""
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int port = argc > 1 ? atoi(argv[1]) : 8080, one = 1;
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET; a.sin_port = htons(port); a.sin_addr.s_addr = htonl(INADDR_ANY);
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) { perror("bind/listen"); return 1; }
  printf("test-echo listening on %d as uid %d\n", port, (int)getuid()); fflush(stdout);
  for (;;) {
    char buf[2048], host[256] = "", out[512];
    int c = accept(s, 0, 0);
    if (c < 0) continue;
    if (read(c, buf, sizeof buf) < 0) { close(c); continue; }
    gethostname(host, sizeof host);
    int n = snprintf(out, sizeof out, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from %s uid %d\n", host, (int)getuid());
    if (write(c, out, n) < 0) perror("write");
    close(c);
  }
}
"""


FORWARD_CHANGED = (
    "the host's net.ipv4.ip_forward changed while the node ran: the node never writes it (its "
    "forwarding is set inside llmtrain-node); look for a tool with a bridge network on the host "
    "(a buildah/podman RUN step with CNI networking sets it)"
)


def _host_forward() -> str:
    return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()


@dataclass
class NodeCluster:
    cp: controlplane.ControlPlane
    node: node_mod.Node
    startup_seconds: float
    # the host's net.ipv4.ip_forward before the node started: the node must leave it as it was
    # (0 on a clean machine; another tool on the host, e.g. a CNI-networked builder, may set it)
    host_forward: str = "0"
    stopped: bool = False

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return self.cp.kubectl(*args, check=check, input=input).stdout

    def pod(self, ns: str, name: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", "pod", "-n", ns, name, "-o", "json"))  # type: ignore[no-any-return]

    def wait(self, what: str, check: Any, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def nc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeCluster]:
    reason = node_mod.node_skip_reason()
    if reason:
        pytest.skip(reason)
    live = node_mod.NodeNetwork().in_use()
    if live:  # one node per machine (one namespace name, one veth address pair)
        pytest.skip(f"a node runs in network namespace {node_mod.NETNS} (PIDs {live}): run.sh down")
    forward = _host_forward()
    t0 = time.monotonic()
    try:
        cp, node = node_mod.start_node_cluster(tmp_path_factory.mktemp("realnode"), die_with_parent=True)
    except node_mod.NodeError as e:
        if "a node runs" in str(e):  # another test's node won the start
            pytest.skip(str(e))
        raise
    c = NodeCluster(cp, node, time.monotonic() - t0, host_forward=forward)
    try:
        yield c
    finally:
        if not c.stopped:
            node_mod.stop_node_cluster(cp, node, keep_logs=True)


@pytest.fixture(scope="module")
def ns(nc: NodeCluster) -> str:
    nc.kubectl("create", "namespace", "realnode")
    nc.wait(
        "ServiceAccount realnode/default",
        lambda: nc.kubectl("get", "sa", "-n", "realnode", "default", check=False).strip(),
    )
    return "realnode"


def _pod(name: str, image: str, **container: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {
                "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True},
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {"name": "main", "image": image, "imagePullPolicy": "IfNotPresent", **container}
                ],
            },
        }
    )


def _running(nc: NodeCluster, ns: str, name: str) -> dict[str, Any] | None:
    p = nc.pod(ns, name)
    return p if p["status"].get("phase") == "Running" else None


def test_node_ready(nc: NodeCluster) -> None:
    nodes = json.loads(nc.kubectl("get", "nodes", "-o", "json"))["items"]
    assert [n["metadata"]["name"] for n in nodes] == ["llmtrain-node"]  # no kwok node in node mode
    [n] = nodes
    ready = {c["type"]: c["status"] for c in n["status"]["conditions"]}
    assert ready["Ready"] == "True", n["status"]["conditions"]
    info = n["status"]["nodeInfo"]
    assert info["kubeletVersion"] == controlplane.read_versions()["K8S_VERSION"]
    assert info["containerRuntimeVersion"].startswith("containerd://")
    assert {"type": "InternalIP", "address": controlplane.NODE_IP} in n["status"]["addresses"]
    # the namespace has no route off the machine: only the veth's link route
    routes = node_mod.NodeNetwork().routes()
    assert "default" not in routes, routes
    assert _host_forward() == nc.host_forward, FORWARD_CHANGED
    print(f"\nnode cluster start -> node Ready: {nc.startup_seconds:.1f}s; {nc.node.timings}")


def test_pause_pod_runs_with_a_real_ip(nc: NodeCluster, ns: str) -> None:
    t0 = time.monotonic()
    nc.kubectl("apply", "-n", ns, "-f", "-", input=_pod("pause", node_mod.pause_image()))
    pod = nc.wait("pod pause Running", lambda: _running(nc, ns, "pause"), timeout=90)
    elapsed = time.monotonic() - t0
    assert ipaddress.ip_address(pod["status"]["podIP"]) in POD_NET, pod["status"]
    assert pod["spec"]["nodeName"] == "llmtrain-node"
    [cs] = pod["status"]["containerStatuses"]
    assert cs["ready"] and "running" in cs["state"]
    print(f"\npause pod apply -> Running: {elapsed:.1f}s, IP {pod['status']['podIP']}")


def test_pod_open_files_limit(nc: NodeCluster, ns: str) -> None:
    """Containers inherit containerd's RLIMIT_NOFILE: what a pod's `ulimit -n` can reach."""
    nc.wait("pod pause Running", lambda: _running(nc, ns, "pause"), timeout=90)
    tasks = nc.node.ctr("tasks", "list").stdout.split("\n")[1:]
    pids = [int(line.split()[1]) for line in tasks if line.split() and line.split()[2] == "RUNNING"]
    assert pids
    limits = Path(f"/proc/{pids[0]}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    soft, hard = (int(v) for v in line.split()[3:5])
    assert hard == node_mod.nofile_limit(), line
    print(f"\npod process open-files limit: soft {soft}, hard {hard} (want >= 65536: {hard >= 65536})")


@pytest.fixture(scope="module")
def echo(nc: NodeCluster, ns: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("echo")
    (d / "echo.c").write_text(ECHO_C)
    subprocess.run(["gcc", "-Os", "-static", "-o", str(d / "echo"), str(d / "echo.c")], check=True)
    (d / "echo.tar").write_bytes(
        ociimage.oci_archive(ECHO_IMAGE, [ociimage.ImageFile(d / "echo", "/echo")], entrypoint=["/echo"])
    )
    nc.node.ctr("images", "import", str(d / "echo.tar"))
    nc.kubectl("apply", "-n", ns, "-f", "-", input=_pod("echo", ECHO_IMAGE, ports=[{"containerPort": 8080}]))
    nc.kubectl(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "echo"},
                "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]},
            }
        ),
    )
    return nc.wait("pod echo Running", lambda: _running(nc, ns, "echo"), timeout=90)  # type: ignore[no-any-return]


def test_cluster_ip_service_through_kube_proxy(nc: NodeCluster, ns: str, echo: dict[str, Any]) -> None:
    svc = json.loads(nc.kubectl("get", "svc", "-n", ns, "echo", "-o", "json"))
    ip = svc["spec"]["clusterIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(controlplane.SERVICE_CIDR)

    def answer() -> str:
        r = nc.node.nsenter("curl", "-sS", "--max-time", "3", f"http://{ip}:80/", check=False)
        return r.stdout if r.returncode == 0 else ""

    body = nc.wait(f"echo through Service {ip}:80", answer, timeout=60)  # kube-proxy syncs the rule
    assert body.strip() == "hello from echo uid 65532", body


def test_kubectl_logs_via_kubelet(nc: NodeCluster, ns: str, echo: dict[str, Any]) -> None:
    out = nc.kubectl("logs", "-n", ns, "echo")
    assert "test-echo listening on 8080 as uid 65532" in out, out


def test_kubernetes_service_reaches_the_apiserver(nc: NodeCluster) -> None:
    """10.96.0.1:443 -> kube-proxy DNAT -> 172.31.200.1:<apiserver port>, from inside the namespace."""

    def version() -> dict[str, Any] | None:
        r = nc.node.nsenter("curl", "-sS", "--max-time", "3", "--cacert", str(nc.cp.pki_dir / "ca.crt"),
                            "https://10.96.0.1:443/version", check=False)  # fmt: skip
        return json.loads(r.stdout) if r.returncode == 0 else None

    v = nc.wait("https://10.96.0.1/version from the node's namespace", version, timeout=60)
    assert v["gitVersion"] == controlplane.read_versions()["K8S_VERSION"]
    eps = json.loads(nc.kubectl("get", "endpoints", "-n", "default", "kubernetes", "-o", "json"))
    assert eps["subsets"][0]["addresses"][0]["ip"] == controlplane.NODE_HOST_IP


def test_missing_image_fails_fast(nc: NodeCluster, ns: str) -> None:
    t0 = time.monotonic()
    nc.kubectl("apply", "-n", ns, "-f", "-", input=_pod("missing", "does-not/exist:1"))

    def waiting() -> dict[str, Any] | None:
        statuses = nc.pod(ns, "missing")["status"].get("containerStatuses") or []
        w = statuses[0]["state"].get("waiting", {}) if statuses else {}
        return w if w.get("reason") in ("ErrImagePull", "ImagePullBackOff") else None

    w = nc.wait("ErrImagePull/ImagePullBackOff", waiting, timeout=60)
    print(f"\nmissing image -> {w['reason']} in {time.monotonic() - t0:.1f}s: {w.get('message', '')[:300]}")


def test_teardown_leaves_nothing(nc: NodeCluster) -> None:
    pids = dict(nc.node.pids) | dict(nc.cp.pids)
    workdir = nc.cp.workdir
    # Another test may start the next node the moment this one is gone (same names): what must be
    # gone is this namespace (made by this process: its owner file names it) and this veth (its
    # ifindex: the host never reuses one soon).
    veth = _ifindex(node_mod.HOST_IF)
    assert veth is not None and node_mod._read_owner(node_mod.NETNS) == os.getpid()
    nc.stopped = True
    t0 = time.monotonic()
    node_mod.stop_node_cluster(nc.cp, nc.node, keep_logs=True)
    print(f"\nstop: {time.monotonic() - t0:.1f}s; node phases {nc.node.stop_timings}")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert not node_mod.NodeNetwork().exists() or node_mod._read_owner(node_mod.NETNS) != os.getpid(), netns
    assert _ifindex(node_mod.HOST_IF) != veth, links
    if not node_mod.NodeNetwork().exists():  # nobody started another node meanwhile: no name left
        assert node_mod.NETNS not in netns, netns
        assert not [x for x in links.splitlines() if ": lt-" in x], links
    alive = {n: p for n, p in pids.items() if controlplane._pid_alive(p)}
    assert not alive, alive
    assert node_mod._mounts_under([workdir, node_mod.containerd_root()]) == []
    assert _host_forward() == nc.host_forward, FORWARD_CHANGED


def _ifindex(name: str) -> int | None:
    try:
        return int(Path("/sys/class/net", name, "ifindex").read_text())
    except (OSError, ValueError):
        return None
