//go:build tools

// Package tools pins the Kubernetes commands that build.sh builds (control plane,
// and the real node's kubelet and kube-proxy), so that `go mod tidy` keeps their
// dependencies in go.mod.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
