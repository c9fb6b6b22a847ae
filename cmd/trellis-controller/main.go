// Command trellis-controller is the Trellis control plane: a
// controller-runtime manager running the mesh reconciler, the xDS server
// (ADS, state of the world and delta, with SDS) and the certificate
// authority. Every replica serves xDS; the leader writes status.
package main

import (
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"

	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/trellis-mesh/trellis/internal/controlplane"
)

// version is set at build time (-ldflags "-X main.version=…").
var version = "dev"

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "trellis-controller: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	o := controlplane.Defaults()
	// Every listener binds one explicit address: the pod's IP (env POD_IP,
	// the chart sets it) or loopback. Metrics default to loopback even in a
	// pod: kubectl port-forward dials it there (the chart adds the pod IP).
	host := envOr("POD_IP", "127.0.0.1")
	o.XDSAddr = net.JoinHostPort(host, "15012")
	o.ProbeAddr = net.JoinHostPort(host, "8081")
	webhookAddr := net.JoinHostPort(host, strconv.Itoa(o.WebhookPort))
	kubeQPS, kubeBurst := float64(50), 100
	var dnsNames, rootCAOut string
	fs := flag.CommandLine
	fs.StringVar(&o.MetricsAddr, "metrics-bind-address", o.MetricsAddr, "Address of the metrics endpoint (Prometheus metrics and the debug API); \"0\" disables it, \":8443\" is every interface.")
	fs.BoolVar(&o.MetricsSecure, "metrics-secure", o.MetricsSecure, "Serve metrics over HTTPS with Kubernetes authentication and authorization (TokenReview and SubjectAccessReview).")
	fs.StringVar(&o.ProbeAddr, "health-probe-bind-address", o.ProbeAddr, "Address of the /healthz and /readyz endpoints (default: env POD_IP or loopback).")
	fs.StringVar(&o.PprofAddr, "pprof-bind-address", "0", "Address of Go's net/http/pprof profiles (plain HTTP, no authentication: keep it on loopback, e.g. 127.0.0.1:6060, and reach it with kubectl port-forward); \"0\" disables it.")
	fs.Float64Var(&kubeQPS, "kube-api-qps", kubeQPS, "Requests per second the controller's Kubernetes client may send (reads come from informer caches; this bounds status writes, TokenReviews and SubjectAccessReviews).")
	fs.IntVar(&kubeBurst, "kube-api-burst", kubeBurst, "Burst of the Kubernetes client above --kube-api-qps.")
	fs.BoolVar(&o.LeaderElect, "leader-elect", o.LeaderElect, "Elect a leader among replicas; only the leader writes status. Every replica serves xDS.")
	fs.StringVar(&o.LeaderElectionNamespace, "leader-election-namespace", "", "Namespace of the leader election Lease (default: --namespace).")
	fs.DurationVar(&o.LeaseDuration, "leader-election-lease-duration", o.LeaseDuration, "How long followers wait after the leader's last renewal before taking the Lease: a killed leader's successor writes status within about this plus the retry period.")
	fs.DurationVar(&o.RenewDeadline, "leader-election-renew-deadline", o.RenewDeadline, "How long the leader retries renewing before it gives up leadership (less than the lease duration).")
	fs.DurationVar(&o.RetryPeriod, "leader-election-retry-period", o.RetryPeriod, "How often replicas try to acquire or renew the Lease.")
	fs.StringVar(&o.Namespace, "namespace", envOr("POD_NAMESPACE", o.Namespace), "Namespace the control plane runs in (env POD_NAMESPACE).")
	fs.StringVar(&o.XDSAddr, "xds-address", o.XDSAddr, "Address of the xDS (ADS) gRPC server (default: env POD_IP or loopback); it always uses TLS.")
	fs.StringVar(&dnsNames, "xds-dns-names", "", "Comma-separated DNS names of the xDS serving certificate (default: trellis-xds.<namespace>.svc, its .cluster.local form, localhost).")
	fs.StringVar(&rootCAOut, "xds-root-ca-out", "", "If set, write the mesh root certificate (PEM) to this file, for clients outside the cluster and tests.")
	fs.DurationVar(&o.Debounce, "xds-debounce", o.Debounce, "Quiet period after a change before a push round.")
	fs.DurationVar(&o.MaxDelay, "xds-debounce-max", o.MaxDelay, "Longest a change waits for a push round while changes keep coming.")
	fs.DurationVar(&o.MaxConnectionAge, "xds-max-connection-age", o.MaxConnectionAge, "Proxies reconnect after this long, to spread across replicas.")
	fs.Float64Var(&o.ConnectionRate, "xds-connection-rate", o.ConnectionRate, "New xDS connections accepted per second (burst: the same number).")
	fs.IntVar(&o.MaxStreams, "xds-max-streams", o.MaxStreams, "Most ADS streams one replica serves (0: no cap); more are refused with RESOURCE_EXHAUSTED and retried, through the Service, on another replica.")
	fs.StringVar(&o.Audience, "xds-token-audience", o.Audience, "Audience proxies' projected ServiceAccount tokens must carry.")
	fs.BoolVar(&o.VerifyPeerIP, "xds-verify-peer-ip", o.VerifyPeerIP, "Require the connection to come from the IP of the pod named in the node id.")
	fs.DurationVar(&o.TokenReviewTTL, "xds-tokenreview-cache-ttl", o.TokenReviewTTL, "Longest a successful TokenReview is reused (never past the token's expiry).")
	fs.DurationVar(&o.RootRotationOverlap, "root-rotation-overlap", o.RootRotationOverlap, "Least time each phase of a root rotation (Overlap, Reissue) lasts; start one by creating the Secret trellis-ca-next.")
	fs.DurationVar(&o.RootRotationTick, "root-rotation-check-interval", o.RootRotationTick, "How often the root Secrets are checked.")
	fs.StringVar(&webhookAddr, "webhook-bind-address", webhookAddr, "Address (host:port) of the webhooks' HTTPS server (injection and validation).")
	var webhookNames string
	fs.StringVar(&o.WebhookCertDir, "webhook-cert-dir", "", "Directory with the webhook's tls.crt and tls.key (e.g. from cert-manager, whose CA injector then owns the caBundle). Empty: the controller issues the certificate from the mesh root and keeps the caBundle of --webhook-configuration current.")
	fs.StringVar(&webhookNames, "webhook-dns-names", "", "Comma-separated names of the self-issued webhook certificate (default trellis-webhook.<namespace>.svc and its .cluster.local form).")
	fs.StringVar(&o.WebhookConfiguration, "webhook-configuration", o.WebhookConfiguration, "MutatingWebhookConfiguration (injection) whose caBundle the controller keeps current.")
	fs.StringVar(&o.ValidatingConfiguration, "validating-webhook-configuration", o.ValidatingConfiguration, "ValidatingWebhookConfiguration (Trellis objects) whose caBundle the controller keeps current.")
	fs.StringVar(&o.InitImage, "init-image", o.InitImage, "trellis-init image injected into pods.")
	fs.StringVar(&o.XDSServiceHost, "xds-service-host", "", "Host injected proxies dial for xDS (default trellis-xds.<namespace>.svc).")
	fs.IntVar(&o.XDSServicePort, "xds-service-port", o.XDSServicePort, "Port injected proxies dial for xDS.")
	var podCIDRs string
	fs.StringVar(&podCIDRs, "pod-cidrs", "", "Comma-separated pod networks (CIDRs) for calls to pod IPs under mTLS. Empty: the Nodes' spec.podCIDRs (set when the cluster allocates node CIDRs); set it when the CNI's IPAM does not fill them (e.g. Calico, the AWS VPC CNI).")
	showVersion := fs.Bool("version", false, "Print the version and exit.")
	zapOpts := zap.Options{}
	zapOpts.BindFlags(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: trellis-controller [flags]\n\nThe Trellis control plane: mesh reconciler, xDS/SDS server and certificate authority.\nEnvironment: POD_NAMESPACE (default of --namespace); POD_IP (default host of --xds-address, --webhook-bind-address, --health-probe-bind-address); KUBECONFIG or --kubeconfig outside a cluster.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	flag.Parse()
	if *showVersion {
		fmt.Println("trellis-controller", version)
		return nil
	}
	h, port, err := net.SplitHostPort(webhookAddr)
	if o.WebhookPort, _ = strconv.Atoi(port); err != nil || o.WebhookPort <= 0 || h == "" {
		return fmt.Errorf("--webhook-bind-address: %q is no host:port (write e.g. 10.0.0.5:9443)", webhookAddr)
	}
	o.WebhookHost = h
	for _, n := range strings.Split(webhookNames, ",") {
		if n = strings.TrimSpace(n); n != "" {
			o.WebhookDNSNames = append(o.WebhookDNSNames, n)
		}
	}
	for _, c := range strings.Split(podCIDRs, ",") {
		if c = strings.TrimSpace(c); c == "" {
			continue
		}
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return fmt.Errorf("--pod-cidrs: %q is not a CIDR (write e.g. 10.244.0.0/16): %w", c, err)
		}
		o.PodCIDRs = append(o.PodCIDRs, p.Masked())
	}
	for _, n := range strings.Split(dnsNames, ",") {
		if n = strings.TrimSpace(n); n != "" {
			o.XDSDNSNames = append(o.XDSDNSNames, n)
		}
	}
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&zapOpts)))
	o.Log = ctrl.Log.WithName("trellis")
	cfg, err := ctrl.GetConfig()
	if err != nil {
		return fmt.Errorf("kubeconfig: %w", err)
	}
	if kubeQPS <= 0 || kubeBurst < 1 {
		return fmt.Errorf("--kube-api-qps and --kube-api-burst must be positive (got %v and %d)", kubeQPS, kubeBurst)
	}
	cfg.QPS, cfg.Burst = float32(kubeQPS), kubeBurst
	cp, err := controlplane.New(cfg, o)
	if err != nil {
		return err
	}
	if rootCAOut != "" {
		if err := os.WriteFile(rootCAOut, cp.Authority.RootPEM(), 0o644); err != nil {
			return err
		}
	}
	o.Log.Info("starting", "version", version, "namespace", o.Namespace, "leaderElection", o.LeaderElect)
	return cp.Start(ctrl.SetupSignalHandler())
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
