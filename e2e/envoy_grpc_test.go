package e2e_test

import (
	"fmt"
	"strings"
	"testing"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// TestEnvoyGRPCRoute: plain gRPC applications (no xDS of their own, no
// trellis.dev/proxy annotation) get Envoy sidecars; a GRPCRoute sends
// echo.Echo/Other to v2 and splits the rest 80/20, as the client's sidecar
// routes the HTTP/2 streams.
func TestEnvoyGRPCRoute(t *testing.T) {
	requireEnv(t)
	t.Parallel()
	ns := meshNamespace(t)
	v1, v2 := echoService(ns, "echo-v1"), echoService(ns, "echo-v2")
	v1.Spec.Selector = map[string]string{"app": "echo", "version": "v1"}
	v2.Spec.Selector = map[string]string{"app": "echo", "version": "v2"}
	d1, d2 := echoDeployment(ns, "echo", "v1", 1), echoDeployment(ns, "echo", "v2", 1)
	client := clientPod(ns, "client", "client")
	for _, a := range []map[string]string{d1.Spec.Template.Annotations, d2.Spec.Template.Annotations, client.Annotations} {
		delete(a, "trellis.dev/proxy") // an ordinary gRPC app: the injector gives it Envoy
	}
	create(t, serviceAccount(ns, "echo"), serviceAccount(ns, "client"), echoService(ns, "echo"), v1, v2, d1, d2, client)
	waitEndpoints(t, ns, "echo", 2)
	waitRunning(t, ns, "client")
	method := gwv1.GRPCRouteRule{
		Matches:     []gwv1.GRPCRouteMatch{{Method: &gwv1.GRPCMethodMatch{Service: ptrTo("echo.Echo"), Method: ptrTo("Other")}}},
		BackendRefs: []gwv1.GRPCBackendRef{backend("echo-v2", 1)},
	}
	create(t, grpcRoute(ns, method, gwv1.GRPCRouteRule{BackendRefs: []gwv1.GRPCBackendRef{backend("echo-v1", 80), backend("echo-v2", 20)}}))
	target := fmt.Sprintf("--target=echo.%s.svc.cluster.local:50051", ns)
	eventually(t, "method route", func() (bool, string) {
		_, codes, by := summarize(call(t, ns, "client", target, "--method=Other", "--n=10", "--wait-for-ready=false", "--timeout=2s"))
		return by["v2"] == 10, fmt.Sprint(by, codes)
	})
	rs := call(t, ns, "client", target, "--n=1000")
	ok, codes, by := summarize(rs)
	share := float64(by["v1"]) / float64(max(ok, 1))
	t.Logf("Echo: %d/1000 ok, v1 share %.1f %% (want 80 ± 5); Other → v2 10/10", ok, share*100)
	if ok != 1000 || share < 0.75 || share > 0.85 {
		t.Errorf("Echo: %d/1000 ok (%v), v1 share %.3f", ok, codes, share)
	}
	for _, r := range rs[:1] {
		if r.Headers["x-forwarded-client-cert"] == "" && !strings.Contains(fmt.Sprint(r.Headers), "spiffe://") {
			t.Logf("server metadata: %v", r.Headers)
		}
	}
}

// TestEnvoyWebSocket: a WebSocket upgrade through both sidecars (HTTP/1.1
// Upgrade on an HTTP port; Envoy needs upgrade_configs for it).
func TestEnvoyWebSocket(t *testing.T) {
	requireEnv(t)
	t.Parallel()
	ns := setupHTTP(t, "web", 1)
	rs := eventuallyHTTP(t, "websocket", func() []httpResult { return httpCall(t, ns, "client", "--ws", "ws://web/ws", "--count", "5") }, allCode(101))
	t.Logf("5/5 upgraded; reply %q", rs[0].Reply)
	if !strings.HasSuffix(rs[0].Reply, ": ping") {
		t.Errorf("reply %q", rs[0].Reply)
	}
}

func ptrTo[T any](v T) *T { return &v }
