//go:build tools

// Package tools pins the Kubernetes control-plane commands that build.sh
// builds, so that `go mod tidy` keeps their dependencies in go.mod.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
