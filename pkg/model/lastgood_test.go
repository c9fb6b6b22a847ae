package model_test

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/trellis-mesh/trellis/internal/testgen"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/model"
)

// lastGoodRoute is HTTPRoute shop/split (uid, generation) sending every
// request to backend port 9080.
func lastGoodRoute(uid string, generation int64, backend string) *gwv1.HTTPRoute {
	return &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "split", UID: types.UID(uid), Generation: generation},
		Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: new(gwv1.Group("")), Kind: new(gwv1.Kind("Service")), Name: "reviews"}}},
			Rules:           []gwv1.HTTPRouteRule{{BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: gwv1.ObjectName(backend), Port: new(gwv1.PortNumber(9080))}}}}}},
		},
	}
}

func lastGoodInput(services []string, routes ...*gwv1.HTTPRoute) model.Input {
	in := model.Input{HTTPRoutes: routes}
	for _, s := range services {
		in.Services = append(in.Services, testgen.Service("shop", s, "10.0.0.1", testgen.Port("http", 9080, 9080)))
	}
	return in
}

// routedTo is the Service the first rule of the route on shop/reviews sends
// to ("" when the rule's backend does not resolve, "-" when no route).
func routedTo(m *model.Mesh) string {
	svc := m.Service("shop", "reviews")
	if svc == nil || len(svc.ProducerRoutes) == 0 || len(svc.ProducerRoutes[0].Rules) == 0 || len(svc.ProducerRoutes[0].Rules[0].Backends) == 0 {
		return "-"
	}
	b := svc.ProducerRoutes[0].Rules[0].Backends[0]
	if b.Service == nil {
		return ""
	}
	return b.Service.Name
}

func problemsOf(ps []model.Problem, kind string) []model.Problem {
	var out []model.Problem
	for _, p := range ps {
		if p.Object.Kind == kind {
			out = append(out, p)
		}
	}
	return out
}

// TestLastGoodKeepsTheLastValidGeneration: an edit that breaks a route is
// reported on the new generation while the previous one stays in force;
// a change of the world, a new object or a re-created one, and a last good
// generation that no longer builds cleanly, are built as Build says.
func TestLastGoodKeepsTheLastValidGeneration(t *testing.T) {
	var lg model.LastGood
	services := []string{"reviews", "reviews-v2"}
	step := func(name string, in model.Input, wantBackend string, wantHeld bool) []model.Problem {
		t.Helper()
		m, ps := lg.Build(in)
		if got := routedTo(m); got != wantBackend {
			t.Errorf("%s: routed to %q, want %q", name, got, wantBackend)
		}
		held := false
		for _, p := range problemsOf(ps, "HTTPRoute") {
			held = held || strings.Contains(p.Message, "stays programmed")
		}
		if held != wantHeld {
			t.Errorf("%s: problems %v, want a held generation: %v", name, ps, wantHeld)
		}
		return ps
	}
	step("generation 1 is valid", lastGoodInput(services, lastGoodRoute("a", 1, "reviews-v2")), "reviews-v2", false)
	ps := step("generation 2 names a Service that does not exist", lastGoodInput(services, lastGoodRoute("a", 2, "reviews-v3")), "reviews-v2", true)
	if rs := problemsOf(ps, "HTTPRoute"); len(rs) != 1 || rs[0].Reason != model.ReasonBackendNotFound || rs[0].Field != "spec.rules[0].backendRefs[0]" ||
		!strings.Contains(rs[0].Message, "generation 1, the last valid one, stays programmed") {
		t.Errorf("the new generation's problem: %+v", rs)
	}
	step("generation 2 again (a status write)", lastGoodInput(services, lastGoodRoute("a", 2, "reviews-v3")), "reviews-v2", true)
	step("generation 3 fixes it", lastGoodInput(services, lastGoodRoute("a", 3, "reviews")), "reviews", false)

	// The world changes under a valid generation: Build's answer (HTTP 500 for the rule).
	step("generation 4 is valid", lastGoodInput(services, lastGoodRoute("a", 4, "reviews-v2")), "reviews-v2", false)
	step("generation 4's backend is deleted", lastGoodInput([]string{"reviews"}, lastGoodRoute("a", 4, "reviews-v2")), "", false)
	// The last good generation's own backend is gone: nothing to keep.
	step("generation 5 is invalid and generation 4's backend is gone", lastGoodInput([]string{"reviews"}, lastGoodRoute("a", 5, "reviews-v3")), "", false)
	step("generation 6 is valid", lastGoodInput(services, lastGoodRoute("a", 6, "reviews-v2")), "reviews-v2", false)

	// A re-created route (another UID) has no last good generation.
	step("route re-created, valid", lastGoodInput(services, lastGoodRoute("b", 1, "reviews-v2")), "reviews-v2", false)
	step("route deleted and re-created invalid", lastGoodInput(services, lastGoodRoute("c", 2, "nope")), "", false)
}

// TestLastGoodBackendPolicy: a BackendPolicy edited to target a Service that
// does not exist keeps its last good generation on the Service it targeted.
func TestLastGoodBackendPolicy(t *testing.T) {
	var lg model.LastGood
	policy := func(gen int64, target, timeout string) *meshv1alpha1.BackendPolicy {
		return &meshv1alpha1.BackendPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "reviews", UID: "p", Generation: gen},
			Spec: meshv1alpha1.BackendPolicySpec{
				TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: target}},
				Timeout:    new(meshv1alpha1.Duration(timeout)),
			},
		}
	}
	in := func(p *meshv1alpha1.BackendPolicy) model.Input {
		return model.Input{Services: []*corev1.Service{testgen.Service("shop", "reviews", "10.0.0.1", testgen.Port("http", 9080, 9080))}, BackendPolicies: []*meshv1alpha1.BackendPolicy{p}}
	}
	timeout := func(m *model.Mesh) string {
		if p := m.Service("shop", "reviews").Policy; p != nil && p.Timeout != nil {
			return p.Timeout.String()
		}
		return "none"
	}
	if m, ps := lg.Build(in(policy(1, "reviews", "3s"))); timeout(m) != "3s" || len(ps) != 0 {
		t.Fatalf("generation 1: timeout %s, problems %v", timeout(m), ps)
	}
	m, ps := lg.Build(in(policy(2, "reveiws", "5s")))
	if timeout(m) != "3s" {
		t.Errorf("generation 2 (a typo in the target): timeout %s, want generation 1's 3s", timeout(m))
	}
	if len(ps) != 1 || ps[0].Reason != meshv1alpha1.ReasonTargetNotFound || !strings.Contains(ps[0].Message, "generation 1") {
		t.Errorf("problems %v", ps)
	}
	if m, ps := lg.Build(in(policy(3, "reviews", "5s"))); timeout(m) != "5s" || len(ps) != 0 {
		t.Errorf("generation 3: timeout %s, problems %v", timeout(m), ps)
	}
}

// TestLastGoodIsBuildWhenNothingIsBroken: with every object valid (the
// goldens' inputs among them) LastGood.Build is Build.
func TestLastGoodIsBuildWhenNothingIsBroken(t *testing.T) {
	in := lastGoodInput([]string{"reviews", "reviews-v2"}, lastGoodRoute("a", 1, "reviews-v2"))
	var lg model.LastGood
	m1, p1 := model.Build(in)
	m2, p2 := lg.Build(in)
	if routedTo(m1) != routedTo(m2) || len(p1) != len(p2) {
		t.Errorf("Build %q %v, LastGood.Build %q %v", routedTo(m1), p1, routedTo(m2), p2)
	}
}

// TestShadowedRouteIsReported: a newer route every match of which an older
// route on the same parent has (a second catch-all) is Accepted=False
// naming the older one and not attached; one with a match of its own, or
// on every port while the older one is on one port, is attached.
func TestShadowedRouteIsReported(t *testing.T) {
	at := func(name string, created int64, port *gwv1.PortNumber, header string) *gwv1.HTTPRoute {
		r := lastGoodRoute(name, 1, "reviews-v2")
		r.Name, r.CreationTimestamp = name, metav1.Unix(created, 0)
		r.Spec.ParentRefs[0].Port = port
		if header != "" {
			r.Spec.Rules[0].Matches = []gwv1.HTTPRouteMatch{{Headers: []gwv1.HTTPHeaderMatch{{Name: gwv1.HTTPHeaderName(header), Value: "1"}}}}
		}
		return r
	}
	m, ps := model.Build(lastGoodInput([]string{"reviews", "reviews-v2"},
		at("first", 100, nil, ""),
		at("second", 200, nil, ""),
		at("canary", 300, nil, "X-Canary"),
		at("canary-again", 400, new(gwv1.PortNumber(9080)), "x-canary"),
	))
	var attached []string
	for _, r := range m.Service("shop", "reviews").ProducerRoutes {
		attached = append(attached, r.Name)
	}
	if got := strings.Join(attached, ","); got != "first,canary" {
		t.Errorf("attached %s, want first,canary", got)
	}
	var conflicted []string
	for _, p := range problemsOf(ps, "HTTPRoute") {
		if p.Reason != meshv1alpha1.ReasonConflicted || p.Condition != meshv1alpha1.ConditionAccepted {
			t.Errorf("unexpected problem %v", p)
		}
		conflicted = append(conflicted, p.Object.Name+": "+p.Message)
	}
	if len(conflicted) != 2 || !strings.HasPrefix(conflicted[0], "second: every match of this route is already a match of the older HTTPRoute shop/first") ||
		!strings.HasPrefix(conflicted[1], "canary-again: every match of this route is already a match of the older HTTPRoute shop/canary") {
		t.Errorf("problems %q", conflicted)
	}

	// The older route on one port does not shadow a newer one on every port.
	m, ps = model.Build(lastGoodInput([]string{"reviews", "reviews-v2"}, at("first", 100, new(gwv1.PortNumber(9080)), ""), at("second", 200, nil, "")))
	if n := len(m.Service("shop", "reviews").ProducerRoutes); n != 2 || len(ps) != 0 {
		t.Errorf("%d routes attached, problems %v", n, ps)
	}
}
