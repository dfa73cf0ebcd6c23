"""The real test node's configuration (tests/cluster/node.py), checked without starting anything.

What is pinned here is what this machine and the network-safety rule need: containerd's CRI
with ``restrict_oom_score_adj`` (the sandbox refuses a negative oom_score_adj), the cgroupfs
driver on cgroup v1, no host-wide path and no registry mirror in containerd's config, pod
networking that stays inside 10.245.0.0/24 with masquerade towards the host end of the veth,
cluster DNS on the node's own address, the pause image archive that ``ctr images import``
reads, and the control plane's node mode (apiserver on 172.31.200.1, Node authorization)
without any change to the plain mode the other integration tests use.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import ipaddress
import json
import sys
import tarfile
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import controlplane  # noqa: E402
import node  # noqa: E402
import ociimage  # noqa: E402

LINK = ipaddress.ip_network("172.31.200.0/30")


def _containerd(tmp_path: Path) -> dict[str, Any]:
    text = node.containerd_config(
        root=tmp_path / "root",
        state=tmp_path / "state",
        socket=tmp_path / "state" / "containerd.sock",
        sandbox_image="registry.k8s.io/pause:3.10.1",
        cni_conf_dir=tmp_path / "cni",
    )
    return tomllib.loads(text)


def _paths(obj: Any) -> list[str]:
    """Every string value of a nested config that looks like an absolute path."""
    if isinstance(obj, dict):
        return [p for v in obj.values() for p in _paths(v)]
    if isinstance(obj, list):
        return [p for v in obj for p in _paths(v)]
    return [obj] if isinstance(obj, str) and obj.startswith("/") else []


def test_containerd_config_cri(tmp_path: Path) -> None:
    cfg = _containerd(tmp_path)
    cri = cfg["plugins"]["io.containerd.grpc.v1.cri"]
    assert cfg["version"] == 2
    assert cri["restrict_oom_score_adj"] is True
    assert cri["sandbox_image"] == "registry.k8s.io/pause:3.10.1"
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    assert cri["containerd"]["runtimes"]["runc"]["runtime_type"] == "io.containerd.runc.v2"
    assert cri["cni"]["bin_dir"] == "/usr/lib/cni"
    assert cfg["grpc"]["address"] == str(tmp_path / "state" / "containerd.sock")


def test_containerd_config_touches_nothing_host_wide(tmp_path: Path) -> None:
    cfg = _containerd(tmp_path)
    cri = cfg["plugins"]["io.containerd.grpc.v1.cri"]
    # pods' network-namespace mounts under the run's state dir: `ip netns list` stays ours alone
    assert cri["netns_mounts_under_state_dir"] is True
    # no mirror, no hosts dir: a pull can only go to the image's own registry, which has no route
    assert cri["registry"]["config_path"] == ""
    assert "mirrors" not in cri["registry"]
    # TCP listeners only on loopback (CRI streaming); no debug/metrics/ttrpc listener
    assert cri["stream_server_address"] == "127.0.0.1"
    assert cfg["debug"]["address"] == cfg["metrics"]["address"] == cfg["ttrpc"]["address"] == ""
    allowed = (str(tmp_path), "/usr/lib/cni")
    outside = [p for p in _paths(cfg) if not p.startswith(allowed)]
    assert outside == [], outside


def test_cni_config_stays_in_the_pod_range(tmp_path: Path) -> None:
    cni = node.cni_config(ipam_dir=tmp_path / "ipam")
    assert cni["cniVersion"] == "1.0.0"
    bridge, portmap = cni["plugins"]
    assert (bridge["type"], portmap["type"]) == ("bridge", "portmap")
    assert bridge["bridge"] == "lt-cni0"
    assert bridge["ipMasq"] is True  # pod -> 172.31.200.1 leaves as 172.31.200.2
    ipam = bridge["ipam"]
    assert ipam["type"] == "host-local"
    assert ipam["dataDir"] == str(tmp_path / "ipam")  # not /var/lib/cni
    [[rng]] = ipam["ranges"]
    subnet = ipaddress.ip_network(rng["subnet"])
    assert subnet == ipaddress.ip_network("10.245.0.0/24")
    assert ipaddress.ip_address(rng["gateway"]) in subnet
    # the pod range overlaps neither kwok's fake pod IPs, the Service range nor the veth link
    for other in ("10.244.0.0/16", controlplane.SERVICE_CIDR, str(LINK)):
        assert not subnet.overlaps(ipaddress.ip_network(other)), other


def test_cni_plugins_are_debians() -> None:
    """Every plugin the config names (and containerd's loopback) is one Debian's package ships."""
    names = {p["type"] for p in node.cni_config(ipam_dir=Path("/x"))["plugins"]}
    names |= {node.cni_config(ipam_dir=Path("/x"))["plugins"][0]["ipam"]["type"], "loopback"}
    shipped = {k.removesuffix("-cni") for k in node.DEBIAN_BINARIES if k.endswith("-cni")}
    assert names == shipped
    assert all(node.DEBIAN_BINARIES[f"{n}-cni"].parent == node.CNI_BIN_DIR for n in names)


def test_kubelet_config(tmp_path: Path) -> None:
    cfg = node.kubelet_config(
        ca_file=tmp_path / "ca.crt",
        tls_cert=tmp_path / "k.crt",
        tls_key=tmp_path / "k.key",
        runtime_socket=tmp_path / "c.sock",
        resolv_conf=tmp_path / "resolv.conf",
        pod_logs_dir=tmp_path / "pod-logs",
    )
    assert cfg["kind"] == "KubeletConfiguration"
    # cgroup v1, PID 1 not systemd
    assert cfg["cgroupDriver"] == "cgroupfs"
    assert cfg["failCgroupV1"] is False
    assert cfg["containerRuntimeEndpoint"] == f"unix://{tmp_path / 'c.sock'}"
    assert cfg["clusterDNS"] == ["172.31.200.2"] and cfg["clusterDomain"] == "cluster.local"
    assert cfg["address"] == "172.31.200.2"
    # only certificates from the test CA; no read-only port
    assert cfg["authentication"]["anonymous"]["enabled"] is False
    assert cfg["authentication"]["x509"]["clientCAFile"] == str(tmp_path / "ca.crt")
    assert cfg["readOnlyPort"] == 0
    # imported images cannot be pulled back: never garbage-collected
    assert cfg["imageGCHighThresholdPercent"] == 100
    # the host's resolver and /var/log/pods are not the node's
    assert cfg["resolvConf"] != "/etc/resolv.conf"
    assert cfg["podLogsDir"].startswith(str(tmp_path))


def test_kube_proxy_config(tmp_path: Path) -> None:
    cfg = node.kube_proxy_config(kubeconfig=tmp_path / "kp.kubeconfig")
    assert cfg["mode"] == "iptables"
    assert cfg["clusterCIDR"] == "10.245.0.0/24"
    assert cfg["hostnameOverride"] == "llmtrain-node"
    # host-wide conntrack sysctls left alone (0 = do not set)
    c = cfg["conntrack"]
    assert (c["maxPerCore"], c["min"], c["tcpEstablishedTimeout"], c["tcpCloseWaitTimeout"]) == (
        0,
        0,
        "0s",
        "0s",
    )
    assert cfg["iptables"]["localhostNodePorts"] is False
    for addr in (cfg["healthzBindAddress"], cfg["metricsBindAddress"]):
        assert addr.startswith("127.0.0.1:")


def test_addresses_of_the_link() -> None:
    assert ipaddress.ip_address(controlplane.NODE_HOST_IP) in LINK
    assert ipaddress.ip_address(controlplane.NODE_IP) in LINK
    assert node.CLUSTER_DNS == controlplane.NODE_IP
    assert ipaddress.ip_address(controlplane.KUBERNETES_SERVICE_IP) in ipaddress.ip_network(
        controlplane.SERVICE_CIDR
    )


def test_nsenter_not_ip_netns_exec() -> None:
    """`ip netns exec` remounts /sys and the kubelet then finds no cgroup mounts."""
    argv = node.nsenter_argv("kubelet", "--v=1")
    assert argv[:3] == ["/usr/bin/nsenter", "--net=/var/run/netns/llmtrain-node", "--"]
    assert argv[3:] == ["kubelet", "--v=1"]


def test_kubeconfig_for(tmp_path: Path) -> None:
    cfg = json.loads(
        node.kubeconfig_for(
            "https://172.31.200.1:6443", tmp_path / "ca", tmp_path / "c", tmp_path / "k", "system:node:x"
        )
    )
    assert cfg["clusters"][0]["cluster"]["server"] == "https://172.31.200.1:6443"
    assert cfg["users"][0] == {
        "name": "system:node:x",
        "user": {"client-certificate": str(tmp_path / "c"), "client-key": str(tmp_path / "k")},
    }


def test_needs_import(tmp_path: Path) -> None:
    tar = tmp_path / "img.tar"
    stamp = tmp_path / "img.json"
    tar.write_bytes(b"one")
    assert node.needs_import(tar, stamp)  # never imported
    st = tar.stat()
    stamp.write_text(json.dumps({"mtime_ns": st.st_mtime_ns, "size": st.st_size}))
    assert not node.needs_import(tar, stamp)
    tar.write_bytes(b"two!")  # rebuilt: another size (and mtime)
    assert node.needs_import(tar, stamp)
    stamp.write_text("not json")
    assert node.needs_import(tar, stamp)
    # with `make images`' id file: the id decides, not the file's times
    (tmp_path / "img.id").write_text("sha256:aaa\n")
    stamp.write_text(json.dumps(node.import_stamp(tar)))
    tar.write_bytes(b"same image, new tar")
    assert not node.needs_import(tar, stamp)
    (tmp_path / "img.id").write_text("sha256:bbb\n")
    assert node.needs_import(tar, stamp)


def test_kill_trees_takes_the_descendants() -> None:
    """A container's processes outlive a killed shim (re-parented): the stop kills whole trees."""
    import subprocess

    p = subprocess.Popen(["/bin/sh", "-c", "sleep 60 & sleep 60 & wait"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len([c for c, pp in node._parents().items() if pp == p.pid]) < 2:
        time.sleep(0.02)
    kids = [c for c, pp in node._parents().items() if pp == p.pid]
    assert len(kids) == 2
    killed = node._kill_trees([p.pid])
    assert set(killed) == {p.pid, *kids}
    p.wait(timeout=5)
    assert not any(controlplane._pid_alive(k) for k in kids)


# --------------------------------------------------------------------------- the pause image


def _archive(tmp_path: Path) -> dict[str, bytes]:
    exe = tmp_path / "pause"
    exe.write_bytes(b"\x7fELF not really")
    data = ociimage.oci_archive(
        "registry.k8s.io/pause:3.10.1",
        [ociimage.ImageFile(exe, "/pause")],
        entrypoint=["/pause"],
        user="65535:65535",
    )
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_oci_archive_layout(tmp_path: Path) -> None:
    files = _archive(tmp_path)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():  # content-addressed: every blob's name is its digest
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    [desc] = json.loads(files["index.json"])["manifests"]
    assert desc["annotations"]["io.containerd.image.name"] == "registry.k8s.io/pause:3.10.1"
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == "3.10.1"
    assert desc["platform"] == {"architecture": "amd64", "os": "linux"}
    manifest = json.loads(files["blobs/sha256/" + desc["digest"].split(":")[1]])
    config = json.loads(files["blobs/sha256/" + manifest["config"]["digest"].split(":")[1]])
    assert config["config"]["Entrypoint"] == ["/pause"] and config["config"]["User"] == "65535:65535"
    [layer_desc] = manifest["layers"]
    raw = gzip.decompress(files["blobs/sha256/" + layer_desc["digest"].split(":")[1]])
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(raw)) as layer:
        [member] = layer.getmembers()
        assert member.name == "pause" and member.mode == 0o755 and member.uid == 0


def test_oci_archive_is_reproducible(tmp_path: Path) -> None:
    """The same binary gives the same digests: a rebuild does not make containerd re-import."""
    assert _archive(tmp_path) == _archive(tmp_path)


def test_oci_file_spec() -> None:
    f = ociimage._parse_file("/a/b:c/pause:/pause")
    assert (f.src, f.dest) == (Path("/a/b:c/pause"), "/pause")
    with pytest.raises(Exception, match="SRC:/DEST"):
        ociimage._parse_file("pause")


# --------------------------------------------------------------------------- control plane node mode


def _pki(tmp_path: Path) -> Any:
    return controlplane._Pki(*(tmp_path / n for n in ("ca", "sc", "sk", "ac", "ak", "sa", "sp")))


def test_plain_mode_unchanged(tmp_path: Path) -> None:
    cp = controlplane.ControlPlane(workdir=tmp_path)
    assert cp._apiserver_mode_flags(_pki(tmp_path)) == [
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        "--authorization-mode=RBAC",
        "--endpoint-reconciler-type=none",
    ]
    assert cp.host == "127.0.0.1" and cp.registers_fake_nodes


def test_node_mode_apiserver(tmp_path: Path) -> None:
    cp = controlplane.ControlPlane(workdir=tmp_path, node=True)
    flags = cp._apiserver_mode_flags(_pki(tmp_path))
    assert "--bind-address=172.31.200.1" in flags and "--advertise-address=172.31.200.1" in flags
    assert "--authorization-mode=Node,RBAC" in flags
    assert "--enable-admission-plugins=NodeRestriction" in flags
    # the default (lease) endpoint reconciler: the `kubernetes` Service gets its endpoint
    assert not any(f.startswith("--endpoint-reconciler-type") for f in flags)
    assert f"--kubelet-certificate-authority={tmp_path / 'ca'}" in flags
    assert cp.host == "172.31.200.1" and not cp.registers_fake_nodes
    assert controlplane.ControlPlane(workdir=tmp_path, node=True, fake_nodes=True).registers_fake_nodes
    # pods' Services and Endpoints, each namespace's kube-root-ca.crt
    for c in ("endpointslice", "root-ca-cert-publisher", "podgc"):
        assert c in controlplane.NODE_MODE_CONTROLLERS
    assert "nodelifecycle" not in controlplane.NODE_MODE_CONTROLLERS


def test_node_mode_serving_cert(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from cryptography import x509

    def sans(d: Path, node_mode: bool) -> tuple[set[str], set[str]]:
        pki = controlplane._write_pki(d, node=node_mode)
        cert = x509.load_pem_x509_certificate(pki.serving_crt.read_bytes())
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = {str(i) for i in ext.get_values_for_type(x509.IPAddress)}
        return ips, set(ext.get_values_for_type(x509.DNSName))

    ips, dns = sans(tmp_path / "node", True)
    assert ips == {"127.0.0.1", "172.31.200.1", "10.96.0.1"}
    assert {"kubernetes", "kubernetes.default.svc.cluster.local"} <= dns
    assert (tmp_path / "node" / "ca.key").exists()
    plain_ips, _ = sans(tmp_path / "plain", False)
    assert plain_ips == {"127.0.0.1"} and not (tmp_path / "plain" / "ca.key").exists()


def test_node_mode_needs_the_veth(tmp_path: Path) -> None:
    """Without 172.31.200.1 on this host the apiserver could not bind: say so before starting."""
    if Path("/sys/class/net", node.HOST_IF).exists():
        pytest.skip("a node's veth exists on this host right now")
    with pytest.raises(controlplane.ControlPlaneError, match="node mode needs the node's veth"):
        controlplane._require_local_address(controlplane.NODE_HOST_IP)
