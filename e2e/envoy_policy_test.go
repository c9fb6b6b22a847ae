package e2e_test

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

func targets(svc string) []meshv1alpha1.PolicyTargetReference {
	return []meshv1alpha1.PolicyTargetReference{{Kind: "Service", Name: svc}}
}

func backendPolicy(ns, svc string, spec meshv1alpha1.BackendPolicySpec) *meshv1alpha1.BackendPolicy {
	spec.TargetRefs = targets(svc)
	return &meshv1alpha1.BackendPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: svc}, Spec: spec}
}

// TestEnvoyAccessPolicy: AccessPolicies enforced by the server's sidecar
// (Envoy's RBAC filters): L7 Allow by path and method, a Deny that wins over
// an Allow, and an L4 Allow on the TCP port that names another identity.
func TestEnvoyAccessPolicy(t *testing.T) {
	requireEnv(t)
	t.Parallel()
	ns := setupHTTP(t, "web", 1)
	create(t, serviceAccount(ns, "other"), httpClientPod(ns, "other", "other", true),
		serviceAccount(ns, "stranger"), httpClientPod(ns, "stranger", "stranger", true))
	waitRunning(t, ns, "other")
	waitRunning(t, ns, "stranger")
	create(t, &meshv1alpha1.AccessPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "allow-client-reads"},
		Spec: meshv1alpha1.AccessPolicySpec{TargetRefs: targets("web"), Action: meshv1alpha1.AccessAllow, Rules: []meshv1alpha1.AccessRule{{
			From: []meshv1alpha1.AccessSource{{ServiceAccount: &meshv1alpha1.ServiceAccountReference{Name: "client"}}},
			To:   []meshv1alpha1.AccessOperation{{Paths: []meshv1alpha1.PathMatch{{Type: "PathPrefix", Value: "/public"}, {Type: "PathPrefix", Value: "/private"}}, Methods: []string{"GET"}}},
		}, {
			From: []meshv1alpha1.AccessSource{{ServiceAccount: &meshv1alpha1.ServiceAccountReference{Name: "other"}}},
			To:   []meshv1alpha1.AccessOperation{{Ports: []int32{tcpPort}}},
		}}},
	}, &meshv1alpha1.AccessPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "deny-private"},
		Spec: meshv1alpha1.AccessPolicySpec{TargetRefs: targets("web"), Action: meshv1alpha1.AccessDeny, Rules: []meshv1alpha1.AccessRule{{
			To: []meshv1alpha1.AccessOperation{{Paths: []meshv1alpha1.PathMatch{{Type: "PathPrefix", Value: "/private"}}}},
		}}},
	})
	cases := []struct {
		name, pod string
		args      []string
		want      int
	}{
		{"allowed path and method", "client", []string{"--url", "http://web/public/a"}, 200},
		{"allowed path, other method", "client", []string{"--url", "http://web/public/a", "--method", "POST"}, 403},
		{"path not allowed", "client", []string{"--url", "http://web/admin"}, 403},
		{"Deny wins over Allow", "client", []string{"--url", "http://web/private/x"}, 403},
		{"identity with only an L4 rule on the HTTP port", "other", []string{"--url", "http://web/public/a"}, 403},
		{"L4 rule on the TCP port: allowed identity", "other", []string{"--tcp", "web:9000"}, 1},
		{"L4 rule on the TCP port: other identity refused", "client", []string{"--tcp", "web:9000"}, 0},
	}
	// Both policies are in force once the Deny answers 403.
	eventuallyHTTP(t, "policies programmed", func() []httpResult {
		return httpCall(t, ns, "client", "--url", "http://web/private/x")
	}, allCode(403))
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rs := eventuallyHTTP(t, c.name, func() []httpResult {
				return httpCall(t, ns, c.pod, append(c.args, "--count", "5", "--timeout", "2s")...)
			}, allCode(c.want))
			t.Logf("%s from %s: 5/5 code %d %s", strings.Join(c.args, " "), c.pod, c.want, rs[0].Raw)
		})
	}
	// No Allow rule names the stranger: it is not given web's cluster or
	// endpoints, and its own sidecar answers 403 saying which policy.
	t.Run("an identity no Allow rule names gets a clear 403 from its own sidecar", func(t *testing.T) {
		rs := eventuallyHTTP(t, "stranger denied", func() []httpResult {
			return httpCall(t, ns, "stranger", "--url", "http://web/public/a", "--count", "5", "--timeout", "2s")
		}, allCode(403))
		if !strings.Contains(rs[0].Raw, "AccessPolicy "+ns+"/allow-client-reads allows calls") || !strings.Contains(rs[0].Raw, "/sa/stranger") {
			t.Errorf("the denial does not name the policy and the caller: %q", rs[0].Raw)
		}
		t.Logf("stranger: 5/5 code 403 %q", rs[0].Raw)
		// The server removes clusters after the listeners that used them
		// (make before break): wait for the cluster update too.
		eventually(t, "web's clusters gone from the stranger's sidecar", func() (bool, string) {
			clusters, err := env.Kubelet.EnvoyAdmin(ctxT(t), ns, "stranger", "/clusters?format=json")
			if err != nil {
				return false, err.Error()
			}
			return !strings.Contains(string(clusters), "web."+ns+".svc"), "still there"
		})
	})
}

// TestEnvoyBackendPolicy: BackendPolicy features on real traffic.
func TestEnvoyBackendPolicy(t *testing.T) {
	requireEnv(t)
	t.Parallel()
	ns := meshNamespace(t)
	// flaky fails every 2nd request; slow answers in 300 ms; ok is healthy.
	svcs := map[string][]string{"flaky": {"--fail-every=2"}, "slow": {"--delay=300ms"}, "ok": nil, "limited": nil, "faulty": nil, "sticky": nil}
	objs := []client.Object{serviceAccount(ns, "client"), httpClientPod(ns, "client", "client", true)}
	for name, args := range svcs {
		replicas := int32(1)
		if name == "sticky" {
			replicas = 3
		}
		objs = append(objs, serviceAccount(ns, name), httpService(ns, name), httpDeployment(ns, name, "v1", replicas, args...))
	}
	create(t, objs...)
	// outlier: two replicas, one of which answers 503 to everything.
	create(t, serviceAccount(ns, "outlier"), httpService(ns, "outlier"),
		httpDeployment(ns, "outlier", "v1", 1), httpDeployment(ns, "outlier", "bad", 1, "--fail-every=1"))
	for name := range svcs {
		replicas := 1
		if name == "sticky" {
			replicas = 3
		}
		waitEndpoints(t, ns, name, replicas)
	}
	waitEndpoints(t, ns, "outlier", 2)
	waitRunning(t, ns, "client")

	t.Run("without retries on 5xx, every 2nd request fails", func(t *testing.T) {
		rs := eventuallyHTTP(t, "flaky reachable", func() []httpResult { return httpCall(t, ns, "client", "--url", "http://flaky/", "--count", "40") }, appAnswered)
		t.Logf("%v, every answer from the app", codes(rs))
		if c := codes(rs); c[503] < 15 || c[200] < 15 {
			t.Errorf("%v: the app should fail half the requests", c)
		}
	})
	create(t,
		backendPolicy(ns, "flaky", meshv1alpha1.BackendPolicySpec{Retries: &meshv1alpha1.Retries{Attempts: 3, RetryOn: []meshv1alpha1.RetryOn{"5xx"}}}),
		backendPolicy(ns, "slow", meshv1alpha1.BackendPolicySpec{Timeout: ptr.To(meshv1alpha1.Duration("100ms"))}),
		backendPolicy(ns, "ok", meshv1alpha1.BackendPolicySpec{Connection: &meshv1alpha1.ConnectionSettings{MaxConnections: ptr.To[int32](1), MaxPendingRequests: ptr.To[int32](1), MaxRequests: ptr.To[int32](1)}}),
		backendPolicy(ns, "limited", meshv1alpha1.BackendPolicySpec{RateLimit: &meshv1alpha1.LocalRateLimit{Requests: 5, Interval: "1m"}}),
		backendPolicy(ns, "faulty", meshv1alpha1.BackendPolicySpec{FaultInjection: &meshv1alpha1.FaultInjection{
			Abort: &meshv1alpha1.FaultAbort{HTTPStatus: ptr.To[int32](418), Percent: 50},
			Delay: &meshv1alpha1.FaultDelay{Duration: "200ms", Percent: 100},
		}}),
		backendPolicy(ns, "sticky", meshv1alpha1.BackendPolicySpec{LoadBalancer: &meshv1alpha1.LoadBalancer{Algorithm: "RingHash", HashHeader: ptr.To("x-user")}}),
		backendPolicy(ns, "outlier", meshv1alpha1.BackendPolicySpec{OutlierDetection: &meshv1alpha1.OutlierDetection{
			Consecutive5xxErrors: 3, Interval: "1s", BaseEjectionTime: "1m", MaxEjectionPercent: 50,
		}}),
	)
	t.Run("retries on 5xx: every request succeeds", func(t *testing.T) {
		rs := eventuallyHTTP(t, "retries", func() []httpResult { return httpCall(t, ns, "client", "--url", "http://flaky/", "--count", "100") }, allCode(200))
		t.Logf("%d/100 succeeded against a backend failing every 2nd request", codes(rs)[200])
	})
	t.Run("timeout: 504 after 100 ms against a 300 ms backend", func(t *testing.T) {
		rs := eventuallyHTTP(t, "timeout", func() []httpResult { return httpCall(t, ns, "client", "--url", "http://slow/", "--count", "5") }, allCode(504))
		t.Logf("5/5 answered 504 in %.0f ms", rs[0].MS)
		if rs[0].MS > 290 {
			t.Errorf("504 after %.0f ms, want about 100", rs[0].MS)
		}
	})
	t.Run("circuit breaking: overflow answers 503 and is counted", func(t *testing.T) {
		var last map[int]int
		eventually(t, "overflow", func() (bool, string) {
			rs := httpCall(t, ns, "client", "--url", "http://ok/?delay=200ms", "--count", "40", "--concurrency", "10", "--timeout", "5s")
			last = codes(rs)
			return last[503] > 0 && last[200] > 0, fmt.Sprint(last)
		})
		stats := scrape(t, ns, "client")
		overflow := statSum(stats, "envoy_cluster_upstream_rq_pending_overflow", "outbound|80||ok."+ns)
		t.Logf("40 requests, 10 at a time, limits 1/1/1: %v; client sidecar upstream_rq_pending_overflow %v", last, overflow)
		if overflow == 0 {
			t.Errorf("no pending overflow counted by the client's sidecar:\n%s", grepLines(stats, "overflow"))
		}
	})
	t.Run("local rate limit: 429 past 5 requests a minute", func(t *testing.T) {
		var last map[int]int
		eventually(t, "rate limited", func() (bool, string) {
			last = codes(httpCall(t, ns, "client", "--url", "http://limited/", "--count", "20"))
			return last[429] >= 15, fmt.Sprint(last)
		})
		t.Logf("20 requests: %v", last)
	})
	t.Run("fault injection: 50 % abort 418, 200 ms delay", func(t *testing.T) {
		var rs []httpResult
		eventually(t, "faults", func() (bool, string) {
			rs = httpCall(t, ns, "client", "--url", "http://faulty/", "--count", "100", "--concurrency", "10")
			c := codes(rs)
			return c[418] >= 30 && c[418] <= 70 && c[200]+c[418] == 100, fmt.Sprint(c)
		})
		slow := 0
		for _, r := range rs {
			if r.MS >= 190 {
				slow++
			}
		}
		t.Logf("%v; %d/100 delayed ≥ 190 ms", codes(rs), slow)
		if slow < 95 {
			t.Errorf("only %d/100 requests delayed", slow)
		}
	})
	t.Run("ring hash: one header value always reaches one pod", func(t *testing.T) {
		eventually(t, "sticky", func() (bool, string) {
			seen := map[string]map[string]bool{}
			for _, user := range []string{"alice", "bob", "carol", "dave"} {
				seen[user] = map[string]bool{}
				for _, r := range httpCall(t, ns, "client", "--url", "http://sticky/", "--header", "x-user: "+user, "--count", "20") {
					seen[user][r.Pod] = r.Code == 200
				}
				if len(seen[user]) != 1 {
					return false, fmt.Sprintf("%s reached %v", user, seen[user])
				}
			}
			return true, ""
		})
	})
	t.Run("outlier detection ejects the failing endpoint", func(t *testing.T) {
		var last map[int]int
		eventually(t, "ejected", func() (bool, string) {
			httpCall(t, ns, "client", "--url", "http://outlier/", "--count", "20")
			last = codes(httpCall(t, ns, "client", "--url", "http://outlier/", "--count", "50"))
			if last[200] != 50 {
				b, _ := env.Kubelet.EnvoyAdmin(ctxT(t), ns, "client", "/clusters")
				return false, fmt.Sprintf("%v\n%s", last, grepLines(string(b), "outbound|80||outlier."))
			}
			return true, ""
		})
		stats := scrape(t, ns, "client")
		t.Logf("after ejection 50/50 succeeded; ejections %v", statSum(stats, "envoy_cluster_outlier_detection_ejections_enforced_total", "outbound|80||outlier."+ns))
	})
}

// scrape reads a pod's merged Prometheus stats from the host, as a
// Prometheus server would (pod IP, port 15020, /stats/prometheus).
func scrape(t *testing.T, ns, pod string) string {
	t.Helper()
	var p corev1.Pod
	if err := env.Cluster.Client().Get(ctxT(t), client.ObjectKey{Namespace: ns, Name: pod}, &p); err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + net.JoinHostPort(p.Status.PodIP, "15020") + "/stats/prometheus")
	if err != nil {
		t.Fatalf("scrape %s: %v", pod, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("scrape %s: %d %s", pod, resp.StatusCode, b)
	}
	return string(b)
}

// statSum adds the values of a metric's series whose labels contain sub.
func statSum(text, metric, sub string) float64 {
	var sum float64
	for _, l := range strings.Split(text, "\n") {
		if !strings.HasPrefix(l, metric+"{") && !strings.HasPrefix(l, metric+" ") {
			continue
		}
		if !strings.Contains(l, sub) {
			continue
		}
		var v float64
		if _, err := fmt.Sscan(l[strings.LastIndexByte(l, ' ')+1:], &v); err == nil {
			sum += v
		}
	}
	return sum
}

func grepLines(text, sub string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
