"""Cluster DNS and the NetworkPolicy engine of the real test node (``node.py``).

Contract with ``node.py`` (``Node.start`` calls ``start_addons(node)`` when this file exists,
and ``Node.stop`` calls what it returned):

- ``start_addons(node) -> Addons`` reads only these attributes of ``node``:
  ``netns`` (network namespace name under /var/run/netns), ``kubeconfig`` (an admin kubeconfig
  whose server the namespace can reach: https://172.31.200.1:<port> in node mode), ``workdir``
  (a directory of this run; logs go to ``workdir/logs/<name>.log``, the Corefile and
  ``addons.json`` to ``workdir``), ``name`` (the Node object's name) and ``ip`` (the node's
  address in the namespace, 172.31.200.2: where CoreDNS listens and the kubelet's clusterDNS).
  Optional: ``die_with_parent`` (bool; default False).
- It returns once CoreDNS answers ``/ready`` (its kubernetes plugin has synced) and the policy
  engine has programmed its nftables table; it raises ``AddonError`` (after stopping what it
  started) otherwise.
- ``Addons`` is a list of the started ``subprocess.Popen`` objects with a ``stop()`` method:
  both stop every process by PID (SIGTERM, then SIGKILL), checking ``/proc/PID/exe`` first.
- ``stop_addons(node_or_addons)`` does the same from another process (``run.sh down``): it
  reads the PIDs from ``workdir/addons.json``.

The same pieces with plain arguments, for use without a ``Node``: ``start_coredns``,
``start_netpol``, ``start_addons_in``; the Corefile comes from the pure ``corefile()``.

What runs, and why (no packet may leave the machine):

- **CoreDNS** (``build.sh coredns``; v1.15.0 with only bind, ready, health, errors,
  loadbalance, cache and kubernetes compiled in: no ``forward``, no plugin that sends a query
  anywhere). It serves ``cluster.local`` and the reverse zones from the apiserver, and answers
  REFUSED for any other name, at once. It binds the node's address only.
- **kube-network-policies** (``build.sh netpol``; sigs.k8s.io/kube-network-policies v0.8.0,
  the engine kind ships). It runs as a process in the node's namespace, as its DaemonSet does
  with hostNetwork, and enforces ``networking.k8s.io/v1`` NetworkPolicies — ingress and
  egress — for the pods of this node: the first packet of each connection to or from a pod
  that a policy selects goes to an nfqueue (nftables table ``inet kube-network-policies``,
  postrouting hook), the engine evaluates the policies in user space and accepts or drops it.
  Chosen because it is small (one process, nftables + nfqueue, which this kernel offers), has
  no reported security advisory, works with any CNI (the node's is the plain ``bridge``), and
  reads the apiserver through a kubeconfig; kube-router v2.1.0, the other Go-module engine
  served here, has reported flaws. Traffic the node's own root processes send is not
  evaluated (upstream's rule: kubelet probes must pass), so a policy test needs client pods.

Processes are entered into the namespace with ``nsenter --net=`` (``ip netns exec`` would
remount /sys), run in their own session, and, with ``die_with_parent``, get SIGTERM when the
Python process that started them dies.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported by path (node.py, tests): find controlplane beside us
    sys.path.insert(0, str(HERE))

from controlplane import _die_with_parent, _pid_alive, _pid_is, cache_dir, read_versions, stop_pid, tail  # noqa: E402

NETNS_DIR = Path("/var/run/netns")
NSENTER = "/usr/bin/nsenter"
NFT = "/usr/sbin/nft"
CLUSTER_DOMAIN = "cluster.local"
DNS_PORT = 53
# CoreDNS's own defaults for health and ready, bound to the node's address only.
HEALTH_PORT = 8080
READY_PORT = 8181
# Seconds a client may cache an answer; short, so a test sees a changed Service quickly.
DNS_TTL = 5
NETPOL_TABLE = "kube-network-policies"
NETPOL_QUEUE = 100
STATE_FILE = "addons.json"


class AddonError(RuntimeError):
    pass


class NodeLike(Protocol):
    """What ``start_addons`` reads of ``node.Node`` (see the module docstring)."""

    @property
    def netns(self) -> str: ...
    @property
    def kubeconfig(self) -> Path: ...
    @property
    def name(self) -> str: ...
    @property
    def ip(self) -> str: ...

    workdir: Path


# --------------------------------------------------------------------------- binaries


def addon_binaries() -> dict[str, Path]:
    """The two Go-built binaries (may not exist: ``tests/cluster/build.sh coredns netpol``)."""
    v = read_versions()
    b = cache_dir() / "bin"
    return {
        "coredns": b / f"coredns-{v['COREDNS_VERSION']}" / "coredns",
        "kube-network-policies": b
        / f"kube-network-policies-{v['KUBE_NETWORK_POLICIES_VERSION']}"
        / "kube-network-policies",
    }


def missing_addon_binaries() -> list[str]:
    return [str(p) for p in addon_binaries().values() if not os.access(p, os.X_OK)]


# --------------------------------------------------------------------------- pure builders

_TOKEN = re.compile(r"^[^\s{}\"#;]+$")


def _token(value: str, what: str) -> str:
    """A Corefile token: no whitespace, braces, quotes or comment marks (caddyfile syntax)."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} cannot be written into a Corefile")
    return value


def corefile(
    *,
    listen_ip: str,
    kubeconfig: Path,
    dns_port: int = DNS_PORT,
    health_port: int = HEALTH_PORT,
    ready_port: int = READY_PORT,
    cluster_domain: str = CLUSTER_DOMAIN,
    ttl: int = DNS_TTL,
) -> str:
    """The Corefile: one server for the cluster domain and the reverse zones, nothing else.

    Queries for any other zone match no server block, so CoreDNS answers REFUSED itself: there
    is no ``forward`` (nor is it compiled into the binary). ``bind`` keeps every listener on
    ``listen_ip``; ``pods insecure`` answers ``a-b-c-d.<ns>.pod.<domain>`` (what kube-dns did).
    """
    ip = _token(listen_ip, "listen address")
    domain = _token(cluster_domain.strip("."), "cluster domain")
    cfg = _token(str(kubeconfig), "kubeconfig path")
    zones = f"{domain} in-addr.arpa ip6.arpa"
    server = " ".join(f"{z}:{dns_port}" for z in zones.split())
    return (
        f"{server} {{\n"
        f"    bind {ip}\n"
        "    errors\n"
        f"    health {ip}:{health_port}\n"
        f"    ready {ip}:{ready_port}\n"
        f"    kubernetes {zones} {{\n"
        f"        kubeconfig {cfg}\n"
        "        pods insecure\n"
        f"        ttl {ttl}\n"
        "    }\n"
        f"    cache {ttl}\n"
        "    loadbalance\n"
        "}\n"
    )


def coredns_args(corefile_path: Path) -> list[str]:
    return ["-conf", str(corefile_path)]


def netpol_args(*, kubeconfig: Path, node_name: str, queue: int = NETPOL_QUEUE) -> list[str]:
    """The engine's flags: its node (whose pods it guards), the apiserver, its nfqueue."""
    return [
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={node_name}",
        f"--nfqueue-id={queue}",
        # fail closed: a packet the engine cannot judge (it is not running) is dropped
        "--fail-open=false",
        # v=2 logs each verdict (one line per new connection): what a failed test needs
        "--v=2",
    ]


def nsenter_argv(netns: str, *argv: str) -> list[str]:
    """`argv` inside `netns` (``nsenter --net``: ``ip netns exec`` remounts /sys)."""
    return [NSENTER, f"--net={NETNS_DIR / netns}", "--", *argv]


# --------------------------------------------------------------------------- processes


class Addons(list[subprocess.Popen[bytes]]):
    """The started addon processes; ``stop()`` ends each by PID (last started first)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.workdir = workdir
        self.names: dict[int, str] = {}
        self.exes: dict[int, str] = {}

    @property
    def pids(self) -> dict[str, int]:
        return {self.names[p.pid]: p.pid for p in self}

    def add(self, name: str, proc: subprocess.Popen[bytes], exe: Path) -> None:
        self.append(proc)
        self.names[proc.pid] = name
        self.exes[proc.pid] = os.path.realpath(exe)
        self.save()

    def save(self) -> None:
        state = {self.names[p.pid]: {"pid": p.pid, "exe": self.exes[p.pid]} for p in self}
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=2))

    def stop(self) -> None:
        for p in reversed(self):
            # the engine deletes its nftables table on SIGTERM: give it the time it takes
            stop_pid(p.pid, self.exes[p.pid], timeout=15)
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self.clear()
        (self.workdir / STATE_FILE).unlink(missing_ok=True)


def _spawn(
    name: str,
    exe: Path,
    args: list[str],
    *,
    netns: str | None,
    workdir: Path,
    die_with_parent: bool,
) -> subprocess.Popen[bytes]:
    log_dir = workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = [str(exe), *args]
    if netns is not None:
        argv = nsenter_argv(netns, *argv)
    with open(log_dir / f"{name}.log", "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        # nsenter execs the binary in place: the PID (and /proc/PID/exe) is the addon's own
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
            # a minimal environment: no proxy variable can reach the addons
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(workdir)},
        )


def _wait(
    what: str, ok: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AddonError(f"{what}: the process exited ({proc.returncode}); last log lines:\n{tail(log)}")
        try:
            if ok():
                return
        except (OSError, urllib.error.URLError, subprocess.SubprocessError):
            pass
        time.sleep(0.2)
    raise AddonError(f"timed out after {timeout:.0f}s waiting for {what}; last log lines:\n{tail(log)}")


# No proxy, whatever the environment says: the probe goes to the addon's own address only.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def route_stays_local(ip: str) -> bool:
    """True if this namespace reaches `ip` without a gateway (loopback, or a directly attached
    link such as the node's veth). The node's addresses are not reserved: when the veth is
    gone (a node stopped, or torn down by another run), 172.31.200.2 routes through the
    default gateway, and a probe there would leave the machine."""
    r = subprocess.run(["ip", "-o", "route", "get", ip], capture_output=True, text=True, timeout=10)
    return r.returncode == 0 and " via " not in r.stdout


def _http_ok(ip: str, port: int, path: str) -> bool:
    if not route_stays_local(ip):
        raise AddonError(f"{ip} is not on a local link (its route has a gateway): refusing to probe it")
    with _DIRECT.open(f"http://{ip}:{port}{path}", timeout=2) as r:
        return int(r.status) == 200


def start_coredns(
    *,
    netns: str | None,
    kubeconfig: Path,
    workdir: Path,
    listen_ip: str,
    dns_port: int = DNS_PORT,
    health_port: int = HEALTH_PORT,
    ready_port: int = READY_PORT,
    die_with_parent: bool = False,
    timeout: float = 60,
) -> subprocess.Popen[bytes]:
    """CoreDNS on `listen_ip` in `netns` (None: this namespace); returns once /ready says 200.

    `listen_ip` must be reachable from here for the readiness probe: the node's address
    (172.31.200.2, across the veth) or 127.0.0.1 when `netns` is None.
    """
    exe = addon_binaries()["coredns"]
    if not os.access(exe, os.X_OK):
        raise AddonError(f"{exe} not built (tests/cluster/build.sh coredns)")
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "Corefile"
    path.write_text(
        corefile(
            listen_ip=listen_ip,
            kubeconfig=kubeconfig,
            dns_port=dns_port,
            health_port=health_port,
            ready_port=ready_port,
        )
    )
    proc = _spawn(
        "coredns", exe, coredns_args(path), netns=netns, workdir=workdir, die_with_parent=die_with_parent
    )
    try:
        _wait(
            f"CoreDNS ready on {listen_ip}:{ready_port}",
            lambda: _http_ok(listen_ip, ready_port, "/ready"),
            proc,
            workdir / "logs" / "coredns.log",
            timeout,
        )
    except BaseException:
        stop_pid(proc.pid, str(exe))
        raise
    return proc


def nft_table(netns: str, table: str = NETPOL_TABLE) -> str:
    """``nft list table inet <table>`` inside `netns` ('' when the table does not exist)."""
    r = subprocess.run(
        nsenter_argv(netns, NFT, "list", "table", "inet", table), capture_output=True, text=True, timeout=10
    )
    return r.stdout if r.returncode == 0 else ""


def start_netpol(
    *,
    netns: str,
    kubeconfig: Path,
    workdir: Path,
    node_name: str,
    die_with_parent: bool = False,
    timeout: float = 60,
) -> subprocess.Popen[bytes]:
    """The NetworkPolicy engine inside `netns`; returns once its nftables table exists there.

    Never in the host's namespace: the engine programs the netfilter tables of the namespace it
    runs in, and the host's are not the test's to change.
    """
    if not netns:
        raise AddonError("the NetworkPolicy engine runs inside a network namespace only")
    exe = addon_binaries()["kube-network-policies"]
    if not os.access(exe, os.X_OK):
        raise AddonError(f"{exe} not built (tests/cluster/build.sh netpol)")
    workdir.mkdir(parents=True, exist_ok=True)
    proc = _spawn(
        "kube-network-policies",
        exe,
        netpol_args(kubeconfig=kubeconfig, node_name=node_name),
        netns=netns,
        workdir=workdir,
        die_with_parent=die_with_parent,
    )
    log = workdir / "logs" / "kube-network-policies.log"

    def programmed() -> bool:
        if os.access(NFT, os.X_OK):
            return "queue" in nft_table(netns)
        # without Debian's nftables package: the engine logs this once its table is written
        return "Syncing nftables rules" in tail(log, 200)

    try:
        _wait(f"nftables table inet {NETPOL_TABLE} in {netns}", programmed, proc, log, timeout)
    except BaseException:
        stop_pid(proc.pid, str(exe))
        raise
    return proc


def start_addons_in(
    *,
    netns: str,
    kubeconfig: Path,
    workdir: Path,
    node_name: str,
    listen_ip: str,
    die_with_parent: bool = False,
    timeout: float = 60,
) -> Addons:
    """CoreDNS on `listen_ip`:53 and the NetworkPolicy engine, both inside `netns`."""
    missing = missing_addon_binaries()
    if missing:
        raise AddonError("not built (tests/cluster/build.sh coredns netpol): " + ", ".join(missing))
    bins = addon_binaries()
    addons = Addons(workdir)
    try:
        addons.add(
            "coredns",
            start_coredns(
                netns=netns,
                kubeconfig=kubeconfig,
                workdir=workdir,
                listen_ip=listen_ip,
                die_with_parent=die_with_parent,
                timeout=timeout,
            ),
            bins["coredns"],
        )
        addons.add(
            "kube-network-policies",
            start_netpol(
                netns=netns,
                kubeconfig=kubeconfig,
                workdir=workdir,
                node_name=node_name,
                die_with_parent=die_with_parent,
                timeout=timeout,
            ),
            bins["kube-network-policies"],
        )
    except BaseException:
        addons.stop()
        raise
    return addons


def start_addons(node: NodeLike) -> Addons:
    """What ``node.Node.start`` calls: the addons of `node` (attributes: see the module docstring)."""
    return start_addons_in(
        netns=node.netns,
        kubeconfig=Path(node.kubeconfig),
        workdir=Path(node.workdir),
        node_name=node.name,
        listen_ip=node.ip,
        die_with_parent=bool(getattr(node, "die_with_parent", False)),
    )


def stop_addons(target: Addons | Any) -> None:
    """Stop by PID: an ``Addons``, or (from another process) those recorded in ``workdir``."""
    if isinstance(target, Addons):
        target.stop()
        return
    state_file = Path(target.workdir) / STATE_FILE
    if not state_file.exists():
        return
    state: dict[str, dict[str, Any]] = json.loads(state_file.read_text())
    for entry in reversed(list(state.values())):
        pid, exe = int(entry["pid"]), str(entry["exe"])
        if _pid_alive(pid) and _pid_is(pid, exe):
            stop_pid(pid, exe, timeout=15)
    state_file.unlink(missing_ok=True)


__all__ = [
    "AddonError",
    "Addons",
    "addon_binaries",
    "corefile",
    "missing_addon_binaries",
    "netpol_args",
    "nft_table",
    "start_addons",
    "start_addons_in",
    "start_coredns",
    "start_netpol",
    "stop_addons",
]
