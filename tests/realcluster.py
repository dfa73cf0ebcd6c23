"""The whole product on a real node: what ``make k8s-demo`` and the real-pod tests stand up.

1. the control plane in node mode and the real node (``tests/cluster/node.py``: containerd,
   kubelet, kube-proxy, CoreDNS, the NetworkPolicy engine, inside the network namespace
   ``llmtrain-node``), with the images ``make images`` built imported into the node's store;
2. ``helm install`` of ``charts/llmtrain`` with its defaults: the operator runs **as a pod** from
   ``ghcr.io/llmtrain/llmtrain-operator:0.1.0``, with the chart's ServiceAccount, and reaches
   every job's head through its Service name (cluster DNS);
3. moto's S3 server on the host end of the node's veth (172.31.200.1), the one host address
   pods can reach: data, checkpoints, logs and exports go there; the jobs read its dummy
   credentials from a Secret (``spec.storage.secretRef``), as on a real cluster.

Nothing here connects anywhere but 127.0.0.1 and the veth pair's two addresses; anything that
must reach a pod or Service IP runs inside the node's namespace (:meth:`RealCluster.in_node`).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests" / "cluster") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import controlplane  # noqa: E402
import node as node_mod  # noqa: E402
from controlplane import NODE_HOST_IP, ControlPlane  # noqa: E402

T = TypeVar("T")

NAMESPACE = "llmtrain-system"
RELEASE = "llmtrain"
S3_SECRET = "s3-credentials"
BUCKET = "llmtrain"
# The names the chart and the spec use by default: the tests and the demo set no image.
OPERATOR_IMAGE = "ghcr.io/llmtrain/llmtrain-operator:0.1.0"
RUNTIME_IMAGE = "ghcr.io/llmtrain/llmtrain:0.1.0"
IMAGE_ARCHIVES = ("operator.tar", "runtime.tar")
# moto accepts any key; the pods get these from the Secret, never from the operator.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "llmtrain-test", "AWS_SECRET_ACCESS_KEY": "llmtrain-test-secret"}


def skip_reason() -> str | None:
    """Why the real node cannot run here (not root, binaries or images missing), or None."""
    reason = node_mod.node_skip_reason()
    if reason:
        return reason
    missing = [a for a in IMAGE_ARCHIVES if not (node_mod.images_dir() / a).is_file()]
    if missing:
        return f"images not built (make images): {', '.join(missing)} missing in {node_mod.images_dir()}"
    return None


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(fn: Callable[[], T], timeout: float, what: str, interval: float = 1.0) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


@dataclass
class RealCluster:
    workdir: Path
    die_with_parent: bool = False
    cp: ControlPlane | None = None
    node: Any = None  # node.Node
    s3_endpoint: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    _moto: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ start / stop
    def start(self) -> RealCluster:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cp, self.node = node_mod.start_node_cluster(self.workdir, die_with_parent=self.die_with_parent)
        self.timings["node ready"] = time.monotonic() - t0
        try:
            self._start_moto()
            self.timings["s3"] = time.monotonic() - t0
            self.helm_install()
            self.timings["operator ready"] = time.monotonic() - t0
        except BaseException:
            self.stop(keep_logs=True)
            raise
        return self

    def stop(self, keep_logs: bool = False) -> None:
        if self._moto is not None:
            self._moto.terminate()
            try:
                self._moto.wait(10)
            except subprocess.TimeoutExpired:
                self._moto.kill()
            self._moto = None
        if self.cp is not None and self.node is not None:
            node_mod.stop_node_cluster(self.cp, self.node, keep_logs=keep_logs)
            self.cp = self.node = None

    def _start_moto(self) -> None:
        """moto on the host end of the veth: the only host address the pods can reach."""
        exe = Path(sys.executable).parent / "moto_server"
        port = _free_port(NODE_HOST_IP)
        log = open(self.workdir / "moto.log", "wb")
        self._moto = subprocess.Popen(
            [str(exe), "-H", NODE_HOST_IP, "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=controlplane._die_with_parent if self.die_with_parent else None,
        )
        self.s3_endpoint = f"http://{NODE_HOST_IP}:{port}"

        def up() -> bool:
            try:
                urllib.request.urlopen(self.s3_endpoint, timeout=1)
                return True
            except OSError:
                return False

        wait_for(up, 30, "moto S3", interval=0.1)
        self.s3().create_bucket(Bucket=BUCKET)

    def s3(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def helm_install(self, *extra: str) -> None:
        """The chart with its defaults (the operator image by its default name), then Ready."""
        self.helm(
            "install",
            RELEASE,
            str(ROOT / "charts" / "llmtrain"),
            "-n",
            NAMESPACE,
            "--create-namespace",
            "--wait",
            "--timeout",
            "300s",
            *extra,
            timeout=330,
        )

    # ------------------------------------------------------------------ commands
    @property
    def env(self) -> dict[str, str]:
        assert self.cp is not None
        return self.cp.env()

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        assert self.cp is not None
        return self.cp.kubectl(*args, check=check, input=input, timeout=timeout)

    def helm(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [str(controlplane.binaries()["helm"]), *args],
            env=self.env,
            text=True,
            capture_output=True,
            timeout=timeout,
        )
        if r.returncode != 0:
            raise controlplane.CommandError(r.returncode, r.args, r.stdout, r.stderr)
        return r

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        r = self.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def in_node(
        self, *argv: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """A command inside the node's network namespace: the only place pod and Service IPs
        exist (and the only place from which this harness ever connects to one)."""
        r = subprocess.run(node_mod.nsenter_argv(*argv), text=True, capture_output=True, timeout=timeout)
        if check and r.returncode != 0:
            raise controlplane.CommandError(r.returncode, r.args, r.stdout, r.stderr)
        return r

    def in_node_with_cluster_dns(self, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``script`` (shell) inside the node's namespace, resolving names as a pod does: a
        private mount namespace whose /etc/resolv.conf names the cluster DNS."""
        resolv = self.workdir / "resolv.conf"
        resolv.write_text(
            f"nameserver {controlplane.NODE_IP}\nsearch svc.cluster.local cluster.local\noptions ndots:5\n"
        )
        inner = f"mount --bind {shlex.quote(str(resolv))} /etc/resolv.conf && {script}"
        return self.in_node(
            "unshare", "--mount", "--propagation", "private", "sh", "-c", inner, timeout=timeout
        )

    # ------------------------------------------------------------------ jobs
    def namespace_with_s3(self, ns: str) -> None:
        """Namespace ``ns`` and the Secret its jobs name in ``spec.storage.secretRef``."""
        self.kubectl("create", "namespace", ns, check=False)
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": S3_SECRET, "namespace": ns},
            "stringData": dict(S3_CREDENTIALS),
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(secret))

    def job_text(self, path: Path) -> str:
        """A job manifest with the demo's ``S3_ENDPOINT`` placeholder filled in."""
        return path.read_text().replace("http://S3_ENDPOINT", self.s3_endpoint)

    def ltj(self, name: str, namespace: str) -> dict[str, Any]:
        return self.get("ltj", name, namespace) or {}

    def phase(self, name: str, namespace: str) -> str:
        return str(self.ltj(name, namespace).get("status", {}).get("phase", ""))

    def logs_summary(self, lines: int = 30) -> str:
        parts = []
        if self.cp is not None:
            parts.append(self.cp.logs_summary(lines))
        if self.node is not None:
            parts.append(self.node.logs_summary(lines))
        if self.cp is not None:
            r = self.kubectl("logs", "-n", NAMESPACE, "deploy/llmtrain", "--tail", str(lines), check=False)
            parts.append(f"===== operator pod (last {lines} lines)\n{r.stdout}{r.stderr}")
        return "\n".join(parts)


def s3_env() -> dict[str, str]:
    """The dummy credentials for this process's own S3 clients (the demo's `llmtrain` calls)."""
    return {**os.environ, **S3_CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1"}
