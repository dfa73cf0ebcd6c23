"""A real local Ray cluster standing in for a job's KWOK pods (which run no processes).

``ray start --head`` on 127.0.0.1 with the dashboard (Ray's Jobs API) and token auth
(``RAY_AUTH_MODE=token``), as the head pod runs it; the operator reaches it through its
head resolver (``--ray-head-host 127.0.0.1 --ray-dashboard-port … --ray-progress-port …``)
and the job's Secret holds the same token (the operator's ``--ray-token-file``).

Used by the operator integration tests and ``make k8s-demo``; run it by hand with
``python -m tests.raystandin`` (prints the addresses, stops on Ctrl-C).

Like a kubelet, it also copies each job's spec ConfigMap to a file (:meth:`RayStandIn.mirror_specs`):
the driver the operator submits reads the job from there (``--ray-driver-spec-path``), as it
reads the ConfigMap's mount in a head pod.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

STANDIN_ENV = "LLMTRAIN_RAY_STANDIN"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RayStandIn:
    """One Ray head (and its CPUs as the worker nodes) on loopback, token-authenticated."""

    def __init__(self, num_cpus: int = 2, token: str | None = None, workdir: Path | None = None) -> None:
        self.num_cpus = num_cpus
        self.token = token or secrets.token_hex(32)
        # Short: Ray's unix socket paths under it must stay below 108 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="rsi-", dir="/tmp"))
        self.workdir = workdir or self.tmp
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.progress_port = free_port()
        self.token_file = self.workdir / "ray-token"
        self.token_file.write_text(self.token)
        self.specs = self.workdir / "specs"
        self._mirror_stop = threading.Event()
        self._mirror: threading.Thread | None = None

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def operator_args(self) -> tuple[str, ...]:
        """The operator's flags that point it at this stand-in for every job's head."""
        return (
            "--ray-head-host",
            "127.0.0.1",
            "--ray-dashboard-port",
            str(self.dashboard_port),
            "--ray-progress-port",
            str(self.progress_port),
            "--ray-token-file",
            str(self.token_file),
            "--ray-driver-spec-path",
            str(self.specs / "{namespace}" / "{name}" / "job.yaml"),
        )

    def mirror_specs(self, kubeconfig: Path, interval: float = 0.5) -> None:
        """Copy every llmtrain spec ConfigMap to ``specs/<namespace>/<job>/job.yaml`` until
        :meth:`stop`: the kubelet's part for the KWOK head pods, which mount nothing."""
        if self._mirror is not None:
            return
        from kubernetes import client, config

        core = client.CoreV1Api(config.new_client_from_config(str(kubeconfig)))

        def sync() -> None:
            while not self._mirror_stop.is_set():
                try:
                    items = core.list_config_map_for_all_namespaces(
                        label_selector="app.kubernetes.io/managed-by=llmtrain-operator"
                    ).items
                except Exception:  # the control plane restarting: the next round retries
                    items = []
                for cm in items:
                    job = (cm.metadata.labels or {}).get("llmtrain.dev/job")
                    text = (cm.data or {}).get("job.yaml")
                    if job and text is not None:
                        _write_if_changed(self.specs / cm.metadata.namespace / job / "job.yaml", text)
                self._mirror_stop.wait(interval)

        self._mirror = threading.Thread(target=sync, name="standin-kubelet", daemon=True)
        self._mirror.start()

    def env(self) -> dict[str, str]:
        bindir = str(Path(sys.executable).parent)
        return {
            **os.environ,
            # The driver runs `llmtrain driver` from the job's entrypoint: the venv's bin first.
            "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            # Every Ray socket on loopback (see llmtrain.runtime.ray_local).
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
            "RAY_TMPDIR": str(self.tmp),
            "LLMTRAIN_RUN_DIR": str(self.workdir / "driver-runs"),
            # Every process of this stand-in (GCS, raylet, dashboard, workers, the driver)
            # inherits it: how kill_head() finds them all, and only them.
            STANDIN_ENV: str(self.tmp),
        }

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        ray_bin = str(Path(sys.executable).parent / "ray")
        return subprocess.run(
            [ray_bin, *args], env=self.env(), capture_output=True, text=True, timeout=timeout, cwd=self.tmp
        )

    def start(self) -> RayStandIn:
        r = self.ray(
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            # Not Ray's fixed default (52365): an agent left over elsewhere must not block ours.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--temp-dir={self.tmp}",
            "--disable-usage-stats",
        )
        if r.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{r.stdout}\n{r.stderr}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.get("/api/jobs/")
                return self
            except (OSError, urllib.error.HTTPError):
                time.sleep(0.5)
        raise RuntimeError("the Ray dashboard did not answer within 60 s")

    def stop(self) -> None:
        self._mirror_stop.set()
        self.kill_head()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- the Jobs API, as a user (or a test) calls it

    def get(self, path: str, token: str | None = "") -> Any:
        headers = {} if token is None else {"Authorization": f"Bearer {token or self.token}"}
        req = urllib.request.Request(self.dashboard + path, headers=headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def jobs(self) -> list[dict[str, Any]]:
        """Every Ray job this head has run (submissions, by submission_id)."""
        return [j for j in self.get("/api/jobs/") if j.get("submission_id")]

    def pids(self) -> list[int]:
        """This stand-in's processes (never another Ray cluster's on the machine)."""
        marker = f"{STANDIN_ENV}={self.tmp}".encode()
        out = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                # Ray's agents retitle themselves (setproctitle overwrites their environment
                # block): those are found by their working directory, where `ray start` ran.
                cwd = os.readlink(proc / "cwd")
                if cwd.startswith(str(self.tmp)) or marker in (proc / "environ").read_bytes().split(b"\0"):
                    out.append(int(proc.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
        return [p for p in out if p != os.getpid()]

    def kill_head(self) -> None:
        """SIGKILL every process of the stand-in (GCS, raylet, dashboard, workers, the
        driver): what losing the head pod does to a Ray cluster."""
        for _ in range(5):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def kill_training_worker(self) -> int:
        """SIGKILL the Ray Train worker process: what losing a worker pod does to the run."""
        for pid in self.pids():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"RayTrainWorker" in cmd:
                os.kill(pid, signal.SIGKILL)
                return pid
        raise RuntimeError("no RayTrainWorker process is running")


def _write_if_changed(path: Path, text: str) -> None:
    """Replace the file atomically, as a kubelet swaps a ConfigMap volume's contents."""
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    standin = RayStandIn().start()
    print(
        json.dumps(
            {
                "dashboard": standin.dashboard,
                "progress_port": standin.progress_port,
                "token_file": str(standin.token_file),
            }
        ),
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        standin.stop()


if __name__ == "__main__":
    main()
