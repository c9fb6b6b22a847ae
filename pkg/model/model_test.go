package model_test

import (
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"

	"github.com/trellis-mesh/trellis/pkg/model"
)

func TestProtocolFor(t *testing.T) {
	for _, tt := range []struct {
		name        string
		port        string
		appProtocol string
		want        model.Protocol
	}{
		{"appProtocol http wins over the port name", "tcp-web", "http", model.ProtocolHTTP},
		{"the Kubernetes h2c appProtocol is HTTP/2", "web", "kubernetes.io/h2c", model.ProtocolHTTP2},
		{"appProtocol grpc", "x", "grpc", model.ProtocolGRPC},
		{"appProtocol https is TLS", "x", "https", model.ProtocolTLS},
		{"an unknown appProtocol falls back to the name", "grpc-api", "example.com/custom", model.ProtocolGRPC},
		{"a name prefix before the dash", "http-admin", "", model.ProtocolHTTP},
		{"the name alone", "grpc", "", model.ProtocolGRPC},
		{"http2 by name", "http2", "", model.ProtocolHTTP2},
		{"names are case-insensitive", "HTTP-x", "", model.ProtocolHTTP},
		{"an unnamed port is TCP", "", "", model.ProtocolTCP},
		{"a prefix must be a whole word", "httpx", "", model.ProtocolTCP},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var ap *string
			if tt.appProtocol != "" {
				ap = &tt.appProtocol
			}
			if got := model.ProtocolFor(tt.port, ap); got != tt.want {
				t.Errorf("ProtocolFor(%q, %q) = %q, want %q", tt.port, tt.appProtocol, got, tt.want)
			}
		})
	}
}

func TestSPIFFEID(t *testing.T) {
	if got, want := model.SPIFFEID("example.org", "shop", "frontend"), "spiffe://example.org/ns/shop/sa/frontend"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

// TestUnknownAccessPolicySources: sources naming a namespace or a
// ServiceAccount that does not exist are ResolvedRefs problems (the policy
// is still attached); "*", existing ones and a namespace's "default"
// ServiceAccount are not; without IdentitiesKnown nothing is checked.
func TestUnknownAccessPolicySources(t *testing.T) {
	ap := &meshv1alpha1.AccessPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "callers"}, Spec: meshv1alpha1.AccessPolicySpec{
		TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: "reviews"}},
		Rules: []meshv1alpha1.AccessRule{{From: []meshv1alpha1.AccessSource{
			{Namespace: ptr.To("*")},
			{Namespace: ptr.To("shop")},
			{Namespace: ptr.To("gone")},
			{ServiceAccount: &meshv1alpha1.ServiceAccountReference{Name: "frontend"}},
			{ServiceAccount: &meshv1alpha1.ServiceAccountReference{Name: "fronted"}},
			{ServiceAccount: &meshv1alpha1.ServiceAccountReference{Name: "default"}},
			{ServiceAccount: &meshv1alpha1.ServiceAccountReference{Namespace: "gone", Name: "default"}},
		}}},
	}}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "reviews"}, Spec: corev1.ServiceSpec{ClusterIP: "10.0.0.1", Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}}
	in := model.Input{Services: []*corev1.Service{svc}, AccessPolicies: []*meshv1alpha1.AccessPolicy{ap},
		Namespaces: []string{"shop"}, ServiceAccounts: []string{"shop/frontend"}, IdentitiesKnown: true}
	m, problems := model.Build(in)
	var got []string
	for _, p := range problems {
		if p.Condition != meshv1alpha1.ConditionResolvedRefs || p.Reason != model.ReasonRefNotFound {
			t.Errorf("unexpected problem %v", p)
		}
		got = append(got, p.Field)
	}
	want := []string{"spec.rules[0].from[2].namespace", "spec.rules[0].from[4].serviceAccount", "spec.rules[0].from[6].serviceAccount"}
	if !slices.Equal(got, want) {
		t.Errorf("problems on %v, want %v", got, want)
	}
	if len(m.Service("shop", "reviews").AccessPolicies) != 1 {
		t.Error("the policy is no longer attached")
	}
	in.IdentitiesKnown = false
	if _, problems := model.Build(in); len(problems) != 0 {
		t.Errorf("without IdentitiesKnown: %v", problems)
	}
}

// TestExternalServiceAddressThatIsNoCIDR: an address that does not parse
// (CEL rejects it at admission; manifests given to trellisctl analyze did
// not pass admission) is reported on its field and left out; the others
// are masked.
func TestExternalServiceAddressThatIsNoCIDR(t *testing.T) {
	es := &meshv1alpha1.ExternalService{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "db"}, Spec: meshv1alpha1.ExternalServiceSpec{
		Hosts: []string{"db.example.com"}, Addresses: []string{"203.0.113.7/24", "db.example.com"},
		Ports: []meshv1alpha1.ExternalPort{{Number: 5432, Protocol: meshv1alpha1.ExternalTCP}},
	}}
	m, problems := model.Build(model.Input{ExternalServices: []*meshv1alpha1.ExternalService{es}})
	if len(problems) != 1 || problems[0].Field != "spec.addresses[1]" || problems[0].Object.Kind != "ExternalService" {
		t.Fatalf("problems = %v; want one on spec.addresses[1]", problems)
	}
	if got := m.External[0].Addresses; len(got) != 1 || got[0].String() != "203.0.113.0/24" {
		t.Errorf("addresses = %v; want [203.0.113.0/24]", got)
	}
	if p := m.External[0].Ports[0]; p.TargetPort != 5432 {
		t.Errorf("target port = %d; want the port number 5432", p.TargetPort)
	}
}

// TestTracingSamplingZeroIsKept: samplingPercent 0 (trace only what
// arrives sampled) stays 0; unset is the CRD's default 1.
func TestTracingSamplingZeroIsKept(t *testing.T) {
	for _, tt := range []struct {
		set  *int32
		want int32
	}{{ptr.To(int32(0)), 0}, {nil, 1}, {ptr.To(int32(25)), 25}} {
		mc := &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: "default"}, Spec: meshv1alpha1.MeshConfigSpec{
			Tracing: &meshv1alpha1.Tracing{Collector: "otel.observability:4317", SamplingPercent: tt.set}}}
		m, _ := model.Build(model.Input{MeshConfig: mc})
		if got := m.Settings.Tracing.SamplingPercent; got != tt.want {
			t.Errorf("samplingPercent %v: model has %d; want %d", tt.set, got, tt.want)
		}
	}
}

// TestReusedPodIP: a deleted pod whose object outlived its sandbox keeps
// reporting an IP the network gave to a new pod; the new pod owns it,
// whatever the names' order. Between two live pods the newer wins.
func TestReusedPodIP(t *testing.T) {
	t0 := metav1.Now()
	pod := func(name string, created metav1.Time, deleted bool, mode string) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: name, CreationTimestamp: created,
			Annotations: map[string]string{model.AnnotationProxy: mode}},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.0.0.9"}}
		if deleted {
			p.DeletionTimestamp = &t0
		}
		return p
	}
	later := metav1.NewTime(t0.Add(time.Minute))
	for _, tt := range []struct {
		name string
		pods []*corev1.Pod
		want string
	}{
		{"deleted pod sorts last", []*corev1.Pod{pod("a-new", later, false, "none"), pod("z-old", t0, true, "sidecar")}, "a-new"},
		{"deleted pod sorts first", []*corev1.Pod{pod("z-new", t0, false, "none"), pod("a-old", later, true, "sidecar")}, "z-new"},
		{"two live pods: newer wins", []*corev1.Pod{pod("z-old", t0, false, "sidecar"), pod("a-new", later, false, "none")}, "a-new"},
	} {
		m, _ := model.Build(model.Input{Pods: tt.pods})
		w := m.WorkloadByIP("10.0.0.9")
		if w == nil || w.Name != tt.want {
			t.Errorf("%s: 10.0.0.9 is %+v; want pod %s", tt.name, w, tt.want)
		}
	}
}
