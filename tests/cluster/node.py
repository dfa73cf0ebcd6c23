"""A real Kubernetes node beside the test control plane, inside a network namespace.

Why: kwok's fake nodes run nothing. This node runs real containers (containerd + runc, the
kubelet and kube-proxy built from the control plane's ``k8s.io/kubernetes`` version) so that
images, commands, mounts, Services and DNS are exercised for real — without any packet leaving
the machine:

- Everything of the node (containerd, kubelet, kube-proxy, the addons, every pod) lives in the
  network namespace ``llmtrain-node`` (``/var/run/netns/llmtrain-node``), which has **no default
  route**. Its only link is the veth pair ``lt-host`` 172.31.200.1/30 (host) — ``lt-node``
  172.31.200.2/30 (namespace). The control plane's apiserver binds 172.31.200.1 (node mode of
  ``controlplane.py``); the host keeps ``net.ipv4.ip_forward`` as it is (0) and gets no iptables
  rule, no route: forwarding and NAT are per-namespace settings made inside ``llmtrain-node``.
- Pods: CNI ``bridge`` (``lt-cni0``, 10.245.0.0/24, gateway 10.245.0.1) with ``ipMasq``, so pod
  traffic to 172.31.200.1 leaves the namespace as 172.31.200.2 and the host needs no route back;
  ``host-local`` IPAM keeps its leases in the run directory; ``portmap``; containerd adds
  ``loopback``. Debian's plugins in ``/usr/lib/cni``.
- Services: kube-proxy (iptables mode, inside the namespace; clusterCIDR 10.245.0.0/24). The
  ``kubernetes`` Service 10.96.0.1:443 DNATs to the apiserver on 172.31.200.1, for pods and for
  processes entered into the namespace alike.
- Images: no registry is reachable (no route; a pull of a missing image fails at once). The
  pause image (``build.sh node``) and every ``$LLMTRAIN_CACHE/images/*.tar`` (docker-archive or OCI
  archive, written by ``make images``) are imported with ``ctr -n k8s.io images import`` when the
  tar is newer than its import stamp. containerd's root (the image store) is kept under
  ``$LLMTRAIN_CACHE/node/containerd`` so imports persist across runs; its state, the kubelet's
  root dir, the CNI leases and the pods' network-namespace mounts are per run (``Node.workdir``).
- This machine: cgroup v1 and PID 1 not systemd -> ``cgroupfs`` driver and ``failCgroupV1: false``;
  the sandbox refuses a negative ``oom_score_adj`` -> ``restrict_oom_score_adj = true``;
  containerd (and so every container) gets RLIMIT_NOFILE 1048576 so a pod's ``ulimit -n 65536``
  succeeds — where the machine allows it: raising a hard limit needs CAP_SYS_RESOURCE, and a
  sandbox whose bounding set lacks it (as the CI machine's, hard limit 20000) caps every process,
  containers included, at the hard limit it was given (``nofile_limit()`` says what pods get). Processes are entered into the namespace with ``nsenter --net=`` (``ip netns exec``
  remounts /sys and hides the cgroup mounts from the kubelet).
- Cluster DNS is ``172.31.200.2`` (the node's own address): ``tests/cluster/addons.py``, when it
  exists and defines ``start_addons(node)``, starts CoreDNS there and the NetworkPolicy engine;
  ``stop_addons(node)``, if defined, is called on stop. Addons may start their processes with
  ``Node.spawn`` so that ``Node.stop`` ends them by PID.

Stop (``Node.stop``): addons, kubelet and kube-proxy by PID; every container and task through
``ctr``; containerd by PID; any process left in the node's namespaces (by namespace inode);
every mount under the run directory; then the namespace and the veth. Nothing else on the host
is touched.

Python API::

    from node import start_node_cluster, stop_node_cluster
    cp, node = start_node_cluster(Path("/tmp/x"))   # network, control plane (node mode), node Ready
    cp.kubectl("get", "nodes")                       # llmtrain-node Ready, no fake nodes
    node.nsenter("curl", "-sk", "https://10.96.0.1/healthz")  # run a command inside the namespace
    stop_node_cluster(cp, node)                      # everything by PID; namespace and veth gone

CLI: ``tests/cluster/run.sh up --node`` / ``status`` / ``down`` (see ``controlplane.py``).
Needs root, ``build.sh node`` and the Debian packages ``containerd runc
containernetworking-plugins iptables conntrack``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script or imported by path: find controlplane beside us
    sys.path.insert(0, str(HERE))

import controlplane  # noqa: E402
from controlplane import (  # noqa: E402
    NODE_HOST_IP,
    NODE_IP,
    ControlPlane,
    ControlPlaneError,
    _die_with_parent,
    _make_cert,
    _pem_cert,
    _pem_key,
    _pid_alive,
    _pid_is,
    cache_dir,
    read_versions,
    stop_pid,
    tail,
)

NETNS = "llmtrain-node"
NETNS_DIR = Path("/var/run/netns")
HOST_IF = "lt-host"
# Host route that keeps traffic for the link off the default route (NodeNetwork.create).
GUARD_ROUTE = "172.31.200.0/24"
NODE_IF = "lt-node"
LINK_PREFIX = 30
NODE_NAME = "llmtrain-node"
POD_CIDR = "10.245.0.0/24"
POD_GATEWAY = "10.245.0.1"
CNI_BRIDGE = "lt-cni0"
CNI_NETWORK = "llmtrain-pods"
CNI_BIN_DIR = Path("/usr/lib/cni")
CLUSTER_DOMAIN = "cluster.local"
CLUSTER_DNS = NODE_IP
# Enough for `ulimit -n 65536` in a pod (containers inherit containerd's limit); fs.nr_open's default.
NOFILE_LIMIT = 1048576
NODE_COMPONENTS = ("containerd", "kubelet", "kube-proxy")
DEBIAN_BINARIES = {
    "containerd": Path("/usr/bin/containerd"),
    "ctr": Path("/usr/bin/ctr"),
    "runc": Path("/usr/sbin/runc"),
    "nsenter": Path("/usr/bin/nsenter"),
    "ip": Path("/usr/sbin/ip"),
    "iptables": Path("/usr/sbin/iptables"),
    "bridge-cni": CNI_BIN_DIR / "bridge",
    "host-local-cni": CNI_BIN_DIR / "host-local",
    "portmap-cni": CNI_BIN_DIR / "portmap",
    "loopback-cni": CNI_BIN_DIR / "loopback",
}
CTR_NAMESPACE = "k8s.io"


# What the kubelet's container manager wants these host-wide kernel settings to be (k8s.io/
# component-helpers/node/util/sysctl, v0.35): it shows them to the kubelet alone (see _start_kubelet).
KUBELET_KERNEL_TUNABLES = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}


class NodeError(RuntimeError):
    pass


def node_env() -> dict[str, str]:
    """The components' environment: the system dirs first on PATH (containerd finds runc and the
    shim there, the CNI bridge plugin and kube-proxy find iptables)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(
        ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin", env.get("PATH", "")]
    )
    return env


# --------------------------------------------------------------------------- binaries


def node_binaries() -> dict[str, Path]:
    """Every file the node needs: the Go-built kubelet/kube-proxy, the pause image, Debian's tools."""
    v = read_versions()
    bins = cache_dir() / "bin"
    k8s = bins / f"kubernetes-{v['K8S_VERSION']}"
    return {
        "kubelet": k8s / "kubelet",
        "kube-proxy": k8s / "kube-proxy",
        "pause.tar": bins / f"pause-{v['PAUSE_VERSION']}" / "pause.tar",
        **DEBIAN_BINARIES,
    }


def pause_image() -> str:
    return read_versions()["PAUSE_IMAGE"]


def missing_node_binaries() -> list[str]:
    return [
        str(p)
        for n, p in node_binaries().items()
        if not (p.is_file() if n == "pause.tar" else os.access(p, os.X_OK))
    ]


def node_skip_reason() -> str | None:
    """Why a real node cannot start here (None: it can): not root, or something not built/installed."""
    if os.geteuid() != 0:
        return "the real node needs root (network namespace, mounts, containerd)"
    missing = controlplane.missing_binaries() + missing_node_binaries()
    if missing:
        return "not built/installed (tests/cluster/build.sh all; make apt): " + ", ".join(missing)
    return None


def images_dir() -> Path:
    """Where `make images` leaves image archives for the node to import."""
    return cache_dir() / "images"


def containerd_root() -> Path:
    """containerd's persistent root (image store): imports survive a node's stop."""
    return cache_dir() / "node" / "containerd"


# --------------------------------------------------------------------------- config builders


def _toml_str(s: str | Path) -> str:
    return json.dumps(str(s))  # a JSON string is a valid TOML basic string


def containerd_config(
    *,
    root: Path,
    state: Path,
    socket: Path,
    sandbox_image: str,
    cni_conf_dir: Path,
    cni_bin_dir: Path = CNI_BIN_DIR,
) -> str:
    """containerd 1.6 config (version 2): CRI for the kubelet, nothing on a host-wide path."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return "\n".join(
        [
            "version = 2",
            f"root = {_toml_str(root)}",
            f"state = {_toml_str(state)}",
            # snapshotters this machine lacks (and that only log errors)
            'disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",'
            ' "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",'
            ' "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]',
            "",
            "[grpc]",
            f"  address = {_toml_str(socket)}",
            "",
            "[ttrpc]",
            '  address = ""',
            "",
            "[debug]",
            '  address = ""',
            "",
            "[metrics]",
            '  address = ""',
            "",
            f"[{cri}]",
            f"  sandbox_image = {_toml_str(sandbox_image)}",
            # this sandbox refuses a negative oom_score_adj (runc then dies: "can't get final child's PID")
            "  restrict_oom_score_adj = true",
            # pods' network-namespace mounts under the run's state dir, not /var/run/netns
            "  netns_mounts_under_state_dir = true",
            "  disable_apparmor = true",
            "  enable_selinux = false",
            "  systemd_cgroup = false",
            "  disable_tcp_service = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "  max_container_log_line_size = 16384",
            "",
            f"[{cri}.cni]",
            f"  bin_dir = {_toml_str(cni_bin_dir)}",
            f"  conf_dir = {_toml_str(cni_conf_dir)}",
            "  max_conf_num = 1",
            "",
            f"[{cri}.containerd]",
            '  snapshotter = "overlayfs"',
            '  default_runtime_name = "runc"',
            "",
            f"[{cri}.containerd.runtimes.runc]",
            '  runtime_type = "io.containerd.runc.v2"',
            "",
            f"[{cri}.containerd.runtimes.runc.options]",
            # PID 1 is not systemd: the cgroupfs driver, as the kubelet's cgroupDriver
            "  SystemdCgroup = false",
            f"  Root = {_toml_str(state / 'runc')}",
            "",
            f"[{cri}.registry]",
            # no mirrors and no hosts dir: a pull goes to the image's own registry, which has no route
            '  config_path = ""',
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml_str(root / 'opt')}",
            "",
        ]
    )


def cni_config(*, ipam_dir: Path, subnet: str = POD_CIDR, gateway: str = POD_GATEWAY) -> dict[str, Any]:
    """The pods' network: one bridge in the node's namespace, host-local leases in `ipam_dir`."""
    return {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": CNI_BRIDGE,
                "isGateway": True,
                # pod -> 172.31.200.1 leaves as 172.31.200.2: the host needs no route to the pods
                "ipMasq": True,
                # a pod reaching itself through its own Service's ClusterIP
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet, "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    # per run, not the host-wide /var/lib/cni/networks
                    "dataDir": str(ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(
    *,
    ca_file: Path,
    tls_cert: Path,
    tls_key: Path,
    runtime_socket: Path,
    resolv_conf: Path,
    pod_logs_dir: Path,
    node_ip: str = NODE_IP,
    cluster_dns: str = CLUSTER_DNS,
) -> dict[str, Any]:
    """KubeletConfiguration for this machine (cgroup v1, no systemd, no swap accounting)."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node_ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "tlsCertFile": str(tls_cert),
        "tlsPrivateKeyFile": str(tls_key),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_file)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{runtime_socket}",
        # cgroup v1 (kubelets >= 1.31 refuse it unless told), PID 1 is not systemd
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        # no QoS cgroup tree and no node-allocatable enforcement: the kubelet is not this
        # machine's cgroup owner (what the hand probe ran with)
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "clusterDNS": [cluster_dns],
        "clusterDomain": CLUSTER_DOMAIN,
        # the host's resolver is unreachable from the namespace: give pods none of it
        "resolvConf": str(resolv_conf),
        "podLogsDir": str(pod_logs_dir),
        # imported images cannot be pulled again: never garbage-collect them
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # a shared CI disk must not evict test pods
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "serializeImagePulls": False,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "maxPods": 110,
        "nodeStatusUpdateFrequency": "5s",
        "nodeStatusReportFrequency": "1m",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "shutdownGracePeriod": "0s",
        # the default -999 is refused by this sandbox (no negative oom_score_adj)
        "oomScoreAdj": 0,
        "logging": {"format": "text"},
    }


def kube_proxy_config(*, kubeconfig: Path, cluster_cidr: str = POD_CIDR) -> dict[str, Any]:
    """KubeProxyConfiguration: iptables mode inside the namespace; host-wide sysctls left alone."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": cluster_cidr,
        "bindAddress": NODE_IP,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # 0 = leave the conntrack table size and timeouts as they are (not kube-proxy's to set here)
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        # NodePorts on the node's address only; no route_localnet for 127.0.0.1 NodePorts
        "nodePortAddresses": [f"{NODE_IP}/32"],
        # the default -999 is refused by this sandbox (no negative oom_score_adj)
        "oomScoreAdj": 0,
        "iptables": {"localhostNodePorts": False, "syncPeriod": "30s", "minSyncPeriod": "0s"},
    }


def kubeconfig_for(server: str, ca_crt: Path, crt: Path, key: Path, user: str) -> str:
    """A kubeconfig that names its certificate files (JSON: valid YAML)."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "llmtrain-test", "cluster": {"server": server, "certificate-authority": str(ca_crt)}}
            ],
            "users": [{"name": user, "user": {"client-certificate": str(crt), "client-key": str(key)}}],
            "contexts": [{"name": "llmtrain-test", "context": {"cluster": "llmtrain-test", "user": user}}],
            "current-context": "llmtrain-test",
        },
        indent=2,
    )


def image_id(tar: Path) -> str | None:
    """The image id `make images` writes beside its archive (`<name>.id`), if any."""
    try:
        return tar.with_suffix(".id").read_text().strip() or None
    except OSError:
        return None


def import_stamp(tar: Path) -> dict[str, Any]:
    """What a stamp records of an imported archive (see needs_import)."""
    st = tar.stat()
    return {"mtime_ns": st.st_mtime_ns, "size": st.st_size, "id": image_id(tar)}


def needs_import(tar: Path, stamp: Path) -> bool:
    """Import an archive unless its stamp shows this content imported: the same image id (a
    rebuild that changed nothing writes a new tar of the same image), or else the same mtime and
    size. A multi-GB runtime image takes minutes to import: only a real change pays that."""
    if not stamp.exists():
        return True
    try:
        seen = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return True
    now = import_stamp(tar)
    if now["id"] is not None and seen.get("id") is not None:
        return bool(now["id"] != seen["id"])
    return bool(seen.get("mtime_ns") != now["mtime_ns"] or seen.get("size") != now["size"])


def raise_nofile(want: int) -> int:
    """Set RLIMIT_NOFILE (soft and hard) to `want`, or to the hard limit when raising it is refused."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        return want
    except (ValueError, OSError):  # no CAP_SYS_RESOURCE: the hard limit is a ceiling
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return int(hard)


def nofile_limit() -> int:
    """The open-files limit containerd gets here (and so a pod's hard limit): NOFILE_LIMIT if allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= NOFILE_LIMIT:
        return NOFILE_LIMIT
    try:  # can this process raise its hard limit? (a child it starts can then too)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, NOFILE_LIMIT))
    except (ValueError, OSError):
        return int(hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))  # lowering back is always allowed
    return NOFILE_LIMIT


# --------------------------------------------------------------------------- network


def _run(cmd: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise NodeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def nsenter_argv(*argv: str, netns: str = NETNS) -> list[str]:
    """`argv` run inside the node's network namespace (`nsenter --net`, not `ip netns exec`)."""
    return [str(DEBIAN_BINARIES["nsenter"]), f"--net={NETNS_DIR / netns}", "--", *argv]


def _netns_inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


@dataclass
class NodeNetwork:
    """The namespace `llmtrain-node` and the veth pair lt-host/lt-node; nothing else on the host."""

    netns: str = NETNS

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.netns

    def exists(self) -> bool:
        return self.path.exists()

    def create(self) -> None:
        if self.exists():
            raise NodeError(
                f"network namespace {self.netns} exists: a node is running or was not torn down "
                "(tests/cluster/run.sh down, or NodeNetwork().delete())"
            )
        if Path(f"/sys/class/net/{HOST_IF}").exists():
            raise NodeError(f"interface {HOST_IF} exists: tear the previous node down first")
        ip = str(DEBIAN_BINARIES["ip"])
        # `ip netns add` fails if the name exists: of two racing starts only one gets past it, and
        # the other must not delete what it did not make.
        _run([ip, "netns", "add", self.netns])
        # The link's range is refused on the host whenever the veth is not there (before a node,
        # after one, or while another test tears one down): without it a client still aimed at
        # 172.31.200.x (kubectl, moto's clients) would follow the default route off the machine.
        # The veth's own /30 is more specific and wins while it exists. Kept on purpose at
        # tear-down: it only ever turns such traffic into an immediate "unreachable".
        _run([ip, "route", "replace", "unreachable", GUARD_ROUTE])
        try:
            _run([ip, "link", "add", HOST_IF, "type", "veth", "peer", "name", NODE_IF, "netns", self.netns])
            _run([ip, "addr", "add", f"{NODE_HOST_IP}/{LINK_PREFIX}", "dev", HOST_IF])
            _run([ip, "link", "set", HOST_IF, "up"])
            _run([ip, "-n", self.netns, "link", "set", "lo", "up"])
            _run([ip, "-n", self.netns, "addr", "add", f"{NODE_IP}/{LINK_PREFIX}", "dev", NODE_IF])
            _run([ip, "-n", self.netns, "link", "set", NODE_IF, "up"])
            # The Service range as local addresses of the namespace: a process in it connecting to a
            # ClusterIP needs a route before kube-proxy's OUTPUT DNAT can apply (there is no default
            # route), and a ClusterIP without a rule is then refused here instead of being sent on.
            _run([ip, "-n", self.netns, "route", "add", "local", controlplane.SERVICE_CIDR, "dev", "lo"])
            # Per-namespace settings, made inside it: the host's own values are not touched.
            # ip_forward: pods -> lt-node (172.31.200.1) and ClusterIP DNAT between pods;
            # bridge-nf-call-iptables: kube-proxy's rules see pod-to-pod traffic on lt-cni0.
            self.sysctl("net.ipv4.ip_forward", "1")
            self.sysctl("net.bridge.bridge-nf-call-iptables", "1")
        except BaseException:
            self.delete()
            raise
        # Nothing here writes the host's net.ipv4.ip_forward: the node needs none of it.
        _write_owner(self.netns)

    def sysctl(self, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        # /proc/sys/net is the namespace of the process that opens it: write from inside.
        _run(nsenter_argv("/bin/sh", "-c", f"echo {value} > {path}", netns=self.netns))

    def routes(self) -> str:
        return _run(
            nsenter_argv(str(DEBIAN_BINARIES["ip"]), "route", "show", "table", "all", netns=self.netns)
        ).stdout

    def pids_inside(self) -> list[int]:
        """Processes whose network namespace is this one (they keep it alive after `ip netns delete`)."""
        ino = _netns_inode(self.path)
        return _pids_in_netns({ino} if ino is not None else set())

    def live_components(self) -> list[int]:
        """PIDs of a node's containerd/kubelet/kube-proxy running in this namespace (a live node)."""
        bins = node_binaries()
        exes = {os.path.realpath(bins[n]) for n in ("kubelet", "kube-proxy")}
        exes.add(os.path.realpath(DEBIAN_BINARIES["containerd"]))
        live = []
        for pid in self.pids_inside():
            try:
                if os.path.realpath(f"/proc/{pid}/exe") in exes:
                    live.append(pid)
            except OSError:
                pass
        return live

    def in_use(self) -> list[int]:
        """PIDs that make the namespace someone's: its node components, or the process that made it
        and may still be starting the node (before any component runs)."""
        live = self.live_components()
        owner = _read_owner(self.netns)
        if owner is not None and _pid_alive(owner) and owner != os.getpid():
            live.append(owner)
        return live

    def remove_stale(self) -> bool:
        """Remove what a killed run left (namespace, veth, shims and their containers, mounts of our
        run-dir layout) when nobody uses it; raise if a live node (or one starting) does."""
        if not self.exists() and not Path(f"/sys/class/net/{HOST_IF}").exists():
            return False
        live = self.in_use()
        if live:
            raise NodeError(
                f"a node runs in network namespace {self.netns} (PIDs {live}): "
                "one node at a time (tests/cluster/run.sh down, or wait for its test)"
            )
        _kill_trees(self.pids_inside())
        _unmount_all([], stale=True)
        self.delete()
        return True

    def delete(self) -> None:
        """Remove the namespace (and with it lt-node, and so its peer lt-host); lt-host if left."""
        ip = str(DEBIAN_BINARIES["ip"])
        if self.exists():
            _run([ip, "netns", "delete", self.netns], check=False)
        if Path(f"/sys/class/net/{HOST_IF}").exists():
            _run([ip, "link", "delete", HOST_IF], check=False)
        if not self.exists():
            _owner_file(self.netns).unlink(missing_ok=True)


def _owner_file(netns: str) -> Path:
    return cache_dir() / "node" / f"{netns}.owner"


def _write_owner(netns: str) -> None:
    """Record which process made the namespace: while it lives, the namespace is not stale."""
    f = _owner_file(netns)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(str(os.getpid()))


def _read_owner(netns: str) -> int | None:
    try:
        return int(_owner_file(netns).read_text().strip())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _start_lock() -> Iterator[None]:
    """One start at a time on this machine: the stale check and the namespace's creation together."""
    f = cache_dir() / "node" / "start.lock"
    f.parent.mkdir(parents=True, exist_ok=True)
    with open(f, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pids_in_netns(inodes: set[int]) -> list[int]:
    pids: list[int] = []
    if not inodes:
        return pids
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if os.stat(proc / "ns" / "net").st_ino in inodes:
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def _exe(pid: int) -> str:
    try:
        return os.path.realpath(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    """pid -> parent pid, for every process."""
    out: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                out[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def _kill_trees(roots: list[int], timeout: float = 5.0) -> list[int]:
    """SIGKILL `roots` and all their descendants (a container's processes outlive its shim
    otherwise: they are re-parented, not killed); wait until they are gone. Returns the PIDs."""
    parents = _parents()
    tree = set(roots)
    frontier = list(roots)
    while frontier:
        kids = [c for c, p in parents.items() if p in frontier and c not in tree]
        tree.update(kids)
        frontier = kids
    tree.discard(os.getpid())
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    for pid in tree:
        while _pid_alive(pid) and time.monotonic() < deadline:
            try:  # reap our own children
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.02)
    return sorted(tree)


# The run-directory layout this module makes (pytest's or run.sh's): mounts there are ours.
_OUR_MOUNT_PARTS = ("/node/containerd/", "/node/kubelet/")


def _stale_mounts() -> list[str]:
    """Mounts a killed run left: under some `.../node/containerd/` or `.../node/kubelet` of ours."""
    return [
        m
        for m in _mounts_under([Path("/")])
        if any(part in m + "/" for part in _OUR_MOUNT_PARTS) and not m.startswith(str(containerd_root()))
    ]


def _mounts_under(prefixes: list[Path]) -> list[str]:
    """Mount points (from /proc/self/mountinfo) under any of `prefixes`, deepest first."""
    roots = [str(p.resolve()).rstrip("/") + "/" for p in prefixes]
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) < 5:
            continue
        mp = parts[4].encode().decode("unicode_escape")  # \040 etc.
        if any((mp + "/").startswith(r) for r in roots):
            found.append(mp)
    return sorted(set(found), key=lambda m: (-m.count("/"), m))


def _unmount_all(prefixes: list[Path], stale: bool = False) -> list[str]:
    """Unmount (lazily, deepest first) everything mounted under `prefixes` (with `stale`, what a
    killed run of ours left anywhere); returns what was."""
    done = []
    for _ in range(5):  # stacked mounts: repeat until nothing is left
        mounts = _mounts_under(prefixes) + (_stale_mounts() if stale else [])
        if not mounts:
            break
        for mp in mounts:
            subprocess.run(["umount", "-l", mp], capture_output=True)
            done.append(mp)
    return done


# --------------------------------------------------------------------------- the node


@dataclass
class Node:
    """The real node: `Node(workdir).start(cp)` after `NodeNetwork().create()` and `cp.start()`."""

    workdir: Path
    pids: dict[str, int] = field(default_factory=dict)
    exes: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    startup_seconds: float | None = None
    server: str = ""
    admin_kubeconfig: Path | None = None
    # see ControlPlane.die_with_parent: True for pytest fixtures, False for run.sh
    die_with_parent: bool = False
    network: NodeNetwork = field(default_factory=NodeNetwork)
    cp: ControlPlane | None = field(default=None, repr=False)
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    _addons_stop: Callable[[], Any] | None = field(default=None, repr=False)
    # seconds from stop() to the end of each phase (the last stop)
    stop_timings: dict[str, float] = field(default_factory=dict)
    _t0: float = field(default=0.0, repr=False)

    # ---- paths
    @property
    def name(self) -> str:
        return NODE_NAME

    @property
    def ip(self) -> str:
        return NODE_IP

    @property
    def netns(self) -> str:
        return self.network.netns

    @property
    def netns_path(self) -> Path:
        return self.network.path

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    @property
    def state_file(self) -> Path:
        return self.workdir / "state.json"

    @property
    def containerd_state(self) -> Path:
        return self.workdir / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd_state / "containerd.sock"

    @property
    def kubelet_root(self) -> Path:
        return self.workdir / "kubelet"

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig of the control plane this node joined."""
        if self.admin_kubeconfig is None:
            raise NodeError("node not started")
        return self.admin_kubeconfig

    def log_paths(self) -> dict[str, Path]:
        return {n: self.log_dir / f"{n}.log" for n in self.pids} | {
            n: self.log_dir / f"{n}.log" for n in NODE_COMPONENTS
        }

    # ---- commands inside the namespace
    def nsenter(
        self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the node's network namespace; on failure (check) raise with its stderr."""
        r = subprocess.run(
            nsenter_argv(*argv, netns=self.netns),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and r.returncode != 0:
            raise NodeError(f"{' '.join(argv)} (in {self.netns}) failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """`ctr` against this node's containerd, namespace k8s.io (the socket is a file: no netns needed)."""
        r = subprocess.run(
            [
                str(DEBIAN_BINARIES["ctr"]),
                "--address",
                str(self.containerd_socket),
                "-n",
                CTR_NAMESPACE,
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise NodeError(f"ctr {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def spawn(
        self,
        name: str,
        exe: str | Path,
        args: list[str],
        *,
        nofile: int | None = None,
        env: dict[str, str] | None = None,
        wrapper: list[str] | None = None,
    ) -> int:
        """Start `exe args` inside the namespace, log to logs/<name>.log; `stop()` ends it by PID.

        `wrapper`: commands that set up and then exec `exe args` (e.g. ``unshare ... sh -c``); every
        step execs in place, so the PID stays the component's own.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)

        def preexec() -> None:
            if nofile is not None:
                raise_nofile(nofile)
            if self.die_with_parent:
                _die_with_parent()

        with open(self.log_dir / f"{name}.log", "ab") as log:
            log.write(f"$ {exe} {' '.join(args)}\n".encode())
            log.flush()
            p = subprocess.Popen(
                nsenter_argv(*(wrapper or []), str(exe), *args, netns=self.netns),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=preexec,
                env=env if env is not None else node_env(),
            )
        # nsenter execs `exe` in place: the PID is the component's own
        self._procs[name] = p
        self.pids[name] = p.pid
        self.exes[name] = os.path.realpath(exe)
        self.save_state()
        return p.pid

    # ---- start
    def _mark(self, milestone: str) -> None:
        self.timings[milestone] = round(time.monotonic() - self._t0, 2)

    def _check_alive(self) -> None:
        for name, pid in self.pids.items():
            if not _pid_alive(pid):
                raise NodeError(
                    f"{name} (pid {pid}) exited during start-up; last log lines:\n{tail(self.log_dir / f'{name}.log')}"
                )

    def _wait(self, what: str, ok: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                r = ok()
                if r:
                    return r
            # SubprocessError: a probe command that timed out (a loaded machine) is a "not yet".
            except (
                urllib.error.URLError,
                OSError,
                ValueError,
                KeyError,
                NodeError,
                subprocess.SubprocessError,
            ):
                pass
            time.sleep(0.2)
        raise NodeError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.log_dir}")

    def start(self, cp: ControlPlane, timeout: float = 120) -> Node:
        """Start containerd, import images, kubelet, kube-proxy, addons; return when the node is Ready."""
        reason = node_skip_reason()
        if reason:
            raise NodeError(reason)
        if not cp.node:
            raise NodeError("the control plane must run in node mode: ControlPlane(..., node=True)")
        if not self.network.exists():
            raise NodeError(f"network namespace {self.netns} missing: NodeNetwork().create() first")
        self.cp = cp
        self.server = cp.server
        self.admin_kubeconfig = cp.kubeconfig
        self._t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._write_files(cp)
            self._start_containerd(timeout)
            self._import_images()
            self._start_kubelet()
            self._start_kube_proxy()
            self._wait(f"node {NODE_NAME} Ready", self.ready, timeout)
            self._mark("node Ready")
            self._start_addons()
        except BaseException:
            self.stop(keep_logs=True, delete_network=False)
            raise
        self.startup_seconds = time.monotonic() - self._t0
        self.save_state()
        return self

    def _write_files(self, cp: ControlPlane) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        cp_pki = cp.pki_dir
        ca_key_path = cp_pki / "ca.key"
        if not ca_key_path.exists():
            raise NodeError(f"{ca_key_path} missing: the control plane was not started in node mode")
        ca = (
            x509.load_pem_x509_certificate((cp_pki / "ca.crt").read_bytes()),
            serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None),
        )
        pki = self.pki_dir
        pki.mkdir(parents=True, exist_ok=True)
        certs = {
            # the kubelet's identity: the Node authorizer and NodeRestriction key on this name
            "kubelet-client": _make_cert(
                f"system:node:{NODE_NAME}", orgs=["system:nodes"], issuer=ca, client=True
            ),
            # apiserver -> kubelet (logs/exec): checked with --kubelet-certificate-authority
            "kubelet-serving": _make_cert(NODE_NAME, issuer=ca, server=True, dns=[NODE_NAME], ips=[NODE_IP]),
            # bound to the system:node-proxier ClusterRole by RBAC's bootstrap policy
            "kube-proxy": _make_cert("system:kube-proxy", issuer=ca, client=True),
        }
        for name, (crt, key) in certs.items():
            (pki / f"{name}.crt").write_bytes(_pem_cert(crt))
            (pki / f"{name}.key").write_bytes(_pem_key(key))
            os.chmod(pki / f"{name}.key", 0o600)
        ca_crt = cp_pki / "ca.crt"
        (self.workdir / "kubelet.kubeconfig").write_text(
            kubeconfig_for(
                cp.server,
                ca_crt,
                pki / "kubelet-client.crt",
                pki / "kubelet-client.key",
                f"system:node:{NODE_NAME}",
            )
        )
        (self.workdir / "kube-proxy.kubeconfig").write_text(
            kubeconfig_for(
                cp.server, ca_crt, pki / "kube-proxy.crt", pki / "kube-proxy.key", "system:kube-proxy"
            )
        )
        cni_dir = self.workdir / "cni" / "net.d"
        cni_dir.mkdir(parents=True, exist_ok=True)
        (cni_dir / "10-llmtrain.conflist").write_text(
            json.dumps(cni_config(ipam_dir=self.workdir / "cni" / "ipam"), indent=2)
        )
        self.containerd_state.mkdir(parents=True, exist_ok=True)
        containerd_root().mkdir(parents=True, exist_ok=True)
        (self.workdir / "containerd.toml").write_text(
            containerd_config(
                root=containerd_root(),
                state=self.containerd_state,
                socket=self.containerd_socket,
                sandbox_image=pause_image(),
                cni_conf_dir=cni_dir,
            )
        )
        resolv = self.workdir / "resolv.conf"
        resolv.write_text("# pods' upstream resolver: none (no route off the node)\n")
        (self.workdir / "kubelet.yaml").write_text(
            json.dumps(
                kubelet_config(
                    ca_file=ca_crt,
                    tls_cert=pki / "kubelet-serving.crt",
                    tls_key=pki / "kubelet-serving.key",
                    runtime_socket=self.containerd_socket,
                    resolv_conf=resolv,
                    pod_logs_dir=self.workdir / "pod-logs",
                ),
                indent=2,
            )
        )
        (self.workdir / "kube-proxy.yaml").write_text(
            json.dumps(kube_proxy_config(kubeconfig=self.workdir / "kube-proxy.kubeconfig"), indent=2)
        )

    def _start_containerd(self, timeout: float) -> None:
        self.spawn(
            "containerd",
            DEBIAN_BINARIES["containerd"],
            ["--config", str(self.workdir / "containerd.toml"), "--log-level", "warn"],
            nofile=NOFILE_LIMIT,
        )
        self._wait("containerd socket", lambda: self.ctr("version", timeout=5).returncode == 0, timeout)
        self._mark("containerd ready")
        self._remove_containers()  # a previous run killed uncleanly leaves its containers in the root

    def _import_images(self) -> None:
        stamps = containerd_root() / "llmtrain-imported"
        stamps.mkdir(parents=True, exist_ok=True)
        tars = [node_binaries()["pause.tar"], *sorted(images_dir().glob("*.tar"))]
        imported: list[str] = []
        failed: list[str] = []
        for tar in tars:
            stamp = stamps / (tar.name + ".json")
            if tar.parent != images_dir():
                stamp = stamps / f"{tar.parent.name}-{tar.name}.json"
            if not needs_import(tar, stamp):
                continue
            before = import_stamp(tar)
            t0 = time.monotonic()
            r = self.ctr("images", "import", str(tar), check=tar.parent != images_dir(), timeout=1800)
            if r.returncode != 0:
                # Not an image archive (another tool's file in the shared folder) or a broken one: the
                # node still starts; a pod that needs the image then shows ErrImagePull naming it.
                failed.append(f"{tar.name}: {r.stderr.strip()}")
                continue
            stamp.write_text(json.dumps(before | {"ctr": r.stdout.strip()}))
            imported.append(f"{tar.name} {time.monotonic() - t0:.1f}s")
        self._mark("images imported" + (f" ({', '.join(imported)})" if imported else " (none new)"))
        if failed:
            self._mark("images NOT imported: " + "; ".join(failed))
            with open(self.log_dir / "containerd.log", "a") as log:
                log.write("".join(f"[node.py] import failed: {f}\n" for f in failed))

    def _start_kubelet(self) -> None:
        # The kubelet would set host-wide kernel tunables (vm.overcommit_memory=1, kernel.panic=10,
        # kernel.panic_on_oops=1, ...) that other work on this machine would then live with. It
        # runs in a mount namespace of its own where files holding the values it wants are bound
        # over those /proc/sys entries (private: nothing propagates back), so it reads what it
        # wants and writes nothing to the kernel. Its root dir is made a shared mount first, so the
        # volumes it mounts there (secrets, tokens) propagate to containerd's, the host's, view.
        root = self.kubelet_root
        root.mkdir(parents=True, exist_ok=True)
        _run(["mount", "--bind", str(root), str(root)])
        _run(["mount", "--make-shared", str(root)])
        masks = self.workdir / "kernel-tunables"
        masks.mkdir(parents=True, exist_ok=True)
        binds = []
        for key, value in KUBELET_KERNEL_TUNABLES.items():
            f = masks / key.replace("/", ".")
            f.write_text(value + "\n")
            binds.append(f"mount --bind {f} /proc/sys/{key}")
        script = "set -e; " + "; ".join(binds) + '; exec "$0" "$@"'
        unshare = ["/usr/bin/unshare", "--mount", "--propagation", "unchanged", "--", "/bin/sh", "-c", script]
        self.spawn(
            "kubelet",
            node_binaries()["kubelet"],
            wrapper=unshare,
            args=[
                f"--config={self.workdir / 'kubelet.yaml'}",
                f"--kubeconfig={self.workdir / 'kubelet.kubeconfig'}",
                f"--root-dir={self.kubelet_root}",
                f"--hostname-override={NODE_NAME}",
                # no default route: the kubelet cannot guess its address
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )

    def _start_kube_proxy(self) -> None:
        self.spawn(
            "kube-proxy",
            node_binaries()["kube-proxy"],
            [f"--config={self.workdir / 'kube-proxy.yaml'}", "--v=1"],
        )

    def _start_addons(self) -> None:
        """CoreDNS and the NetworkPolicy engine from addons.py (another part of the suite), if present."""
        if not (HERE / "addons.py").exists():
            return
        addons = importlib.import_module("addons")
        start = getattr(addons, "start_addons", None)
        if start is None:
            return
        result = start(self)
        if callable(result):
            self._addons_stop = result
        elif result is not None and callable(getattr(result, "stop", None)):
            self._addons_stop = result.stop
        self._mark("addons started")

    # ---- status
    def ready(self) -> bool:
        if self.cp is None:
            return False
        try:
            n = self.cp.api("GET", f"/api/v1/nodes/{NODE_NAME}")
        except urllib.error.HTTPError:
            return False
        return any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))

    def running(self) -> dict[str, bool]:
        return {n: _pid_alive(pid) and _pid_is(pid, self.exes.get(n, "")) for n, pid in self.pids.items()}

    # ---- state
    def save_state(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        state = {
            "workdir": str(self.workdir),
            "pids": self.pids,
            "exes": self.exes,
            "netns": self.netns,
            "server": self.server,
            "admin_kubeconfig": str(self.admin_kubeconfig) if self.admin_kubeconfig else None,
            "startup_seconds": self.startup_seconds,
            "timings": self.timings,
        }
        self.state_file.write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, workdir: Path, cp: ControlPlane | None = None) -> Node:
        state = json.loads((workdir / "state.json").read_text())
        node = cls(workdir=Path(state["workdir"]), network=NodeNetwork(state.get("netns", NETNS)), cp=cp)
        node.pids = {k: int(v) for k, v in state["pids"].items()}
        node.exes = dict(state.get("exes", {}))
        node.server = state.get("server", "")
        node.admin_kubeconfig = Path(state["admin_kubeconfig"]) if state.get("admin_kubeconfig") else None
        node.startup_seconds = state.get("startup_seconds")
        node.timings = state.get("timings", {})
        return node

    # ---- stop
    def _remove_containers(self) -> list[str]:
        """Kill every task and delete every container of containerd's k8s.io namespace (ours alone)."""
        r = self.ctr("containers", "list", "-q", check=False, timeout=30)
        ids = [i for i in r.stdout.split() if i]
        if not ids:
            return ids
        # The containers' processes, at once: every shim's process tree (`ctr tasks kill` is one
        # container per call, and a pod's grace period is no concern of a test node's stop).
        shim = os.path.realpath("/usr/bin/containerd-shim-runc-v2")
        shims = [p for p in self.network.pids_inside() if _exe(p) == shim]
        _kill_trees([c for s in shims for c, parent in _parents().items() if parent == s])
        self.ctr("tasks", "delete", "-f", *ids, check=False, timeout=60)
        self.ctr("containers", "delete", *ids, check=False, timeout=60)
        return ids

    def stop(self, keep_logs: bool = True, delete_network: bool = True) -> None:
        """Stop everything by PID, unmount what was mounted, remove the namespace and the veth."""
        t0 = time.monotonic()
        self._stop_addons()
        self.stop_timings = {"addons": round(time.monotonic() - t0, 2)}
        bins = node_binaries()
        # kubelet, kube-proxy and spawn()ed extras together: SIGTERM all, then wait (SIGKILL at 10 s)
        names = [n for n in self.pids if n != "containerd"]
        threads = [
            threading.Thread(
                target=stop_pid, args=(self.pids[n], self.exes.get(n) or str(bins.get(n, ""))), daemon=True
            )
            for n in names
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        self.stop_timings["kubelet, kube-proxy"] = round(time.monotonic() - t0, 2)
        if "containerd" in self.pids and self.containerd_socket.exists() and self.running().get("containerd"):
            self._remove_containers()
        self.stop_timings["containers"] = round(time.monotonic() - t0, 2)
        pid = self.pids.get("containerd")
        if pid is not None:
            stop_pid(pid, self.exes.get("containerd") or str(DEBIAN_BINARIES["containerd"]))
        self.stop_timings["containerd"] = round(time.monotonic() - t0, 2)
        # Whatever still runs in the node's namespaces (shims, pod processes, an addon that did not
        # use spawn()), and every descendant of it, is ours by construction: end it by PID.
        netns_inodes = {i for i in [_netns_inode(self.netns_path)] if i is not None}
        netns_inodes |= {i for p in self._pod_netns_mounts() if (i := _netns_inode(Path(p))) is not None}
        _kill_trees(_pids_in_netns(netns_inodes))
        self.pids.clear()
        self._procs.clear()
        _unmount_all([self.workdir, containerd_root()])
        if delete_network:
            self.network.delete()
        self.stop_timings["mounts, network"] = round(time.monotonic() - t0, 2)
        if keep_logs:
            self.save_state()
            # the rest of the run dir (kubelet root, containerd state, leases) is per run
            for sub in ("kubelet", "containerd", "cni", "pod-logs"):
                shutil.rmtree(self.workdir / sub, ignore_errors=True)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _pod_netns_mounts(self) -> list[str]:
        return [m for m in _mounts_under([self.containerd_state]) if "/netns/" in m]

    def _stop_addons(self) -> None:
        if self._addons_stop is not None:
            try:
                self._addons_stop()
            finally:
                self._addons_stop = None
            return
        if (HERE / "addons.py").exists():
            stop = getattr(importlib.import_module("addons"), "stop_addons", None)
            if stop is not None:
                stop(self)

    def logs_summary(self, lines: int = 20) -> str:
        out = []
        for name, path in self.log_paths().items():
            if path.exists():
                out.append(f"===== {name}: {path} (last {lines} lines)\n{tail(path, lines)}")
        return "\n".join(out)


# --------------------------------------------------------------------------- one call


def start_node_cluster(
    workdir: Path, *, die_with_parent: bool = False, fake_nodes: bool = False, timeout: float = 120
) -> tuple[ControlPlane, Node]:
    """Network, control plane in node mode (workdir), node (workdir/node) Ready: (cp, node).

    Raises NodeError/ControlPlaneError (after tearing down what it made) on failure.
    """
    reason = node_skip_reason()
    if reason:
        raise NodeError(reason)
    network = NodeNetwork()
    with _start_lock():
        network.remove_stale()  # a killed run's leftovers; raises if another node is live
        network.create()  # before the apiserver: it binds the host end of the veth
    cp = ControlPlane(workdir=workdir, die_with_parent=die_with_parent, node=True, fake_nodes=fake_nodes)
    try:
        cp.start()
    except BaseException:
        network.delete()
        raise
    node = Node(workdir=workdir / "node", die_with_parent=die_with_parent, network=network)
    try:
        node.start(cp, timeout=timeout)
    except BaseException:
        node.stop(keep_logs=True)
        cp.stop(keep_logs=True)
        raise
    return cp, node


def stop_node_cluster(cp: ControlPlane, node: Node, keep_logs: bool = False) -> None:
    """Node first (its pods, processes, mounts, namespace, veth), then the control plane."""
    try:
        node.stop(keep_logs=keep_logs)
    finally:
        cp.stop(keep_logs=keep_logs)


__all__ = [
    "ControlPlaneError",
    "Node",
    "NodeError",
    "NodeNetwork",
    "cni_config",
    "containerd_config",
    "kube_proxy_config",
    "kubelet_config",
    "missing_node_binaries",
    "node_skip_reason",
    "start_node_cluster",
    "stop_node_cluster",
]
