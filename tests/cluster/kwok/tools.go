//go:build tools

// Package tools pins sigs.k8s.io/kwok/cmd/kwok. kwok lives in a module of its
// own because it builds against k8s.io/* v0.36 while the control plane in
// ../go.mod is pinned to v1.35 / v0.35.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
