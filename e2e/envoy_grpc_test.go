package e2e_test

import (
	"fmt"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
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
	// v1 is ready by a gRPC probe (grpc.health.v1 through the sidecar's
	// 15020 health-check cluster); "unhealthy" probes a service the app
	// does not serve and must never become ready.
	grpcProbe := func(service string) *corev1.Probe {
		return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{GRPC: &corev1.GRPCAction{Port: 50051, Service: ptrTo(service)}}, PeriodSeconds: 1}
	}
	d1.Spec.Template.Spec.Containers[0].ReadinessProbe = grpcProbe("echo.Echo")
	bad := echoDeployment(ns, "unhealthy", "v1", 1)
	bad.Spec.Template.Spec.Containers[0].ReadinessProbe = grpcProbe("no.such.Service")
	for _, a := range []map[string]string{d1.Spec.Template.Annotations, d2.Spec.Template.Annotations, bad.Spec.Template.Annotations, client.Annotations} {
		delete(a, "trellis.dev/proxy") // an ordinary gRPC app: the injector gives it Envoy
	}
	create(t, serviceAccount(ns, "echo"), serviceAccount(ns, "client"), serviceAccount(ns, "unhealthy"), echoService(ns, "echo"), echoService(ns, "unhealthy"), v1, v2, d1, d2, bad, client)
	waitEndpoints(t, ns, "echo", 2)
	waitRunning(t, ns, "client")
	for _, name := range podNames(t, ns, "echo-v1") {
		var p corev1.Pod
		if err := env.Cluster.Client().Get(ctxT(t), clientKey(ns, name), &p); err != nil {
			t.Fatal(err)
		}
		if rp := p.Spec.Containers[0].ReadinessProbe; rp.HTTPGet == nil || rp.HTTPGet.Port.IntValue() != 15020 {
			t.Fatalf("the gRPC probe was not moved to the sidecar: %+v", rp)
		}
		t.Logf("gRPC readiness probe served through %s:15020%s: pod ready", name, p.Spec.Containers[0].ReadinessProbe.HTTPGet.Path)
	}
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
	for _, name := range podNames(t, ns, "unhealthy-v1") {
		if env.Kubelet.PID(ns, name, "echo") == 0 {
			t.Errorf("the unhealthy pod's app is not running, so its probe proves nothing")
		}
	}
	if n := readyEndpoints(t, ns, "unhealthy"); n != 0 {
		t.Errorf("a pod whose gRPC probe names a service the app does not serve has %d ready endpoints", n)
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
