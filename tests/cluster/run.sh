#!/usr/bin/env bash
# A local Kubernetes control plane for development (the same one the integration
# tests start): etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
# kwok with a fake GPU node pool, all on 127.0.0.1.
#
#   eval "$(tests/cluster/run.sh up)"   # start; prints export KUBECONFIG=... and PATH (kubectl, helm)
#   tests/cluster/run.sh status         # PIDs and ports
#   tests/cluster/run.sh logs [-n N] [-f] # tail the component logs (-f: follow)
#   tests/cluster/run.sh down           # stop every component by PID, remove its state
#
# Build the binaries first: tests/cluster/build.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
exec "$PY" "$HERE/controlplane.py" "$@"
