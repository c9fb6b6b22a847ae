package e2e_test

import (
	"fmt"
	"math"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// eventually retries check every 300 ms for up to a minute.
func eventually(t *testing.T, what string, check func() (bool, string)) time.Duration {
	t.Helper()
	return eventuallyWithin(t, time.Minute, what, check)
}

// eventuallyWithin is eventually with another limit.
func eventuallyWithin(t *testing.T, limit time.Duration, what string, check func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	last := ""
	for time.Since(start) < limit {
		ok, msg := check()
		if ok {
			return time.Since(start)
		}
		last = msg
		time.Sleep(300 * time.Millisecond)
	}
	t.Fatalf("%s: not after %v; last: %s", what, limit, last)
	return 0
}

func echoRef() []meshv1alpha1.PolicyTargetReference {
	return []meshv1alpha1.PolicyTargetReference{{Kind: "Service", Name: "echo"}}
}

// TestAccessPolicy: a Deny policy for the client's identity makes calls fail
// with PERMISSION_DENIED at the server; replacing it with an Allow policy
// naming the client restores them.
func TestAccessPolicy(t *testing.T) {
	requireEnv(t)
	ns := setupEcho(t, 1)
	deny := &meshv1alpha1.AccessPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "deny-client"},
		Spec: meshv1alpha1.AccessPolicySpec{TargetRefs: echoRef(), Action: meshv1alpha1.AccessDeny, Rules: []meshv1alpha1.AccessRule{{
			From: []meshv1alpha1.AccessSource{{ServiceAccount: &meshv1alpha1.ServiceAccountReference{Name: "client"}}},
		}}},
	}
	create(t, deny)
	took := eventually(t, "calls denied", func() (bool, string) {
		rs := call(t, ns, "client", target(ns, "echo"), "--n=1")
		return rs[0].Code == "PermissionDenied", rs[0].Code + " " + rs[0].Error
	})
	t.Logf("deny effective after %s", took.Round(time.Millisecond))
	if err := env.Cluster.Client().Delete(ctxT(t), deny); err != nil {
		t.Fatal(err)
	}
	// (Until the controller has seen the deletion, Deny wins over this Allow;
	// the calls below wait for that.)
	create(t, &meshv1alpha1.AccessPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "allow-client"},
		Spec: meshv1alpha1.AccessPolicySpec{TargetRefs: echoRef(), Action: meshv1alpha1.AccessAllow, Rules: []meshv1alpha1.AccessRule{{
			From: []meshv1alpha1.AccessSource{{ServiceAccount: &meshv1alpha1.ServiceAccountReference{Name: "client"}}},
		}}},
	})
	eventually(t, "calls allowed again", func() (bool, string) {
		rs := call(t, ns, "client", target(ns, "echo"), "--n=1")
		return rs[0].ok(), rs[0].Code
	})
	rs := call(t, ns, "client", target(ns, "echo"), "--n=20")
	if ok, codes, _ := summarize(rs); ok != 20 {
		t.Fatalf("with the Allow policy %d/20 succeeded (%v)", ok, codes)
	}

	// Scoped out: the Allow policy now names another identity only. The
	// client is no longer given echo's cluster or endpoints, and its calls
	// fail with PERMISSION_DENIED from its own gRPC (the fault filter) —
	// not a deadline or UNAVAILABLE for a listener that never comes.
	var allow meshv1alpha1.AccessPolicy
	if err := env.Cluster.Client().Get(ctxT(t), client.ObjectKey{Namespace: ns, Name: "allow-client"}, &allow); err != nil {
		t.Fatal(err)
	}
	allow.Spec.Rules[0].From[0].ServiceAccount.Name = "someone-else"
	update(t, &allow)
	eventually(t, "scoped-out calls denied", func() (bool, string) {
		rs := call(t, ns, "client", target(ns, "echo"), "--n=1")
		return rs[0].Code == "PermissionDenied", rs[0].Code + " " + rs[0].Error
	})
	rs = call(t, ns, "client", target(ns, "echo"), "--n=5")
	_, codes, _ := summarize(rs)
	t.Logf("scoped out by the Allow policy: %v (%s, %.0f ms)", codes, rs[0].Error, rs[0].MS)
	if codes["PermissionDenied"] != 5 {
		t.Errorf("scoped out: %v, want 5 PermissionDenied", codes)
	}
}

// setupVersions deploys echo v1 and v2 (one replica each) behind Service
// echo, plus Services echo-v1 and echo-v2 for each version.
func setupVersions(t *testing.T, v2args ...string) string {
	t.Helper()
	ns := meshNamespace(t)
	v1svc, v2svc := echoService(ns, "echo-v1"), echoService(ns, "echo-v2")
	v1svc.Spec.Selector = map[string]string{"app": "echo", "version": "v1"}
	v2svc.Spec.Selector = map[string]string{"app": "echo", "version": "v2"}
	create(t, serviceAccount(ns, "echo"), serviceAccount(ns, "client"), echoService(ns, "echo"), v1svc, v2svc,
		echoDeployment(ns, "echo", "v1", 1), echoDeployment(ns, "echo", "v2", 1, v2args...), clientPod(ns, "client", "client"))
	waitEndpoints(t, ns, "echo", 2)
	waitRunning(t, ns, "client")
	return ns
}

func backend(name string, weight int32) gwv1.GRPCBackendRef {
	return gwv1.GRPCBackendRef{BackendRef: gwv1.BackendRef{Weight: ptr.To(weight), BackendObjectReference: gwv1.BackendObjectReference{
		Name: gwv1.ObjectName(name), Port: ptr.To(gwv1.PortNumber(50051)),
	}}}
}

func grpcRoute(ns string, rules ...gwv1.GRPCRouteRule) *gwv1.GRPCRoute {
	return &gwv1.GRPCRoute{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "echo"},
		Spec: gwv1.GRPCRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: ptr.To(gwv1.Group("")), Kind: ptr.To(gwv1.Kind("Service")), Name: "echo"}}},
			Rules:           rules,
		},
	}
}

// TestTrafficSplit: a GRPCRoute splitting 80/20 between v1 and v2 is
// observed within ±5 % over 2,000 calls.
func TestTrafficSplit(t *testing.T) {
	requireEnv(t)
	ns := setupVersions(t)
	create(t, grpcRoute(ns, gwv1.GRPCRouteRule{BackendRefs: []gwv1.GRPCBackendRef{backend("echo-v1", 80), backend("echo-v2", 20)}}))
	// The split is in place once the first 200 calls look like it.
	eventually(t, "split programmed", func() (bool, string) {
		_, _, by := summarize(call(t, ns, "client", target(ns, "echo"), "--n=200"))
		return by["v1"] > 120 && by["v1"] < 190, fmt.Sprint(by)
	})
	rs := call(t, ns, "client", target(ns, "echo"), "--n=2000")
	ok, codes, by := summarize(rs)
	if ok != 2000 {
		t.Fatalf("%d/2000 succeeded (%v)", ok, codes)
	}
	share := float64(by["v1"]) / 2000
	t.Logf("v1 %d, v2 %d: v1 share %.1f %% (want 80 ± 5)", by["v1"], by["v2"], share*100)
	if math.Abs(share-0.8) > 0.05 {
		t.Errorf("v1 share %.3f, want 0.80 ± 0.05", share)
	}
}

// TestHeaderAndMethodMatching: requests with x-version: v2, or calling
// echo.Echo/Other, go to v2; everything else to v1.
func TestHeaderAndMethodMatching(t *testing.T) {
	requireEnv(t)
	ns := setupVersions(t)
	create(t, grpcRoute(ns,
		gwv1.GRPCRouteRule{
			Matches:     []gwv1.GRPCRouteMatch{{Headers: []gwv1.GRPCHeaderMatch{{Name: "x-version", Value: "v2"}}}, {Method: &gwv1.GRPCMethodMatch{Service: ptr.To("echo.Echo"), Method: ptr.To("Other")}}},
			BackendRefs: []gwv1.GRPCBackendRef{backend("echo-v2", 1)},
		},
		gwv1.GRPCRouteRule{BackendRefs: []gwv1.GRPCBackendRef{backend("echo-v1", 1)}},
	))
	// Both directions: before the route arrives, a client that knows only
	// one of the two endpoints would already send every call to one version.
	eventually(t, "header match programmed", func() (bool, string) {
		_, _, v2 := summarize(call(t, ns, "client", target(ns, "echo"), "--n=10", "--header=x-version=v2"))
		_, _, v1 := summarize(call(t, ns, "client", target(ns, "echo"), "--n=10"))
		return v2["v2"] == 10 && v1["v1"] == 10, fmt.Sprint("with header ", v2, ", without ", v1)
	})
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"no header, method Echo", nil, "v1"},
		{"x-version: v2", []string{"--header=x-version=v2"}, "v2"},
		{"x-version: v3", []string{"--header=x-version=v3"}, "v1"},
		{"method Other", []string{"--method=Other"}, "v2"},
	} {
		_, codes, by := summarize(call(t, ns, "client", append([]string{target(ns, "echo"), "--n=20"}, c.args...)...))
		if by[c.want] != 20 {
			t.Errorf("%s: answers %v (failures %v), want all 20 from %s", c.name, by, codes, c.want)
		}
	}
}

// TestRetries: a backend failing every other call with UNAVAILABLE; with
// retries off about half the calls fail, with one retry ≥ 99 % succeed.
func TestRetries(t *testing.T) {
	requireEnv(t)
	ns := setupEcho(t, 1, "--fail-every=2")
	bp := backendPolicy(ns, "echo", meshv1alpha1.BackendPolicySpec{Retries: &meshv1alpha1.Retries{Attempts: 0}})
	create(t, bp)
	eventually(t, "retries off", func() (bool, string) {
		ok, _, _ := summarize(call(t, ns, "client", target(ns, "echo"), "--n=20"))
		return ok <= 12, fmt.Sprintf("%d/20 succeeded", ok)
	})
	bp.Spec.Retries = &meshv1alpha1.Retries{Attempts: 2, RetryOn: []meshv1alpha1.RetryOn{"unavailable"}}
	update(t, bp)
	eventually(t, "retries on", func() (bool, string) {
		ok, _, _ := summarize(call(t, ns, "client", target(ns, "echo"), "--n=20"))
		return ok == 20, fmt.Sprintf("%d/20 succeeded", ok)
	})
	rs := call(t, ns, "client", target(ns, "echo"), "--n=500")
	ok, codes, _ := summarize(rs)
	t.Logf("with 2 retries: %d/500 succeeded against a backend failing every other call", ok)
	if ok < 495 {
		t.Errorf("%d/500 succeeded (%v), want ≥ 99 %%", ok, codes)
	}
}

// TestFaultInjection: an abort fault fails every call with the configured
// gRPC status; a delay fault delays every call.
func TestFaultInjection(t *testing.T) {
	requireEnv(t)
	ns := setupEcho(t, 1)
	bp := backendPolicy(ns, "echo", meshv1alpha1.BackendPolicySpec{FaultInjection: &meshv1alpha1.FaultInjection{
		Abort: &meshv1alpha1.FaultAbort{GRPCStatus: ptr.To[int32](8), Percent: 100},
	}})
	create(t, bp)
	eventually(t, "abort", func() (bool, string) {
		rs := call(t, ns, "client", target(ns, "echo"), "--n=10")
		_, codes, _ := summarize(rs)
		return codes["ResourceExhausted"] == 10, fmt.Sprint(codes)
	})
	bp.Spec.FaultInjection = &meshv1alpha1.FaultInjection{Delay: &meshv1alpha1.FaultDelay{Duration: "700ms", Percent: 100}}
	update(t, bp)
	eventually(t, "delay", func() (bool, string) {
		rs := call(t, ns, "client", target(ns, "echo"), "--n=5")
		for _, r := range rs {
			if !r.ok() || r.MS < 700 {
				return false, fmt.Sprintf("%+v", r)
			}
		}
		return true, ""
	})
}

// TestRequestTimeout: a BackendPolicy timeout shorter than the backend's
// answer ends calls with DEADLINE_EXCEEDED at about the timeout.
func TestRequestTimeout(t *testing.T) {
	requireEnv(t)
	ns := setupEcho(t, 1, "--delay=3s")
	create(t, backendPolicy(ns, "echo", meshv1alpha1.BackendPolicySpec{Timeout: ptr.To(meshv1alpha1.Duration("500ms"))}))
	eventually(t, "timeout", func() (bool, string) {
		rs := call(t, ns, "client", target(ns, "echo"), "--n=3")
		for _, r := range rs {
			if r.Code != "DeadlineExceeded" || r.MS > 2500 {
				return false, fmt.Sprintf("%s after %.0f ms", r.Code, r.MS)
			}
		}
		t.Logf("DEADLINE_EXCEEDED after %.0f ms (timeout 500ms, backend answers after 3s)", rs[0].MS)
		return true, ""
	})
}

// TestOutlierDetection: one of two endpoints fails every call; outlier
// detection ejects it and calls stop failing.
func TestOutlierDetection(t *testing.T) {
	requireEnv(t)
	ns := setupVersions(t, "--fail-every=1")
	create(t, backendPolicy(ns, "echo", meshv1alpha1.BackendPolicySpec{
		Retries:          &meshv1alpha1.Retries{Attempts: 0},
		OutlierDetection: &meshv1alpha1.OutlierDetection{Consecutive5xxErrors: 5, Interval: "1s", BaseEjectionTime: "5m", MaxEjectionPercent: 50},
	}))
	// Ejection is the client's own state, so it is observed within one
	// client process: 400 calls, 10 ms apart.
	var rs []result
	eventually(t, "outlier detection programmed", func() (bool, string) {
		rs = call(t, ns, "client", target(ns, "echo"), "--n=400", "--interval=10ms")
		last := -1
		for i, r := range rs {
			if !r.ok() {
				last = i
			}
		}
		return last >= 0 && last < 200, fmt.Sprintf("last failure at call %d of 400", last)
	})
	failed, last := 0, 0
	for i, r := range rs {
		if !r.ok() {
			failed, last = failed+1, i
		}
	}
	_, _, by := summarize(rs[last+1:])
	t.Logf("failing endpoint ejected after %d calls (%d failed, %d ms); the remaining %d calls all succeeded, answered by %v",
		last+1, failed, rs[last].At-rs[0].At, len(rs)-last-1, by)
	if by["v2"] != 0 {
		t.Errorf("the failing v2 still answered after ejection: %v", by)
	}
}
