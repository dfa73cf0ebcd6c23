// Command kube-network-policies is the NetworkPolicy engine of the test node:
// sigs.k8s.io/kube-network-policies v0.8.0 (the engine kind ships; nftables + nfqueue) with the
// upstream command's wiring (cmd/main.go of that tag), changed where the test node needs it:
//
//   - --kubeconfig: upstream only reads the in-cluster service-account config; here the engine
//     runs as a plain process in the node's network namespace (as its DaemonSet does with
//     hostNetwork) and reaches the apiserver through a kubeconfig.
//   - SIGTERM stops it cleanly (upstream waits for SIGINT only), so the table it programmed is
//     removed when addons.py stops it by PID.
//   - the metrics listener is off unless --metrics-bind-address is given: nothing needs it, and
//     an open port on every address of the node is surface for nothing.
//   - AdminNetworkPolicy / BaselineAdminNetworkPolicy are left out: their CRDs are not installed.
//   - build.sh netpol builds it against a patched copy of the module whose nftables rules queue
//     through the xt NFQUEUE target (nfqueue_xt.go.in, nfqueue-xt-target.patch): the test
//     machines' kernels lack nftables' native queue expression.
//
// The engine puts the first packet of each new connection towards (and from) a local pod
// selected by a NetworkPolicy on an nfqueue, evaluates the policies in user space, and gives
// the verdict; established flows stay in conntrack.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/component-base/logs"
	logsapi "k8s.io/component-base/logs/api/v1"
	nodeutil "k8s.io/component-helpers/node/util"
	"k8s.io/klog/v2"
	"sigs.k8s.io/kube-network-policies/pkg/networkpolicy"
)

var (
	kubeconfig          string
	failOpen            bool
	queueID             int
	metricsBindAddress  string
	hostnameOverride    string
	netfilterBug1766Fix bool
)

func init() {
	flag.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig of the apiserver; empty: the in-cluster service-account config")
	flag.BoolVar(&failOpen, "fail-open", false, "If set, don't drop packets if the controller is not running")
	flag.IntVar(&queueID, "nfqueue-id", 100, "Number of the nfqueue used")
	flag.StringVar(&metricsBindAddress, "metrics-bind-address", "", "host:port of the metrics server; empty: no metrics server")
	flag.StringVar(&hostnameOverride, "hostname-override", "", "Name of the Node this runs on (default: the hostname)")
	flag.BoolVar(&netfilterBug1766Fix, "netfilter-bug-1766-fix", true, "Process DNS packets on the PREROUTING hooks to avoid the conntrack race of https://bugzilla.netfilter.org/show_bug.cgi?id=1766 (not needed on kernels 6.12+)")
}

func main() {
	os.Exit(run())
}

func run() int {
	c := logsapi.NewLoggingConfiguration()
	logsapi.AddGoFlags(c, flag.CommandLine)
	flag.Parse()
	logs.InitLogs()
	if err := logsapi.ValidateAndApply(c, nil); err != nil {
		fmt.Fprintf(os.Stderr, "%v\n", err)
		return 1
	}

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, unix.SIGTERM)
	defer cancel()
	logger := klog.FromContext(ctx)

	nodeName, err := nodeutil.GetHostname(hostnameOverride)
	if err != nil {
		logger.Error(err, "cannot obtain the node name; set --hostname-override")
		return 1
	}

	var config *rest.Config
	if kubeconfig != "" {
		config, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		config, err = rest.InClusterConfig()
	}
	if err != nil {
		logger.Error(err, "cannot build the apiserver client config", "kubeconfig", kubeconfig)
		return 1
	}
	// protobuf for the core types, as upstream does
	config.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	config.ContentType = "application/vnd.kubernetes.protobuf"
	clientset, err := kubernetes.NewForConfig(config)
	if err != nil {
		logger.Error(err, "cannot create the clientset")
		return 1
	}
	informersFactory := informers.NewSharedInformerFactory(clientset, 0)

	if metricsBindAddress != "" {
		if _, _, err := net.SplitHostPort(metricsBindAddress); err != nil {
			logger.Error(err, "parsing metrics bind address", "address", metricsBindAddress)
			return 1
		}
		http.Handle("/metrics", promhttp.Handler())
		go func() {
			utilruntime.HandleError(http.ListenAndServe(metricsBindAddress, nil))
		}()
	}

	cfg := networkpolicy.Config{
		FailOpen:            failOpen,
		QueueID:             queueID,
		NodeName:            nodeName,
		NetfilterBug1766Fix: netfilterBug1766Fix,
		// NRI stays enabled, as upstream's command leaves it: with NRIdisabled the v0.8.0
		// controller dereferences its nil NRI plugin for any address that is not a known pod
		// IP. Without an NRI socket (containerd 1.6 has none) the plugin's connection fails,
		// is logged, and the engine works from the apiserver's pod IPs alone.
		NRIdisabled: false,
	}
	controller, err := networkpolicy.NewController(
		clientset,
		informersFactory.Networking().V1().NetworkPolicies(),
		informersFactory.Core().V1().Namespaces(),
		informersFactory.Core().V1().Pods(),
		nil, nil, nil, nil,
		cfg,
	)
	if err != nil {
		logger.Error(err, "cannot start the network policy controller")
		return 1
	}
	done := make(chan error, 1)
	go func() { done <- controller.Run(ctx) }()
	informersFactory.Start(ctx.Done())
	logger.Info("kube-network-policies started", "node", nodeName, "nfqueue", queueID)

	select {
	case <-ctx.Done():
		// Run returns once its deferred cleanup (deleting the nftables table) has run.
		select {
		case <-done:
		case <-time.After(5 * time.Second):
		}
		return 0
	case err := <-done:
		// The controller stopped on its own (e.g. the nfqueue could not be opened): exit
		// non-zero so the supervisor sees it, instead of running without enforcement.
		if err == nil {
			err = errors.New("controller stopped")
		}
		logger.Error(err, "network policy controller exited")
		return 1
	}
}
