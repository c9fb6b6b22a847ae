package main

import (
	"context"
	"fmt"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/testgen"
)

// liveObjects are a meshed namespace as a cluster holds it: pods that run
// (sidecar annotation, IPs), Services with the cluster IPs the apiserver
// gave them, EndpointSlices, policies and routes with mistakes.
const liveObjects = `
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: %[1]s}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: %[1]s}
spec:
  selector: {app: legacy}
  ports: [{name: web, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-a, namespace: %[1]s, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.70.21], conditions: {ready: true}, targetRef: {kind: Pod, name: reviews-1, namespace: %[1]s}}]
---
apiVersion: mesh.trellis.dev/v1alpha1
kind: AccessPolicy
metadata: {name: reviews-callers, namespace: %[1]s}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  action: Allow
  rules: [{from: [{serviceAccount: {name: frontend}}, {serviceAccount: {name: ghost}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-nowhere, namespace: %[1]s}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules: [{backendRefs: [{name: missing, port: 80}]}]
`

// TestLiveAnalyzeAndDescribe: analyze --live and describe request --live
// read the cluster as the controller does.
func TestLiveAnalyzeAndDescribe(t *testing.T) {
	ctx := context.Background()
	ns := env.Namespace(t, map[string]string{"trellis.dev/inject": "enabled"})
	other := env.Namespace(t, nil)
	for _, sa := range []string{"frontend", "reviews"} {
		mustCreate(t, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: sa}})
	}
	createRunning(t,
		testgen.Pod(ns, "frontend-1", testgen.WithServiceAccount("frontend"), testgen.WithIP("10.244.70.10"), testgen.WithProxy("envoy"), testgen.WithLabel("app", "frontend")),
		testgen.Pod(ns, "reviews-1", testgen.WithServiceAccount("reviews"), testgen.WithIP("10.244.70.21"), testgen.WithProxy("envoy"), testgen.WithLabel("app", "reviews")))
	createYAML(t, fmt.Sprintf(liveObjects, ns))
	// Another namespace's finding is not shown with -n.
	mustCreate(t, testgen.Service(other, "elsewhere", "", testgen.Port("web", 80, 80)))

	admin := kubeconfig(t, envtest.User{Name: "live-admin", Groups: []string{"system:masters"}})
	code, out, errOut := trellisctl(t, "", "analyze", "--live", "--kubeconfig", admin, "-n", ns)
	t.Logf("analyze --live -n %s:\n%s%s", ns, out, errOut)
	if code != 1 {
		t.Errorf("exit %d, want 1 (errors found)", code)
	}
	wantLines(t, out,
		"HTTPRoute/"+ns+"/to-nowhere",         // a backendRef to a Service that does not exist
		"AccessPolicy/"+ns+"/reviews-callers", // ServiceAccount ghost does not exist
		"[RefNotFound]",
		"Service/"+ns+"/legacy spec.ports[0] [NoPortProtocol]",
		"Service/"+ns+"/legacy spec.selector [NoPods]",
		"no pod matches app=legacy",
	)
	if strings.Contains(out, other) {
		t.Errorf("-n %s shows another namespace's findings:\n%s", ns, out)
	}
	if code, _, errOut := trellisctl(t, "", "analyze", "--live", "-f", "x.yaml"); code != 2 || !strings.Contains(errOut, "exclude each other") {
		t.Errorf("--live with -f: exit %d: %s", code, errOut)
	}

	code, out, errOut = trellisctl(t, "", "describe", "request", "--live", "--kubeconfig", admin, "-n", ns, "frontend-1", "http://reviews:9080/")
	t.Logf("describe request --live:\n%s%s", out, errOut)
	if code != 0 {
		t.Fatalf("describe request --live: exit %d", code)
	}
	// The route's only backend does not exist: the client's sidecar
	// answers 500, and describe says which route.
	wantLines(t, out, "cluster IP of Service "+ns+"/reviews", "route t-", "HTTPRoute "+ns+"/to-nowhere rules[0].matches[0]", "the client's sidecar answers 500 itself")
	if err := env.Client.Delete(ctx, &gwv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "to-nowhere"}}); err != nil {
		t.Fatal(err)
	}
	code, out, errOut = trellisctl(t, "", "describe", "request", "--live", "--kubeconfig", admin, "-n", ns, "frontend-1", "http://reviews:9080/")
	t.Logf("describe request --live, without the route:\n%s%s", out, errOut)
	if code != 0 {
		t.Fatalf("describe request --live: exit %d", code)
	}
	wantLines(t, out, "10.244.70.21:8080", "allowed by "+ns+"/reviews-callers/rules/0")
	if code, _, errOut := trellisctl(t, "", "describe", "request", "--live", "--kubeconfig", admin, "-n", ns, "deployment/frontend", "http://reviews/"); code != 1 || !strings.Contains(errOut, `no pod "deployment/frontend" in namespace `+ns+" (name a pod") {
		t.Errorf("describe request --live from a Deployment: exit %d: %s", code, errOut)
	}
}

// TestDescribeServiceAndPod, live and from manifests.
func TestDescribeServiceAndPod(t *testing.T) {
	ns := env.Namespace(t, map[string]string{"trellis.dev/inject": "enabled"})
	mustCreate(t, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "reviews"}})
	createRunning(t, testgen.Pod(ns, "reviews-1", testgen.WithServiceAccount("reviews"), testgen.WithIP("10.244.71.21"), testgen.WithProxy("envoy"), testgen.WithLabel("app", "reviews")))
	createYAML(t, strings.ReplaceAll(fmt.Sprintf(liveObjects, ns), "10.244.70.21", "10.244.71.21"))
	admin := kubeconfig(t, envtest.User{Name: "describe-admin", Groups: []string{"system:masters"}})
	describe := func(args ...string) string {
		t.Helper()
		code, out, errOut := trellisctl(t, "", append([]string{"describe"}, args...)...)
		t.Logf("describe %s:\n%s%s", strings.Join(args, " "), out, errOut)
		if code != 0 {
			t.Fatalf("exit %d", code)
		}
		return out
	}
	out := describe("service", "reviews", "--live", "--kubeconfig", admin, "-n", ns)
	wantLines(t, out, "Service "+ns+"/reviews", "port 9080 http   → 8080, treated as http",
		"10.244.71.21:8080  reviews-1  ready  meshed (envoy)",
		"HTTPRoute "+ns+"/to-nowhere: every port, 1 rules; producer route: every client",
		"✘ HTTPRoute/"+ns+"/to-nowhere spec.rules[0].backendRefs[0] [BackendNotFound]",
		"AccessPolicy "+ns+"/reviews-callers (Allow, 1 rules)", "BackendPolicy none")
	out = describe("service", "legacy", "--live", "--kubeconfig", admin, "-n", ns)
	wantLines(t, out, "treated as tcp (routes, retries and L7 policy do not apply", "no endpoints: clients get 503", "spec.selector [NoPods] no pod matches app=legacy")
	out = describe("pod", "reviews-1", "--live", "--kubeconfig", admin, "-n", ns)
	wantLines(t, out, "Pod/"+ns+"/reviews-1", "proxy           Envoy sidecar", "spiffe://cluster.local/ns/"+ns+"/sa/reviews",
		"backs           Service "+ns+"/reviews port 9080 → 8080 (http); AccessPolicies: "+ns+"/reviews-callers")

	// From manifests: a workload stands for its pods.
	out = describe("pod", "deployment/frontend", "-f", "testdata/describe", "-n", "shop")
	wantLines(t, out, "Deployment/shop/frontend", "Envoy sidecar", "spiffe://cluster.local/ns/shop/sa/frontend", "backs           no Service")
	out = describe("service", "reviews", "-f", "testdata/describe", "-n", "shop")
	wantLines(t, out, "AccessPolicy shop/no-admin (Deny, 1 rules)", "meshed (envoy)")
	if code, _, errOut := trellisctl(t, "", "describe", "service", "nope", "-f", "testdata/describe", "-n", "shop"); code != 1 || !strings.Contains(errOut, "no Service shop/nope") {
		t.Errorf("unknown Service: exit %d: %s", code, errOut)
	}
}

// createRunning creates pods with the status their testgen options set
// (IP, Running), as a kubelet would report it.
func createRunning(t *testing.T, pods ...*corev1.Pod) {
	t.Helper()
	for _, p := range pods {
		st := p.Status
		mustCreate(t, p)
		p.Status = st
		if err := env.Client.Status().Update(context.Background(), p); err != nil {
			t.Fatal(err)
		}
	}
}

// createYAML creates the objects of a multi-document manifest.
func createYAML(t *testing.T, manifest string) {
	t.Helper()
	for _, doc := range strings.Split(manifest, "\n---\n") {
		u := &unstructured.Unstructured{}
		if err := yaml.Unmarshal([]byte(doc), &u.Object); err != nil {
			t.Fatal(err)
		}
		mustCreate(t, u)
	}
}
