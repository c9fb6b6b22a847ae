package controller

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/go-logr/logr/funcr"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/model"
)

// recordingPusher keeps every model it is handed.
type recordingPusher struct {
	mu     sync.Mutex
	meshes []*model.Mesh
}

func (p *recordingPusher) Update(m *model.Mesh) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.meshes = append(p.meshes, m)
}

func (p *recordingPusher) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.meshes)
}

func (p *recordingPusher) last() *model.Mesh {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.meshes) == 0 {
		return nil
	}
	return p.meshes[len(p.meshes)-1]
}

func create(t testing.TB, objs ...client.Object) {
	t.Helper()
	for _, o := range objs {
		if err := env.Client.Create(context.Background(), o); err != nil {
			t.Fatalf("create %T %s: %v", o, o.GetName(), err)
		}
	}
}

// meshObjects creates, in a new namespace, a Service with a BackendPolicy
// that applies, one whose target does not exist, and an HTTPRoute whose
// backend does not exist.
func meshObjects(t *testing.T) string {
	ns := env.Namespace(t, nil)
	create(t,
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "reviews"}, Spec: corev1.ServiceSpec{
			Ports: []corev1.ServicePort{{Name: "http", Port: 9080}}, Selector: map[string]string{"app": "reviews"}}},
		&meshv1alpha1.BackendPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "good"}, Spec: meshv1alpha1.BackendPolicySpec{
			TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: "reviews"}}, Timeout: ptr.To(meshv1alpha1.Duration("5s"))}},
		&meshv1alpha1.BackendPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "stray"}, Spec: meshv1alpha1.BackendPolicySpec{
			TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: "ratings"}}, Timeout: ptr.To(meshv1alpha1.Duration("5s"))}},
		&gwv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "split"}, Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: ptr.To(gwv1.Group("")), Kind: ptr.To(gwv1.Kind("Service")), Name: "reviews"}}},
			Rules:           []gwv1.HTTPRouteRule{{BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: "reviews-v9", Port: ptr.To(gwv1.PortNumber(9080))}}}}}},
		}},
	)
	return ns
}

func policyCondition(t *testing.T, ns, name, typ string) *metav1.Condition {
	t.Helper()
	var bp meshv1alpha1.BackendPolicy
	if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, &bp); err != nil {
		t.Fatal(err)
	}
	return meta.FindStatusCondition(bp.Status.Conditions, typ)
}

// TestReconcileBuildsTheModelAndWritesStatus: one Reconcile lists the
// cluster, hands the model to the pusher and, on the leader, writes the
// conditions the model's problems call for.
func TestReconcileBuildsTheModelAndWritesStatus(t *testing.T) {
	ns := meshObjects(t)
	p := &recordingPusher{}
	r := &MeshReconciler{Client: env.Client, Pusher: p, IsLeader: func() bool { return true }}
	if _, err := r.Reconcile(context.Background(), meshKey); err != nil {
		t.Fatalf("Reconcile: %v", err)
	}
	m := p.last()
	if m == nil {
		t.Fatal("the pusher got no model")
	}
	svc := m.Service(ns, "reviews")
	if svc == nil || svc.Policy == nil || svc.Policy.Name != "good" || svc.Policy.Timeout == nil || svc.Policy.Timeout.String() != "5s" {
		t.Fatalf("model Service %s/reviews = %+v; want BackendPolicy good with timeout 5s", ns, svc)
	}
	if len(svc.ProducerRoutes) != 1 || svc.ProducerRoutes[0].Rules[0].Backends[0].Service != nil {
		t.Errorf("the route's backend should be attached and unresolved: %+v", svc.ProducerRoutes)
	}
	if c := policyCondition(t, ns, "good", meshv1alpha1.ConditionAccepted); c == nil || c.Status != metav1.ConditionTrue {
		t.Errorf("BackendPolicy good Accepted = %+v; want True", c)
	}
	if c := policyCondition(t, ns, "stray", meshv1alpha1.ConditionResolvedRefs); c == nil || c.Status != metav1.ConditionFalse || c.Reason != meshv1alpha1.ReasonTargetNotFound {
		t.Errorf("BackendPolicy stray ResolvedRefs = %+v; want False/%s", c, meshv1alpha1.ReasonTargetNotFound)
	}
	var route gwv1.HTTPRoute
	if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: "split"}, &route); err != nil {
		t.Fatal(err)
	}
	if len(route.Status.Parents) != 1 {
		t.Fatalf("route parents status = %+v; want one entry for Service reviews", route.Status.Parents)
	}
	ps := route.Status.Parents[0]
	if ps.ControllerName != ControllerName {
		t.Errorf("controllerName = %q; want %q", ps.ControllerName, ControllerName)
	}
	if c := meta.FindStatusCondition(ps.Conditions, string(gwv1.RouteConditionResolvedRefs)); c == nil || c.Status != metav1.ConditionFalse || c.Reason != model.ReasonBackendNotFound {
		t.Errorf("route ResolvedRefs = %+v; want False/%s", c, model.ReasonBackendNotFound)
	}

	// Nothing changed: a second Reconcile writes nothing (resourceVersions stay).
	var before meshv1alpha1.BackendPolicy
	_ = env.Client.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: "stray"}, &before)
	if _, err := r.Reconcile(context.Background(), meshKey); err != nil {
		t.Fatal(err)
	}
	var after meshv1alpha1.BackendPolicy
	_ = env.Client.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: "stray"}, &after)
	if before.ResourceVersion != after.ResourceVersion {
		t.Errorf("an unchanged status was rewritten (resourceVersion %s -> %s)", before.ResourceVersion, after.ResourceVersion)
	}
}

// TestFollowerWritesNoStatus: a replica that is not the leader pushes the
// model to its own proxies and leaves status alone.
func TestFollowerWritesNoStatus(t *testing.T) {
	ns := meshObjects(t)
	p := &recordingPusher{}
	r := &MeshReconciler{Client: env.Client, Pusher: p, IsLeader: func() bool { return false }}
	if _, err := r.Reconcile(context.Background(), meshKey); err != nil {
		t.Fatal(err)
	}
	if p.last() == nil || p.last().Service(ns, "reviews") == nil {
		t.Fatal("a follower must still push the model")
	}
	if c := policyCondition(t, ns, "stray", meshv1alpha1.ConditionResolvedRefs); c != nil {
		t.Errorf("a follower wrote status: %+v", c)
	}
}

// TestStatusKeyWritesTranslatorProblemsWithoutPushing: the translator's
// problems (here a conflict on an ExternalService) reach status through
// the status work item, which does not push (a push would find the same
// problems and wake it again).
func TestStatusKeyWritesTranslatorProblemsWithoutPushing(t *testing.T) {
	ns := env.Namespace(t, nil)
	create(t, &meshv1alpha1.ExternalService{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "api"}, Spec: meshv1alpha1.ExternalServiceSpec{
		Hosts: []string{"api.example.com"}, Ports: []meshv1alpha1.ExternalPort{{Number: 443, Protocol: meshv1alpha1.ExternalTLS}}}})
	p := &recordingPusher{}
	r := &MeshReconciler{Client: env.Client, Pusher: p, IsLeader: func() bool { return true }}
	r.SetTranslatorProblems([]model.Problem{{Object: model.Ref{Kind: "ExternalService", Namespace: ns, Name: "api"},
		Reason: meshv1alpha1.ReasonConflicted, Condition: meshv1alpha1.ConditionAccepted, Message: "destination api.example.com port 443 is already claimed by another"}})
	if _, err := r.Reconcile(context.Background(), statusKey); err != nil {
		t.Fatal(err)
	}
	if n := p.count(); n != 0 {
		t.Errorf("the status work item pushed %d models; want none", n)
	}
	var es meshv1alpha1.ExternalService
	if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: "api"}, &es); err != nil {
		t.Fatal(err)
	}
	c := meta.FindStatusCondition(es.Status.Conditions, meshv1alpha1.ConditionAccepted)
	if c == nil || c.Status != metav1.ConditionFalse || c.Reason != meshv1alpha1.ReasonConflicted {
		t.Errorf("ExternalService Accepted = %+v; want False/%s from the translator's problem", c, meshv1alpha1.ReasonConflicted)
	}
	if !slices.ContainsFunc(es.Status.Conditions, func(c metav1.Condition) bool { return c.ObservedGeneration == es.Generation }) {
		t.Errorf("conditions do not carry the observed generation %d: %+v", es.Generation, es.Status.Conditions)
	}
}

// TestProblemsAreLoggedOnce: a problem is logged at info with object,
// field and reason when it appears, not again every round; again once it
// went away and came back.
func TestProblemsAreLoggedOnce(t *testing.T) {
	ns := env.Namespace(t, nil)
	var mu sync.Mutex
	var lines []string
	ctx := logf.IntoContext(context.Background(), funcr.New(func(prefix, args string) {
		mu.Lock()
		defer mu.Unlock()
		lines = append(lines, args)
	}, funcr.Options{}))
	logged := func() int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, l := range lines {
			if strings.Contains(l, `"object"="AccessPolicy/`+ns+`/p"`) && strings.Contains(l, `"reason"="TargetNotFound"`) && strings.Contains(l, `"field"="spec.targetRefs[0]"`) {
				n++
			}
		}
		return n
	}
	create(t, &meshv1alpha1.AccessPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "p"}, Spec: meshv1alpha1.AccessPolicySpec{
		TargetRefs: []meshv1alpha1.PolicyTargetReference{{Kind: "Service", Name: "gone"}}, Action: meshv1alpha1.AccessAllow,
		Rules: []meshv1alpha1.AccessRule{{From: []meshv1alpha1.AccessSource{{Namespace: ptr.To("*")}}}},
	}})
	r := &MeshReconciler{Client: env.Client, Pusher: &recordingPusher{}, IsLeader: func() bool { return true }}
	for range 3 {
		if _, err := r.Reconcile(ctx, meshKey); err != nil {
			t.Fatal(err)
		}
	}
	if n := logged(); n != 1 {
		t.Fatalf("the AccessPolicy's problem was logged %d times over 3 rounds, want once:\n%s", n, strings.Join(lines, "\n"))
	}
	create(t, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gone"}, Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}}})
	if _, err := r.Reconcile(ctx, meshKey); err != nil {
		t.Fatal(err)
	}
	if err := env.Client.Delete(context.Background(), &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gone"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Reconcile(ctx, meshKey); err != nil {
		t.Fatal(err)
	}
	if n := logged(); n != 2 {
		t.Errorf("the problem came back: logged %d times in all, want 2", n)
	}
}
