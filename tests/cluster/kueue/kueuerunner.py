"""Run the real Kueue controller (``build.sh kueue``) against the test control plane.

The control plane runs on the host, so Kueue does too: its CRDs come from the Go module's
``config/components/crd/bases`` (the module cache ``build.sh`` filled: the same version
as the binary, nothing vendored), its webhooks are Kueue's own
``config/components/webhook/manifests.yaml`` pointed at ``https://127.0.0.1:<port>`` with a
CA made here (Kueue's internal cert management is off: it would write certs into a Secret
for an in-cluster Service). Only the webhooks of Kueue's own kinds are installed: no job
framework is enabled (the operator integrates ``LLMTrainingJob`` through the ``Workload``
API: docs/kueue.md), so a Job/Pod/Deployment webhook would point at a path Kueue does not
serve and, with ``failurePolicy: Fail``, block those kinds cluster-wide.
"""

from __future__ import annotations

import base64
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import controlplane
import yaml

HERE = Path(__file__).resolve().parent
NAMESPACE = "kueue-system"
# With internal cert management off, Kueue v0.17 reads a metrics server certificate from this
# fixed path (cmd/kueue/main.go) and exits without one, even with the metrics server off
# (bindAddress "0", as here): a throwaway self-signed pair is put there once per machine.
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")
# The LLMTrainingJob kind as Kueue names an external framework (Kind.version.group).
EXTERNAL_FRAMEWORK = "LLMTrainingJob.v1alpha1.llmtrain.dev"


def version() -> str:
    return controlplane.read_versions()["KUEUE_VERSION"]


def binary() -> Path:
    return controlplane.cache_dir() / "bin" / f"kueue-{version()}" / "kueue"


def module_dir() -> Path:
    """The sigs.k8s.io/kueue module's source in build.sh's module cache."""
    return controlplane.cache_dir() / "go" / "mod" / "sigs.k8s.io" / f"kueue@{version()}"


def missing() -> str | None:
    """Why Kueue cannot run here (for a skip), or None."""
    if not binary().is_file():
        return f"{binary()} missing (tests/cluster/build.sh kueue)"
    if not (module_dir() / "config").is_dir():
        return f"{module_dir()} missing (tests/cluster/build.sh kueue fills the module cache)"
    return None


def crds() -> list[dict[str, Any]]:
    out = []
    for f in sorted((module_dir() / "config/components/crd/bases").glob("*.yaml")):
        out.extend(d for d in yaml.safe_load_all(f.read_text()) if d)
    return out


def webhooks(port: int, ca_pem: bytes) -> list[dict[str, Any]]:
    """Kueue's webhook configurations for its own kinds, served on 127.0.0.1:port."""
    docs = yaml.safe_load_all((module_dir() / "config/components/webhook/manifests.yaml").read_text())
    out = []
    for d in docs:
        if not d:
            continue
        hooks = [w for w in d["webhooks"] if all("kueue.x-k8s.io" in r["apiGroups"] for r in w["rules"])]
        for w in hooks:
            path = w["clientConfig"]["service"]["path"]
            w["clientConfig"] = {
                "url": f"https://127.0.0.1:{port}{path}",
                "caBundle": base64.b64encode(ca_pem).decode(),
            }
        d["metadata"]["name"] = f"kueue-{d['metadata']['name']}"
        d["webhooks"] = hooks
        out.append(d)
    return out


class Kueue:
    """One Kueue manager process on the host, its CRDs and webhooks in the test cluster."""

    def __init__(self, cp: Any, workdir: Path) -> None:
        self.cp = cp
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "kueue.log"

    def _certs(self) -> tuple[Path, bytes]:
        from controlplane import _make_cert, _pem_cert, _pem_key

        ca = _make_cert("kueue-webhook-ca", ca=True)
        cert, key = _make_cert("kueue-webhook", issuer=ca, server=True, dns=["localhost"], ips=["127.0.0.1"])
        d = self.workdir / "certs"
        d.mkdir(parents=True, exist_ok=True)
        # controller-runtime's webhook server reads these two names from certDir
        (d / "tls.crt").write_bytes(_pem_cert(cert))
        (d / "tls.key").write_bytes(_pem_key(key))
        return d, _pem_cert(ca[0])

    def _metrics_certs(self) -> None:
        from controlplane import _make_cert, _pem_cert, _pem_key

        if (METRICS_CERT_DIR / "tls.crt").is_file() and (METRICS_CERT_DIR / "tls.key").is_file():
            return
        cert, key = _make_cert("kueue-metrics-unused", server=True, ips=["127.0.0.1"])
        try:
            METRICS_CERT_DIR.mkdir(parents=True, exist_ok=True)
            for name, data in (("tls.key", _pem_key(key)), ("tls.crt", _pem_cert(cert))):
                tmp = METRICS_CERT_DIR / f".{name}.{os.getpid()}"
                tmp.write_bytes(data)
                tmp.replace(METRICS_CERT_DIR / name)  # atomic: another test run may read it now
        except OSError as e:
            raise RuntimeError(
                f"kueue needs {METRICS_CERT_DIR}/tls.{{crt,key}} and it cannot be written: {e}"
            ) from e

    def config(self, webhook_port: int, health_port: int, cert_dir: Path) -> dict[str, Any]:
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "manageJobsWithoutQueueName": False,
            # Only namespaces that ask: Kueue never looks at the rest of the test cluster.
            "managedJobsNamespaceSelector": {"matchLabels": {"kueue.llmtrain.dev/managed": "true"}},
            "integrations": {"frameworks": [], "externalFrameworks": [EXTERNAL_FRAMEWORK]},
            # Preempted workloads come back at once (the default backs off for minutes).
            "waitForPodsReady": None,
        }

    def start(self, timeout: float = 60) -> Kueue:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cp.kubectl("apply", "--server-side", "-f", "-", input=_yaml_list(crds()))
        for c in crds():
            self.cp.kubectl(
                "wait", "--for=condition=Established", f"crd/{c['metadata']['name']}", "--timeout=30s"
            )
        self.cp.kubectl("create", "namespace", NAMESPACE, check=False)
        cert_dir, ca_pem = self._certs()
        self._metrics_certs()
        webhook_port, health_port = controlplane.free_port(), controlplane.free_port()
        cfg = {k: v for k, v in self.config(webhook_port, health_port, cert_dir).items() if v is not None}
        cfg_path = self.workdir / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "KUBECONFIG": str(self.cp.kubeconfig)}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(binary()),
                    f"--config={cfg_path}",
                    # no aggregated visibility API server: nothing registers its APIService here
                    "--feature-gates=VisibilityOnDemand=false",
                    "--zap-log-level=3",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=controlplane._die_with_parent,
            )
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"kueue exited {self.proc.returncode}:\n{controlplane.tail(self.log_path, 40)}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"kueue not ready in {timeout}s:\n{controlplane.tail(self.log_path, 40)}")
            time.sleep(0.5)
        # Webhooks last: before the server answers they would refuse every Kueue object.
        self.cp.kubectl("apply", "-f", "-", input=_yaml_list(webhooks(webhook_port, ca_pem)))
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
            for d in webhooks(1, b""):
                if d["kind"].lower() == kind:
                    self.cp.kubectl("delete", kind, d["metadata"]["name"], "--ignore-not-found", check=False)

    def log(self, lines: int = 60) -> str:
        return controlplane.tail(self.log_path, lines)


def _yaml_list(objs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": objs})
