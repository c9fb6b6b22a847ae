package controlplane

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"
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
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/controller"
	"github.com/trellis-mesh/trellis/pkg/inject"
	"github.com/trellis-mesh/trellis/pkg/xds"
)

// New wires a control plane against the apiserver of cfg: one constructor
// per concern, in this order, each using what the ones before produced.
// Every long-running part is a runnable of the manager, which starts them
// as one group (controller-runtime's runnable groups: caches, then
// webhooks, then the leader's and every replica's runnables), stops them
// all when one fails or the context ends, and waits for them to return.
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
	direct, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, err
	}
	cp := &ControlPlane{opts: o, Ready: make(chan struct{}), scheme: scheme, direct: direct, wakeRootCA: make(chan event.GenericEvent, 1)}
	signer := func() *ca.Authority { return cp.rotating.Signer() }
	cp.xdsCert = &ca.ServingCertificate{Names: o.XDSDNSNames, Lifetime: servingLifetime, Signer: signer}
	if len(cp.xdsCert.Names) == 0 {
		cp.xdsCert.Names = []string{"trellis-xds." + o.Namespace + ".svc", "trellis-xds." + o.Namespace + ".svc.cluster.local", "localhost"}
	}
	cp.metricsCert = &ca.ServingCertificate{Names: o.MetricsDNSNames, Lifetime: servingLifetime, Signer: signer}
	if len(cp.metricsCert.Names) == 0 {
		cp.metricsCert.Names = MetricsDNSNames(o.Namespace)
	}
	cp.webhookCert = &ca.ServingCertificate{Names: o.WebhookDNSNames, Lifetime: servingLifetime, Signer: signer}
	if len(cp.webhookCert.Names) == 0 {
		cp.webhookCert.Names = []string{"trellis-webhook." + o.Namespace + ".svc", "trellis-webhook." + o.Namespace + ".svc.cluster.local"}
	}
	for _, wire := range []func() error{
		cp.wireXDSCache,
		func() error { return cp.wireManager(cfg) },
		func() error { return cp.wireXDSServer(cfg) },
		cp.wireCA,
		cp.wireReconcilers,
		cp.wireWebhooks,
		cp.wireHealth,
	} {
		if err := wire(); err != nil {
			return nil, err
		}
	}
	return cp, nil
}

// wireXDSCache: Options (registry, clock, debounce) → Metrics, Cache and
// the Pusher that turns models into per-proxy snapshots.
func (cp *ControlPlane) wireXDSCache() error {
	o := cp.opts
	cp.Metrics = xds.NewMetrics()
	if err := register(o, cp.Metrics.Collectors()); err != nil {
		return err
	}
	cp.Cache = xds.NewCache()
	cp.Pusher = xds.NewPusher(cp.Cache, cp.Metrics, o.Log.WithName("pusher"), o.Clock)
	cp.Pusher.Debounce, cp.Pusher.MaxDelay = o.Debounce, o.MaxDelay
	return nil
}

// wireManager: Options → the Manager with the metrics endpoint (and
// /debug/proxies) behind Kubernetes authn/authz, the probe endpoint,
// leader election, the webhook server on the self-issued certificate, and
// a cache that keeps only what is read of ConfigMaps and Nodes.
func (cp *ControlPlane) wireManager(cfg *rest.Config) error {
	o := cp.opts
	metricsOpts := metricsserver.Options{BindAddress: o.MetricsAddr, SecureServing: o.MetricsSecure}
	var clientCAs manager.Runnable
	if cp.servesDebugAPI() {
		// The debug API is served only behind authentication (debugapi.go).
		debug := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { cp.Server.DebugHandler().ServeHTTP(w, r) })
		metricsOpts.ExtraHandlers = map[string]http.Handler{xds.DebugProxiesPath: debug, xds.DebugConfigDumpPath: debug}
		ccas, err := clientCA(cfg)
		if err != nil {
			return err
		}
		metricsOpts.FilterProvider, metricsOpts.TLSOpts, clientCAs = metricsAuth(ccas), []func(*tls.Config){cp.metricsTLS}, runClientCA(ccas)
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 cp.scheme,
		Metrics:                metricsOpts,
		HealthProbeBindAddress: o.ProbeAddr,
		PprofBindAddress:       cmp.Or(o.PprofAddr, "0"),
		// Leader election is the control plane's own (leader.go): a lost
		// Lease must not stop the replica.
		LeaderElection: false,
		Logger:         o.Log,
		Controller:     config.Controller{SkipNameValidation: &o.SkipControllerNameValidation},
		WebhookServer:  webhook.NewServer(cp.webhookOptions(o)),
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
		return fmt.Errorf("manager: %w", err)
	}
	cp.Manager = mgr
	if o.LeaderElect {
		run, err := cp.campaign(cfg)
		if err != nil {
			return err
		}
		if err := add(mgr, everyReplica(run)); err != nil {
			return err
		}
	}
	if clientCAs != nil {
		return mgr.Add(clientCAs)
	}
	return nil
}

// wireXDSServer: the Cache, the Pusher and the Manager's pod cache → the
// ADS server, authenticating proxies by TokenReview; runs the Pusher and
// the gRPC listener on every replica.
func (cp *ControlPlane) wireXDSServer(cfg *rest.Config) error {
	o := cp.opts
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	auth := &xds.Authenticator{
		TokenReviews: cs.AuthenticationV1().TokenReviews(),
		Pods:         cp.Manager.GetCache(),
		Audience:     o.Audience,
		VerifyPeerIP: o.VerifyPeerIP,
		Clock:        o.Clock,
		CacheTTL:     o.TokenReviewTTL,
		OnCache:      func(r string) { cp.Metrics.TokenReviewCache.WithLabelValues(r).Inc() },
	}
	cp.Server = xds.NewServer(cp.Cache, auth, cp.Pusher, cp.Metrics, o.Log.WithName("xds"), o.Clock)
	cp.Server.MaxStreams = o.MaxStreams
	return add(cp.Manager, everyReplica(cp.Pusher.Run), everyReplica(cp.serveXDS))
}

// wireCA: Options.Authority or the root Secret → the Authority, the
// rotating signer, the workload backend and Issuer the Pusher's SDS
// secrets come from, the xDS and webhook serving certificates (issued now,
// then kept by servingRenewals), the webhook caBundle sync and, for the
// built-in CA, the root rotation (Sync on every replica, Step on the
// leader).
func (cp *ControlPlane) wireCA() error {
	o := cp.opts
	cp.Authority = o.Authority
	if cp.Authority == nil {
		// The built-in CA's root lives in a Secret in the control plane's
		// namespace, created by the first replica to start.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		var err error
		if cp.Authority, err = ca.LoadOrCreate(ctx, cp.direct, o.Namespace, ca.RootSecretName, "cluster.local", o.Clock, cp.replacedRootAnnotations(ctx)); err != nil {
			return err
		}
	}
	cp.IssuerMetrics = ca.NewIssuerMetrics()
	if err := register(o, cp.IssuerMetrics.Collectors()); err != nil {
		return err
	}
	cp.rotating = ca.NewRotating(cp.Authority)
	cp.backend = &meshBackend{builtIn: cp.rotating, client: cp.direct, namespace: o.Namespace, clock: o.Clock, mesh: cp.mesh}
	cp.Issuer = &ca.Issuer{Backend: cp.backend, Clock: o.Clock, Metrics: cp.IssuerMetrics}
	cp.Pusher.NodeSecrets = xds.WorkloadSecrets(cp.Issuer, cp.mesh)
	cp.Pusher.OnExpiry = func(identity string, soonest time.Time) {
		if soonest.IsZero() {
			cp.IssuerMetrics.Expiry.DeleteLabelValues(identity)
		} else {
			cp.IssuerMetrics.Expiry.WithLabelValues(identity).Set(float64(soonest.Unix()))
		}
	}
	log := o.Log.WithName("pusher")
	cp.Pusher.Renewals.OnFailure = func(node string, err error, retryIn time.Duration) {
		log.Error(err, "issue workload certificate; retrying", "node", node, "retryIn", retryIn.String())
		cp.IssuerMetrics.Failures.WithLabelValues("rotate").Inc()
	}

	// The serving certificates exist before any listener starts; then
	// they are renewed at half life, and at once after a root change.
	servingLog := o.Log.WithName("serving")
	cp.servingRenewals = &ca.Renewals{Clock: o.Clock, OnFailure: func(name string, err error, retryIn time.Duration) {
		servingLog.Error(err, "re-issue a serving certificate; retrying", "certificate", name, "retryIn", retryIn.String())
	}}
	certs := map[string]*ca.ServingCertificate{"xds": cp.xdsCert}
	if cp.servesDebugAPI() {
		certs["metrics"] = cp.metricsCert
	}
	if o.WebhookCertDir == "" {
		certs["webhook"] = cp.webhookCert
	}
	for name, c := range certs {
		at, err := c.IssueNow()
		if err != nil {
			return fmt.Errorf("issue the %s serving certificate: %w", name, err)
		}
		cp.servingRenewals.StartAt(name, at, c.Issue)
	}
	if err := add(cp.Manager, everyReplica(func(ctx context.Context) error {
		<-ctx.Done()
		cp.servingRenewals.StopAll()
		return nil
	})); err != nil {
		return err
	}
	if o.WebhookCertDir == "" {
		cp.webhookBundle = &controller.WebhookBundle{Client: cp.direct, Name: o.WebhookConfiguration, ValidatingName: o.ValidatingConfiguration, Bundle: cp.rotating.BundlePEM}
		// The leader keeps the caBundle current; it also runs after each change.
		if err := cp.leaderTask(cp.every(cp.webhookBundle.Sync, "sync the webhook caBundle")); err != nil {
			return err
		}
	}
	if o.Authority != nil {
		return nil
	}
	replaced := &rootReplaced{cp: cp}
	rr := &controller.RootRotation{
		Client: cp.direct, Namespace: o.Namespace, Backend: cp.rotating, Clock: o.Clock, Overlap: o.RootRotationOverlap,
		Recorder: cp.Manager.GetEventRecorderFor("trellis-controller"), Current: cp.Authority,
		OnChange: cp.rootChanged, OnRootSecret: replaced.observe,
	}
	if err := add(cp.Manager, everyReplica(cp.every(rr.Sync, "apply root rotation"))); err != nil {
		return err
	}
	return cp.leaderTask(cp.every(rr.Step, "advance root rotation"))
}

// rootChanged follows a change of signer or trust bundle: new serving
// certificates, the webhooks' caBundle, every proxy's SDS secrets and the
// namespaces' trust-bundle ConfigMaps.
func (cp *ControlPlane) rootChanged() {
	cp.servingRenewals.Refresh()
	if cp.webhookBundle != nil {
		if err := cp.webhookBundle.Sync(context.Background()); err != nil {
			cp.opts.Log.Error(err, "sync the webhook caBundle")
		}
	}
	cp.Pusher.RefreshSecrets()
	select {
	case cp.wakeRootCA <- event.GenericEvent{Object: &corev1.Namespace{}}:
	default:
	}
}

// wireReconcilers: the Manager's cache, the Pusher and the CA → the mesh
// reconciler (model → Pusher; status on the leader) and the trust-bundle
// reconciler (the roots into each meshed namespace).
func (cp *ControlPlane) wireReconcilers() error {
	o, mgr := cp.opts, cp.Manager
	cp.Reconciler = &controller.MeshReconciler{
		Client:   mgr.GetClient(),
		Pusher:   cp.Pusher,
		PodCIDRs: o.PodCIDRs,
		IsLeader: cp.IsLeader,
	}
	cp.Pusher.OnProblems = cp.Reconciler.SetTranslatorProblems
	cp.Server.OnRejections = cp.Reconciler.SetRejections
	if err := cp.Reconciler.SetupWithManager(mgr); err != nil {
		return err
	}
	// A newly elected leader writes status and trust bundles at once (a
	// follower's model is current; its writes were skipped).
	if err := cp.onElected(func() {
		cp.Reconciler.WakeStatus()
		select {
		case cp.wakeRootCA <- event.GenericEvent{Object: &corev1.Namespace{}}:
		default:
		}
	}); err != nil {
		return err
	}
	return (&controller.RootCAReconciler{
		Namespace: o.Namespace,
		Client:    mgr.GetClient(),
		Reader:    mgr.GetAPIReader(),
		Wake:      cp.wakeRootCA,
		IsLeader:  cp.IsLeader,
		// The xDS serving certificate is signed by the built-in root; with
		// cert-manager the issuer's CA is added for workloads.
		Bundle: func(ctx context.Context) ([]byte, error) {
			out, err := cp.rotating.BundlePEM(ctx)
			if err != nil {
				return nil, err
			}
			if b, err := cp.backend.BundlePEM(ctx); err == nil && !bytes.Contains(out, b) {
				out = append(append(out, '\n'), b...)
			}
			return out, nil
		},
	}).SetupWithManager(mgr)
}

// wireWebhooks: the Manager's webhook server and client, the current
// model → the validating webhook and the injection webhook (which injects
// what the current MeshConfig says).
func (cp *ControlPlane) wireWebhooks() error {
	o, srv := cp.opts, cp.Manager.GetWebhookServer()
	xdsHost := cmp.Or(o.XDSServiceHost, "trellis-xds."+o.Namespace+".svc")
	srv.Register(controller.ValidatePath, &webhook.Admission{Handler: &controller.Validator{
		Client: cp.Manager.GetClient(), Decoder: admission.NewDecoder(cp.scheme),
	}})
	srv.Register(inject.WebhookPath, &webhook.Admission{Handler: &inject.Webhook{
		Decoder: admission.NewDecoder(cp.scheme),
		Config: func() inject.Config {
			return inject.Config{Mesh: cp.mesh().Config, InitImage: o.InitImage, XDSHost: xdsHost, XDSPort: o.XDSServicePort}
		},
	}})
	return nil
}

// wireHealth: /healthz answers while the process runs; /readyz once the
// xDS server listens.
func (cp *ControlPlane) wireHealth() error {
	if err := cp.Manager.AddHealthzCheck("ping", healthz.Ping); err != nil {
		return err
	}
	return cp.Manager.AddReadyzCheck("xds", func(*http.Request) error {
		select {
		case <-cp.Ready:
			return nil
		default:
			return errors.New("xDS server not listening yet")
		}
	})
}

// every runs step now and then at each RootRotationTick until ctx ends,
// logging (not returning) its errors: the next tick retries.
func (cp *ControlPlane) every(step func(context.Context) error, name string) func(context.Context) error {
	return func(ctx context.Context) error {
		t := cp.opts.Clock.NewTicker(cp.opts.RootRotationTick)
		defer t.Stop()
		for {
			if err := step(ctx); err != nil {
				cp.opts.Log.Error(err, name)
			}
			select {
			case <-ctx.Done():
				return nil
			case <-t.C():
			}
		}
	}
}

func register(o Options, cs []prometheus.Collector) error {
	for _, c := range cs {
		if err := o.Registry.Register(c); err != nil {
			return fmt.Errorf("register metrics: %w", err)
		}
	}
	return nil
}

func add(mgr manager.Manager, rs ...manager.Runnable) error {
	for _, r := range rs {
		if err := mgr.Add(r); err != nil {
			return err
		}
	}
	return nil
}
