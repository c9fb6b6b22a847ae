package xds

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"

	"github.com/trellis-mesh/trellis/internal/testgen"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
)

// incEndpoint is one address of a Service's slice in the generated mesh.
type incEndpoint struct {
	ip, pod, zone string
	ready         bool
}

// incMesh is a small mesh whose endpoints a test changes at random: two
// namespaces, meshed and unmeshed backends in two zones, a proxyless
// client, a headless Service and a BackendPolicy with outlier detection
// (locality failover: its endpoints differ by the client's zone).
type incMesh struct {
	pods      []*corev1.Pod
	services  []*corev1.Service
	endpoints map[string][]incEndpoint // namespace/name
	policies  []*meshv1alpha1.BackendPolicy
}

func newIncMesh() *incMesh {
	m := &incMesh{endpoints: map[string][]incEndpoint{}}
	pod := func(ns, name, sa, mode, ip string) {
		m.pods = append(m.pods, testgen.Pod(ns, name, testgen.WithServiceAccount(sa), testgen.WithIP(ip), testgen.WithProxy(mode)))
	}
	svc := func(ns, name, clusterIP string) {
		s := testgen.Service(ns, name, clusterIP, testgen.Port("http", 80, 8080), testgen.Port("grpc", 9090, 9090))
		m.services = append(m.services, s)
	}
	for i, z := range []string{"z1", "z2", "z1"} {
		pod("a", fmt.Sprintf("web-%d", i), "web", "envoy", fmt.Sprintf("10.0.0.%d", i+1))
		m.endpoints["a/web"] = append(m.endpoints["a/web"], incEndpoint{ip: fmt.Sprintf("10.0.0.%d", i+1), pod: fmt.Sprintf("web-%d", i), zone: z, ready: true})
	}
	pod("a", "client", "client", "envoy", "10.0.1.1")
	pod("a", "plain", "plain", "", "10.0.1.2")
	pod("b", "grpc-0", "grpc", "grpc", "10.0.2.1")
	pod("b", "api-0", "api", "envoy", "10.0.2.2")
	svc("a", "web", "10.96.0.1")
	svc("a", "pay", "10.96.0.2")
	svc("a", "plain", "10.96.0.3")
	svc("a", "db", "None")
	svc("b", "grpc", "10.96.1.1")
	svc("b", "api", "10.96.1.2")
	m.endpoints["a/pay"] = []incEndpoint{{ip: "10.0.0.1", pod: "web-0", zone: "z1", ready: true}, {ip: "10.0.0.2", pod: "web-1", zone: "z2", ready: true}}
	m.endpoints["a/plain"] = []incEndpoint{{ip: "10.0.1.2", pod: "plain", ready: true}}
	m.endpoints["a/db"] = []incEndpoint{{ip: "10.0.3.1", ready: true}}
	m.endpoints["b/grpc"] = []incEndpoint{{ip: "10.0.2.1", pod: "grpc-0", zone: "z2", ready: true}}
	m.endpoints["b/api"] = []incEndpoint{{ip: "10.0.2.2", pod: "api-0", zone: "z1", ready: true}}
	m.policies = []*meshv1alpha1.BackendPolicy{{
		ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "pay"},
		Spec: meshv1alpha1.BackendPolicySpec{
			TargetRefs:       []meshv1alpha1.PolicyTargetReference{{Kind: "Service", Name: "pay"}},
			OutlierDetection: &meshv1alpha1.OutlierDetection{Consecutive5xxErrors: 5, Interval: "10s", BaseEjectionTime: "30s", MaxEjectionPercent: 50},
		},
	}}
	return m
}

func (m *incMesh) build(t *testing.T) *model.Mesh {
	t.Helper()
	in := model.Input{Pods: m.pods, Services: m.services, BackendPolicies: m.policies, PodCIDRs: []string{"10.0.0.0/16"}}
	for _, s := range m.services {
		es := &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Namespace: s.Namespace, Name: s.Name + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: s.Name}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(int32(8080))}, {Name: ptr.To("grpc"), Port: ptr.To(int32(9090))}},
		}
		for _, e := range m.endpoints[s.Namespace+"/"+s.Name] {
			ep := discoveryv1.Endpoint{Addresses: []string{e.ip}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(e.ready)}}
			if e.zone != "" {
				ep.Zone = ptr.To(e.zone)
			}
			if e.pod != "" {
				ep.TargetRef = &corev1.ObjectReference{Kind: "Pod", Namespace: s.Namespace, Name: e.pod}
			}
			es.Endpoints = append(es.Endpoints, ep)
		}
		in.EndpointSlices = append(in.EndpointSlices, es)
	}
	mesh, problems := model.Build(in)
	if len(problems) > 0 {
		t.Fatalf("problems: %v", problems)
	}
	return mesh
}

// mutate changes the endpoints of one Service at random, or now and then
// something else (a new Service), and says what it did.
func (m *incMesh) mutate(r *rand.Rand, step int) string {
	if r.IntN(8) == 0 {
		name := fmt.Sprintf("new-%d", step)
		m.services = append(m.services, testgen.Service("b", name, fmt.Sprintf("10.96.2.%d", step%250+1), testgen.Port("http", 80, 8080)))
		return "new Service b/" + name
	}
	keys := []string{"a/web", "a/pay", "a/plain", "a/db", "b/grpc", "b/api"}
	key := keys[r.IntN(len(keys))]
	eps := m.endpoints[key]
	zones := []string{"", "z1", "z2"}
	switch op := r.IntN(4); {
	case op == 0 || len(eps) == 0:
		e := incEndpoint{ip: fmt.Sprintf("10.0.9.%d", step%250+1), zone: zones[r.IntN(3)], ready: true}
		m.endpoints[key] = append(eps, e)
		return "add unmeshed " + e.ip + " to " + key
	case op == 1:
		i := r.IntN(len(eps))
		m.endpoints[key] = slices.Delete(slices.Clone(eps), i, i+1)
		return "remove " + eps[i].ip + " from " + key
	case op == 2:
		i := r.IntN(len(eps))
		eps = slices.Clone(eps)
		eps[i].ready = !eps[i].ready
		m.endpoints[key] = eps
		return "toggle ready of " + eps[i].ip + " in " + key
	default:
		i := r.IntN(len(eps))
		eps = slices.Clone(eps)
		if eps[i].pod != "" {
			// A pod's zone is its node's: keep it (a change is a model change).
			eps[i].ready = !eps[i].ready
		} else {
			eps[i].zone = zones[r.IntN(3)]
		}
		m.endpoints[key] = eps
		return "rezone or toggle " + eps[i].ip + " in " + key
	}
}

// TestEndpointRoundsEqualFullTranslation: after any sequence of endpoint
// changes (and, now and then, another change), what the cache serves every
// class is exactly what a full translation of the latest model gives —
// whether the round recomputed only the changed ClusterLoadAssignments or
// translated in full.
func TestEndpointRoundsEqualFullTranslation(t *testing.T) {
	for seed := range uint64(4) {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 7))
			gen := newIncMesh()
			p := NewPusher(NewCache(), NewMetrics(), logr.Discard(), clock.RealClock{})
			mesh := gen.build(t)
			p.Update(mesh)
			var nodes []string
			for _, pod := range gen.pods {
				if pod.Annotations["trellis.dev/proxy"] == "" {
					continue
				}
				id := &Identity{NodeID: NodeID{Type: "sidecar", IP: pod.Status.PodIP, Pod: pod.Name, Namespace: pod.Namespace}, ServiceAccount: pod.Spec.ServiceAccountName}
				p.Connect(id)
				nodes = append(nodes, id.NodeID.String())
			}
			p.round(context.Background())
			var log []string
			for step := range 60 {
				log = append(log, gen.mutate(r, step))
				mesh = gen.build(t)
				p.Update(mesh)
				p.round(context.Background())
				for _, node := range nodes {
					if diff := servedDiff(t, p, mesh, node); diff != "" {
						t.Fatalf("after %v:\n%s: %s", log, node, diff)
					}
				}
			}
			inPlace := testutil.ToFloat64(p.Metrics.ClassUpdates.WithLabelValues("endpoints"))
			full := testutil.ToFloat64(p.Metrics.ClassUpdates.WithLabelValues("full"))
			t.Logf("class updates: %v in place, %v full", inPlace, full)
			if inPlace == 0 || full <= float64(len(nodes)) {
				t.Errorf("class updates: %v in place, %v full; the sequence must exercise both paths", inPlace, full)
			}
		})
	}
}

// servedDiff compares what the cache serves node with a full translation
// of mesh for it.
func servedDiff(t *testing.T, p *Pusher, mesh *model.Mesh, node string) string {
	t.Helper()
	key, _ := p.Cache.NodeClass(node)
	id, err := ParseNodeID(node)
	if err != nil {
		t.Fatal(err)
	}
	w := mesh.Workload(id.Namespace, id.Pod)
	if want := translate.ClassKey(mesh, w); key != want {
		return fmt.Sprintf("bound to class %s, want %s", key, want)
	}
	got, ok := p.Cache.classes[key] // no round runs meanwhile
	if !ok {
		return "class not held"
	}
	res, _ := translate.ForWorkload(mesh, w)
	want, err := ClassFrom(res)
	if err != nil {
		t.Fatal(err)
	}
	for typeURL, rs := range want {
		for name, r := range rs {
			if g, ok := got[typeURL][name]; !ok || g.Version != r.Version {
				return fmt.Sprintf("%s %s: served %v, full translation %s", typeURL, name, g, r.Version)
			}
		}
		for name := range got[typeURL] {
			if _, ok := rs[name]; !ok {
				return fmt.Sprintf("%s %s served, not in the full translation", typeURL, name)
			}
		}
	}
	return ""
}
