"""Fixtures for tests that talk to a real Kubernetes control plane.

``cluster`` (session scope) starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok from the binaries built by ``tests/cluster/build.sh``
(see ``tests/cluster/controlplane.py``) and yields a :class:`Cluster`: the
kubeconfig path, Kubernetes API clients, and a ``kubectl`` helper. Tests that use
it are skipped, with the reason, when the binaries (or the Python packages
``kubernetes`` / ``cryptography``) are missing.

``namespace`` (function scope) gives each test a fresh namespace, deleted after it.

Component logs: on a failed test the tail of every component log is attached to
the report; when any test failed the control plane's directory (logs, kubeconfig)
is kept and its path printed at the end of the session.

Never connect to a pod or service IP: they are fake (kwok) private addresses.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
# `tests.*` importable when only this folder (no __init__.py) is collected; appended, so the
# repository's operator/ folder never shadows the standard library's `operator`.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import controlplane  # noqa: E402

T = TypeVar("T")

_STARTUP: dict[str, Any] = {}
_STARTUP_KEY = pytest.StashKey[dict[str, Any]]()


@dataclass
class Cluster:
    """What the ``cluster`` fixture yields."""

    cp: controlplane.ControlPlane
    api_client: Any  # kubernetes.client.ApiClient

    @property
    def kubeconfig(self) -> Path:
        return self.cp.kubeconfig

    @property
    def env(self) -> dict[str, str]:
        """os.environ + KUBECONFIG + PATH with the cached kubectl/helm: for subprocess calls."""
        return self.cp.env()

    @property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    @property
    def batch(self) -> Any:
        from kubernetes import client

        return client.BatchV1Api(self.api_client)

    @property
    def rbac(self) -> Any:
        from kubernetes import client

        return client.RbacAuthorizationV1Api(self.api_client)

    @property
    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client)

    @property
    def apiext(self) -> Any:
        from kubernetes import client

        return client.ApiextensionsV1Api(self.api_client)

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.cp.kubectl(*args, check=check, input=input, timeout=timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [str(controlplane.binaries()["helm"]), *args],
            env=self.env,
            text=True,
            capture_output=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise controlplane.CommandError(r.returncode, r.args, r.stdout, r.stderr)
        return r

    def crds_and_namespace(self, ns: str) -> str:
        """The repo's CRDs applied and served, and namespace ``ns`` (kept if it exists)."""
        from kubernetes import client

        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        self.wait_for(
            lambda: self.kubectl("get", "ltj", "-A", check=False).returncode == 0, what="`kubectl get ltj`"
        )
        try:
            self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
        except client.ApiException as e:
            if e.status != 409:
                raise
        return ns

    @staticmethod
    def wait_for(
        fn: Callable[[], T], timeout: float = 30, interval: float = 0.2, what: str = "condition"
    ) -> T:
        """Poll fn() until it returns something truthy; return it. Fails the test on timeout."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = fn()
            if last:
                return last
            time.sleep(interval)
        pytest.fail(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def _skip_reason() -> str | None:
    missing = controlplane.missing_binaries()
    if missing:
        return "control-plane binaries not built (run tests/cluster/build.sh): " + ", ".join(
            os.path.basename(m) for m in missing
        )
    for mod in ("kubernetes", "cryptography"):
        try:
            __import__(mod)
        except ImportError:
            return f"Python package {mod!r} not installed (pip install -e '.[operator,test]')"
    return None


# Pod IPs (kwok), service IPs and kwok's node IPs are fake private addresses: nothing listens
# there and traffic to private ranges is not allowed on these machines. Every connect() from
# the test process to one of these ranges fails at once, before any packet leaves.
PRIVATE_NETS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]
# The one exception: the veth pair of the real node's network namespace, which the tests make
# themselves (tests/cluster/node.py); the apiserver (node mode) and moto listen on its host end.
NODE_LINK = ipaddress.ip_network(f"{controlplane.NODE_HOST_IP}/30", strict=False)


class PrivateAddressConnectError(ConnectionRefusedError):
    pass


def _check_destination(address: Any) -> None:
    if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
        return
    try:
        ip = ipaddress.ip_address(address[0])
    except ValueError:
        return
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip not in NODE_LINK and any(ip in net for net in PRIVATE_NETS):
        raise PrivateAddressConnectError(
            f"test refused to connect to {address[0]}: pod/service IPs are fake (kwok) private "
            "addresses; take an injectable resolver and point it at 127.0.0.1"
        )


@pytest.fixture(scope="session", autouse=True)
def _no_private_connections() -> Iterator[None]:
    orig_connect, orig_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self: socket.socket, address: Any) -> None:
        _check_destination(address)
        orig_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check_destination(address)
        return orig_connect_ex(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex = orig_connect, orig_connect_ex  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from kubernetes import config as kconfig

    workdir = tmp_path_factory.mktemp("controlplane")
    for attempt in (1, 2):  # a second try covers a free port taken between probe and bind
        cp = controlplane.ControlPlane(workdir=workdir / f"try{attempt}", die_with_parent=True)
        try:
            cp.start()
            break
        except controlplane.ControlPlaneError as e:
            if attempt == 2:
                pytest.fail(f"control plane failed to start: {e}\n{cp.logs_summary(30)}")
    info = {
        "seconds": cp.startup_seconds,
        "timings": cp.timings,
        "workdir": str(cp.workdir),
        "server": cp.server,
    }
    _STARTUP.update(info)
    request.config.stash[_STARTUP_KEY] = info
    api_client = kconfig.new_client_from_config(config_file=str(cp.kubeconfig))
    c = Cluster(cp=cp, api_client=api_client)
    try:
        yield c
    finally:
        api_client.close()
        failed = request.session.testsfailed > 0
        cp.stop(keep_logs=failed)
        info["kept"] = failed


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount ready); deleted after the test."""
    from kubernetes import client

    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{base}-{uuid.uuid4().hex[:5]}"
    cluster.core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"llmtrain.dev/test": "true"}))
    )

    def sa_ready() -> bool:
        try:
            cluster.core.read_namespaced_service_account("default", name)
            return True
        except client.ApiException as e:
            if e.status == 404:
                return False
            raise

    cluster.wait_for(sa_ready, timeout=30, what=f"ServiceAccount {name}/default")
    yield name
    try:
        cluster.core.delete_namespace(name, propagation_policy="Background")
    except client.ApiException as e:
        if e.status != 404:
            raise


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    outcome: Any = yield
    rep = outcome.get_result()
    if rep.failed and "cluster" in getattr(item, "fixturenames", ()) and _STARTUP.get("workdir"):
        cp = controlplane.ControlPlane(workdir=Path(_STARTUP["workdir"]))
        rep.sections.append(("control plane logs", cp.logs_summary(15)))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    info = config.stash.get(_STARTUP_KEY, None)
    if not info:
        return
    terminalreporter.section("llmtrain control plane")
    terminalreporter.write_line(
        f"control plane start-up (etcd, apiserver, controller-manager, scheduler, kwok, 6 nodes Ready): "
        f"{info['seconds']:.2f} s"
    )
    steps = ", ".join(f"{k} at {v:.1f} s" for k, v in info.get("timings", {}).items())
    terminalreporter.write_line(f"  milestones: {steps}")
    if info.get("kept"):
        terminalreporter.write_line(f"component logs kept for failed tests: {info['workdir']}/logs/")
