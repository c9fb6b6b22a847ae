// Package controlplane wires the Trellis control plane — manager, mesh
// reconciler, pusher, xDS server and certificate authority — so that
// cmd/trellis-controller and the integration tests run the same thing.
package controlplane

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	"github.com/go-logr/logr"
	"golang.org/x/time/rate"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/utils/clock"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/controller"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/xds"
)

// Options configure the control plane; cmd/trellis-controller maps its
// flags onto them.
type Options struct {
	MetricsAddr   string
	MetricsSecure bool
	// MetricsDNSNames are the metrics serving certificate's names (default
	// MetricsDNSNames(Namespace)).
	MetricsDNSNames []string
	ProbeAddr       string
	// PprofAddr serves net/http/pprof ("" or "0": off).
	PprofAddr               string
	LeaderElect             bool
	LeaderElectionNamespace string
	// LeaseDuration, RenewDeadline and RetryPeriod time leader election
	// (client-go's meanings): a killed leader's successor writes status
	// within about LeaseDuration + RetryPeriod. The leader releases the
	// Lease when it stops gracefully, so a rolling restart does not wait.
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
	// LeaderIdentity names this replica in the Lease (default: env
	// POD_NAME, else the host name with a random suffix).
	LeaderIdentity     string
	Namespace          string
	XDSAddr            string
	XDSDNSNames        []string
	Debounce, MaxDelay time.Duration
	MaxConnectionAge   time.Duration
	ConnectionRate     float64
	// MaxStreams caps the ADS streams one replica serves (0: no cap).
	MaxStreams     int
	Audience       string
	VerifyPeerIP   bool
	TokenReviewTTL time.Duration
	// Authority signs workload and serving certificates. Nil: the root in
	// the Secret trellis-ca of Namespace (loaded, or created by the first
	// replica), with root rotation; set: that authority, no rotation (tests).
	Authority *ca.Authority
	// Registry receives the Prometheus metrics; nil uses controller-runtime's.
	Registry metrics.RegistererGatherer
	Clock    clock.WithTickerAndDelayedExecution
	Log      logr.Logger
	// SkipControllerNameValidation lets tests run several control planes in
	// one process.
	SkipControllerNameValidation bool
	// RootRotationOverlap is the least time each root-rotation phase lasts.
	RootRotationOverlap time.Duration
	// RootRotationTick is how often the root Secrets are checked.
	RootRotationTick time.Duration
	// Webhook serving: the injection webhook is served with a certificate
	// the control plane issues itself from the mesh root for
	// WebhookDNSNames, and the caBundle of the MutatingWebhookConfiguration
	// WebhookConfiguration is kept equal to the trust bundle. With
	// WebhookCertDir set instead (e.g. cert-manager's CA injector manages
	// the bundle), tls.crt and tls.key there are used.
	WebhookHost, WebhookCertDir string
	WebhookPort                 int
	WebhookDNSNames             []string
	WebhookConfiguration        string
	ValidatingConfiguration     string
	// InitImage is the trellis-init image injected into pods.
	InitImage string
	// XDSServiceHost and XDSServicePort are how injected proxies reach the
	// control plane (default trellis-xds.<namespace>.svc:15012).
	XDSServiceHost string
	XDSServicePort int
	// PodCIDRs are the cluster's pod networks, for calls to pod IPs; empty:
	// the Nodes' spec.podCIDRs.
	PodCIDRs []netip.Prefix
}

// Defaults returns the production defaults.
func Defaults() Options {
	return Options{
		MetricsAddr: "127.0.0.1:8443", MetricsSecure: true, ProbeAddr: "127.0.0.1:8081", LeaderElect: true,
		LeaseDuration: 15 * time.Second, RenewDeadline: 10 * time.Second, RetryPeriod: 2 * time.Second,
		Namespace: "trellis-system", XDSAddr: "127.0.0.1:15012",
		Debounce: 100 * time.Millisecond, MaxDelay: 10 * time.Second, MaxConnectionAge: 30 * time.Minute,
		ConnectionRate: 100, MaxStreams: 20000, Audience: "trellis", VerifyPeerIP: true, TokenReviewTTL: 5 * time.Minute,
		RootRotationOverlap: time.Hour, RootRotationTick: 10 * time.Second,
		WebhookHost: "127.0.0.1", WebhookPort: 9443, WebhookConfiguration: "trellis-injection", ValidatingConfiguration: "trellis-validation",
		InitImage: "ghcr.io/trellis-mesh/trellis-init:dev", XDSServicePort: 15012,
	}
}

// ControlPlane is a wired, not yet started, control plane.
type ControlPlane struct {
	Manager       manager.Manager
	Server        *xds.Server
	Pusher        *xds.Pusher
	Cache         *xds.Cache
	Metrics       *xds.Metrics
	Authority     *ca.Authority
	Issuer        *ca.Issuer
	IssuerMetrics *ca.IssuerMetrics
	Reconciler    *controller.MeshReconciler
	// XDSAddr is the address the xDS server listens on, once Ready is closed.
	XDSAddr string
	// Ready is closed when the xDS server listens.
	Ready chan struct{}
	opts  Options
	// xdsCert and webhookCert are the listeners' serving certificates
	// (webhookCert unless WebhookCertDir is set), kept current by
	// servingRenewals.
	xdsCert, webhookCert, metricsCert *ca.ServingCertificate
	servingRenewals                   *ca.Renewals
	webhookBundle                     *controller.WebhookBundle
	rotating                          *ca.Rotating
	// backend is the workload certificate backend (built-in or
	// cert-manager, as MeshConfig says).
	backend *meshBackend
	// scheme and direct (an uncached client) are shared by the wiring.
	scheme *runtime.Scheme
	direct client.Client
	// wakeRootCA makes the trust-bundle reconciler republish at once.
	wakeRootCA chan event.GenericEvent
	leader     leadership
}

// MetricsDNSNames are the names of the metrics endpoint's certificate:
// its Service (trellis-metrics), which trellisctl verifies whichever way it
// connects (port-forward, --controller-address).
func MetricsDNSNames(namespace string) []string {
	return []string{"trellis-metrics." + namespace + ".svc", "trellis-metrics." + namespace + ".svc.cluster.local", "localhost"}
}

// servingLifetime of the xDS serving certificate; it is renewed at half.
const servingLifetime = 90 * 24 * time.Hour

// webhookOptions serves the self-issued webhook certificate unless a
// certificate directory is configured.
func (cp *ControlPlane) webhookOptions(o Options) webhook.Options {
	wo := webhook.Options{Host: o.WebhookHost, Port: o.WebhookPort, CertDir: o.WebhookCertDir}
	if o.WebhookCertDir == "" {
		wo.TLSOpts = []func(*tls.Config){func(c *tls.Config) {
			c.GetCertificate = cp.webhookCert.GetCertificate
		}}
	}
	return wo
}

// Scheme has every kind the control plane reads.
func Scheme() (*runtime.Scheme, error) {
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{clientgoscheme.AddToScheme, meshv1alpha1.AddToScheme, gwv1.Install, cmapi.AddToScheme} {
		if err := add(scheme); err != nil {
			return nil, err
		}
	}
	return scheme, nil
}

func (cp *ControlPlane) mesh() model.Mesh {
	if m := cp.Pusher.Mesh(); m != nil {
		return *m
	}
	return model.Mesh{Config: model.Defaults(meshv1alpha1.MeshConfigSpec{})}
}

func (cp *ControlPlane) serveXDS(ctx context.Context) error {
	lis, err := net.Listen("tcp", cp.opts.XDSAddr)
	if err != nil {
		return fmt.Errorf("xds listen: %w", err)
	}
	g := xds.NewGRPCServer(xds.GRPCOptions{
		TLS:                  &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: cp.xdsCert.GetCertificate},
		MaxConnectionAge:     cp.opts.MaxConnectionAge,
		MaxConcurrentStreams: 16,
	})
	cp.Server.Register(ctx, g)
	cp.XDSAddr = lis.Addr().String()
	cp.opts.Log.Info("serving xDS", "address", cp.XDSAddr)
	close(cp.Ready)
	errc := make(chan error, 1)
	go func() {
		errc <- g.Serve(xds.RateLimitedListener(lis, rate.Limit(cp.opts.ConnectionRate), max(int(cp.opts.ConnectionRate), 1)))
	}()
	select {
	case <-ctx.Done():
		stopped := make(chan struct{})
		go func() { g.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
			g.Stop()
		}
		return nil
	case err := <-errc:
		return err
	}
}

// Start runs the control plane until ctx ends.
func (cp *ControlPlane) Start(ctx context.Context) error { return cp.Manager.Start(ctx) }

// everyReplica runs f on every replica, leader or not.
type everyReplica func(context.Context) error

func (f everyReplica) Start(ctx context.Context) error { return f(ctx) }
func (f everyReplica) NeedLeaderElection() bool        { return false }

var _ manager.LeaderElectionRunnable = everyReplica(nil)
