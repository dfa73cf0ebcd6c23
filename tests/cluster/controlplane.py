"""A real, local Kubernetes control plane for llmtrain's integration tests.

Starts etcd -> kube-apiserver -> kube-controller-manager -> kube-scheduler -> kwok,
all built from Go modules by ``tests/cluster/build.sh`` and cached under
``~/.cache/llmtrain/bin/<name>-<version>/``. Every process binds 127.0.0.1 on a
free port; etcd keeps its data on /dev/shm with --unsafe-no-fsync.

A fake node pool is registered and driven by kwok with the Stage configs in
``stages.yaml``: 4 GPU nodes (8 x nvidia.com/gpu each, tainted
nvidia.com/gpu=present:NoSchedule) and 2 CPU nodes. Pods on them become Running;
they become Succeeded/Failed only when a test sets the annotation
``llmtrain.dev/test-exit`` ("0" or a non-zero integer).

Pod and service IPs are fake (private ranges): nothing listens there and nothing
may connect to them. The only addresses this module ever connects to are
127.0.0.1 ports it started.

**Node mode** (``ControlPlane(workdir, node=True)``, ``run.sh up --node``): the control plane of
a real node (``node.py``) that lives in the network namespace ``llmtrain-node``. The apiserver
binds 172.31.200.1, the host end of the node's veth pair (which ``node.NodeNetwork`` must create
first), advertises it, so the ``kubernetes`` Service (10.96.0.1) gets an endpoint the node's pods
reach through kube-proxy; authorization is ``Node,RBAC`` with the NodeRestriction admission plugin
(the kubelet is a real ``system:node:llmtrain-node``); the KCM runs the controllers a real node
needs besides the usual ones (``NODE_MODE_CONTROLLERS``); kwok still runs but no fake node is
registered unless ``fake_nodes=True``. Without ``node=True`` nothing of this changes.

Used by ``tests/integration/conftest.py`` and by the CLI ``tests/cluster/run.sh``::

    python tests/cluster/controlplane.py up [--node]|down|status|logs|env

Needs only the standard library and ``cryptography``.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STAGES_FILE = HERE / "stages.yaml"
VERSIONS_FILE = HERE / "versions.env"

TEST_EXIT_ANNOTATION = "llmtrain.dev/test-exit"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT_KEY = "nvidia.com/gpu"
POOL_LABEL = "llmtrain.dev/pool"
GPU_NODES = 4
GPUS_PER_NODE = 8
CPU_NODES = 2
# Never connected to: the apiserver only needs a range to allocate ClusterIPs from.
# (Node mode: reachable from inside the node's network namespace only, through kube-proxy.)
SERVICE_CIDR = "10.96.0.0/16"
# Node mode: the veth pair between the host and the node's network namespace (node.py makes it).
NODE_HOST_IP = "172.31.200.1"
NODE_IP = "172.31.200.2"
# The `kubernetes` Service's ClusterIP: the first address of SERVICE_CIDR.
KUBERNETES_SERVICE_IP = "10.96.0.1"
# Controllers every mode runs; deployment + replicaset: spec.serve's model server is a Deployment.
BASE_CONTROLLERS = (
    "garbagecollector",
    "namespace",
    "job",
    "serviceaccount",
    "serviceaccount-token",
    "deployment",
    "replicaset",
)
# What a real node's pods need on top (node mode):
# - endpoint, endpointslice, endpointslicemirroring: Services get endpoints that kube-proxy
#   (EndpointSlices) and CoreDNS turn into DNAT rules and records; mirroring covers hand-made
#   Endpoints;
# - root-ca-cert-publisher: every namespace's kube-root-ca.crt ConfigMap, which each pod's
#   projected service-account volume mounts (without it pods hang in ContainerCreating);
# - podgc: deletes terminated pods past the threshold and pods bound to deleted nodes;
# - ttl: the node TTL annotation the kubelet's Secret/ConfigMap cache reads;
# - clusterrole-aggregation: the admin/edit/view ClusterRoles a chart's RoleBindings may name.
# Not run: nodelifecycle (it would taint and evict; the admission plugin that taints new nodes
# not-ready is off in both modes, so nothing waits for it to lift a taint), nodeipam (IPs come from
# the CNI's host-local range, not Node.spec.podCIDR), csr* (node.py signs the kubelet's certs).
NODE_MODE_CONTROLLERS = (
    "endpoint",
    "endpointslice",
    "endpointslicemirroring",
    "root-ca-cert-publisher",
    "podgc",
    "ttl",
    "clusterrole-aggregation",
)
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


# --------------------------------------------------------------------------- binaries


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    versions: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip()
    return versions


def cache_dir() -> Path:
    return Path(os.environ.get("LLMTRAIN_CACHE") or Path.home() / ".cache" / "llmtrain")


def binaries() -> dict[str, Path]:
    """Paths of every binary the control plane and the tests use (may not exist)."""
    v = read_versions()
    b = cache_dir() / "bin"
    k8s = b / f"kubernetes-{v['K8S_VERSION']}"
    tools = b / f"kubectl-layer-{v['KUBECTL_LAYER_VERSION']}"
    return {
        "etcd": b / f"etcd-{v['ETCD_VERSION']}" / "etcd",
        "kube-apiserver": k8s / "kube-apiserver",
        "kube-controller-manager": k8s / "kube-controller-manager",
        "kube-scheduler": k8s / "kube-scheduler",
        "kwok": b / f"kwok-{v['KWOK_VERSION']}" / "kwok",
        "kubectl": tools / "kubectl",
        "helm": tools / "helm",
    }


def missing_binaries() -> list[str]:
    return [str(p) for p in binaries().values() if not os.access(p, os.X_OK)]


def tools_path() -> str:
    """A PATH with the cached kubectl and helm first."""
    return os.pathsep.join([str(binaries()["kubectl"].parent), os.environ.get("PATH", "")])


# --------------------------------------------------------------------------- certificates


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _make_cert(
    cn: str,
    *,
    orgs: Iterable[str] = (),
    issuer: tuple[Any, Any] | None = None,
    ca: bool = False,
    server: bool = False,
    client: bool = False,
    dns: Iterable[str] = (),
    ips: Iterable[str] = (),
) -> tuple[Any, Any]:
    """Return (cert, key); self-signed when issuer is None. EC P-256 keys: fast to generate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    subject = x509.Name(attrs)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    return cert, key


@dataclass
class _Pki:
    ca_crt: Path
    serving_crt: Path
    serving_key: Path
    admin_crt: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path
    # Node mode only: node.py signs the kubelet's and kube-proxy's certificates with it.
    ca_key: Path | None = None


def _write_pki(d: Path, node: bool = False) -> _Pki:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    d.mkdir(parents=True, exist_ok=True)
    ca = _make_cert("llmtrain-test-ca", ca=True)
    serving = _make_cert(
        "kube-apiserver",
        issuer=ca,
        server=True,
        dns=[
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ],
        # node mode: pods reach the apiserver as 10.96.0.1 (kube-proxy DNAT to 172.31.200.1).
        ips=["127.0.0.1", NODE_HOST_IP, KUBERNETES_SERVICE_IP] if node else ["127.0.0.1"],
    )
    admin = _make_cert("llmtrain-admin", orgs=["system:masters"], issuer=ca, client=True)
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files = {
        "ca.crt": _pem_cert(ca[0]),
        "serving.crt": _pem_cert(serving[0]),
        "serving.key": _pem_key(serving[1]),
        "admin.crt": _pem_cert(admin[0]),
        "admin.key": _pem_key(admin[1]),
        "sa.key": _pem_key(sa),
        "sa.pub": sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    if node:
        files["ca.key"] = _pem_key(ca[1])
    for name, data in files.items():
        (d / name).write_bytes(data)
        os.chmod(d / name, 0o600)
    return _Pki(
        ca_crt=d / "ca.crt",
        serving_crt=d / "serving.crt",
        serving_key=d / "serving.key",
        admin_crt=d / "admin.crt",
        admin_key=d / "admin.key",
        sa_key=d / "sa.key",
        sa_pub=d / "sa.pub",
        ca_key=d / "ca.key" if node else None,
    )


def _kubeconfig(server: str, pki: _Pki, user: str = "admin") -> str:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "llmtrain-test",
                "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_crt)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(pki.admin_crt),
                    "client-key-data": b64(pki.admin_key),
                },
            }
        ],
        "contexts": [
            {
                "name": "llmtrain-test",
                "context": {"cluster": "llmtrain-test", "user": user, "namespace": "default"},
            }
        ],
        "current-context": "llmtrain-test",
    }
    return json.dumps(cfg, indent=2)  # JSON is valid YAML


# --------------------------------------------------------------------------- helpers


def _require_local_address(ip: str) -> None:
    """Fail early, and clearly, when `ip` is not an address of this host (node mode's veth)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError as e:
            raise ControlPlaneError(
                f"{ip} is not a local address ({e}): node mode needs the node's veth first "
                "(node.NodeNetwork.create(), or node.start_node_cluster())"
            ) from e


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM the child when its parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


def _remove_stale_etcd_dirs(base: Path, min_age: float = 300) -> None:
    """Remove llmtrain-etcd-* data dirs (left by killed runs) that no running process names."""
    stale = [d for d in base.glob("llmtrain-etcd-*") if time.time() - d.stat().st_mtime > min_age]
    if not stale:
        return
    cmdlines = ""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdlines += (proc / "cmdline").read_bytes().decode(errors="replace") + "\n"
            except OSError:
                pass
    for d in stale:
        if str(d) not in cmdlines:
            shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still "exists"; treat it as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _pid_is(pid: int, exe: str) -> bool:
    """True if pid still runs the binary `exe` (guards against PID reuse)."""
    try:
        return os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(exe)
    except OSError:
        return False


def stop_pid(pid: int, exe: str | None = None, timeout: float = 10.0) -> None:
    """SIGTERM one process by PID, SIGKILL it after `timeout` s."""
    if not _pid_alive(pid) or (exe is not None and not _pid_is(pid, exe)):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # reap if it is our child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        if not _pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(data.splitlines()[-lines:])


class ControlPlaneError(RuntimeError):
    pass


class CommandError(subprocess.CalledProcessError):
    """A failed kubectl/helm call whose message carries its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.output}\nstderr: {self.stderr}"


# --------------------------------------------------------------------------- control plane


@dataclass
class ControlPlane:
    """One local control plane. `start()` it, `stop()` it; state lives in `workdir`."""

    workdir: Path
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    etcd_data: Path | None = None
    startup_seconds: float | None = None
    # seconds from start() to each milestone (apiserver ready, ..., nodes ready)
    timings: dict[str, float] = field(default_factory=dict)
    # True (the pytest fixture): components get SIGTERM if the process that started them dies,
    # so a killed test run leaves nothing behind. False for `run.sh up`, which outlives its python.
    die_with_parent: bool = False
    # Node mode (see the module docstring): the apiserver on NODE_HOST_IP for a real node.
    node: bool = False
    # Register kwok's fake node pool; None: yes, except in node mode.
    fake_nodes: bool | None = None
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    _t0: float = field(default=0.0, repr=False)

    # ---- paths
    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

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
    def host(self) -> str:
        """The apiserver's address: 127.0.0.1, or the host end of the node's veth in node mode."""
        return NODE_HOST_IP if self.node else "127.0.0.1"

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.ports['kube-apiserver']}"

    @property
    def registers_fake_nodes(self) -> bool:
        return (not self.node) if self.fake_nodes is None else self.fake_nodes

    def log_paths(self) -> dict[str, Path]:
        return {c: self.log_dir / f"{c}.log" for c in COMPONENTS}

    def env(self) -> dict[str, str]:
        """Environment for shelling out to kubectl/helm against this control plane."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = tools_path()
        return env

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the cached kubectl against this control plane; on failure (check=True) the error shows stderr."""
        r = subprocess.run(
            [str(binaries()["kubectl"]), *args],
            env=self.env(),
            input=input,
            text=True,
            capture_output=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise CommandError(r.returncode, r.args, r.stdout, r.stderr)
        return r

    # ---- HTTP to the apiserver (127.0.0.1 only)
    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
        ctx.load_cert_chain(str(self.pki_dir / "admin.crt"), str(self.pki_dir / "admin.key"))
        return ctx

    def api(self, method: str, path: str, body: Any = None, timeout: float = 5) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, context=self._ssl(), timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def _healthy(self, port: int, path: str, scheme: str = "https", host: str = "127.0.0.1") -> bool:
        url = f"{scheme}://{host}:{port}{path}"
        ctx = None
        if scheme == "https":
            ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
            ctx.load_cert_chain(str(self.pki_dir / "admin.crt"), str(self.pki_dir / "admin.key"))
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    # ---- processes
    def _mark(self, milestone: str) -> None:
        self.timings[milestone] = round(time.monotonic() - self._t0, 2)

    def _spawn(self, name: str, args: list[str]) -> None:
        exe = str(binaries()[name])
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            log.write(f"$ {exe} {' '.join(args)}\n".encode())
            log.flush()
            p = subprocess.Popen(
                [exe, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        self._procs[name] = p
        self.pids[name] = p.pid
        self.save_state()

    def _check_alive(self) -> None:
        for name, pid in self.pids.items():
            if not _pid_alive(pid):
                raise ControlPlaneError(
                    f"{name} (pid {pid}) exited during start-up; last log lines:\n"
                    f"{tail(self.log_paths()[name])}"
                )

    def _wait(self, what: str, ok: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if ok():
                    return
            except (urllib.error.URLError, OSError, ssl.SSLError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.log_dir}")

    def start(self, timeout: float = 90) -> ControlPlane:
        missing = missing_binaries()
        if missing:
            raise ControlPlaneError("binaries not built (run tests/cluster/build.sh): " + ", ".join(missing))
        if self.node:
            _require_local_address(NODE_HOST_IP)
        t0 = self._t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for c in ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"):
            self.ports[c] = free_port()
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else self.workdir
        _remove_stale_etcd_dirs(base)
        self.etcd_data = Path(tempfile.mkdtemp(prefix="llmtrain-etcd-", dir=base))
        pki = _write_pki(self.pki_dir, node=self.node)
        self.kubeconfig.write_text(_kubeconfig(self.server, pki))
        os.chmod(self.kubeconfig, 0o600)
        try:
            self._start_components(pki, timeout)
        except BaseException:
            self.stop(keep_logs=True)
            raise
        self.startup_seconds = time.monotonic() - t0
        self.save_state()
        return self

    def _start_components(self, pki: _Pki, timeout: float) -> None:
        p = self.ports
        etcd_url = f"http://127.0.0.1:{p['etcd']}"
        peer_url = f"http://127.0.0.1:{p['etcd-peer']}"
        self._spawn(
            "etcd",
            [
                "--name=llmtrain-test",
                f"--data-dir={self.etcd_data}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=llmtrain-test={peer_url}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync",
                "--quota-backend-bytes=1073741824",
                "--log-level=warn",
            ],
        )
        kcfg = str(self.kubeconfig)
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                *self._apiserver_mode_flags(pki),
                f"--secure-port={p['kube-apiserver']}",
                f"--cert-dir={self.pki_dir}",
                f"--tls-cert-file={pki.serving_crt}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_crt}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # it taints new nodes node.kubernetes.io/not-ready, and only the node-lifecycle
                # controller (not run here) would lift it: kwok's Ready status is the truth here.
                "--disable-admission-plugins=TaintNodesByCondition",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
                *os.environ.get("LLMTRAIN_APISERVER_FLAGS", "").split(),
            ],
        )
        self._wait(
            "kube-apiserver /readyz",
            lambda: self._healthy(p["kube-apiserver"], "/readyz", host=self.host),
            timeout,
        )
        self._mark("kube-apiserver ready")
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={kcfg}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p['kube-controller-manager']}",
                f"--tls-cert-file={pki.serving_crt}",
                f"--tls-private-key-file={pki.serving_key}",
                "--controllers=" + ",".join(BASE_CONTROLLERS + (NODE_MODE_CONTROLLERS if self.node else ())),
                "--leader-elect=false",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_crt}",
                "--use-service-account-credentials=false",
                "--concurrent-gc-syncs=5",
                "--profiling=false",
                "--v=1",
            ],
        )
        sched_cfg = self.workdir / "kube-scheduler.yaml"
        sched_cfg.write_text(
            json.dumps(
                {
                    "apiVersion": "kubescheduler.config.k8s.io/v1",
                    "kind": "KubeSchedulerConfiguration",
                    "clientConnection": {"kubeconfig": kcfg},
                    "leaderElection": {"leaderElect": False},
                }
            )
        )
        self._spawn(
            "kube-scheduler",
            [
                f"--config={sched_cfg}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p['kube-scheduler']}",
                f"--tls-cert-file={pki.serving_crt}",
                f"--tls-private-key-file={pki.serving_key}",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._spawn(
            "kwok",
            [
                f"--kubeconfig={kcfg}",
                f"--config={STAGES_FILE}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                f"--server-address=127.0.0.1:{p['kwok']}",
                f"--tls-cert-file={pki.serving_crt}",
                f"--tls-private-key-file={pki.serving_key}",
                "--node-lease-duration-seconds=0",
                "--cidr=10.244.0.1/16",
                "--node-ip=10.250.0.1",
            ],
        )
        if self.registers_fake_nodes:
            self.register_nodes()
        self._wait(
            "kube-controller-manager /healthz",
            lambda: self._healthy(p["kube-controller-manager"], "/healthz"),
            timeout,
        )
        self._mark("kube-controller-manager ready")
        self._wait("kube-scheduler /healthz", lambda: self._healthy(p["kube-scheduler"], "/healthz"), timeout)
        self._mark("kube-scheduler ready")
        if self.registers_fake_nodes:
            self._wait("fake nodes Ready", self._nodes_ready, timeout)
            self._mark("nodes Ready")
        self._wait(
            "ServiceAccount default/default",
            lambda: self.api("GET", "/api/v1/namespaces/default/serviceaccounts/default"),
            timeout,
        )
        self._mark("ServiceAccount default/default")

    def _apiserver_mode_flags(self, pki: _Pki) -> list[str]:
        """The apiserver flags that differ between the plain and the node mode."""
        if not self.node:
            return [
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--authorization-mode=RBAC",
                # no kubelet and no pod can reach it: the `kubernetes` Service needs no endpoints.
                "--endpoint-reconciler-type=none",
            ]
        return [
            f"--bind-address={NODE_HOST_IP}",
            # the `kubernetes` Service's endpoint (default lease reconciler): 10.96.0.1:443 in pods
            f"--advertise-address={NODE_HOST_IP}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            # apiserver -> kubelet (logs, exec, port-forward): the admin identity, the kubelet's
            # serving certificate checked against the test CA, on the node's InternalIP.
            f"--kubelet-client-certificate={pki.admin_crt}",
            f"--kubelet-client-key={pki.admin_key}",
            f"--kubelet-certificate-authority={pki.ca_crt}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    # ---- node pool
    @staticmethod
    def node_manifests() -> list[dict[str, Any]]:
        def node(
            name: str, pool: str, capacity: dict[str, str], taints: list[dict[str, str]]
        ) -> dict[str, Any]:
            return {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        POOL_LABEL: pool,
                    },
                },
                "spec": {"taints": taints} if taints else {},
                "status": {"capacity": capacity, "allocatable": capacity},
            }

        gpu_cap = {
            "cpu": "64",
            "memory": "512Gi",
            "pods": "110",
            "ephemeral-storage": "1Ti",
            GPU_RESOURCE: str(GPUS_PER_NODE),
        }
        cpu_cap = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "500Gi"}
        taint = [{"key": GPU_TAINT_KEY, "value": "present", "effect": "NoSchedule"}]
        return [node(f"gpu-node-{i}", "gpu", gpu_cap, taint) for i in range(GPU_NODES)] + [
            node(f"cpu-node-{i}", "cpu", cpu_cap, []) for i in range(CPU_NODES)
        ]

    def register_nodes(self) -> None:
        for n in self.node_manifests():
            try:
                self.api("POST", "/api/v1/nodes", n)
            except urllib.error.HTTPError as e:
                if e.code != 409:
                    raise

    def _nodes_ready(self) -> bool:
        nodes = self.api("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")["items"]
        ready = [
            n
            for n in nodes
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
        ]
        return len(ready) == GPU_NODES + CPU_NODES

    # ---- state / stop
    def save_state(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        state = {
            "workdir": str(self.workdir),
            "ports": self.ports,
            "pids": self.pids,
            "exes": {n: str(binaries()[n]) for n in self.pids},
            "etcd_data": str(self.etcd_data) if self.etcd_data else None,
            "kubeconfig": str(self.kubeconfig),
            "startup_seconds": self.startup_seconds,
            "timings": self.timings,
            "node": self.node,
            "fake_nodes": self.fake_nodes,
        }
        self.state_file.write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, workdir: Path) -> ControlPlane:
        state = json.loads((workdir / "state.json").read_text())
        cp = cls(
            workdir=Path(state["workdir"]), node=bool(state.get("node")), fake_nodes=state.get("fake_nodes")
        )
        cp.ports = {k: int(v) for k, v in state["ports"].items()}
        cp.pids = {k: int(v) for k, v in state["pids"].items()}
        cp.etcd_data = Path(state["etcd_data"]) if state.get("etcd_data") else None
        cp.startup_seconds = state.get("startup_seconds")
        return cp

    def running(self) -> dict[str, bool]:
        exes = binaries()
        return {n: _pid_alive(pid) and _pid_is(pid, str(exes[n])) for n, pid in self.pids.items()}

    def stop(self, keep_logs: bool = True) -> None:
        """Stop every component by PID (reverse start order); remove etcd's data."""
        exes = binaries()
        for name in reversed(COMPONENTS):
            pid = self.pids.get(name)
            if pid is not None:
                stop_pid(pid, str(exes[name]))
        self.pids.clear()
        self._procs.clear()
        if self.etcd_data is not None:
            shutil.rmtree(self.etcd_data, ignore_errors=True)
            self.etcd_data = None
        if keep_logs:
            self.save_state()
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def logs_summary(self, lines: int = 20) -> str:
        out = []
        for name, path in self.log_paths().items():
            if path.exists():
                out.append(f"===== {name}: {path} (last {lines} lines)\n{tail(path, lines)}")
        return "\n".join(out)


# --------------------------------------------------------------------------- CLI


def default_cli_dir() -> Path:
    return cache_dir() / "run" / "cluster"


def _cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tests/cluster/run.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["up", "down", "status", "logs", "env"])
    ap.add_argument("--dir", type=Path, default=default_cli_dir(), help="state directory")
    ap.add_argument("-n", "--lines", type=int, default=30, help="log lines per component (logs)")
    ap.add_argument("-f", "--follow", action="store_true", help="logs: keep following (tail -F)")
    ap.add_argument(
        "--node",
        action="store_true",
        help="up: node mode, plus a real node (containerd, kubelet, kube-proxy) in the network namespace llmtrain-node",
    )
    ap.add_argument("--fake-nodes", action="store_true", help="up --node: register kwok's fake node pool too")
    args = ap.parse_args(argv)
    state = args.dir / "state.json"
    node_dir = args.dir / "node"

    if args.command == "up":
        if state.exists():
            cp = ControlPlane.load(args.dir)
            if any(cp.running().values()):
                print(
                    f"# already running (tests/cluster/run.sh down to stop); state in {args.dir}",
                    file=sys.stderr,
                )
                print(f"export KUBECONFIG={cp.kubeconfig}")
                print(f'export PATH="{binaries()["kubectl"].parent}:$PATH"')
                return 0
            shutil.rmtree(args.dir, ignore_errors=True)
        if args.node:
            # imported here: node.py imports this module, and plain mode needs none of it
            import node as node_mod

            t0 = time.monotonic()
            try:
                cp, started = node_mod.start_node_cluster(args.dir, fake_nodes=args.fake_nodes)
            except (ControlPlaneError, node_mod.NodeError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            steps = ", ".join(f"{k} {v:.1f}s" for k, v in started.timings.items())
            print(
                f"# node {started.name} Ready {time.monotonic() - t0:.1f}s after start ({steps}); "
                f"netns {started.netns}, node IP {started.ip}; logs in {started.log_dir}",
                file=sys.stderr,
            )
        else:
            try:
                cp = ControlPlane(workdir=args.dir).start()
            except ControlPlaneError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in cp.timings.items())
        print(
            f"# control plane up in {cp.startup_seconds:.1f}s ({steps}): {cp.server}; logs in {cp.log_dir}",
            file=sys.stderr,
        )
        print(f"export KUBECONFIG={cp.kubeconfig}")
        print(f'export PATH="{binaries()["kubectl"].parent}:$PATH"')
        return 0
    if not state.exists():
        print(f"not running (no {state})", file=sys.stderr)
        return 0 if args.command == "down" else 1
    cp = ControlPlane.load(args.dir)
    node: Any = None  # node.Node when a node runs (the module is imported only then)
    if (node_dir / "state.json").exists():
        import node as node_mod

        node = node_mod.Node.load(node_dir, cp=cp)
    if args.command == "down":
        t0 = time.monotonic()
        if node is not None:
            node.stop(keep_logs=False)  # the node first: its pods, mounts, namespace and veth
            steps = ", ".join(f"{k} {v:.1f}s" for k, v in node.stop_timings.items())
            print(f"# node stopped ({steps})", file=sys.stderr)
        cp.stop(keep_logs=False)
        print(f"stopped ({time.monotonic() - t0:.1f}s)", file=sys.stderr)
    elif args.command == "status":
        for name, alive in cp.running().items():
            print(
                f"{name:<24} pid {cp.pids[name]:<8} {'running' if alive else 'STOPPED'}  "
                f"port {cp.ports.get(name, '-')}"
            )
        if node is not None:
            for name, alive in node.running().items():
                print(
                    f"{name:<24} pid {node.pids[name]:<8} {'running' if alive else 'STOPPED'}  netns {node.netns}"
                )
            try:
                ready = "Ready" if node.ready() else "NotReady"
            except (urllib.error.URLError, OSError, ssl.SSLError):
                ready = "unknown (apiserver unreachable)"
            print(f"node {node.name}: {ready}, IP {node.ip}, netns {node.netns}")
        print(f"KUBECONFIG={cp.kubeconfig}")
    elif args.command == "logs":
        paths = list(cp.log_paths().values())
        if node is not None:
            paths += list(node.log_paths().values())
        if args.follow:
            os.execvp("tail", ["tail", "-n", str(args.lines), "-F", *[str(p) for p in paths if p.exists()]])
        print(cp.logs_summary(args.lines))
        if node is not None:
            print(node.logs_summary(args.lines))
    elif args.command == "env":
        print(f"export KUBECONFIG={cp.kubeconfig}")
        print(f'export PATH="{binaries()["kubectl"].parent}:$PATH"')
    return 0


if __name__ == "__main__":
    # Run the CLI from the module imported by its own name, so that node.py's
    # `import controlplane` shares its classes instead of loading a second copy.
    sys.path.insert(0, str(HERE))
    import controlplane as _self

    sys.exit(_self._cli())
