// Command etcd is a thin wrapper around go.etcd.io/etcd/server/v3/etcdmain so
// that etcd 3.6 builds from the Go module proxy in the same module (and
// compile cache) as the Kubernetes control-plane binaries.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
