package v1alpha1_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/localcluster"
	"github.com/trellis-mesh/trellis/internal/testenv"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

var env *testenv.Env

func TestMain(m *testing.M) { testenv.Main(m, &env) }

// object parses a manifest; namespaced kinds are put in ns.
func object(t *testing.T, manifest, ns string) *unstructured.Unstructured {
	t.Helper()
	u := &unstructured.Unstructured{}
	if err := yaml.Unmarshal([]byte(manifest), &u.Object); err != nil {
		t.Fatalf("parse manifest: %v", err)
	}
	if u.GetKind() != "MeshConfig" {
		u.SetNamespace(ns)
	}
	return u
}

func TestValidObjectsAreAcceptedAndDefaulted(t *testing.T) {
	ns := env.Namespace(t, nil)
	tests := []struct {
		name     string
		manifest string
		// want maps a JSON path (dot separated) to the value the apiserver
		// must have stored, defaults included.
		want map[string]any
	}{
		{
			name: "an empty MeshConfig named default gets every default",
			manifest: `
apiVersion: mesh.trellis.dev/v1alpha1
kind: MeshConfig
metadata: {name: default}
`,
			want: map[string]any{
				"spec.mtls.mode":                    "Strict",
				"spec.trustDomain":                  "cluster.local",
				"spec.certificates.lifetime":        "24h",
				"spec.certificates.rotationPercent": int64(50),
				"spec.issuer.type":                  "BuiltIn",
				"spec.outboundPolicy":               "AllowAny",
				"spec.defaultAccess":                "Allow",
				"spec.sidecar.logLevel":             "warning",
				"spec.sidecar.image":                "envoyproxy/envoy:v1.40.0",
			},
		},
		{
			name: "a MeshConfig with a cert-manager issuer, short certificates, logs and tracing is accepted",
			manifest: `
apiVersion: mesh.trellis.dev/v1alpha1
kind: MeshConfig
metadata: {name: default}
spec:
  mtls: {mode: Permissive}
  certificates: {lifetime: 2m, rotationPercent: 60}
  issuer: {type: CertManager, certManager: {issuerRef: {name: mesh-ca, kind: ClusterIssuer}}}
  outboundPolicy: RegistryOnly
  defaultAccess: Deny
  accessLog: {}
  tracing: {collector: "otel.observability:4317"}
`,
			want: map[string]any{
				"spec.issuer.certManager.issuerRef.group": "cert-manager.io",
				"spec.accessLog.encoding":                 "Text",
				"spec.tracing.samplingPercent":            int64(1),
			},
		},
		{
			name: "an AccessPolicy allowing a ServiceAccount and a namespace on some paths is accepted",
			manifest: `
apiVersion: mesh.trellis.dev/v1alpha1
kind: AccessPolicy
metadata: {name: reviews}
spec:
  targetRefs: [{name: reviews}]
  rules:
  - from: [{serviceAccount: {name: frontend}}, {namespace: shop}]
    to: [{ports: [9080], paths: [{value: /api}, {type: Exact, value: /healthz}], methods: [GET]}]
`,
			want: map[string]any{
				"spec.action": "Allow",
			},
		},
		{
			name: "a BackendPolicy using every setting is accepted",
			manifest: `
apiVersion: mesh.trellis.dev/v1alpha1
kind: BackendPolicy
metadata: {name: reviews}
spec:
  targetRefs: [{name: reviews}]
  timeout: 10s
  retries: {attempts: 3, perTryTimeout: 2s, retryOn: [5xx, reset]}
  connection: {connectTimeout: 1s, maxConnections: 100, maxPendingRequests: 10, maxRequests: 1000, maxRetries: 3}
  outlierDetection: {consecutive5xxErrors: 3}
  loadBalancer: {algorithm: RingHash, hashHeader: x-user}
  rateLimit: {requests: 100}
  faultInjection:
    delay: {duration: 100ms, percent: 10}
    abort: {grpcStatus: 14, percent: 5}
`,
			want: map[string]any{
				"spec.outlierDetection.interval": "10s",
				"spec.rateLimit.interval":        "1s",
			},
		},
		{
			name: "an ExternalService with an HTTP port originating TLS and a TCP port with addresses is accepted",
			manifest: `
apiVersion: mesh.trellis.dev/v1alpha1
kind: ExternalService
metadata: {name: payments}
spec:
  hosts: [api.payments.example.com]
  addresses: [203.0.113.0/24]
  ports:
  - {number: 80, protocol: HTTP, targetPort: 443, tls: {}}
  - {number: 5432, protocol: TCP}
`,
			want: map[string]any{"spec.ports": nil},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			u := object(t, tt.manifest, ns)
			if err := env.Client.Create(ctx, u); err != nil {
				t.Fatalf("create: %v", err)
			}
			t.Cleanup(func() { _ = env.Client.Delete(context.Background(), u) })
			for path, want := range tt.want {
				got, found, err := unstructured.NestedFieldNoCopy(u.Object, strings.Split(path, ".")...)
				if err != nil || !found {
					t.Errorf("%s: not found in the stored object (err %v)", path, err)
					continue
				}
				if want == nil {
					continue
				}
				if diff := cmp.Diff(want, got); diff != "" {
					t.Errorf("%s (-want +got):\n%s", path, diff)
				}
			}
		})
	}
}

func TestInvalidObjectsAreRejectedNamingTheField(t *testing.T) {
	ns := env.Namespace(t, nil)
	tests := []struct {
		name     string
		manifest string
		// wantField and wantMessage must both appear in the apiserver's error.
		wantField   string
		wantMessage string
	}{
		{
			name:        "a MeshConfig not named default is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: MeshConfig, metadata: {name: other}}`,
			wantField:   "metadata.name",
			wantMessage: "must be 'default': MeshConfig is a singleton",
		},
		{
			name:        "an unknown mTLS mode is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: MeshConfig, metadata: {name: default}, spec: {mtls: {mode: Lenient}}}`,
			wantField:   "spec.mtls.mode",
			wantMessage: `supported values: "Strict", "Permissive"`,
		},
		{
			name:        "a certificate lifetime under two minutes is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: MeshConfig, metadata: {name: default}, spec: {certificates: {lifetime: 1m}}}`,
			wantField:   "spec.certificates",
			wantMessage: "certificates.lifetime must be between 2m and 720h",
		},
		{
			name:        "a lifetime that is not a duration is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: MeshConfig, metadata: {name: default}, spec: {certificates: {lifetime: "1 day"}}}`,
			wantField:   "spec.certificates.lifetime",
			wantMessage: "a duration such as 500ms, 10s, 1m30s or 2h",
		},
		{
			name:        "a rotation percent of 95 is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: MeshConfig, metadata: {name: default}, spec: {certificates: {rotationPercent: 95}}}`,
			wantField:   "spec.certificates.rotationPercent",
			wantMessage: "less than or equal to 80",
		},
		{
			name:        "a CertManager issuer without issuerRef is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: MeshConfig, metadata: {name: default}, spec: {issuer: {type: CertManager}}}`,
			wantField:   "spec.issuer",
			wantMessage: "issuer.certManager must be set exactly when issuer.type is CertManager",
		},
		{
			name:        "a tracing sampling percent over 100 is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: MeshConfig, metadata: {name: default}, spec: {tracing: {collector: "otel.obs:4317", samplingPercent: 150}}}`,
			wantField:   "spec.tracing.samplingPercent",
			wantMessage: "less than or equal to 100",
		},
		{
			name:        "an AccessPolicy without targetRefs is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: AccessPolicy, metadata: {name: a}, spec: {rules: [{from: [{namespace: x}]}]}}`,
			wantField:   "spec.targetRefs",
			wantMessage: "Required value",
		},
		{
			name:        "an AccessPolicy targeting a Deployment is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: AccessPolicy, metadata: {name: a}, spec: {targetRefs: [{kind: Deployment, name: web}], rules: [{from: [{namespace: x}]}]}}`,
			wantField:   "spec.targetRefs[0].kind",
			wantMessage: `supported values: "Service"`,
		},
		{
			name:        "an AccessPolicy with no rules is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: AccessPolicy, metadata: {name: a}, spec: {targetRefs: [{name: web}], rules: []}}`,
			wantField:   "spec.rules",
			wantMessage: "should have at least 1 items",
		},
		{
			name:        "a source naming both a ServiceAccount and a namespace is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: AccessPolicy, metadata: {name: a}, spec: {targetRefs: [{name: web}], rules: [{from: [{namespace: x, serviceAccount: {name: web}}]}]}}`,
			wantField:   "spec.rules[0].from[0]",
			wantMessage: "set exactly one of serviceAccount or namespace",
		},
		{
			name:        "a rule with neither from nor to is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: AccessPolicy, metadata: {name: a}, spec: {targetRefs: [{name: web}], rules: [{}]}}`,
			wantField:   "spec.rules[0].from",
			wantMessage: "a rule needs at least one of from or to",
		},
		{
			name:        "a path without a leading slash is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: AccessPolicy, metadata: {name: a}, spec: {targetRefs: [{name: web}], rules: [{to: [{paths: [{value: api}]}]}]}}`,
			wantField:   "spec.rules[0].to[0].paths[0].value",
			wantMessage: "should match",
		},
		{
			name:        "a lower-case method is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: AccessPolicy, metadata: {name: a}, spec: {targetRefs: [{name: web}], rules: [{to: [{methods: [get]}]}]}}`,
			wantField:   "spec.rules[0].to[0].methods[0]",
			wantMessage: "should match",
		},
		{
			name:        "a BackendPolicy that sets nothing is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: BackendPolicy, metadata: {name: b}, spec: {targetRefs: [{name: web}]}}`,
			wantField:   "spec",
			wantMessage: "must set at least one of",
		},
		{
			name:        "a per-try timeout as long as the request timeout is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: BackendPolicy, metadata: {name: b}, spec: {targetRefs: [{name: web}], timeout: 2s, retries: {perTryTimeout: 2000ms}}}`,
			wantField:   "spec.retries.perTryTimeout",
			wantMessage: "retries.perTryTimeout must be shorter than timeout",
		},
		{
			name:        "eleven retries are refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: BackendPolicy, metadata: {name: b}, spec: {targetRefs: [{name: web}], retries: {attempts: 11}}}`,
			wantField:   "spec.retries.attempts",
			wantMessage: "less than or equal to 10",
		},
		{
			name:        "an unknown retry condition is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: BackendPolicy, metadata: {name: b}, spec: {targetRefs: [{name: web}], retries: {retryOn: [always]}}}`,
			wantField:   "spec.retries.retryOn[0]",
			wantMessage: "supported values",
		},
		{
			name:        "a request timeout in words is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: BackendPolicy, metadata: {name: b}, spec: {targetRefs: [{name: web}], timeout: "5 seconds"}}`,
			wantField:   "spec.timeout",
			wantMessage: "a duration such as 500ms, 10s, 1m30s or 2h",
		},
		{
			name:        "a fault delay for 101 percent of requests is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: BackendPolicy, metadata: {name: b}, spec: {targetRefs: [{name: web}], faultInjection: {delay: {duration: 1s, percent: 101}}}}`,
			wantField:   "spec.faultInjection.delay.percent",
			wantMessage: "less than or equal to 100",
		},
		{
			name:        "an abort with both an HTTP and a gRPC status is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: BackendPolicy, metadata: {name: b}, spec: {targetRefs: [{name: web}], faultInjection: {abort: {httpStatus: 503, grpcStatus: 14, percent: 1}}}}`,
			wantField:   "spec.faultInjection.abort",
			wantMessage: "set exactly one of httpStatus or grpcStatus",
		},
		{
			name:        "ring hash without a hash header is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: BackendPolicy, metadata: {name: b}, spec: {targetRefs: [{name: web}], loadBalancer: {algorithm: RingHash}}}`,
			wantField:   "spec.loadBalancer.hashHeader",
			wantMessage: "hashHeader must be set exactly when algorithm is RingHash",
		},
		{
			name:        "a TCP external port without addresses is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: ExternalService, metadata: {name: e}, spec: {hosts: [db.example.com], ports: [{number: 5432, protocol: TCP}]}}`,
			wantField:   "spec.addresses",
			wantMessage: "addresses are required when a port has protocol TCP",
		},
		{
			name:        "an external host that is not a DNS name is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: ExternalService, metadata: {name: e}, spec: {hosts: ["Bad_Host"], ports: [{number: 80, protocol: HTTP}]}}`,
			wantField:   "spec.hosts[0]",
			wantMessage: "a host is a lower-case DNS name with at least one dot",
		},
		{
			name:        "a wildcard external host is refused, saying so",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: ExternalService, metadata: {name: e}, spec: {hosts: ["*.example.com"], ports: [{number: 80, protocol: HTTP}]}}`,
			wantField:   "spec.hosts[0]",
			wantMessage: "wildcard hosts are not supported",
		},
		{
			name:        "a URL as an external host is refused, saying what to write",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: ExternalService, metadata: {name: e}, spec: {hosts: ["https://api.example.com/v1"], ports: [{number: 443, protocol: TLS}]}}`,
			wantField:   "spec.hosts[0]",
			wantMessage: "give a host name, not a URL",
		},
		{
			name:        "a host with a port is refused, saying where the port goes",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: ExternalService, metadata: {name: e}, spec: {hosts: ["api.example.com:8443"], ports: [{number: 8443, protocol: TLS}]}}`,
			wantField:   "spec.hosts[0]",
			wantMessage: "no port in a host",
		},
		{
			name:        "two external ports with the same number are refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: ExternalService, metadata: {name: e}, spec: {hosts: [a.example.com], ports: [{number: 80, protocol: HTTP}, {number: 80, protocol: TLS}]}}`,
			wantField:   "spec.ports[1]",
			wantMessage: "Duplicate value",
		},
		{
			name:        "TLS origination on a TCP port is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: ExternalService, metadata: {name: e}, spec: {hosts: [a.example.com], addresses: [10.0.0.0/8], ports: [{number: 5432, protocol: TCP, tls: {}}]}}`,
			wantField:   "spec.ports[0].tls",
			wantMessage: "tls origination applies to HTTP ports only",
		},
		{
			name:        "an external address that is not a CIDR is refused",
			manifest:    `{apiVersion: mesh.trellis.dev/v1alpha1, kind: ExternalService, metadata: {name: e}, spec: {hosts: [a.example.com], addresses: [10.0.0.1], ports: [{number: 5432, protocol: TCP}]}}`,
			wantField:   "spec.addresses[0]",
			wantMessage: "each address must be a CIDR",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := object(t, tt.manifest, ns)
			err := env.Client.Create(context.Background(), u)
			if err == nil {
				_ = env.Client.Delete(context.Background(), u)
				t.Fatal("the apiserver accepted the object")
			}
			if !apierrors.IsInvalid(err) {
				t.Fatalf("want an Invalid error, got %v", err)
			}
			for _, want := range []string{tt.wantField, tt.wantMessage} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error does not contain %q:\n%v", want, err)
				}
			}
		})
	}
}

func TestTrustDomainIsImmutable(t *testing.T) {
	ctx := context.Background()
	mc := &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: meshv1alpha1.MeshConfigName}}
	if err := env.Client.Create(ctx, mc); err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Cleanup(func() { _ = env.Client.Delete(context.Background(), mc) })
	mc.Spec.TrustDomain = "example.org"
	err := env.Client.Update(ctx, mc)
	if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "spec.trustDomain") || !strings.Contains(err.Error(), "trustDomain is immutable") {
		t.Fatalf("want an Invalid error naming spec.trustDomain, got %v", err)
	}
}

func TestStatusSubresourceRoundTrip(t *testing.T) {
	ctx := context.Background()
	ns := env.Namespace(t, nil)
	bp := &meshv1alpha1.BackendPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "reviews", Namespace: ns},
		Spec: meshv1alpha1.BackendPolicySpec{
			TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: "reviews"}},
			Timeout:    new(meshv1alpha1.Duration("5s")),
		},
	}
	if err := env.Client.Create(ctx, bp); err != nil {
		t.Fatalf("create: %v", err)
	}
	cond := metav1.Condition{
		Type: meshv1alpha1.ConditionAccepted, Status: metav1.ConditionFalse, Reason: meshv1alpha1.ReasonTargetNotFound,
		Message: "Service reviews not found", ObservedGeneration: bp.Generation, LastTransitionTime: metav1.Now(),
	}
	bp.Status.ObservedGeneration = bp.Generation
	meta.SetStatusCondition(&bp.Status.Conditions, cond)
	// A spec change sent through the status subresource must be ignored.
	bp.Spec.Timeout = new(meshv1alpha1.Duration("9s"))
	if err := env.Client.Status().Update(ctx, bp); err != nil {
		t.Fatalf("update status: %v", err)
	}
	var got meshv1alpha1.BackendPolicy
	if err := env.Client.Get(ctx, client.ObjectKeyFromObject(bp), &got); err != nil {
		t.Fatalf("get: %v", err)
	}
	c := meta.FindStatusCondition(got.Status.Conditions, meshv1alpha1.ConditionAccepted)
	if c == nil || c.Status != metav1.ConditionFalse || c.Reason != meshv1alpha1.ReasonTargetNotFound || c.ObservedGeneration != bp.Generation {
		t.Errorf("Accepted condition after round trip = %+v", c)
	}
	if got.Status.ObservedGeneration != bp.Generation {
		t.Errorf("observedGeneration = %d, want %d", got.Status.ObservedGeneration, bp.Generation)
	}
	if *got.Spec.Timeout != "5s" {
		t.Errorf("status update changed spec.timeout to %s", *got.Spec.Timeout)
	}
}

func TestSamplesAreAccepted(t *testing.T) {
	ns := env.Namespace(t, nil)
	files, err := filepath.Glob(filepath.Join(env.Root, "config", "samples", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no samples found: %v", err)
	}
	for _, f := range files {
		objs, err := localcluster.ReadManifests(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, u := range objs {
			if u.GetKind() != "MeshConfig" {
				u.SetNamespace(ns)
			}
			if err := env.Client.Create(context.Background(), u); err != nil {
				t.Errorf("%s: %s %s rejected: %v", filepath.Base(f), u.GetKind(), u.GetName(), err)
				continue
			}
			t.Cleanup(func() { _ = env.Client.Delete(context.Background(), u) })
		}
	}
}
