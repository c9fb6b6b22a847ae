package controlplane_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/trellis-mesh/trellis/internal/controlplane"
	"github.com/trellis-mesh/trellis/internal/localcluster"
	"github.com/trellis-mesh/trellis/internal/testenv"
	"github.com/trellis-mesh/trellis/internal/testgen"
	"github.com/trellis-mesh/trellis/internal/xdsclient"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/xds"
)

var env *testenv.Env

var logger = zap.New(zap.WriteTo(os.Stderr), zap.UseDevMode(true), zap.Level(zapcore.InfoLevel))

func TestMain(m *testing.M) {
	ctrl.SetLogger(logger)
	mutating, validating := webhooks()
	testenv.Main(m, &env, testenv.Options{
		Webhooks: &envtest.WebhookInstallOptions{MutatingWebhooks: mutating, ValidatingWebhooks: validating},
		// Room for BenchmarkPush's 1,000 Services (envtest's default is a /24).
		APIServerArgs: map[string]string{"service-cluster-ip-range": "10.0.0.0/16"},
	})
}

// webhooks are the generated configurations with the namespace selector
// the chart adds to injection: only namespaces labelled trellis.dev/inject=enabled.
func webhooks() ([]*admissionv1.MutatingWebhookConfiguration, []*admissionv1.ValidatingWebhookConfiguration) {
	objs, err := localcluster.ReadManifests("../../config/webhook/manifests.yaml")
	if err != nil {
		panic(err)
	}
	var mut []*admissionv1.MutatingWebhookConfiguration
	var val []*admissionv1.ValidatingWebhookConfiguration
	for _, u := range objs {
		switch u.GetKind() {
		case "MutatingWebhookConfiguration":
			var mwc admissionv1.MutatingWebhookConfiguration
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &mwc); err != nil {
				panic(err)
			}
			for i := range mwc.Webhooks {
				mwc.Webhooks[i].NamespaceSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"trellis.dev/inject": "enabled"}}
			}
			mut = append(mut, &mwc)
		case "ValidatingWebhookConfiguration":
			var vwc admissionv1.ValidatingWebhookConfiguration
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &vwc); err != nil {
				panic(err)
			}
			val = append(val, &vwc)
		}
	}
	return mut, val
}

const wait = 60 * time.Second // generous: a stall fails, the time is never asserted

// plane is a running in-process control plane.
type plane struct {
	*controlplane.ControlPlane
	stop func()
	// responses counts cache responses per node id and type URL.
	mu        sync.Mutex
	responses map[string]map[string]int
	// bytes is the largest response per node id and type URL.
	bytes map[string]map[string]int
}

func startPlane(t testing.TB, authority *ca.Authority, mods ...func(*controlplane.Options)) *plane {
	t.Helper()
	o := controlplane.Defaults()
	o.MetricsAddr, o.ProbeAddr, o.LeaderElect = "0", "0", false
	o.XDSAddr = "127.0.0.1:0"
	o.Registry = prometheus.NewRegistry()
	o.Authority = authority
	o.Log = logger
	o.SkipControllerNameValidation = true // one manager per test in this process
	wh := env.Environment().WebhookInstallOptions
	// envtest's webhook certificate (directory mode) unless a test asks for
	// the self-issued one.
	o.WebhookHost, o.WebhookPort, o.WebhookCertDir = wh.LocalServingHost, wh.LocalServingPort, wh.LocalServingCertDir
	for _, m := range mods {
		m(&o)
	}
	if err := env.Client.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: o.Namespace}}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	cp, err := controlplane.New(env.Config, o)
	if err != nil {
		t.Fatal(err)
	}
	p := &plane{ControlPlane: cp, responses: map[string]map[string]int{}, bytes: map[string]map[string]int{}}
	cp.Cache.OnRespond = func(node, typeURL string, _, size int) {
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.responses[node] == nil {
			p.responses[node], p.bytes[node] = map[string]int{}, map[string]int{}
		}
		p.responses[node][typeURL]++
		p.bytes[node][typeURL] = max(p.bytes[node][typeURL], size)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- cp.Start(ctx) }()
	select {
	case <-cp.Ready:
	case err := <-done:
		t.Fatalf("control plane stopped: %v", err)
	case <-time.After(wait):
		t.Fatal("xDS server did not start")
	}
	var once sync.Once
	p.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("control plane: %v", err)
			}
		})
	}
	t.Cleanup(p.stop)
	return p
}

func (p *plane) count(node, typeURL string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.responses[node][typeURL]
}

func (p *plane) maxBytes(node, typeURL string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.bytes[node][typeURL]
}

func (p *plane) rounds() float64 { return testutil.ToFloat64(p.Metrics.Rounds) }

// waitRound waits until a push round completes after the call.
func (p *plane) waitRound(t testing.TB, after float64) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for p.rounds() <= after {
		if time.Now().After(deadline) {
			t.Fatal("no push round")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// settle waits until no push round has run for a while (longer than the
// debounce) and every response sent to node has been ACKed.
func (p *plane) settle(t testing.TB, nodes ...string) {
	t.Helper()
	deadline := time.Now().Add(wait)
	last, quietSince := p.rounds(), time.Now()
	for {
		if time.Now().After(deadline) {
			t.Fatal("the control plane did not settle")
		}
		time.Sleep(20 * time.Millisecond)
		if r := p.rounds(); r != last {
			last, quietSince = r, time.Now()
			continue
		}
		if time.Since(quietSince) < 500*time.Millisecond {
			continue
		}
		acked := true
		for _, ps := range p.Server.Proxies() {
			for _, n := range nodes {
				if ps.NodeID != n {
					continue
				}
				for typ, v := range ps.Sent {
					if ps.Acked[typ] != v {
						acked = false
					}
				}
			}
		}
		if acked {
			return
		}
	}
}

// world is a namespace with a frontend client and a reviews Service with two pods.
type world struct {
	ns                                  string
	frontend, reviews1, reviews2, other *corev1.Pod
}

func create(t testing.TB, objs ...client.Object) {
	t.Helper()
	for _, o := range objs {
		status := o.DeepCopyObject().(client.Object)
		if err := env.Client.Create(context.Background(), o); err != nil {
			t.Fatalf("create %T %s: %v", o, o.GetName(), err)
		}
		if p, ok := status.(*corev1.Pod); ok && p.Status.PodIP != "" {
			pod := o.(*corev1.Pod)
			pod.Status = p.Status
			if err := env.Client.Status().Update(context.Background(), pod); err != nil {
				t.Fatalf("set pod status: %v", err)
			}
		}
	}
}

func newWorld(t testing.TB, ipBase int) *world {
	t.Helper()
	ns := env.Namespace(t, nil)
	// Proxies connect from loopback addresses that are their pod IPs; Services'
	// endpoints may not be loopback, and nothing dials them here.
	ip := func(i int) string { return fmt.Sprintf("127.0.%d.%d", ipBase, i) }
	epIP := func(i int) string { return fmt.Sprintf("10.244.%d.%d", ipBase, i) }
	w := &world{ns: ns,
		frontend: testgen.Pod(ns, "frontend-1", testgen.WithServiceAccount("frontend"), testgen.WithIP(ip(10))),
		reviews1: testgen.Pod(ns, "reviews-1", testgen.WithServiceAccount("reviews"), testgen.WithIP(epIP(21))),
		reviews2: testgen.Pod(ns, "reviews-2", testgen.WithServiceAccount("reviews"), testgen.WithIP(epIP(22))),
		other:    testgen.Pod(ns, "other-1", testgen.WithServiceAccount("other"), testgen.WithIP(ip(30))),
	}
	for _, sa := range []string{"frontend", "reviews", "other"} {
		create(t, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: sa}})
	}
	create(t, w.frontend, w.reviews1, w.reviews2, w.other)
	create(t,
		testgen.Service(ns, "reviews", "", testgen.Port("http", 9080, 8080)),
		testgen.EndpointSlice(ns, "reviews", "reviews-a", "http", 8080, testgen.Endpoint{IP: epIP(21), Pod: "reviews-1"}, testgen.Endpoint{IP: epIP(22), Pod: "reviews-2"}),
	)
	return w
}

func nodeID(p *corev1.Pod) string {
	return xds.NodeID{Type: "sidecar", IP: p.Status.PodIP, Pod: p.Name, Namespace: p.Namespace}.String()
}

func token(t testing.TB, pod *corev1.Pod, sa string) string {
	t.Helper()
	cs := kubernetes.NewForConfigOrDie(env.Config)
	var fresh corev1.Pod
	if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(pod), &fresh); err != nil {
		t.Fatal(err)
	}
	tr, err := cs.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(context.Background(), sa, &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
		Audiences: []string{"trellis"}, ExpirationSeconds: new(int64(600)),
		BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: fresh.Name, UID: fresh.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest: %v", err)
	}
	return tr.Status.Token
}

func (p *plane) connect(t testing.TB, pod *corev1.Pod, tok, node string, delta bool) *xdsclient.Client {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(p.Authority.Root())
	conn, err := xdsclient.Dial(p.XDSAddr, &tls.Config{RootCAs: pool, ServerName: "localhost"}, tok, pod.Status.PodIP)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	c, err := xdsclient.Start(ctx, conn, node, delta)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func ctxWait(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	t.Cleanup(cancel)
	return ctx
}

const reviewsCluster = "outbound|9080||reviews.%s.svc.cluster.local"

func hasEndpoints(cluster string, n int) func(map[string]map[string]proto.Message, map[string]int) bool {
	return func(res map[string]map[string]proto.Message, _ map[string]int) bool {
		cla, ok := res[resource.EndpointType][cluster].(*endpointv3.ClusterLoadAssignment)
		if !ok {
			return false
		}
		count := 0
		for _, l := range cla.Endpoints {
			count += len(l.LbEndpoints)
		}
		return count == n
	}
}

func TestProxyReceivesItsConfigurationAndIdentity(t *testing.T) {
	p := startPlane(t, nil)
	for i, delta := range []bool{false, true} {
		t.Run(map[bool]string{false: "state of the world", true: "delta"}[delta], func(t *testing.T) {
			w := newWorld(t, 10+i)
			c := p.connect(t, w.frontend, token(t, w.frontend, "frontend"), nodeID(w.frontend), delta)
			cluster := fmt.Sprintf(reviewsCluster, w.ns)
			err := c.WaitFor(ctxWait(t), func(res map[string]map[string]proto.Message, r map[string]int) bool {
				return hasEndpoints(cluster, 2)(res, r) && res[resource.RouteType][cluster] != nil &&
					res[resource.ListenerType]["outbound_0.0.0.0_15001"] != nil && len(res[resource.SecretType]) == 2
			})
			if err != nil {
				t.Fatal(err)
			}
			res, _ := c.Snapshot()
			cl := res[resource.ClusterType][cluster].(*clusterv3.Cluster)
			if cl.GetType() != clusterv3.Cluster_EDS {
				t.Errorf("cluster type %v", cl.GetType())
			}
			rc := res[resource.RouteType][cluster].(*routev3.RouteConfiguration)
			found := false
			for _, vh := range rc.VirtualHosts {
				if vh.Name == fmt.Sprintf("reviews.%s.svc.cluster.local:9080", w.ns) {
					found = true
					if got := vh.Routes[0].GetRoute().GetCluster(); got != cluster {
						t.Errorf("route goes to %q", got)
					}
				}
			}
			if !found {
				t.Error("no virtual host for reviews")
			}
			// The proxy's own certificate carries exactly its identity.
			sec := res[resource.SecretType]["default"].(*tlsv3.Secret)
			block, _ := pem.Decode(sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
			cert, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			want := "spiffe://cluster.local/ns/" + w.ns + "/sa/frontend"
			if len(cert.URIs) != 1 || cert.URIs[0].String() != want {
				t.Errorf("SVID URIs %v, want [%s]", cert.URIs, want)
			}
			if _, err := cert.Verify(x509.VerifyOptions{Roots: rootPool(p.Authority), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
				t.Errorf("SVID does not verify against the mesh root: %v", err)
			}
		})
	}
}

func rootPool(a *ca.Authority) *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(a.Root())
	return pool
}

func TestUnauthenticatedProxiesGetNothing(t *testing.T) {
	p := startPlane(t, nil)
	w := newWorld(t, 20)
	doomed := testgen.Pod(w.ns, "doomed-1", testgen.WithServiceAccount("frontend"), testgen.WithIP("127.0.20.40"))
	create(t, doomed)
	doomedToken := token(t, doomed, "frontend")
	if err := env.Client.Delete(context.Background(), doomed, client.GracePeriodSeconds(0)); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		pod   *corev1.Pod
		token string
		node  string
		want  codes.Code
	}{
		{"no token", w.frontend, "", nodeID(w.frontend), codes.Unauthenticated},
		{"a garbage token", w.frontend, "not-a-jwt", nodeID(w.frontend), codes.Unauthenticated},
		{"a token for another ServiceAccount's pod", w.frontend, token(t, w.other, "other"), nodeID(w.frontend), codes.PermissionDenied},
		{"a node id naming another pod", w.frontend, token(t, w.frontend, "frontend"), nodeID(w.reviews1), codes.PermissionDenied},
		{"a token of a deleted pod", doomed, doomedToken, nodeID(doomed), codes.Unauthenticated},
		{"a connection from another IP", w.other, token(t, w.frontend, "frontend"), nodeID(w.frontend), codes.PermissionDenied},
	}
	for _, tt := range tests {
		for _, delta := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/delta=%v", tt.name, delta), func(t *testing.T) {
				c := p.connect(t, tt.pod, tt.token, tt.node, delta)
				err := c.WaitFor(ctxWait(t), func(map[string]map[string]proto.Message, map[string]int) bool { return false })
				if got := status.Code(err); got != tt.want {
					t.Fatalf("stream ended with %v (%v), want %v", got, err, tt.want)
				}
				res, responses := c.Snapshot()
				if len(res) != 0 || len(responses) != 0 {
					t.Errorf("a rejected proxy received %d responses: %v", len(responses), responses)
				}
			})
		}
	}
}

func TestEndpointChangeReachesOnlyAffectedProxies(t *testing.T) {
	p := startPlane(t, nil)
	w := newWorld(t, 30)
	// Only the frontend may call reviews, so the other proxy is not given it.
	create(t, &meshv1alpha1.AccessPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: w.ns, Name: "reviews"},
		Spec: meshv1alpha1.AccessPolicySpec{
			TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: "reviews"}},
			Rules:      []meshv1alpha1.AccessRule{{From: []meshv1alpha1.AccessSource{{ServiceAccount: &meshv1alpha1.ServiceAccountReference{Name: "frontend"}}}}},
		},
	})
	cluster := fmt.Sprintf(reviewsCluster, w.ns)
	fe := p.connect(t, w.frontend, token(t, w.frontend, "frontend"), nodeID(w.frontend), false)
	other := p.connect(t, w.other, token(t, w.other, "other"), nodeID(w.other), true)
	if err := fe.WaitFor(ctxWait(t), hasEndpoints(cluster, 2)); err != nil {
		res, resp := fe.Snapshot()
		for typ, rs := range res {
			for n := range rs {
				t.Logf("has %s %s", typ, n)
			}
		}
		t.Logf("responses %v proxies %+v", resp, p.Server.Proxies())
		t.Fatal(err)
	}
	if err := other.WaitFor(ctxWait(t), func(res map[string]map[string]proto.Message, _ map[string]int) bool {
		return res[resource.ListenerType]["outbound_0.0.0.0_15001"] != nil
	}); err != nil {
		t.Fatal(err)
	}
	feNode, otherNode := nodeID(w.frontend), nodeID(w.other)
	p.settle(t, feNode, otherNode)
	before := map[string]int{}
	for _, typ := range []string{resource.ClusterType, resource.ListenerType, resource.RouteType, resource.EndpointType} {
		before[feNode+typ], before[otherNode+typ] = p.count(feNode, typ), p.count(otherNode, typ)
	}
	rounds := p.rounds()
	// Scale reviews up: a third endpoint in a new slice.
	extra := testgen.Pod(w.ns, "reviews-3", testgen.WithServiceAccount("reviews"), testgen.WithIP("10.244.30.23"))
	create(t, extra, testgen.EndpointSlice(w.ns, "reviews", "reviews-b", "http", 8080, testgen.Endpoint{IP: "10.244.30.23", Pod: "reviews-3"}))
	if err := fe.WaitFor(ctxWait(t), hasEndpoints(cluster, 3)); err != nil {
		t.Fatal(err)
	}
	p.waitRound(t, rounds)
	if got := p.count(feNode, resource.EndpointType) - before[feNode+resource.EndpointType]; got < 1 {
		t.Errorf("frontend got %d endpoint responses", got)
	}
	for _, typ := range []string{resource.ClusterType, resource.ListenerType, resource.RouteType} {
		if got := p.count(feNode, typ) - before[feNode+typ]; got != 0 {
			t.Errorf("an endpoint change re-sent %d %s responses to the frontend", got, typ)
		}
	}
	for _, typ := range []string{resource.ClusterType, resource.ListenerType, resource.RouteType, resource.EndpointType} {
		if got := p.count(otherNode, typ) - before[otherNode+typ]; got != 0 {
			t.Errorf("a proxy without reviews got %d %s responses", got, typ)
		}
	}
	// The frontend's ACK of the pushed endpoints is observed as convergence.
	deadline := time.Now().Add(wait)
	for {
		var m dto.Metric
		if err := p.Metrics.Convergence.(prometheus.Metric).Write(&m); err != nil {
			t.Fatal(err)
		}
		if m.GetHistogram().GetSampleCount() > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no convergence observed for the pushed change")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestBadRouteIsReportedAndOthersKeepTheirConfig(t *testing.T) {
	p := startPlane(t, nil)
	w := newWorld(t, 40)
	cluster := fmt.Sprintf(reviewsCluster, w.ns)
	fe := p.connect(t, w.frontend, token(t, w.frontend, "frontend"), nodeID(w.frontend), false)
	if err := fe.WaitFor(ctxWait(t), hasEndpoints(cluster, 2)); err != nil {
		t.Fatal(err)
	}
	p.settle(t, nodeID(w.frontend))
	res, _ := fe.Snapshot()
	routesBefore := res[resource.RouteType][cluster]
	kind := gwv1.Kind("Service")
	route := &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Namespace: w.ns, Name: "bad"},
		Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: new(gwv1.Group("")), Kind: &kind, Name: "reviews"}}},
			Rules: []gwv1.HTTPRouteRule{{
				Matches:     []gwv1.HTTPRouteMatch{{Path: &gwv1.HTTPPathMatch{Type: new(gwv1.PathMatchRegularExpression), Value: new("/(?!admin)")}}},
				BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: "reviews", Port: new(gwv1.PortNumber(9080))}}}},
			}},
		},
	}
	create(t, route)
	var got gwv1.HTTPRoute
	deadline := time.Now().Add(wait)
	for {
		if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(route), &got); err != nil {
			t.Fatal(err)
		}
		if len(got.Status.Parents) == 1 && meta.FindStatusCondition(got.Status.Parents[0].Conditions, "Accepted") != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no route status: %+v", got.Status)
		}
		time.Sleep(20 * time.Millisecond)
	}
	c := meta.FindStatusCondition(got.Status.Parents[0].Conditions, "Accepted")
	if c.Status != metav1.ConditionFalse || c.Reason != "UnsupportedValue" || c.ObservedGeneration != got.Generation {
		t.Errorf("Accepted = %+v, want False/UnsupportedValue", c)
	}
	if got.Status.Parents[0].ControllerName != "trellis.dev/mesh-controller" {
		t.Errorf("controllerName %q", got.Status.Parents[0].ControllerName)
	}
	res, _ = fe.Snapshot()
	if !proto.Equal(routesBefore, res[resource.RouteType][cluster]) {
		t.Error("the rejected route changed the frontend's routes")
	}
}

func TestNACKIsRecordedWithoutAPushLoop(t *testing.T) {
	p := startPlane(t, nil)
	w := newWorld(t, 50)
	cluster := fmt.Sprintf(reviewsCluster, w.ns)
	pool := rootPool(p.Authority)
	conn, err := xdsclient.Dial(p.XDSAddr, &tls.Config{RootCAs: pool, ServerName: "localhost"}, token(t, w.frontend, "frontend"), w.frontend.Status.PodIP)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, err := xdsclient.Start(ctx, conn, nodeID(w.frontend), false)
	if err != nil {
		t.Fatal(err)
	}
	c.Reject = func(typeURL string, _ map[string]proto.Message) error {
		if typeURL == resource.RouteType {
			return fmt.Errorf("route rejected by test")
		}
		return nil
	}
	if err := c.WaitFor(ctxWait(t), hasEndpoints(cluster, 2)); err != nil {
		t.Fatal(err)
	}
	node := nodeID(w.frontend)
	deadline := time.Now().Add(wait)
	for {
		var st *xds.ProxyStatus
		for _, ps := range p.Server.Proxies() {
			if ps.NodeID == node {
				st = &ps
			}
		}
		if st != nil && st.LastNACK != nil {
			if st.LastNACK.Type != resource.RouteType || st.LastNACK.Message != "route rejected by test" {
				t.Errorf("last NACK %+v", st.LastNACK)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the NACK was not recorded")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := testutil.ToFloat64(p.Metrics.NACKs.WithLabelValues("RouteConfiguration")); n < 1 {
		t.Errorf("NACK metric %v", n)
	}
	// The debug endpoint (served on the metrics port) shows the same.
	rec := httptest.NewRecorder()
	p.Server.DebugHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/debug/proxies", nil))
	var dbg struct {
		Proxies []xds.ProxyStatus `json:"proxies"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &dbg); err != nil {
		t.Fatalf("debug endpoint: %v: %s", err, rec.Body.String())
	}
	found := false
	for _, ps := range dbg.Proxies {
		if ps.NodeID == node {
			found = ps.LastNACK != nil && ps.Acked[resource.ClusterType] != "" && ps.Class != ""
		}
	}
	if !found {
		t.Errorf("debug endpoint does not show the proxy with its ACKs and NACK: %s", rec.Body.String())
	}
	routeResponses := p.count(node, resource.RouteType)
	// An unrelated change triggers a push round; the NACKed routes are not re-sent.
	rounds := p.rounds()
	create(t, testgen.Service(w.ns, "unrelated", "", testgen.Port("tcp", 5432, 5432)))
	p.waitRound(t, rounds)
	if err := c.WaitFor(ctxWait(t), func(res map[string]map[string]proto.Message, _ map[string]int) bool {
		return res[resource.ClusterType][fmt.Sprintf("outbound|5432||unrelated.%s.svc.cluster.local", w.ns)] != nil
	}); err != nil {
		t.Fatal(err)
	}
	if got := p.count(node, resource.RouteType); got != routeResponses {
		t.Errorf("routes were re-sent %d times after a NACK without a change", got-routeResponses)
	}
}

func TestRestartServesTheSameConfiguration(t *testing.T) {
	outer := t
	authority, err := ca.NewSelfSigned("cluster.local", time.Hour, clockReal{})
	if err != nil {
		t.Fatal(err)
	}
	p := startPlane(t, authority)
	w := newWorld(t, 60)
	cluster := fmt.Sprintf(reviewsCluster, w.ns)
	for _, delta := range []bool{false, true} {
		t.Run(fmt.Sprintf("delta=%v", delta), func(t *testing.T) {
			tok := token(t, w.frontend, "frontend")
			c := p.connect(t, w.frontend, tok, nodeID(w.frontend), delta)
			if err := c.WaitFor(ctxWait(t), hasEndpoints(cluster, 2)); err != nil {
				t.Fatal(err)
			}
			p.settle(t, nodeID(w.frontend))
			before, _ := c.Snapshot()
			versions := c.Versions()
			p.stop()
			p = startPlane(outer, authority)
			pool := rootPool(authority)
			conn, err := xdsclient.Dial(p.XDSAddr, &tls.Config{RootCAs: pool, ServerName: "localhost"}, tok, w.frontend.Status.PodIP)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			again, err := xdsclient.Resume(ctx, conn, c)
			if err != nil {
				t.Fatal(err)
			}
			// Wait until the new control plane has served the proxy its class.
			node := nodeID(w.frontend)
			deadline := time.Now().Add(wait)
			for p.count(node, resource.SecretType) == 0 {
				if time.Now().After(deadline) {
					t.Fatal("no secrets after reconnect")
				}
				time.Sleep(10 * time.Millisecond)
			}
			after, _ := again.Snapshot()
			for _, typ := range []string{resource.ClusterType, resource.ListenerType, resource.RouteType, resource.EndpointType} {
				if len(before[typ]) != len(after[typ]) {
					t.Errorf("%s: %d resources before, %d after", typ, len(before[typ]), len(after[typ]))
				}
				for name, m := range before[typ] {
					if !proto.Equal(m, after[typ][name]) {
						t.Errorf("%s %s changed across the restart", typ, name)
					}
				}
				for name, v := range versions[typ] {
					if got := again.Versions()[typ][name]; got != v {
						t.Errorf("%s version %q: %s before, %s after", typ, name, v, got)
					}
				}
			}
		})
	}
}

type clockReal struct{}

func (clockReal) Now() time.Time                  { return time.Now() }
func (clockReal) Since(t time.Time) time.Duration { return time.Since(t) }

func TestPolicyStatusConditions(t *testing.T) {
	startPlane(t, nil)
	w := newWorld(t, 70)
	good := &meshv1alpha1.BackendPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: w.ns, Name: "good"},
		Spec:       meshv1alpha1.BackendPolicySpec{TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: "reviews"}}, Timeout: new(meshv1alpha1.Duration("3s"))},
	}
	ghost := &meshv1alpha1.AccessPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: w.ns, Name: "ghost"},
		Spec: meshv1alpha1.AccessPolicySpec{
			TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: "ghost"}},
			Rules:      []meshv1alpha1.AccessRule{{From: []meshv1alpha1.AccessSource{{Namespace: new("shop")}}}},
		},
	}
	create(t, good, ghost)
	conds := func(obj client.Object, st func() *meshv1alpha1.Status) []metav1.Condition {
		deadline := time.Now().Add(wait)
		for {
			if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(obj), obj); err != nil {
				t.Fatal(err)
			}
			if s := st(); s.ObservedGeneration == obj.GetGeneration() && len(s.Conditions) == 3 {
				return s.Conditions
			}
			if time.Now().After(deadline) {
				t.Fatalf("no status on %s", obj.GetName())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	c := conds(good, func() *meshv1alpha1.Status { return &good.Status.Status })
	for _, typ := range []string{"Accepted", "ResolvedRefs", "Programmed"} {
		if cc := meta.FindStatusCondition(c, typ); cc == nil || cc.Status != metav1.ConditionTrue {
			t.Errorf("good policy %s = %+v", typ, cc)
		}
	}
	c = conds(ghost, func() *meshv1alpha1.Status { return &ghost.Status.Status })
	rr := meta.FindStatusCondition(c, "ResolvedRefs")
	if rr == nil || rr.Status != metav1.ConditionFalse || rr.Reason != "TargetNotFound" || !strings.Contains(rr.Message, "ghost") {
		t.Errorf("ResolvedRefs of a policy targeting nothing = %+v", rr)
	}

	// A source naming a ServiceAccount that does not exist: ResolvedRefs
	// False with the name, still programmed; true once it exists.
	callers := &meshv1alpha1.AccessPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: w.ns, Name: "callers"},
		Spec: meshv1alpha1.AccessPolicySpec{
			TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: "reviews"}},
			Rules:      []meshv1alpha1.AccessRule{{From: []meshv1alpha1.AccessSource{{ServiceAccount: &meshv1alpha1.ServiceAccountReference{Name: "late"}}}}},
		},
	}
	create(t, callers)
	c = conds(callers, func() *meshv1alpha1.Status { return &callers.Status.Status })
	rr = meta.FindStatusCondition(c, "ResolvedRefs")
	if rr == nil || rr.Status != metav1.ConditionFalse || rr.Reason != "RefNotFound" || !strings.Contains(rr.Message, w.ns+"/late") {
		t.Errorf("ResolvedRefs of a policy naming a missing ServiceAccount = %+v", rr)
	}
	if p := meta.FindStatusCondition(c, "Programmed"); p == nil || p.Status != metav1.ConditionTrue {
		t.Errorf("a policy naming a missing ServiceAccount is still programmed: %+v", p)
	}
	create(t, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: w.ns, Name: "late"}})
	deadline := time.Now().Add(wait)
	for {
		if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(callers), callers); err != nil {
			t.Fatal(err)
		}
		if rr := meta.FindStatusCondition(callers.Status.Conditions, "ResolvedRefs"); rr != nil && rr.Status == metav1.ConditionTrue {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ResolvedRefs after the ServiceAccount was created: %+v", callers.Status.Conditions)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestInvalidEditKeepsTheLastGoodGeneration: an HTTPRoute edited to name a
// backend that does not exist keeps its previous generation programmed —
// the frontend's routes do not change — and its status says so on the new
// generation; the next valid edit is programmed.
func TestInvalidEditKeepsTheLastGoodGeneration(t *testing.T) {
	p := startPlane(t, nil)
	w := newWorld(t, 41)
	cluster := fmt.Sprintf(reviewsCluster, w.ns)
	fe := p.connect(t, w.frontend, token(t, w.frontend, "frontend"), nodeID(w.frontend), false)
	kind := gwv1.Kind("Service")
	route := func(header, backend string) gwv1.HTTPRouteSpec {
		return gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: new(gwv1.Group("")), Kind: &kind, Name: "reviews"}}},
			Rules: []gwv1.HTTPRouteRule{{
				Matches:     []gwv1.HTTPRouteMatch{{Headers: []gwv1.HTTPHeaderMatch{{Name: gwv1.HTTPHeaderName(header), Value: "1"}}}},
				BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: gwv1.ObjectName(backend), Port: new(gwv1.PortNumber(9080))}}}},
			}},
		}
	}
	hasHeaderMatch := func(header string) func(map[string]map[string]proto.Message, map[string]int) bool {
		return func(res map[string]map[string]proto.Message, _ map[string]int) bool {
			rc, ok := res[resource.RouteType][cluster]
			if !ok {
				return false
			}
			b, _ := protojson.Marshal(rc)
			return strings.Contains(string(b), `"name":"`+header+`"`)
		}
	}
	r := &gwv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: w.ns, Name: "canary"}, Spec: route("x-canary", "reviews")}
	create(t, r)
	if err := fe.WaitFor(ctxWait(t), hasHeaderMatch("x-canary")); err != nil {
		t.Fatal(err)
	}
	routeStatus := func(gen int64, cond string) *metav1.Condition {
		t.Helper()
		var got gwv1.HTTPRoute
		deadline := time.Now().Add(wait)
		for {
			if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(r), &got); err != nil {
				t.Fatal(err)
			}
			if len(got.Status.Parents) == 1 {
				if c := meta.FindStatusCondition(got.Status.Parents[0].Conditions, cond); c != nil && c.ObservedGeneration == gen {
					return c
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %s condition for generation %d: %+v", cond, gen, got.Status)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if c := routeStatus(1, "ResolvedRefs"); c.Status != metav1.ConditionTrue {
		t.Fatalf("generation 1: %+v", c)
	}
	p.settle(t, nodeID(w.frontend))
	res, _ := fe.Snapshot()
	good := res[resource.RouteType][cluster]

	// Generation 2: a typo'd backend on another header.
	var cur gwv1.HTTPRoute
	if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(r), &cur); err != nil {
		t.Fatal(err)
	}
	cur.Spec = route("x-beta", "reveiws")
	if err := env.Client.Update(context.Background(), &cur); err != nil {
		t.Fatal(err)
	}
	c := routeStatus(2, "ResolvedRefs")
	if c.Status != metav1.ConditionFalse || c.Reason != "BackendNotFound" || !strings.Contains(c.Message, "generation 1, the last valid one, stays programmed") {
		t.Errorf("generation 2: ResolvedRefs %+v", c)
	}
	t.Logf("generation 2's status: %s %s: %s", c.Status, c.Reason, c.Message)
	p.settle(t, nodeID(w.frontend))
	res, _ = fe.Snapshot()
	if !proto.Equal(good, res[resource.RouteType][cluster]) {
		t.Error("the invalid generation changed the frontend's routes")
	}

	// Generation 3 is valid again: programmed.
	if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(r), &cur); err != nil {
		t.Fatal(err)
	}
	cur.Spec = route("x-beta", "reviews")
	if err := env.Client.Update(context.Background(), &cur); err != nil {
		t.Fatal(err)
	}
	if err := fe.WaitFor(ctxWait(t), hasHeaderMatch("x-beta")); err != nil {
		t.Fatal(err)
	}
	if c := routeStatus(3, "ResolvedRefs"); c.Status != metav1.ConditionTrue {
		t.Errorf("generation 3: %+v", c)
	}
}
