package controlplane

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apiserver/pkg/apis/apiserver"
	"k8s.io/apiserver/pkg/authentication/authenticatorfactory"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	"k8s.io/apiserver/pkg/authorization/authorizerfactory"
	"k8s.io/apiserver/pkg/server/dynamiccertificates"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
)

// The secure metrics endpoint serves Prometheus metrics and the debug API
// (xds.DebugProxiesPath, xds.DebugConfigDumpPath) over TLS with a
// certificate from the mesh root, so trellisctl verifies it with the trust
// bundle. Callers authenticate as they do to the apiserver: a bearer token
// (TokenReview; Prometheus's ServiceAccount, exec plugins, OIDC) or a
// client certificate signed by the cluster's client CA, which the
// apiserver publishes in kube-system/extension-apiserver-authentication
// (kubeadm and kind admin kubeconfigs carry certificates, not tokens).
// Every request is then authorized by a SubjectAccessReview of the caller
// for the non-resource URL and the HTTP verb: get /metrics, get /debug/…
// (the chart's trellis-metrics-reader and trellis-debug-reader roles).
const (
	clientCANamespace = "kube-system"
	clientCAConfigMap = "extension-apiserver-authentication"
	clientCAKey       = "client-ca-file"
)

// servesDebugAPI: the metrics endpoint is on and secure, so it serves the
// debug API on its own certificate.
func (cp *ControlPlane) servesDebugAPI() bool {
	return cp.opts.MetricsSecure && cp.opts.MetricsAddr != "0"
}

// webhookBackoff is client-go's default for the review calls.
var webhookBackoff = &wait.Backoff{Duration: 500 * time.Millisecond, Factor: 1.5, Jitter: 0.2, Steps: 5}

// clientCA follows the cluster's client CA for the metrics endpoint's
// certificate authentication; run it on every replica (runClientCA).
func clientCA(cfg *rest.Config) (*dynamiccertificates.ConfigMapCAController, error) {
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	return dynamiccertificates.NewDynamicCAFromConfigMapController("metrics-client-ca", clientCANamespace, clientCAConfigMap, clientCAKey, cs)
}

func runClientCA(c *dynamiccertificates.ConfigMapCAController) manager.Runnable {
	return everyReplica(func(ctx context.Context) error {
		_ = c.RunOnce(ctx)
		c.Run(ctx, 1)
		return nil
	})
}

// metricsAuth is the metrics server's filter: authentication by token or
// client certificate, then a SubjectAccessReview.
func metricsAuth(clientCA dynamiccertificates.CAContentProvider) func(*rest.Config, *http.Client) (metricsserver.Filter, error) {
	return func(cfg *rest.Config, hc *http.Client) (metricsserver.Filter, error) {
		cs, err := kubernetes.NewForConfigAndClient(cfg, hc)
		if err != nil {
			return nil, err
		}
		authn, _, err := authenticatorfactory.DelegatingAuthenticatorConfig{
			Anonymous:                          &apiserver.AnonymousAuthConfig{Enabled: false},
			CacheTTL:                           time.Minute,
			TokenAccessReviewClient:            cs.AuthenticationV1(),
			TokenAccessReviewTimeout:           10 * time.Second,
			WebhookRetryBackoff:                webhookBackoff,
			ClientCertificateCAContentProvider: clientCA,
		}.New()
		if err != nil {
			return nil, fmt.Errorf("metrics authentication: %w", err)
		}
		authz, err := authorizerfactory.DelegatingAuthorizerConfig{
			SubjectAccessReviewClient: cs.AuthorizationV1(),
			AllowCacheTTL:             time.Minute,
			DenyCacheTTL:              10 * time.Second,
			WebhookRetryBackoff:       webhookBackoff,
		}.New()
		if err != nil {
			return nil, fmt.Errorf("metrics authorization: %w", err)
		}
		return func(log logr.Logger, next http.Handler) (http.Handler, error) {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				res, ok, err := authn.AuthenticateRequest(r)
				if err != nil || !ok {
					log.V(1).Info("metrics endpoint: unauthenticated request", "path", r.URL.Path, "error", err)
					http.Error(w, "Unauthorized: send a bearer token or a client certificate of this cluster", http.StatusUnauthorized)
					return
				}
				attrs := authorizer.AttributesRecord{User: res.User, Verb: strings.ToLower(r.Method), Path: r.URL.Path}
				decision, reason, err := authz.Authorize(r.Context(), attrs)
				if err != nil {
					log.Error(err, "metrics endpoint: SubjectAccessReview", "user", res.User.GetName())
					http.Error(w, "authorization failed: "+err.Error(), http.StatusInternalServerError)
					return
				}
				if decision != authorizer.DecisionAllow {
					log.V(1).Info("metrics endpoint: forbidden", "user", res.User.GetName(), "path", r.URL.Path, "reason", reason)
					http.Error(w, fmt.Sprintf("Forbidden: user %q may not %s %s (bind the ClusterRole trellis-debug-reader or trellis-metrics-reader)", res.User.GetName(), attrs.Verb, r.URL.Path), http.StatusForbidden)
					return
				}
				next.ServeHTTP(w, r)
			}), nil
		}, nil
	}
}

// metricsTLS serves the mesh-issued certificate and asks for (does not
// require: Prometheus sends a token) a client certificate, which the
// filter verifies against the cluster's client CA.
func (cp *ControlPlane) metricsTLS(c *tls.Config) {
	c.GetCertificate = cp.metricsCert.GetCertificate
	c.ClientAuth = tls.RequestClientCert
	c.MinVersion = tls.VersionTLS12
}
