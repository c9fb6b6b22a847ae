package e2e_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// The fault scenarios (#19): each drives traffic through real sidecars while
// something goes wrong, counts what failed, and checks that status tells
// the truth. docs/reliability.md has the table of their figures.

// routeCondition waits for the route's first parent status to carry the
// condition for generation gen and returns it.
func routeCondition(t *testing.T, ns, name string, gen int64, cond string) metav1.Condition {
	t.Helper()
	return routeConditionWithin(t, time.Minute, ns, name, gen, cond)
}

// routeConditionWithin is routeCondition with another limit.
func routeConditionWithin(t *testing.T, limit time.Duration, ns, name string, gen int64, cond string) metav1.Condition {
	t.Helper()
	var found metav1.Condition
	eventuallyWithin(t, limit, fmt.Sprintf("HTTPRoute %s %s for generation %d", name, cond, gen), func() (bool, string) {
		var r gwv1.HTTPRoute
		if err := env.Cluster.Client().Get(ctxT(t), client.ObjectKey{Namespace: ns, Name: name}, &r); err != nil {
			return false, err.Error()
		}
		if len(r.Status.Parents) == 0 {
			return false, "no parent status"
		}
		c := meta.FindStatusCondition(r.Status.Parents[0].Conditions, cond)
		if c == nil || c.ObservedGeneration != gen {
			return false, fmt.Sprintf("%+v", r.Status.Parents[0].Conditions)
		}
		found = *c
		return true, ""
	})
	return found
}

// editRoute replaces the route's rules (a new generation) and returns that generation.
func editRoute(t *testing.T, ns, name string, rules ...gwv1.HTTPRouteRule) int64 {
	t.Helper()
	var r gwv1.HTTPRoute
	if err := env.Cluster.Client().Get(ctxT(t), client.ObjectKey{Namespace: ns, Name: name}, &r); err != nil {
		t.Fatal(err)
	}
	r.Spec.Rules = rules
	update(t, &r)
	return r.Generation
}

// TestFaultBadRouteEditsUnderTraffic: while 50 requests/s flow through the
// client's sidecar, the HTTPRoute that sends them to web-v1 is edited twice
// into something invalid — a typo'd backend, then an invalid regular
// expression on a more specific match. Each invalid generation is reported
// (ResolvedRefs=False / Accepted=False, naming the generation that stays
// programmed) and no request fails or goes elsewhere; a valid edit then
// moves the traffic.
func TestFaultBadRouteEditsUnderTraffic(t *testing.T) {
	requireEnv(t)
	t.Parallel()
	ns := setupHTTPVersions(t)
	create(t, httpRoute(ns, "web", "web", gwv1.HTTPRouteRule{BackendRefs: []gwv1.HTTPBackendRef{httpBackend("web-v1", 1)}}))
	versions := func(rs []httpResult) map[string]int {
		out := map[string]int{}
		for _, r := range rs {
			out[fmt.Sprintf("%d %s", r.Code, r.Version)]++
		}
		return out
	}
	only := func(version string) func([]httpResult) (bool, string) {
		return func(rs []httpResult) (bool, string) {
			v := versions(rs)
			return len(rs) > 0 && v["200 "+version] == len(rs), fmt.Sprintf("%v", v)
		}
	}
	eventuallyHTTP(t, "the route sends everything to web-v1", func() []httpResult {
		return httpCall(t, ns, "client", "--url", "http://web/", "--count", "20")
	}, only("v1"))

	tr := startHTTPTraffic(t, ns, "client", 15*time.Second, "--url", "http://web/api/items", "--qps", "50", "--concurrency", "4", "--timeout", "5s")
	trafficStart := time.Now()
	time.Sleep(2 * time.Second)
	start := time.Now()
	gen := editRoute(t, ns, "web", gwv1.HTTPRouteRule{BackendRefs: []gwv1.HTTPBackendRef{httpBackend("web-v3", 1)}})
	c := routeCondition(t, ns, "web", gen, "ResolvedRefs")
	t.Logf("generation %d (typo'd backend) reported after %v: %s %s: %s", gen, time.Since(start).Round(time.Millisecond), c.Status, c.Reason, c.Message)
	if c.Status != metav1.ConditionFalse || c.Reason != "BackendNotFound" || !strings.Contains(c.Message, "generation 1, the last valid one, stays programmed") {
		t.Errorf("generation %d: ResolvedRefs %+v", gen, c)
	}
	time.Sleep(3 * time.Second)
	secondEdit := time.Now()
	gen = editRoute(t, ns, "web",
		gwv1.HTTPRouteRule{Matches: []gwv1.HTTPRouteMatch{{Path: &gwv1.HTTPPathMatch{Type: ptr.To(gwv1.PathMatchRegularExpression), Value: ptr.To("/api/(?!admin).*")}}}, BackendRefs: []gwv1.HTTPBackendRef{httpBackend("web-v2", 1)}},
		gwv1.HTTPRouteRule{BackendRefs: []gwv1.HTTPBackendRef{httpBackend("web-v1", 1)}})
	c = routeCondition(t, ns, "web", gen, "Accepted")
	t.Logf("generation %d (invalid RE2 on a more specific match) reported: %s %s: %s", gen, c.Status, c.Reason, c.Message)
	if c.Status != metav1.ConditionFalse || c.Reason != "UnsupportedValue" || !strings.Contains(c.Message, "generation 1, the last valid one, stays programmed") {
		t.Errorf("generation %d: Accepted %+v", gen, c)
	}
	rs := tr.stop(t)
	v := versions(rs)
	t.Logf("two invalid edits under 50 req/s: %v over %d requests", v, len(rs))
	if v["200 v1"] != len(rs) || len(rs) < 300 {
		t.Errorf("requests not answered by web-v1 with 200 while the invalid generations were refused: %v (%s)", v, firstHTTPError(rs, 200))
		// When, against the edits, and what the client's sidecar received.
		t.Logf("traffic started %v before the first edit; second edit %v after the first", start.Sub(trafficStart).Round(time.Millisecond), secondEdit.Sub(start).Round(time.Millisecond))
		for _, r := range rs {
			if r.Code != 200 || r.Version != "v1" {
				t.Logf("request %d (~%.2f s into the traffic at 50/s): %d %s %s", r.I, float64(r.I)/50, r.Code, r.Version, r.Error+r.Raw)
			}
		}
		b, err := env.Kubelet.EnvoyAdmin(ctxT(t), ns, "client", "/stats?filter=(rds|lds|cds|eds)\\..*(update_success|update_rejected|update_attempt|version)")
		t.Logf("client sidecar xDS stats (%v):\n%s", err, b)
	}

	gen = editRoute(t, ns, "web", gwv1.HTTPRouteRule{BackendRefs: []gwv1.HTTPBackendRef{httpBackend("web-v2", 1)}})
	eventuallyHTTP(t, "the valid edit sends everything to web-v2", func() []httpResult {
		return httpCall(t, ns, "client", "--url", "http://web/", "--count", "20")
	}, only("v2"))
	if c := routeCondition(t, ns, "web", gen, "ResolvedRefs"); c.Status != metav1.ConditionTrue {
		t.Errorf("generation %d: ResolvedRefs %+v", gen, c)
	}
	if c := routeCondition(t, ns, "web", gen, "Accepted"); c.Status != metav1.ConditionTrue {
		t.Errorf("generation %d: Accepted %+v", gen, c)
	}
}
