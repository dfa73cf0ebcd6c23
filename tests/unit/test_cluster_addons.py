"""The pure builders of tests/cluster/addons.py: the Corefile and the engine's flags.

What they promise is the network-safety rule of the real node: CoreDNS serves the cluster
domain and the reverse zones only, binds the node's address only, and nothing in its config
can send a query elsewhere (no forward; the binary has none either, see build.sh coredns).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import addons  # noqa: E402

KUBECONFIG = Path("/run/x/kubeconfig")


def _blocks(text: str) -> list[str]:
    """The server-block headers of a Corefile (lines that open a block at depth 0)."""
    depth, heads = 0, []
    for line in text.splitlines():
        if depth == 0 and line.rstrip().endswith("{"):
            heads.append(line.rstrip()[:-1].strip())
        depth += line.count("{") - line.count("}")
    assert depth == 0, text
    return heads


def test_corefile_serves_the_cluster_zones_only() -> None:
    text = addons.corefile(listen_ip="172.31.200.2", kubeconfig=KUBECONFIG)
    assert _blocks(text) == ["cluster.local:53 in-addr.arpa:53 ip6.arpa:53"]
    # no catch-all zone, no upstream of any kind
    for word in ("forward", "proxy", "grpc", "etcd", ". ", ".:53", "fallthrough", "upstream"):
        assert word not in text, (word, text)


def test_corefile_binds_every_listener_to_the_node_address() -> None:
    text = addons.corefile(
        listen_ip="172.31.200.2", kubeconfig=KUBECONFIG, dns_port=53, health_port=8080, ready_port=8181
    )
    lines = [line.strip() for line in text.splitlines()]
    assert "bind 172.31.200.2" in lines
    assert "health 172.31.200.2:8080" in lines
    assert "ready 172.31.200.2:8181" in lines
    assert f"kubeconfig {KUBECONFIG}" in lines
    assert "kubernetes cluster.local in-addr.arpa ip6.arpa {" in lines
    assert "pods insecure" in lines
    assert {"errors", "loadbalance", "cache 5", "ttl 5"} <= set(lines)


def test_corefile_uses_only_compiled_in_plugins() -> None:
    """Every directive the Corefile names is one tests/cluster/coredns/main.go compiles in."""
    main_go = (ROOT / "tests" / "cluster" / "coredns" / "main.go").read_text()
    compiled = {
        line.strip().strip('",') for line in main_go.split("var directives")[1].split("}")[0].splitlines()
    }
    text = addons.corefile(listen_ip="127.0.0.1", kubeconfig=KUBECONFIG, dns_port=5353)
    directives = set()
    depth = 0
    for line in text.splitlines():
        if depth == 1 and line.strip() and line.strip() != "}":
            directives.add(line.split()[0])
        depth += line.count("{") - line.count("}")
    assert directives == {"bind", "errors", "health", "ready", "kubernetes", "cache", "loadbalance"}
    assert directives <= compiled
    assert '"github.com/coredns/coredns/plugin/forward"' not in main_go
    assert '"github.com/coredns/coredns/core/plugin"' not in main_go  # imports every plugin


def test_corefile_other_ports_and_domain() -> None:
    text = addons.corefile(
        listen_ip="127.0.0.1", kubeconfig=KUBECONFIG, dns_port=5353, cluster_domain="k8s.test."
    )
    assert _blocks(text) == ["k8s.test:5353 in-addr.arpa:5353 ip6.arpa:5353"]
    assert "kubernetes k8s.test in-addr.arpa ip6.arpa {" in text


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"listen_ip": "127.0.0.1 8.8.8.8"}, "listen address"),
        ({"kubeconfig": Path("/tmp/a b/kubeconfig")}, "kubeconfig path"),
        ({"kubeconfig": Path("/tmp/x}\nforward . 8.8.8.8\n{")}, "kubeconfig path"),
        ({"cluster_domain": "cluster.local {"}, "cluster domain"),
    ],
)
def test_corefile_refuses_values_that_would_change_its_structure(
    kwargs: dict[str, object], what: str
) -> None:
    args: dict[str, object] = {"listen_ip": "172.31.200.2", "kubeconfig": KUBECONFIG} | kwargs
    with pytest.raises(ValueError, match=what):
        addons.corefile(**args)


def test_netpol_args() -> None:
    args = addons.netpol_args(kubeconfig=KUBECONFIG, node_name="llmtrain-node")
    assert args == [
        f"--kubeconfig={KUBECONFIG}",
        "--hostname-override=llmtrain-node",
        "--nfqueue-id=100",
        "--fail-open=false",
        "--v=2",
    ]


def test_nsenter_enters_the_network_namespace_only() -> None:
    # --net only: `ip netns exec` (or --mount) would remount /sys and hide the cgroup mounts
    assert addons.nsenter_argv("llmtrain-node", "/bin/true") == [
        "/usr/bin/nsenter",
        "--net=/var/run/netns/llmtrain-node",
        "--",
        "/bin/true",
    ]


def test_binaries_are_keyed_by_version() -> None:
    bins = addons.addon_binaries()
    v = addons.read_versions()
    assert bins["coredns"].parent.name == f"coredns-{v['COREDNS_VERSION']}"
    assert (
        bins["kube-network-policies"].parent.name
        == f"kube-network-policies-{v['KUBE_NETWORK_POLICIES_VERSION']}"
    )


def test_netpol_refuses_the_host_namespace(tmp_path: Path) -> None:
    with pytest.raises(addons.AddonError, match="inside a network namespace"):
        addons.start_netpol(netns="", kubeconfig=KUBECONFIG, workdir=tmp_path, node_name="n")


def test_stop_addons_from_another_process_stops_by_recorded_pid(tmp_path: Path) -> None:
    """`run.sh down` runs in a new process: stop_addons(node) finds the PIDs in addons.json."""
    import subprocess
    from types import SimpleNamespace

    sleeper = subprocess.Popen(["/bin/sleep", "60"])
    other = subprocess.Popen(["/bin/sleep", "60"])
    try:
        exe = os.path.realpath("/bin/sleep")
        state = {
            "coredns": {"pid": sleeper.pid, "exe": exe},
            "stale": {"pid": other.pid, "exe": "/not/this/binary"},
        }
        (tmp_path / addons.STATE_FILE).write_text(json.dumps(state))
        addons.stop_addons(SimpleNamespace(workdir=tmp_path))
        assert not addons._pid_alive(sleeper.pid)  # SIGTERMed and reaped by stop_pid
        # a recorded PID now running another binary (PID reuse) is left alone
        assert other.poll() is None
        assert not (tmp_path / addons.STATE_FILE).exists()
        addons.stop_addons(SimpleNamespace(workdir=tmp_path))  # nothing recorded: nothing to do
    finally:
        for p in (sleeper, other):
            p.kill()
            p.wait()


def test_addons_stop_ends_its_processes_last_first(tmp_path: Path) -> None:
    import subprocess

    a = addons.Addons(tmp_path)
    procs = [subprocess.Popen(["/bin/sleep", "60"]) for _ in range(2)]
    for name, p in zip(("coredns", "kube-network-policies"), procs, strict=True):
        a.add(name, p, Path("/bin/sleep"))
    assert a.pids == {"coredns": procs[0].pid, "kube-network-policies": procs[1].pid}
    assert set(json.loads((tmp_path / addons.STATE_FILE).read_text())) == {"coredns", "kube-network-policies"}
    a.stop()
    assert not any(addons._pid_alive(p.pid) for p in procs)
    assert len(a) == 0 and not (tmp_path / addons.STATE_FILE).exists()


def test_probes_only_go_to_addresses_on_a_local_link() -> None:
    """A route lookup only (`ip route get` sends nothing): loopback is local; an address that
    would go through a gateway (or has no route at all) is refused before any connection."""
    assert addons.route_stays_local("127.0.0.1")
    assert not addons.route_stays_local("203.0.113.7")  # TEST-NET-3: never on a local link
    with pytest.raises(addons.AddonError, match="not on a local link"):
        addons._http_ok("203.0.113.7", 8181, "/ready")
