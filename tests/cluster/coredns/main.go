// Command coredns is the cluster DNS of the test node: CoreDNS v1.15.0 built with only the
// plugins a cluster.local-only server needs. This is CoreDNS's documented way to build with a
// chosen plugin set (import coremain and the plugins, set dnsserver.Directives) instead of
// core/plugin, which would compile in every plugin - forward among them. Leaving forward (and
// every other plugin that sends queries elsewhere: grpc, etcd, route53, ...) out of the binary
// means no Corefile can make this server send a packet off the node, whatever it says.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	// The plugins compiled in; each registers its directive in init().
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/ready"
)

// directives is the execution order: the upstream order (core/dnsserver/zdirectives.go of
// v1.15.0) restricted to the plugins above. A directive missing here is an error at start-up
// for any Corefile that names it.
var directives = []string{
	"bind",
	"ready",
	"health",
	"errors",
	"loadbalance",
	"cache",
	"kubernetes",
}

func init() {
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
