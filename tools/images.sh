#!/usr/bin/env bash
# Build the Dockerfile's two images with no Docker engine and no image registry, and write
# each as an archive that `ctr -n k8s.io images import` accepts:
#
#   tools/images.sh [all]     base (once) + operator + runtime + archives (the `make images` target)
#   tools/images.sh base      the local Debian base only
#   tools/images.sh build     operator + runtime + archives (the base must exist)
#   tools/images.sh check     run the built images as the pods will (uid 65532)
#   tools/images.sh import-check   import both archives into a throwaway containerd
#
# Names: ghcr.io/llmtrain/llmtrain-operator:0.1.0 (the chart's default image) and
# ghcr.io/llmtrain/llmtrain:0.1.0 (the spec's default spec.resources.image), so neither the
# chart nor the examples need test-only values; tests/integration/test_images.py checks
# that these still match the chart and the spec.
#
# Everything lives under ${LLMTRAIN_CACHE:-~/.cache/llmtrain}:
#   containers/storage   buildah's image and layer store (overlay), with the cached layers
#   containers/tmp       TMPDIR: buildah keeps RUN --mount=type=cache dirs under it (the
#                        runtime's wheelhouse: torch's ~3 GB of wheels, downloaded once)
#   images/{operator,runtime}.tar   docker-archives with the repo tag inside, written
#                        atomically and only when the image ID changed (the node imports
#                        a tar when it is newer than its stamp), with {..}.id (the config
#                        digest in the archive) and {..}.built (buildah's image ID) beside
#
# Why buildah (Debian's 1.28) and not BuildKit: it is one apt package, daemonless (no
# buildkitd to start, supervise and stop around each build), needs no Go build on a
# 2-core machine that is already building Kubernetes, and does what the Dockerfile needs:
# multi-stage with --target, --build-arg, --layers (a persistent layer cache keyed like
# Docker's), RUN --mount=type=cache, host networking for RUN (PyPI), and docker-archive
# output. BuildKit's containerd worker could write straight into the node's containerd,
# but that containerd lives in a network namespace with no route out, where RUN steps
# could not reach PyPI; an archive import decouples the build from the node's lifetime.
#
# Why a local base: no image registry is reachable here, so the base is made with
# mmdebstrap from Debian's packages (bookworm minbase + python3.11 + venv + CA
# certificates) and passed as BASE_IMAGE; users keep the Dockerfile's default
# (python:3.11-slim-bookworm). The base is built once and kept: every cached layer,
# torch's included, is keyed on its ID.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${LLMTRAIN_CACHE:-$HOME/.cache/llmtrain}
STORE=$CACHE/containers
IMAGES=$CACHE/images
BASE=localhost/llmtrain-base:bookworm
OPERATOR=ghcr.io/llmtrain/llmtrain-operator:0.1.0
RUNTIME=ghcr.io/llmtrain/llmtrain:0.1.0
MIRROR=${LLMTRAIN_DEBIAN_MIRROR:-http://deb.debian.org}
# Heavy steps yield to whatever else runs on the machine (other builds, test suites);
# LLMTRAIN_IMAGES_NICE=0 when the rebuild itself is what matters.
NICE=(nice -n "${LLMTRAIN_IMAGES_NICE:-10}")

# buildah keeps RUN --mount=type=cache directories under os.TempDir(): pointing TMPDIR
# into the cache keeps pip's download cache (torch's ~3 GB of wheels) across builds and
# reboots; large temporary files of a commit or push land on the same disk as the store.
export TMPDIR=$STORE/tmp
mkdir -p "$STORE/storage" "$TMPDIR" "$IMAGES"

log() { printf '[images %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

bah() {
	# overlay: layers are shared, not copied (vfs would copy the ~5 GB runtime image for
	# every layer above torch). The run root holds mount state only, so it is not cached.
	buildah --root "$STORE/storage" --runroot "$STORE/run" --storage-driver overlay "$@"
}

need_root() {
	# Rootless buildah would need subuid ranges, fuse-overlayfs and a user namespace; the
	# CI machine and the node run as root, so rootless is not supported here.
	[ "$(id -u)" = 0 ] || { log "run as root (buildah with its own storage under $STORE)"; exit 1; }
}

# One build at a time (`make images` from two shells, or a test run beside a manual one):
# the archives and their ID files are written as a set. Under the lock, temporary
# directories of an interrupted build (a killed buildah leaves GBs in TMPDIR) are removed.
build_lock() {
	exec 9>"$STORE/build.lock"
	flock 9
	find "$TMPDIR" -mindepth 1 -maxdepth 1 \( -name 'buildah[0-9]*' -o -name 'storage[0-9]*' -o -name 'base.*' \) \
		-exec rm -rf {} +
}

image_id() { bah inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null; }

cmd_base() {
	need_root
	build_lock
	if id=$(image_id "$BASE"); then
		log "base $BASE present (${id:0:12})"
		return
	fi
	local work ctr t0=$SECONDS
	# Removed below; after a failure, by the next build_lock.
	work=$(mktemp -d "$TMPDIR/base.XXXXXX")
	log "base: mmdebstrap bookworm minbase + python3 (from $MIRROR)"
	# passwd (useradd/groupadd) is only 'important' in Debian, not in minbase. The sources
	# are given explicitly: with none, mmdebstrap would read them from a non-tty stdin.
	"${NICE[@]}" mmdebstrap --variant=minbase --mode=root --format=tar --skip=output/dev \
		--include=python3,python3-venv,python-is-python3,bash,ca-certificates,passwd \
		bookworm "$work/rootfs.tar" \
		"deb $MIRROR/debian bookworm main" \
		"deb $MIRROR/debian bookworm-updates main" \
		"deb $MIRROR/debian-security bookworm-security main" </dev/null
	ctr=$(bah from --pull=never scratch)
	bah add "$ctr" "$work/rootfs.tar" /
	bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		--env LANG=C.UTF-8 --cmd /bin/bash --created-by "tools/images.sh base (mmdebstrap bookworm)" "$ctr"
	bah commit --rm "$ctr" "$BASE" >/dev/null
	rm -rf "$work"
	log "base $BASE built in $((SECONDS - t0)) s ($(image_id "$BASE" | cut -c1-12))"
}

# RUN steps trust what the host trusts: a machine whose egress goes through a TLS-inspecting
# proxy (this CI's) has that proxy's CA in the host bundle only. The bundle is bind-mounted
# read-only over the image's own for RUN steps (the Dockerfile points pip at that path with
# PIP_CERT). A mount is not a layer: nothing of the host's trust store lands in an image.
TRUST=()
HOST_CA=/etc/ssl/certs/ca-certificates.crt
[ -f "$HOST_CA" ] && TRUST=(--volume "$HOST_CA:$HOST_CA:ro")

# Build one target of the Dockerfile under its name; archive it when its ID changed.
build_target() {
	local target=$1 name=$2 t0=$SECONDS
	log "build --target $target -> $name"
	# --network host: RUN steps reach PyPI from the host's network namespace (the build
	# never runs inside the node's). --pull=never: every FROM is local (the base, stages).
	"${NICE[@]}" buildah --root "$STORE/storage" --runroot "$STORE/run" --storage-driver overlay \
		bud --layers --force-rm --pull=never --network host --target "$target" "${TRUST[@]}" \
		--build-arg BASE_IMAGE="$BASE" -t "$name" -f "$ROOT/Dockerfile" "$ROOT"
	log "$target built in $((SECONDS - t0)) s"
	archive "$target" "$name"
}

archive() {
	local target=$1 name=$2 id digest tar t0=$SECONDS rc=0
	id=$(image_id "$name")
	tar=$IMAGES/$target.tar
	# <target>.built: buildah's image ID the archive was made from (the skip check);
	# <target>.id: the digest of the config inside the archive (the image ID containerd sees).
	if [ -f "$tar" ] && [ "$(cat "$IMAGES/$target.built" 2>/dev/null)" = "$id" ]; then
		log "$tar is image ${id:0:12} already"
		return
	fi
	rm -f "$tar.tmp"
	# Unchanged layers are copied from the previous archive, so a Python-only change
	# writes ~2 MB of new layers instead of re-exporting 5.7 GB (tools/images_archive.py).
	# docker-archive with the repo tag in its manifest.json: `ctr images import` names the
	# image from it (an OCI archive would need the io.containerd.image.name annotation).
	digest=$("${NICE[@]}" python3 "$ROOT/tools/images_archive.py" --storage "$STORE/storage" --image "$name" \
		--previous "$tar" --out "$tar.tmp") || rc=$?
	if [ "$rc" = 3 ]; then
		"${NICE[@]}" buildah --root "$STORE/storage" --runroot "$STORE/run" --storage-driver overlay \
			push --quiet "$name" "docker-archive:$tar.tmp:$name"
		digest=$id
	elif [ "$rc" != 0 ]; then
		return "$rc"
	fi
	# The ID files first, then the tar by rename: a reader never sees a partial tar, and a
	# tar newer than the node's stamp always has its IDs beside it.
	echo "$digest" >"$IMAGES/$target.id.tmp"
	echo "$id" >"$IMAGES/$target.built.tmp"
	mv -f "$IMAGES/$target.id.tmp" "$IMAGES/$target.id"
	mv -f "$IMAGES/$target.built.tmp" "$IMAGES/$target.built"
	mv -f "$tar.tmp" "$tar"
	log "$tar written in $((SECONDS - t0)) s ($(du -h "$tar" | cut -f1), image ${id:0:12}, config ${digest:0:12})"
}

cmd_build() {
	need_root
	build_lock
	image_id "$BASE" >/dev/null || { log "no base image $BASE: run tools/images.sh base"; exit 1; }
	build_target operator "$OPERATOR"
	build_target runtime "$RUNTIME"
	bah images
}

# Run a command in a throwaway container of an image as uid 65532, as the pods will.
run_as_pod() {
	local name=$1 ctr rc=0
	shift
	ctr=$(bah from --pull=never "$name")
	# --network none: buildah's default (CNI) would make a host bridge, iptables chains and
	# switch the host's net.ipv4.ip_forward on; these checks need no network at all.
	bah run --network none --user 65532:65532 "$ctr" -- "$@" || rc=$?
	bah rm "$ctr" >/dev/null
	return "$rc"
}

cmd_check() {
	need_root
	log "runtime as uid 65532"
	run_as_pod "$RUNTIME" ray --version
	run_as_pod "$RUNTIME" python -c "import torch, llmtrain.runtime; print('torch', torch.__version__)"
	run_as_pod "$RUNTIME" llmtrain --help >/dev/null
	# The pods' command starts with this. Unprivileged, it can only lower the soft limit
	# below the hard limit the runtime inherited; report both either way.
	run_as_pod "$RUNTIME" /bin/bash -c 'echo "nofile soft $(ulimit -Sn) hard $(ulimit -Hn)"; ulimit -n 65536 && echo "ulimit -n 65536: ok" || echo "ulimit -n 65536: refused (hard limit $(ulimit -Hn))"'
	run_as_pod "$RUNTIME" /bin/bash -c 'id; echo "HOME=$HOME"; touch "$HOME/w" /tmp/w && echo "HOME and /tmp writable"'
	log "operator as uid 65532"
	run_as_pod "$OPERATOR" llmtrain operator --help >/dev/null
	run_as_pod "$OPERATOR" /bin/sh -c 'id; echo "HOME=$HOME"; touch "$HOME/w" && echo "HOME writable"; python -c "import torch" 2>/dev/null && echo "torch in the operator image" && exit 1 || echo "no torch: ok"'
	log "checks passed"
}

# Import both archives into a containerd of its own (root, state and socket under a temp
# dir, only the content/snapshot plugins it needs), list them, stop it by PID, delete it.
cmd_import_check() {
	need_root
	local dir pid rc=0 t0
	dir=$(mktemp -d /tmp/llmtrain-ctrd.XXXXXX)
	cat >"$dir/config.toml" <<EOF
version = 2
root = "$dir/root"
state = "$dir/state"
# No CRI: this containerd only stores and unpacks images.
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/containerd.sock"
EOF
	containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
	pid=$!
	for _ in $(seq 50); do [ -S "$dir/containerd.sock" ] && break; sleep 0.2; done
	(
		for target in operator runtime; do
			t0=$SECONDS
			ctr --address "$dir/containerd.sock" -n k8s.io images import "$IMAGES/$target.tar"
			log "$target.tar imported and unpacked in $((SECONDS - t0)) s"
		done
		# Again, as the node does after a rebuild: blobs and unpacked layers it already has
		# are skipped, but the whole tar is still read and hashed.
		t0=$SECONDS
		ctr --address "$dir/containerd.sock" -n k8s.io images import "$IMAGES/runtime.tar" >/dev/null
		log "runtime.tar imported again in $((SECONDS - t0)) s"
		ctr --address "$dir/containerd.sock" -n k8s.io images ls
		ctr --address "$dir/containerd.sock" -n k8s.io images ls -q | grep -qx "$OPERATOR"
		ctr --address "$dir/containerd.sock" -n k8s.io images ls -q | grep -qx "$RUNTIME"
	) || rc=$?
	kill "$pid"
	wait "$pid" || true
	rm -rf "$dir"
	[ "$rc" = 0 ] && log "import check passed" || log "import check FAILED"
	return "$rc"
}

# The host's forwarding switch must end as it began: a build container on buildah's default
# (CNI) network would turn it on and leave a bridge and iptables chains behind. Every buildah
# call here uses the host network or none; this makes a slip fail loudly.
forward_before=$(cat /proc/sys/net/ipv4/ip_forward)
trap '[ "$(cat /proc/sys/net/ipv4/ip_forward)" = "$forward_before" ] || { log "net.ipv4.ip_forward changed from $forward_before: a buildah call used CNI networking"; exit 3; }' EXIT

case ${1:-all} in
all)
	cmd_base
	cmd_build
	;;
base) cmd_base ;;
build) cmd_build ;;
check) cmd_check ;;
import-check) cmd_import_check ;;
*)
	echo "usage: $0 [all|base|build|check|import-check]" >&2
	exit 2
	;;
esac
