package translate_test

import (
	"fmt"
	"testing"

	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
)

// scaleInput is a mesh of n HTTP Services in 10 namespaces, 10 endpoints
// each, with an HTTPRoute (a 90/10 split) and a BackendPolicy on every fifth
// Service, and the client pod the benchmark translates for.
func scaleInput(n int) (model.Input, string, string) {
	var in model.Input
	in.Pods = append(in.Pods, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "client", Namespace: "ns-0", Annotations: map[string]string{model.AnnotationProxy: "envoy"}},
		Spec:       corev1.PodSpec{ServiceAccountName: "client"},
		Status:     corev1.PodStatus{PodIP: "10.0.0.1"},
	})
	kind := gwv1.Kind("Service")
	for i := range n {
		ns, name := fmt.Sprintf("ns-%d", i%10), fmt.Sprintf("svc-%d", i)
		in.Services = append(in.Services, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec: corev1.ServiceSpec{
				ClusterIP: fmt.Sprintf("10.96.%d.%d", i/250, i%250+1),
				Ports:     []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}},
			},
		})
		es := &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: name + "-abc", Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: name}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: new("http"), Port: new(int32(8080))}},
		}
		for e := range 10 {
			es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{
				Addresses:  []string{fmt.Sprintf("10.%d.%d.%d", 1+i/2500, (i/10)%250, (i%10)*10+e+1)},
				Conditions: discoveryv1.EndpointConditions{Ready: new(true)},
				Zone:       new(fmt.Sprintf("zone-%d", e%3)),
			})
		}
		in.EndpointSlices = append(in.EndpointSlices, es)
		if i%5 == 0 && i+1 < n {
			other := fmt.Sprintf("svc-%d", i+1)
			if (i+1)%10 != i%10 { // backends must share the namespace
				other = name
			}
			in.HTTPRoutes = append(in.HTTPRoutes, &gwv1.HTTPRoute{
				ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
				Spec: gwv1.HTTPRouteSpec{
					CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Kind: &kind, Name: gwv1.ObjectName(name)}}},
					Rules: []gwv1.HTTPRouteRule{{
						Matches:     []gwv1.HTTPRouteMatch{{Path: &gwv1.HTTPPathMatch{Type: new(gwv1.PathMatchPathPrefix), Value: new("/api")}}},
						BackendRefs: []gwv1.HTTPBackendRef{backend(name, 90), backend(other, 10)},
					}},
				},
			})
			in.BackendPolicies = append(in.BackendPolicies, &meshv1alpha1.BackendPolicy{
				ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
				Spec: meshv1alpha1.BackendPolicySpec{
					TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: name}},
					Timeout:    new(meshv1alpha1.Duration("5s")),
					Retries:    &meshv1alpha1.Retries{Attempts: 2, PerTryTimeout: new(meshv1alpha1.Duration("1s"))},
					Connection: &meshv1alpha1.ConnectionSettings{MaxConnections: new(int32(100))},
				},
			})
		}
	}
	return in, "ns-0", "client"
}

func backend(name string, weight int32) gwv1.HTTPBackendRef {
	return gwv1.HTTPBackendRef{BackendRef: gwv1.BackendRef{
		BackendObjectReference: gwv1.BackendObjectReference{Name: gwv1.ObjectName(name), Port: new(gwv1.PortNumber(80))},
		Weight:                 new(weight),
	}}
}

func serializedSize(res *translate.Resources) int {
	n := 0
	for _, l := range res.Listeners {
		n += proto.Size(l)
	}
	for _, r := range res.Routes {
		n += proto.Size(r)
	}
	for _, c := range res.Clusters {
		n += proto.Size(c)
	}
	for _, e := range res.Endpoints {
		n += proto.Size(e)
	}
	return n
}

// TestScaleInputTranslates is the size-1 and size-10 twin of
// BenchmarkTranslate: the benchmark's input must stay valid.
func TestScaleInputTranslates(t *testing.T) {
	for _, n := range []int{1, 10} {
		in, ns, pod := scaleInput(n)
		mesh, problems := model.Build(in)
		if len(problems) > 0 {
			t.Fatalf("services=%d: problems %v", n, problems)
		}
		res, tp := translate.Sidecar(mesh, mesh.Workload(ns, pod))
		if len(tp) > 0 {
			t.Fatalf("services=%d: problems %v", n, tp)
		}
		if err := res.Validate(); err != nil {
			t.Fatal(err)
		}
		if err := translate.CheckReferences(res); err != nil {
			t.Fatal(err)
		}
		if len(res.Endpoints) != n {
			t.Errorf("services=%d: %d ClusterLoadAssignments", n, len(res.Endpoints))
		}
	}
}

// BenchmarkTranslate measures one sidecar's translation; it reports the
// serialized size and the resource count of the result.
func BenchmarkTranslate(b *testing.B) {
	for _, n := range []int{100, 1000, 5000} {
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			in, ns, pod := scaleInput(n)
			mesh, _ := model.Build(in)
			w := mesh.Workload(ns, pod)
			b.ReportAllocs()
			var res *translate.Resources
			for b.Loop() {
				res, _ = translate.Sidecar(mesh, w)
			}
			b.ReportMetric(float64(serializedSize(res)), "bytes/result")
			b.ReportMetric(float64(len(res.Listeners)+len(res.Routes)+len(res.Clusters)+len(res.Endpoints)), "resources")
		})
	}
}

// BenchmarkBuild measures building the model from Kubernetes objects.
func BenchmarkBuild(b *testing.B) {
	for _, n := range []int{1000, 5000} {
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			in, _, _ := scaleInput(n)
			b.ReportAllocs()
			for b.Loop() {
				model.Build(in)
			}
		})
	}
}
