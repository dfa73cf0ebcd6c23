"""Cluster DNS and NetworkPolicy enforcement on the real node (tests/cluster/addons.py).

The module starts its own node-mode control plane and the real node ``llmtrain-node``
(``node.start_node_cluster``), which starts the addons: CoreDNS on 172.31.200.2:53 and
kube-network-policies, both inside the node's network namespace. Then, from real pods:

- a headless Service name resolves to its pod's IP, a ClusterIP Service name (full and short,
  through the pod's search path) to its ClusterIP, ``kubernetes.default`` to 10.96.0.1;
- a name outside ``cluster.local`` fails at once (REFUSED: CoreDNS has no upstream), and no DNS
  packet for any other resolver appears in the node's namespace;
- a NetworkPolicy admitting only pods labelled ``a=b`` lets the ``a=b`` pod connect and makes the
  other one time out — to the pod IP and through the ClusterIP Service; deleting it lets both
  connect again.

The clients are pods from a tiny static C program (``probe``: serve, connect, resolve) packed
into a one-layer image with ``tests/cluster/ociimage.py`` and imported into the node's
containerd: the policy engine does not judge what the node's own root processes send
(upstream's rule, so kubelet probes pass), so ``nsenter`` from the host would prove nothing.

Skipped, with the reason, when not root, when a binary or package is missing
(``tests/cluster/build.sh all``, ``make apt``), without gcc or Debian's ``nftables``, or while
another node runs. ``tcpdump`` and ``dig``, when installed, add the packet capture and the
REFUSED check.
"""

from __future__ import annotations

import _socket
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import addons  # noqa: E402
import controlplane  # noqa: E402
import node as node_mod  # noqa: E402
import ociimage  # noqa: E402

pytestmark = pytest.mark.cluster

T = TypeVar("T")
NS = "addons"
PROBE_IMAGE = "llmtrain.dev/test-netprobe:1"
LINK = ipaddress.ip_network(f"{controlplane.NODE_HOST_IP}/{node_mod.LINK_PREFIX}", strict=False)
POD_NET = ipaddress.ip_network(node_mod.POD_CIDR)
# How long a refused connection may take to "time out": well past a pod-to-pod round trip on
# one bridge (well under 10 ms), short enough for four checks.
CONNECT_MS = 2000

PROBE_C = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void bye(int sig) { (void)sig; _exit(0); }

static int serve(int port) {
  int one = 1, s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET; a.sin_port = htons(port); a.sin_addr.s_addr = htonl(INADDR_ANY);
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) { perror("bind/listen"); return 1; }
  printf("probe serving on %d\n", port); fflush(stdout);
  for (;;) {
    char buf[1024], host[256] = "", out[512];
    int c = accept(s, 0, 0);
    if (c < 0) continue;
    if (read(c, buf, sizeof buf) < 0) { close(c); continue; }
    gethostname(host, sizeof host);
    int n = snprintf(out, sizeof out, "HTTP/1.0 200 OK\r\n\r\nhello from %s\n", host);
    if (write(c, out, n) < 0) perror("write");
    close(c);
  }
}

/* exit 0: connected and answered; 3: timed out; 1: refused or another error */
static int connect_to(const char *ip, int port, int ms) {
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET; a.sin_port = htons(port);
  if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) { printf("bad address %s\n", ip); return 1; }
  int s = socket(AF_INET, SOCK_STREAM, 0);
  fcntl(s, F_SETFL, O_NONBLOCK);
  if (connect(s, (struct sockaddr *)&a, sizeof a) && errno != EINPROGRESS) { printf("error: %s\n", strerror(errno)); return 1; }
  struct pollfd p = {s, POLLOUT, 0};
  if (poll(&p, 1, ms) == 0) { printf("timeout after %d ms\n", ms); return 3; }
  int err = 0; socklen_t len = sizeof err;
  getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len);
  if (err) { printf("error: %s\n", strerror(err)); return 1; }
  fcntl(s, F_SETFL, 0);
  const char *req = "GET / HTTP/1.0\r\n\r\n";
  if (write(s, req, strlen(req)) < 0) { printf("error: write %s\n", strerror(errno)); return 1; }
  char buf[512]; int n, total = 0;
  p.events = POLLIN;
  while (total < (int)sizeof buf - 1 && poll(&p, 1, ms) > 0 && (n = read(s, buf + total, sizeof buf - 1 - total)) > 0) total += n;
  buf[total] = 0;
  char *body = strstr(buf, "\r\n\r\n");
  printf("connected: %s", body ? body + 4 : buf);
  return 0;
}

/* exit 0: resolved (one address a line); 2: not resolved */
static int resolve(const char *name) {
  struct addrinfo hints = {0}, *res, *r;
  hints.ai_family = AF_INET; hints.ai_socktype = SOCK_STREAM;
  int e = getaddrinfo(name, NULL, &hints, &res);
  if (e) { printf("unresolved: %s\n", gai_strerror(e)); return 2; }
  for (r = res; r; r = r->ai_next) {
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &((struct sockaddr_in *)r->ai_addr)->sin_addr, ip, sizeof ip);
    printf("%s\n", ip);
  }
  freeaddrinfo(res);
  return 0;
}

int main(int argc, char **argv) {
  signal(SIGTERM, bye); signal(SIGINT, bye);  /* PID 1 of a container has no default action */
  if (argc == 3 && !strcmp(argv[1], "serve")) return serve(atoi(argv[2]));
  if (argc == 5 && !strcmp(argv[1], "connect")) return connect_to(argv[2], atoi(argv[3]), atoi(argv[4]));
  if (argc == 3 && !strcmp(argv[1], "resolve")) return resolve(argv[2]);
  if (argc == 2 && !strcmp(argv[1], "sleep")) { for (;;) pause(); }
  fprintf(stderr, "usage: probe serve PORT | connect IP PORT MS | resolve NAME | sleep\n");
  return 64;
}
"""


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 60) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module", autouse=True)
def _allow_the_node_link() -> Iterator[None]:
    """The session guard refuses private addresses; the veth link 172.31.200.0/30 is this
    machine's own (the node-mode apiserver, CoreDNS's /ready), so connections there go through."""
    import socket

    guarded = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        if isinstance(address, tuple) and address and _on_link(address[0]):
            _socket.socket.connect(self, address)
            return
        guarded(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        socket.socket.connect = guarded  # type: ignore[method-assign]


def _on_link(host: Any) -> bool:
    try:
        return ipaddress.ip_address(host) in LINK
    except ValueError:
        return False


@dataclass
class Cluster:
    cp: controlplane.ControlPlane
    node: node_mod.Node
    probe_image_seconds: float

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return self.cp.kubectl(*args, check=check, input=input).stdout

    def apply(self, obj: dict[str, Any]) -> None:
        self.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(obj))

    def probe(self, pod: str, *args: str) -> tuple[int, str, float]:
        """`/probe args` in `pod` (kubectl exec): exit code, output, seconds."""
        t0 = time.monotonic()
        r = self.cp.kubectl("exec", "-n", NS, pod, "--", "/probe", *args, check=False, timeout=60)
        return r.returncode, (r.stdout + r.stderr).strip(), time.monotonic() - t0

    def pod(self, name: str) -> dict[str, Any]:
        pod: dict[str, Any] = json.loads(self.kubectl("get", "pod", "-n", NS, name, "-o", "json"))
        return pod


def _skip_reason() -> str | None:
    reason = node_mod.node_skip_reason()
    if reason:
        return reason
    missing = addons.missing_addon_binaries()
    if missing:
        return "addons not built (tests/cluster/build.sh coredns netpol): " + ", ".join(missing)
    if shutil.which("gcc") is None:
        return "gcc not installed: the probe image is compiled here (make apt)"
    if not os.access(addons.NFT, os.X_OK):
        return f"{addons.NFT} not installed (Debian nftables): the engine's table is read with it"
    live = node_mod.NodeNetwork().in_use()
    if live:  # one node per machine (one namespace name, one veth address pair)
        return f"a node runs in network namespace {node_mod.NETNS} (PIDs {live}): run.sh down"
    return None


def _probe_pod(name: str, labels: dict[str, str], *args: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True},
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": PROBE_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    **({"args": list(args)} if args else {}),
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("addons")
    try:
        cp, node = node_mod.start_node_cluster(work / "cluster", die_with_parent=True)
    except node_mod.NodeError as e:
        if "a node runs" in str(e):  # another test's node won the start
            pytest.skip(str(e))
        raise
    try:
        t0 = time.monotonic()
        d = work / "probe"
        d.mkdir()
        (d / "probe.c").write_text(PROBE_C)
        # static: the image holds this one file
        subprocess.run(
            ["gcc", "-Os", "-static", "-o", str(d / "probe"), str(d / "probe.c")],
            check=True,
            capture_output=True,
        )
        (d / "probe.tar").write_bytes(
            ociimage.oci_archive(
                PROBE_IMAGE, [ociimage.ImageFile(d / "probe", "/probe")], entrypoint=["/probe"], cmd=["sleep"]
            )
        )
        node.ctr("images", "import", str(d / "probe.tar"))
        c = Cluster(cp, node, time.monotonic() - t0)
        c.kubectl("create", "namespace", NS)
        wait_for(
            "ServiceAccount addons/default", lambda: c.kubectl("get", "sa", "-n", NS, "default", check=False)
        )
        c.apply(_probe_pod("server", {"app": "server"}, "serve", "8080"))
        c.apply(_probe_pod("client-ab", {"a": "b"}))
        c.apply(_probe_pod("client-other", {"a": "c"}))
        for svc in (
            {"metadata": {"name": "server"}, "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080}]}},
            {"metadata": {"name": "server-headless"}, "spec": {"clusterIP": "None", "selector": {"app": "server"}, "ports": [{"port": 8080}]}},
        ):  # fmt: skip
            c.apply({"apiVersion": "v1", "kind": "Service", **svc})
        c.kubectl("wait", "-n", NS, "--for=condition=Ready", "pod", "--all", "--timeout=120s")
        yield c
    finally:
        node_mod.stop_node_cluster(cp, node, keep_logs=True)


def _netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_addons_run_inside_the_node_namespace(cluster: Cluster) -> None:
    state = json.loads((cluster.node.workdir / addons.STATE_FILE).read_text())
    assert set(state) == {"coredns", "kube-network-policies"}
    netns = os.stat(cluster.node.netns_path).st_ino
    for name, entry in state.items():
        pid = entry["pid"]
        assert controlplane._pid_alive(pid) and controlplane._pid_is(pid, entry["exe"]), name
        assert _netns_inode(pid) == netns, f"{name} is not in {node_mod.NETNS}"
    # every CoreDNS listener is on the node's address (bind), none on a wildcard
    ss = cluster.node.nsenter("ss", "-Htulnp").stdout
    listeners = [line.split()[4] for line in ss.splitlines() if f"pid={state['coredns']['pid']}," in line]
    assert listeners and all(a.startswith(f"{controlplane.NODE_IP}:") for a in listeners), ss
    assert {f"{controlplane.NODE_IP}:53"} <= set(listeners)
    # the engine's table is in the node's namespace, not the host's
    table = addons.nft_table(cluster.node.netns)
    assert "queue num 100" in table, table
    host = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert addons.NETPOL_TABLE not in host, host
    print(f"\nnode start incl. addons: {cluster.node.timings}")


def test_pods_resolve_service_names(cluster: Cluster) -> None:
    server_ip = cluster.pod("server")["status"]["podIP"]
    assert ipaddress.ip_address(server_ip) in POD_NET
    cluster_ip = json.loads(cluster.kubectl("get", "svc", "-n", NS, "server", "-o", "json"))["spec"][
        "clusterIP"
    ]
    resolv = cluster.kubectl("exec", "-n", NS, "client-ab", "--", "/probe", "resolve", "localhost")
    assert resolv.strip() == "127.0.0.1", resolv
    expect = {
        f"server-headless.{NS}.svc.cluster.local": server_ip,  # headless: the pod's own IP
        f"server.{NS}.svc.cluster.local": cluster_ip,
        "server": cluster_ip,  # the search path the kubelet wrote (<ns>.svc.cluster.local first)
        "kubernetes.default": "10.96.0.1",
    }
    for name, ip in expect.items():
        rc, out, secs = cluster.probe("client-ab", "resolve", name)
        assert (rc, out) == (0, ip), (name, rc, out)
        print(f"\n{name} -> {out} ({secs:.2f}s incl. kubectl exec)")


def test_other_names_fail_fast_and_stay_on_the_node(cluster: Cluster) -> None:
    tcpdump = shutil.which("tcpdump")
    cap = None
    if tcpdump:
        # Inside the node's namespace, on every interface (lt-node, lt-cni0, the pods' veths):
        # a DNS packet to or from anything but CoreDNS's address would be a query on its way
        # out. (On the host's own interfaces this proves nothing: the host resolves for itself.)
        cap = subprocess.Popen(
            node_mod.nsenter_argv(
                tcpdump,
                "-i",
                "any",
                "-n",
                "-l",
                f"port 53 and not host {controlplane.NODE_IP}",
                netns=node_mod.NETNS,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)
    try:
        for name in ("example.com", "pypi.org"):
            rc, out, secs = cluster.probe("client-ab", "resolve", name)
            assert rc == 2 and out.startswith("unresolved"), (name, rc, out)
            assert secs < 5, f"{name}: {secs:.1f}s (a resolver waiting on an upstream?)"
            print(f"\n{name} -> {out} ({secs:.2f}s incl. kubectl exec)")
        if shutil.which("dig"):
            r = cluster.node.nsenter("dig", "+tries=1", "+time=2", f"@{controlplane.NODE_IP}", "example.com")
            assert "status: REFUSED" in r.stdout, r.stdout
    finally:
        if cap is not None:
            time.sleep(0.5)
            cap.terminate()
            packets, err = cap.communicate(timeout=10)
            assert packets.strip() == "", (
                f"DNS packets for another resolver in the node's namespace:\n{packets}"
            )
            print(f"tcpdump in {node_mod.NETNS}: {err.strip().splitlines()[-3:]}")


def _connect(cluster: Cluster, pod: str, ip: str, port: int) -> tuple[int, str]:
    rc, out, _ = cluster.probe(pod, "connect", ip, str(port), str(CONNECT_MS))
    return rc, out


def test_network_policy_admits_only_matching_pods(cluster: Cluster) -> None:
    # Negative control (planted and run by hand on 2026-12-07): the wait for the engine's set
    # replaced by stopping the engine by PID right after `apply` (its table goes with it), the
    # policy stayed in the apiserver, and this test failed with "policy present: client-other
    # must time out (10.245.0.2): 0 connected: hello from server".
    server_ip = cluster.pod("server")["status"]["podIP"]
    svc = json.loads(cluster.kubectl("get", "svc", "-n", NS, "server", "-o", "json"))["spec"]["clusterIP"]
    targets = [(server_ip, 8080), (svc, 80)]  # the pod, and the Service through kube-proxy's DNAT

    # Without a policy both clients connect: what the timeouts below are measured against.
    for client in ("client-ab", "client-other"):
        for ip, port in targets:
            assert _connect(cluster, client, ip, port) == (0, "connected: hello from server"), (client, ip)

    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "only-a-b"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"a": "b"}}}]}],
        },
    }
    cluster.apply(policy)
    t0 = time.monotonic()
    # the engine queues traffic of pods a policy selects: the server's IP enters its set
    wait_for(
        "server IP in the engine's nftables set", lambda: server_ip in addons.nft_table(cluster.node.netns)
    )
    in_set = time.monotonic() - t0
    for ip, port in targets:
        rc, out = _connect(cluster, "client-other", ip, port)
        assert rc == 3 and out.startswith("timeout"), (
            f"policy present: client-other must time out ({ip}): {rc} {out}"
        )
        assert _connect(cluster, "client-ab", ip, port) == (0, "connected: hello from server"), ip
    print(f"\npolicy applied -> server IP in the engine's set after {in_set:.1f}s; client-other: {out}")

    cluster.kubectl("delete", "networkpolicy", "-n", NS, "only-a-b")
    wait_for(
        "server IP out of the engine's set", lambda: server_ip not in addons.nft_table(cluster.node.netns)
    )
    for ip, port in targets:
        assert _connect(cluster, "client-other", ip, port) == (0, "connected: hello from server"), ip
