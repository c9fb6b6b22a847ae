// Package controlplane wires the Trellis control plane — manager, mesh
// reconciler, pusher, xDS server and certificate authority — so that
// cmd/trellis-controller and the integration tests run the same thing.
package controlplane

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	"github.com/go-logr/logr"
	"golang.org/x/time/rate"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/utils/clock"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
	"sigs.k8s.io/controller-runtime/pkg/metrics/filters"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/controller"
	"github.com/trellis-mesh/trellis/pkg/inject"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/xds"
)

// Options configure the control plane; cmd/trellis-controller maps its
// flags onto them.
type Options struct {
	MetricsAddr             string
	MetricsSecure           bool
	ProbeAddr               string
	LeaderElect             bool
	LeaderElectionNamespace string
	Namespace               string
	XDSAddr                 string
	XDSDNSNames             []string
	Debounce, MaxDelay      time.Duration
	MaxConnectionAge        time.Duration
	ConnectionRate          float64
	Audience                string
	VerifyPeerIP            bool
	TokenReviewTTL          time.Duration
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
		MetricsAddr: ":8443", MetricsSecure: true, ProbeAddr: ":8081", LeaderElect: true,
		Namespace: "trellis-system", XDSAddr: ":15012",
		Debounce: 100 * time.Millisecond, MaxDelay: 10 * time.Second, MaxConnectionAge: 30 * time.Minute,
		ConnectionRate: 100, Audience: "trellis", VerifyPeerIP: true, TokenReviewTTL: 5 * time.Minute,
		RootRotationOverlap: time.Hour, RootRotationTick: 10 * time.Second,
		WebhookPort: 9443, WebhookConfiguration: "trellis-injection", ValidatingConfiguration: "trellis-validation",
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
	Ready   chan struct{}
	opts    Options
	serving atomic.Pointer[tls.Certificate]
	// webhookCert is the injection webhook\'s serving certificate.
	webhookCert   atomic.Pointer[tls.Certificate]
	webhookBundle *controller.WebhookBundle
	// servingRenew is when the serving certificate is due for renewal.
	servingRenew atomic.Int64
	dnsNames     []string
	rotating     *ca.Rotating
}

// servingLifetime of the xDS serving certificate; it is renewed at half.
const servingLifetime = 90 * 24 * time.Hour

// reissueServing signs the xDS serving certificate (and the self-issued
// webhook certificate) with the current signer; new TLS handshakes use them
// at once.
func (cp *ControlPlane) reissueServing() error {
	pair, notAfter, err := cp.issueServing(cp.dnsNames)
	if err != nil {
		return err
	}
	cp.serving.Store(pair)
	cp.servingRenew.Store(ca.RotateAt(notAfter.Add(-servingLifetime), notAfter, 50, 0).UnixNano())
	if cp.opts.WebhookCertDir == "" {
		names := cp.opts.WebhookDNSNames
		if len(names) == 0 {
			names = []string{"trellis-webhook." + cp.opts.Namespace + ".svc", "trellis-webhook." + cp.opts.Namespace + ".svc.cluster.local"}
		}
		wh, _, err := cp.issueServing(names)
		if err != nil {
			return err
		}
		cp.webhookCert.Store(wh)
	}
	return nil
}

// issueServing signs a serving certificate for names with the current signer.
func (cp *ControlPlane) issueServing(names []string) (*tls.Certificate, time.Time, error) {
	issued, err := cp.rotating.Signer().IssueServing(names, servingLifetime)
	if err != nil {
		return nil, time.Time{}, err
	}
	pair, err := issued.TLSCertificate()
	if err != nil {
		return nil, time.Time{}, err
	}
	return &pair, issued.NotAfter, nil
}

// webhookOptions serves the self-issued webhook certificate unless a
// certificate directory is configured.
func (cp *ControlPlane) webhookOptions(o Options) webhook.Options {
	wo := webhook.Options{Host: o.WebhookHost, Port: o.WebhookPort, CertDir: o.WebhookCertDir}
	if o.WebhookCertDir == "" {
		wo.TLSOpts = []func(*tls.Config){func(c *tls.Config) {
			c.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cp.webhookCert.Load(), nil }
		}}
	}
	return wo
}

// renewServing re-issues the serving certificate when it is due.
func (cp *ControlPlane) renewServing(context.Context) error {
	if cp.opts.Clock.Now().UnixNano() < cp.servingRenew.Load() {
		return nil
	}
	return cp.reissueServing()
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

// New wires a control plane against the apiserver of cfg.
func New(cfg *rest.Config, o Options) (*ControlPlane, error) {
	if o.Clock == nil {
		o.Clock = clock.RealClock{}
	}
	if o.Registry == nil {
		o.Registry = metrics.Registry
	}
	scheme, err := Scheme()
	if err != nil {
		return nil, err
	}
	cp := &ControlPlane{opts: o, Ready: make(chan struct{}), Metrics: xds.NewMetrics()}
	for _, c := range cp.Metrics.Collectors() {
		if err := o.Registry.Register(c); err != nil {
			return nil, fmt.Errorf("register metrics: %w", err)
		}
	}
	cp.Cache = xds.NewCache()
	cp.Pusher = xds.NewPusher(cp.Cache, cp.Metrics, o.Log.WithName("pusher"), o.Clock)
	cp.Pusher.Debounce, cp.Pusher.MaxDelay = o.Debounce, o.MaxDelay

	metricsOpts := metricsserver.Options{BindAddress: o.MetricsAddr, SecureServing: o.MetricsSecure,
		ExtraHandlers: map[string]http.Handler{"/debug/proxies": http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { cp.Server.DebugHandler().ServeHTTP(w, r) })}}
	if o.MetricsSecure {
		metricsOpts.FilterProvider = filters.WithAuthenticationAndAuthorization
	}
	leNamespace := o.LeaderElectionNamespace
	if leNamespace == "" {
		leNamespace = o.Namespace
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                  scheme,
		Metrics:                 metricsOpts,
		HealthProbeBindAddress:  o.ProbeAddr,
		LeaderElection:          o.LeaderElect,
		LeaderElectionID:        "trellis-controller.mesh.trellis.dev",
		LeaderElectionNamespace: leNamespace,
		Logger:                  o.Log,
		Controller:              config.Controller{SkipNameValidation: &o.SkipControllerNameValidation},
		WebhookServer:           webhook.NewServer(cp.webhookOptions(o)),
		// The only ConfigMaps watched are the trust bundles (a deleted
		// one is recreated at once); the controller may list and watch
		// ConfigMaps by that name only (RBAC resourceNames + field selector).
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{
			&corev1.ConfigMap{}: {Field: fields.OneTermEqualSelector("metadata.name", controller.RootCAConfigMap)},
			// Of Nodes only the pod CIDRs are read: the cache keeps nothing else.
			&corev1.Node{}: {Transform: controller.NodePodCIDRsOnly},
		}},
	})
	if err != nil {
		return nil, fmt.Errorf("manager: %w", err)
	}
	cp.Manager = mgr
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	auth := &xds.Authenticator{
		TokenReviews: cs.AuthenticationV1().TokenReviews(),
		Pods:         mgr.GetCache(),
		Audience:     o.Audience,
		VerifyPeerIP: o.VerifyPeerIP,
		Clock:        o.Clock,
		CacheTTL:     o.TokenReviewTTL,
		OnCache:      func(r string) { cp.Metrics.TokenReviewCache.WithLabelValues(r).Inc() },
	}
	cp.Server = xds.NewServer(cp.Cache, auth, cp.Pusher, cp.Metrics, o.Log.WithName("xds"), o.Clock)

	cp.Authority = o.Authority
	if cp.Authority == nil {
		// The built-in CA's root lives in a Secret in the control plane's
		// namespace, created by the first replica to start.
		direct, err := client.New(cfg, client.Options{Scheme: scheme})
		if err != nil {
			return nil, err
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if cp.Authority, err = ca.LoadOrCreate(ctx, direct, o.Namespace, ca.RootSecretName, "cluster.local", o.Clock); err != nil {
			return nil, err
		}
	}
	cp.IssuerMetrics = ca.NewIssuerMetrics()
	for _, c := range cp.IssuerMetrics.Collectors() {
		if err := o.Registry.Register(c); err != nil {
			return nil, fmt.Errorf("register metrics: %w", err)
		}
	}
	direct, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, err
	}
	rotating := ca.NewRotating(cp.Authority)
	backend := &meshBackend{builtIn: rotating, client: direct, namespace: o.Namespace, clock: o.Clock, mesh: cp.mesh}
	cp.Issuer = &ca.Issuer{Backend: backend, Clock: o.Clock, Metrics: cp.IssuerMetrics}
	cp.Pusher.NodeSecrets = xds.WorkloadSecrets(cp.Issuer, cp.mesh)
	cp.Pusher.OnExpiry = func(identity string, soonest time.Time) {
		if soonest.IsZero() {
			cp.IssuerMetrics.Expiry.DeleteLabelValues(identity)
		} else {
			cp.IssuerMetrics.Expiry.WithLabelValues(identity).Set(float64(soonest.Unix()))
		}
	}
	cp.Pusher.OnRotationFailure = func() { cp.IssuerMetrics.Failures.WithLabelValues("rotate").Inc() }

	cp.Reconciler = &controller.MeshReconciler{
		Client:   mgr.GetClient(),
		Pusher:   cp.Pusher,
		PodCIDRs: o.PodCIDRs,
		IsLeader: func() bool {
			if !o.LeaderElect {
				return true
			}
			select {
			case <-mgr.Elected():
				return true
			default:
				return false
			}
		},
	}
	cp.Pusher.OnProblems = cp.Reconciler.SetTranslatorProblems
	if err := cp.Reconciler.SetupWithManager(mgr); err != nil {
		return nil, err
	}

	wakeRootCA := make(chan event.GenericEvent, 1)
	if err := (&controller.RootCAReconciler{
		Client: mgr.GetClient(),
		Reader: mgr.GetAPIReader(),
		Wake:   wakeRootCA,
		// The xDS serving certificate is signed by the built-in root; with
		// cert-manager the issuer's CA is added for workloads.
		Bundle: func(ctx context.Context) ([]byte, error) {
			out, err := rotating.BundlePEM(ctx)
			if err != nil {
				return nil, err
			}
			if b, err := backend.BundlePEM(ctx); err == nil && !bytes.Contains(out, b) {
				out = append(append(out, '\n'), b...)
			}
			return out, nil
		},
	}).SetupWithManager(mgr); err != nil {
		return nil, err
	}

	{
		xdsHost := cmp.Or(o.XDSServiceHost, "trellis-xds."+o.Namespace+".svc")
		mgr.GetWebhookServer().Register(controller.ValidatePath, &webhook.Admission{Handler: &controller.Validator{
			Client: mgr.GetClient(), Decoder: admission.NewDecoder(scheme),
		}})
		mgr.GetWebhookServer().Register(inject.WebhookPath, &webhook.Admission{Handler: &inject.Webhook{
			Decoder: admission.NewDecoder(scheme),
			Config: func() inject.Config {
				return inject.Config{Mesh: cp.mesh().Config, InitImage: o.InitImage, XDSHost: xdsHost, XDSPort: o.XDSServicePort}
			},
		}})
	}

	dns := o.XDSDNSNames
	if len(dns) == 0 {
		dns = []string{"trellis-xds." + o.Namespace + ".svc", "trellis-xds." + o.Namespace + ".svc.cluster.local", "localhost"}
	}
	cp.dnsNames = dns
	cp.rotating = rotating
	if err := cp.reissueServing(); err != nil {
		return nil, err
	}
	if o.WebhookCertDir == "" {
		bundler := &controller.WebhookBundle{Client: direct, Name: o.WebhookConfiguration, ValidatingName: o.ValidatingConfiguration, Bundle: rotating.BundlePEM}
		cp.webhookBundle = bundler
		if err := mgr.Add(manager.RunnableFunc(func(ctx context.Context) error {
			// Leader keeps the caBundle current; it also runs after each change.
			t := o.Clock.NewTicker(o.RootRotationTick)
			defer t.Stop()
			for {
				if err := bundler.Sync(ctx); err != nil {
					o.Log.Error(err, "sync the webhook caBundle")
				}
				select {
				case <-ctx.Done():
					return nil
				case <-t.C():
				}
			}
		})); err != nil {
			return nil, err
		}
	}
	if o.Authority == nil {
		rr := &controller.RootRotation{
			Client: direct, Namespace: o.Namespace, Backend: rotating, Clock: o.Clock, Overlap: o.RootRotationOverlap,
			Recorder: mgr.GetEventRecorderFor("trellis-controller"), Current: cp.Authority,
			OnChange: func() {
				if err := cp.reissueServing(); err != nil {
					o.Log.Error(err, "re-issue the xDS serving certificate")
				}
				if cp.webhookBundle != nil {
					if err := cp.webhookBundle.Sync(context.Background()); err != nil {
						o.Log.Error(err, "sync the webhook caBundle")
					}
				}
				cp.Pusher.RefreshSecrets()
				select {
				case wakeRootCA <- event.GenericEvent{Object: &corev1.Namespace{}}:
				default:
				}
			},
		}
		every := func(step func(context.Context) error, name string) func(context.Context) error {
			return func(ctx context.Context) error {
				t := o.Clock.NewTicker(o.RootRotationTick)
				defer t.Stop()
				for {
					if err := step(ctx); err != nil {
						o.Log.Error(err, name)
					}
					select {
					case <-ctx.Done():
						return nil
					case <-t.C():
					}
				}
			}
		}
		if err := mgr.Add(everyReplica(every(rr.Sync, "apply root rotation"))); err != nil {
			return nil, err
		}
		if err := mgr.Add(everyReplica(every(cp.renewServing, "renew the xDS serving certificate"))); err != nil {
			return nil, err
		}
		if err := mgr.Add(manager.RunnableFunc(every(rr.Step, "advance root rotation"))); err != nil {
			return nil, err
		}
	}
	if err := mgr.Add(everyReplica(cp.Pusher.Run)); err != nil {
		return nil, err
	}
	if err := mgr.Add(everyReplica(cp.serveXDS)); err != nil {
		return nil, err
	}
	if err := mgr.AddHealthzCheck("ping", healthz.Ping); err != nil {
		return nil, err
	}
	if err := mgr.AddReadyzCheck("xds", func(*http.Request) error {
		select {
		case <-cp.Ready:
			return nil
		default:
			return errors.New("xDS server not listening yet")
		}
	}); err != nil {
		return nil, err
	}
	return cp, nil
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
		TLS: &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return cp.serving.Load(), nil
		}},
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
