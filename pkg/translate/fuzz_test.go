package translate_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/trellis-mesh/trellis/internal/manifest"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
)

// checkAll translates the input for every workload and fails on a panic (the
// fuzzer reports it), an invalid resource or a dangling reference: bad input
// must become problems, never bad configuration.
func checkAll(t *testing.T, in model.Input) {
	mesh, _ := model.Build(in)
	for _, w := range mesh.Workloads {
		res, _ := translate.ForWorkload(mesh, w)
		if err := res.Validate(); err != nil {
			t.Fatalf("proxy %s/%s: ValidateAll: %v", w.Namespace, w.Name, err)
		}
		if err := translate.CheckReferences(res); err != nil {
			t.Fatalf("proxy %s/%s: CheckReferences: %v", w.Namespace, w.Name, err)
		}
	}
}

// FuzzPipeline runs the whole pipeline from YAML to xDS, seeded with the
// golden inputs.
func FuzzPipeline(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.in.yaml")
	for _, file := range files {
		b, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		in, _, err := manifest.Parse(data)
		if err != nil {
			return
		}
		checkAll(t, in)
	})
}

// bytes hands out fuzz input as small choices.
type bytes struct {
	b []byte
	i int
}

func (b *bytes) n(max int) int {
	if b.i >= len(b.b) || max <= 0 {
		return 0
	}
	v := int(b.b[b.i]) % max
	b.i++
	return v
}

func (b *bytes) pick(options ...string) string { return options[b.n(len(options))] }

// FuzzModel builds random models — Services with odd ports and addresses,
// endpoints, policies and routes with invalid regexes, zero weights and
// dangling references — from the fuzzer's bytes.
func FuzzModel(f *testing.F) {
	f.Add([]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10})
	f.Add([]byte("trellis fuzz seed with more bytes to spend on choices 0123456789"))
	f.Fuzz(func(t *testing.T, data []byte) {
		b := &bytes{b: data}
		var in model.Input
		nss := []string{"a", "b"}
		names := []string{"s0", "s1", "s2"}
		ips := []string{"10.0.0.1", "10.0.0.2", "fd00::1", "not-an-ip", "10.0.0.1", ""}
		for i := range b.n(4) + 1 {
			ns := nss[b.n(2)]
			in.Pods = append(in.Pods, &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("p%d", i), Namespace: ns, Annotations: map[string]string{model.AnnotationProxy: b.pick("envoy", "grpc", "", "junk")}},
				Spec:       corev1.PodSpec{ServiceAccountName: b.pick("sa", "", "other")},
				Status:     corev1.PodStatus{PodIP: ips[b.n(len(ips))]},
			})
		}
		for range b.n(4) {
			ns, name := nss[b.n(2)], names[b.n(3)]
			svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}
			svc.Spec.ClusterIP = b.pick("10.96.0.1", "10.96.0.2", "None", "", "fd00:96::1", "bad")
			for range b.n(3) + 1 {
				port := int32(b.n(3) + 80)
				svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{
					Name: b.pick("http", "grpc", "tcp", "http2-x", "tls", ""), Port: port,
					TargetPort: []intstr.IntOrString{intstr.FromInt32(8080), intstr.FromString("web"), {}}[b.n(3)],
				})
			}
			in.Services = append(in.Services, svc)
			es := &discoveryv1.EndpointSlice{
				ObjectMeta:  metav1.ObjectMeta{Name: name + "-x", Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: name}},
				AddressType: discoveryv1.AddressTypeIPv4,
			}
			for _, p := range svc.Spec.Ports {
				es.Ports = append(es.Ports, discoveryv1.EndpointPort{Name: new(p.Name), Port: new(int32(8080 + b.n(2)))})
			}
			for i := range b.n(3) {
				ready := b.n(2) == 0
				es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{
					Addresses:  []string{ips[b.n(len(ips))]},
					Conditions: discoveryv1.EndpointConditions{Ready: &ready},
					TargetRef:  &corev1.ObjectReference{Kind: "Pod", Name: fmt.Sprintf("p%d", i)},
					Zone:       new(b.pick("z1", "z2")),
				})
			}
			in.EndpointSlices = append(in.EndpointSlices, es)
		}
		for i := range b.n(3) {
			ns := nss[b.n(2)]
			in.AccessPolicies = append(in.AccessPolicies, &meshv1alpha1.AccessPolicy{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("ap%d", i), Namespace: ns},
				Spec: meshv1alpha1.AccessPolicySpec{
					TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: names[b.n(3)]}},
					Action:     meshv1alpha1.AccessAction(b.pick("Allow", "Deny", "")),
					Rules: []meshv1alpha1.AccessRule{{
						From: []meshv1alpha1.AccessSource{{Namespace: new(b.pick("a", "*"))}, {ServiceAccount: &meshv1alpha1.ServiceAccountReference{Name: "sa"}}}[:b.n(3)],
						To:   []meshv1alpha1.AccessOperation{{Ports: []int32{int32(80 + b.n(3))}, Paths: []meshv1alpha1.PathMatch{{Type: meshv1alpha1.PathMatchType(b.pick("Exact", "PathPrefix")), Value: b.pick("/", "/a", "/a/")}}, Methods: []string{"GET"}}}[:b.n(2)],
					}},
				},
			})
		}
		for i := range b.n(3) {
			ns := nss[b.n(2)]
			bp := &meshv1alpha1.BackendPolicy{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("bp%d", i), Namespace: ns},
				Spec:       meshv1alpha1.BackendPolicySpec{TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: names[b.n(3)]}}},
			}
			if b.n(2) == 0 {
				bp.Spec.Timeout = new(meshv1alpha1.Duration(b.pick("1s", "0s", "100ms")))
				bp.Spec.Retries = &meshv1alpha1.Retries{Attempts: int32(b.n(12) - 1), PerTryTimeout: new(meshv1alpha1.Duration("50ms")), RetryOn: []meshv1alpha1.RetryOn{"5xx"}}
			}
			if b.n(2) == 0 {
				bp.Spec.OutlierDetection = &meshv1alpha1.OutlierDetection{Consecutive5xxErrors: int32(b.n(5)), MaxEjectionPercent: int32(b.n(200) - 50)}
				bp.Spec.LoadBalancer = &meshv1alpha1.LoadBalancer{Algorithm: meshv1alpha1.LoadBalancingAlgorithm(b.pick("RingHash", "Random", "LeastRequest", "")), HashHeader: new("x-h")}
			}
			if b.n(2) == 0 {
				bp.Spec.RateLimit = &meshv1alpha1.LocalRateLimit{Requests: int32(b.n(3)), Interval: meshv1alpha1.Duration(b.pick("1s", "0s"))}
				bp.Spec.FaultInjection = &meshv1alpha1.FaultInjection{
					Delay: &meshv1alpha1.FaultDelay{Duration: "10ms", Percent: int32(b.n(300) - 100)},
					Abort: &meshv1alpha1.FaultAbort{GRPCStatus: new(int32(b.n(20))), Percent: int32(b.n(101))},
				}
			}
			in.BackendPolicies = append(in.BackendPolicies, bp)
		}
		for i := range b.n(3) {
			ns := nss[b.n(2)]
			kind := gwv1.Kind("Service")
			rule := gwv1.HTTPRouteRule{
				Matches: []gwv1.HTTPRouteMatch{{
					Path:        &gwv1.HTTPPathMatch{Type: new(gwv1.PathMatchType(b.pick("Exact", "PathPrefix", "RegularExpression"))), Value: new(b.pick("/", "/x/", "(", "/a[0-9]+", "/b"))},
					Headers:     []gwv1.HTTPHeaderMatch{{Name: "x", Value: b.pick("v", "(?<", ".*"), Type: new(gwv1.HeaderMatchType(b.pick("Exact", "RegularExpression")))}}[:b.n(2)],
					QueryParams: []gwv1.HTTPQueryParamMatch{{Name: "q", Value: "1"}}[:b.n(2)],
					Method:      []*gwv1.HTTPMethod{nil, new(gwv1.HTTPMethod("GET"))}[b.n(2)],
				}},
				Filters: []gwv1.HTTPRouteFilter{
					{Type: gwv1.HTTPRouteFilterURLRewrite, URLRewrite: &gwv1.HTTPURLRewriteFilter{Path: &gwv1.HTTPPathModifier{Type: gwv1.PrefixMatchHTTPPathModifier, ReplacePrefixMatch: new("/")}}},
					{Type: gwv1.HTTPRouteFilterRequestMirror, RequestMirror: &gwv1.HTTPRequestMirrorFilter{BackendRef: gwv1.BackendObjectReference{Name: gwv1.ObjectName(names[b.n(3)]), Port: new(gwv1.PortNumber(80))}, Percent: new(int32(b.n(300) - 100))}},
					{Type: gwv1.HTTPRouteFilterRequestRedirect, RequestRedirect: &gwv1.HTTPRequestRedirectFilter{StatusCode: new(b.n(600))}},
					{Type: gwv1.HTTPRouteFilterExtensionRef},
				}[:b.n(5)],
				Timeouts: &gwv1.HTTPRouteTimeouts{Request: new(gwv1.Duration(b.pick("1s", "0s", "bad")))},
			}
			for range b.n(3) {
				rule.BackendRefs = append(rule.BackendRefs, gwv1.HTTPBackendRef{BackendRef: gwv1.BackendRef{
					BackendObjectReference: gwv1.BackendObjectReference{Kind: &kind, Name: gwv1.ObjectName(names[b.n(3)]), Namespace: new(gwv1.Namespace(nss[b.n(2)])), Port: new(gwv1.PortNumber(80 + b.n(3)))},
					Weight:                 new(int32(b.n(3))),
				}})
			}
			in.HTTPRoutes = append(in.HTTPRoutes, &gwv1.HTTPRoute{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("r%d", i), Namespace: ns},
				Spec: gwv1.HTTPRouteSpec{
					CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Kind: &kind, Name: gwv1.ObjectName(names[b.n(3)]), Namespace: new(gwv1.Namespace(nss[b.n(2)]))}}},
					Rules:           []gwv1.HTTPRouteRule{rule},
				},
			})
		}
		if b.n(2) == 0 {
			in.ExternalServices = append(in.ExternalServices, &meshv1alpha1.ExternalService{
				ObjectMeta: metav1.ObjectMeta{Name: "e", Namespace: "a"},
				Spec: meshv1alpha1.ExternalServiceSpec{
					Hosts: []string{"x.example.com"}, Addresses: []string{b.pick("192.0.2.0/24", "bad")},
					Ports: []meshv1alpha1.ExternalPort{{Number: int32(80 + b.n(3)), Protocol: meshv1alpha1.ExternalProtocol(b.pick("HTTP", "TLS", "TCP"))}},
				},
			})
		}
		if b.n(2) == 0 {
			in.MeshConfig = &meshv1alpha1.MeshConfig{Spec: meshv1alpha1.MeshConfigSpec{
				MTLS:           meshv1alpha1.MTLS{Mode: meshv1alpha1.MTLSMode(b.pick("Strict", "Permissive"))},
				OutboundPolicy: meshv1alpha1.OutboundPolicy(b.pick("AllowAny", "RegistryOnly")),
				DefaultAccess:  meshv1alpha1.DefaultAccess(b.pick("Allow", "Deny")),
				AccessLog:      []*meshv1alpha1.AccessLog{nil, {Encoding: "JSON"}}[b.n(2)],
				Tracing:        []*meshv1alpha1.Tracing{nil, {Collector: b.pick("otel.obs:4317", "bad")}}[b.n(2)],
			}}
		}
		checkAll(t, in)
	})
}
