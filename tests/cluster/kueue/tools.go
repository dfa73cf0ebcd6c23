//go:build tools

// Package tools pins sigs.k8s.io/kueue/cmd/kueue. Kueue lives in a module of its
// own because its dependency versions (k8s.io/* v0.35 with a newer
// controller-runtime, jobset, lws, ...) clash with the control plane's in ../go.mod.
package tools

import _ "sigs.k8s.io/kueue/cmd/kueue"
