package e2e_test

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// outboundConnections is how many connections the pod's sidecar accepted
// on its outbound capture listener (15001): a call that bypasses the
// sidecar leaves it unchanged.
func outboundConnections(t *testing.T, ns, pod string) float64 {
	t.Helper()
	return statSum(scrape(t, ns, pod), "envoy_listener_downstream_cx_total", `envoy_listener_address="0.0.0.0_15001"`)
}

// TestEnvoyStrictMTLSAndCapture, under the default Strict mTLS:
//   - a meshed call's server app sees the caller's SPIFFE ID (XFCC) — in
//     TestEnvoyReachability; here: an unmeshed pod's plaintext call to a
//     meshed pod IP is refused by the server's sidecar;
//   - a meshed client calling a meshed pod IP directly (not a Service) gets
//     mTLS with the pod's identity (on-demand cluster), on HTTP and TCP; an
//     unmeshed pod's IP is reached in plaintext;
//   - a pod calling its own Service goes through its sidecar's inbound side;
//   - an app calling its own pod IP reaches itself;
//   - capture: an excluded inbound port takes plaintext directly; excluded
//     outbound ports and CIDRs and UID 1337's traffic bypass the client's
//     sidecar (its outbound listener counts no connection), other calls go
//     through it.
func TestEnvoyStrictMTLSAndCapture(t *testing.T) {
	requireEnv(t)
	t.Parallel()
	ns := setupHTTP(t, "web", 1)
	open := httpDeployment(ns, "open", "v1", 1)
	open.Spec.Template.Annotations = map[string]string{"trellis.dev/exclude-inbound-ports": "9000"}
	bypass := httpClientPod(ns, "bypass", "client", true)
	bypass.Annotations = map[string]string{"trellis.dev/exclude-outbound-ports": "9000", "trellis.dev/exclude-outbound-cidrs": "10.250.0.0/24"}
	proxyUID := httpClientPod(ns, "as-proxy-uid", "client", true)
	proxyUID.Spec.Containers[0].SecurityContext = &corev1.SecurityContext{RunAsUser: ptr.To[int64](1337)}
	create(t, serviceAccount(ns, "open"), httpService(ns, "open"), open,
		httpClientPod(ns, "plain", "client", false), bypass, proxyUID)
	waitEndpoints(t, ns, "open", 1)
	for _, p := range []string{"plain", "bypass", "as-proxy-uid"} {
		waitRunning(t, ns, p)
	}
	webIP, openIP := podIP(t, ns, "web-v1"), podIP(t, ns, "open-v1")

	t.Run("plaintext from an unmeshed pod is refused", func(t *testing.T) {
		for _, target := range []string{"--url=http://" + webIP + ":8080/", "--tcp=" + webIP + ":9000"} {
			rs := httpCall(t, ns, "plain", target, "--count", "5", "--timeout", "2s")
			if c := codes(rs); c[0] != 5 {
				t.Errorf("%s from an unmeshed pod: %v, want 5 refused", target, c)
			} else {
				t.Logf("%s from an unmeshed pod: 5/5 refused (%s)", target, rs[0].Error)
			}
		}
	})
	t.Run("a meshed client's calls to a meshed pod IP (no Service) get mTLS under Strict", func(t *testing.T) {
		// The client's sidecar discovers the pod's cluster on demand
		// (ODCDS): mTLS verifying the pod's own identity.
		// No retry: the first connection waits for the discovery and succeeds.
		rs := httpCall(t, ns, "client", "--url", "http://"+webIP+":8080/direct", "--count", "5", "--timeout", "3s", "--new-conn")
		if c := codes(rs); c[200] != 5 {
			t.Fatalf("pod IP under Strict: %v (%s)", c, firstHTTPError(rs, 200))
		}
		t.Logf("first connection (cluster discovered on demand) %.1f ms, next ones %.1f ms", rs[0].MS, rs[4].MS)
		if xfcc := rs[0].Body.header("x-forwarded-client-cert"); !strings.Contains(xfcc, "/sa/client") {
			t.Errorf("pod IP call: x-forwarded-client-cert %q, want the client's identity (mTLS)", xfcc)
		}
		t.Logf("http://%s:8080 (pod IP) from a meshed client: 5/5 over mTLS (XFCC %q)", webIP, rs[0].Body.header("x-forwarded-client-cert"))
		// TCP on the pod's other port, and an unmeshed pod's IP (plaintext).
		tcp := eventuallyHTTP(t, "pod IP TCP", func() []httpResult {
			return httpCall(t, ns, "client", "--tcp", webIP+":9000", "--count", "3", "--timeout", "3s")
		}, allCode(1))
		t.Logf("%s:9000 (pod IP, TCP) from a meshed client: 3/3 (%s)", webIP, tcp[0].Hello)
		plainIP := podIP(t, ns, "plain")
		plain := eventuallyHTTP(t, "unmeshed pod IP", func() []httpResult {
			return httpCall(t, ns, "client", "--url", "http://"+plainIP+":8080/", "--count", "3", "--timeout", "3s")
		}, allCode(200))
		if xfcc := plain[0].Body.header("x-forwarded-client-cert"); xfcc != "" {
			t.Errorf("unmeshed pod IP: the app saw x-forwarded-client-cert %q (no sidecar should be in front of it)", xfcc)
		}
		t.Logf("http://%s:8080 (unmeshed pod IP) from a meshed client: 3/3 in plaintext", plainIP)
		// Unknown address in the pod network (AllowAny: passthrough, nothing listens).
		rs = httpCall(t, ns, "client", "--url", "http://10.250.255.254:8080/", "--count", "1", "--timeout", "3s")
		if c := codes(rs); c[200] != 0 {
			t.Errorf("an address no pod has answered: %v", c)
		}
	})
	t.Run("an app reaches its own pod IP", func(t *testing.T) {
		rs := httpCall(t, ns, "client", "--url", "http://"+podIP(t, ns, "client")+":8080/self", "--count", "3")
		if c := codes(rs); c[200] != 3 {
			t.Errorf("own pod IP: %v (%s)", c, firstHTTPError(rs, 200))
		}
	})
	t.Run("a pod calling its own Service reaches itself through its sidecar's inbound side", func(t *testing.T) {
		var pods corev1.PodList
		if err := env.Cluster.Client().List(ctxT(t), &pods, client.InNamespace(ns), client.MatchingLabels{"app": "web"}); err != nil || len(pods.Items) != 1 {
			t.Fatalf("web pods: %v %d", err, len(pods.Items))
		}
		rs := httpCall(t, ns, pods.Items[0].Name, "--url", "http://web/self", "--count", "3")
		if c := codes(rs); c[200] != 3 {
			t.Fatalf("own Service: %v (%s)", c, firstHTTPError(rs, 200))
		}
		if xfcc := rs[0].Body.header("x-forwarded-client-cert"); !strings.Contains(xfcc, "/sa/web") {
			t.Errorf("x-forwarded-client-cert %q: the call did not pass the inbound side over mTLS", xfcc)
		}
	})
	t.Run("an excluded inbound port takes plaintext directly", func(t *testing.T) {
		rs := httpCall(t, ns, "plain", "--tcp", openIP+":9000", "--count", "3")
		if c := codes(rs); c[1] != 3 {
			t.Errorf("excluded port 9000: %v (%s)", c, rs[0].Error)
		}
		rs = httpCall(t, ns, "plain", "--url", "http://"+openIP+":8080/", "--count", "3", "--timeout", "2s")
		if c := codes(rs); c[0] != 3 {
			t.Errorf("captured port 8080 from an unmeshed pod: %v, want refused", c)
		}
	})
	t.Run("a meshed client reaches an excluded inbound port in plaintext", func(t *testing.T) {
		for _, target := range []string{"open:9000", openIP + ":9000"} {
			rs := eventuallyHTTP(t, target, func() []httpResult { return httpCall(t, ns, "client", "--tcp", target, "--count", "3") }, allCode(1))
			t.Logf("%s: 3/3 (%s)", target, rs[0].Hello)
		}
	})
	t.Run("excluded outbound ports and CIDRs and UID 1337 bypass the sidecar", func(t *testing.T) {
		cases := []struct {
			pod    string
			args   []string
			bypass bool
		}{
			{"bypass", []string{"--url", "http://web/"}, false},
			{"bypass", []string{"--tcp", openIP + ":9000"}, true},             // excluded port 9000
			{"bypass", []string{"--url", "http://" + webIP + ":8080/"}, true}, // excluded CIDR (refused by web's Strict sidecar)
			{"as-proxy-uid", []string{"--tcp", openIP + ":9000"}, true},
			{"client", []string{"--tcp", openIP + ":9000"}, false},
		}
		for _, c := range cases {
			before := outboundConnections(t, ns, c.pod)
			rs := httpCall(t, ns, c.pod, append(c.args, "--count", "3", "--timeout", "2s", "--new-conn")...)
			after := outboundConnections(t, ns, c.pod)
			got := after == before
			t.Logf("%s %s: codes %v, sidecar outbound connections +%v", c.pod, strings.Join(c.args, " "), codes(rs), after-before)
			if got != c.bypass {
				t.Errorf("%s %v: bypassed=%v, want %v", c.pod, c.args, got, c.bypass)
			}
		}
	})
}
