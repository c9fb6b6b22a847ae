package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/go-logr/logr/testr"
	"github.com/prometheus/client_golang/prometheus"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"

	"google.golang.org/protobuf/proto"

	"github.com/trellis-mesh/trellis/internal/chartinstall"
	"github.com/trellis-mesh/trellis/internal/controlplane"
	"github.com/trellis-mesh/trellis/internal/testgen"
	"github.com/trellis-mesh/trellis/internal/xdsclient"
	"github.com/trellis-mesh/trellis/pkg/controller"
	"github.com/trellis-mesh/trellis/pkg/xds"
)

// freeAddr is a loopback address nothing listens on (for listeners whose
// bound address the control plane does not report).
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestProxyStatusAndConfigDump runs a control plane against the test
// apiserver with the chart's secure metrics endpoint, connects a proxy
// that rejects its routes, and reads it with trellisctl as an
// administrator (client certificate), as a user without rights, as that
// user once bound to trellis-debug-reader, and with a bearer token.
func TestProxyStatusAndConfigDump(t *testing.T) {
	ctx := context.Background()
	metricsAddr := freeAddr(t)
	_, webhookPort, _ := net.SplitHostPort(freeAddr(t))
	o := controlplane.Defaults()
	o.MetricsAddr, o.ProbeAddr, o.LeaderElect = metricsAddr, "0", false
	o.XDSAddr = "127.0.0.1:0"
	o.Registry = prometheus.NewRegistry()
	o.Log = testr.New(t)
	o.SkipControllerNameValidation = true
	o.WebhookHost = "127.0.0.1"
	fmt.Sscan(webhookPort, &o.WebhookPort)
	if err := env.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: o.Namespace}}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	cp, err := controlplane.New(env.Config, o)
	if err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- cp.Start(cctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("control plane: %v", err)
		}
	})
	select {
	case <-cp.Ready:
	case err := <-done:
		t.Fatalf("control plane stopped: %v", err)
	case <-time.After(time.Minute):
		t.Fatal("xDS server did not start")
	}

	// A frontend calling reviews through an HTTPRoute.
	ns := env.Namespace(t, nil)
	frontend := testgen.Pod(ns, "frontend-1", testgen.WithServiceAccount("frontend"), testgen.WithIP("127.0.60.10"))
	reviews := testgen.Pod(ns, "reviews-1", testgen.WithServiceAccount("reviews"), testgen.WithIP("10.244.60.21"))
	for _, sa := range []string{"frontend", "reviews"} {
		mustCreate(t, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: sa}})
	}
	createRunning(t, frontend, reviews)
	mustCreate(t,
		testgen.Service(ns, "reviews", "", testgen.Port("http", 9080, 8080)),
		testgen.EndpointSlice(ns, "reviews", "reviews-a", "http", 8080, testgen.Endpoint{IP: "10.244.60.21", Pod: "reviews-1"}),
		&gwv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "reviews-canary"}, Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: ptr.To(gwv1.Group("")), Kind: ptr.To(gwv1.Kind("Service")), Name: "reviews"}}},
			Rules:           []gwv1.HTTPRouteRule{{BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: "reviews", Port: ptr.To(gwv1.PortNumber(9080))}}}}}},
		}},
	)

	// The proxy rejects its route tables, naming the one it rejects as
	// Envoy does.
	routeName := "outbound|9080||reviews." + ns + ".svc.cluster.local"
	pool := x509.NewCertPool()
	pool.AddCert(cp.Authority.Root())
	conn, err := xdsclient.Dial(cp.XDSAddr, &tls.Config{RootCAs: pool, ServerName: "localhost"}, podToken(t, frontend, "frontend"), frontend.Status.PodIP)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	node := xds.NodeID{Type: "sidecar", IP: frontend.Status.PodIP, Pod: frontend.Name, Namespace: ns}.String()
	xc, err := xdsclient.Start(cctx, conn, node, false)
	if err != nil {
		t.Fatal(err)
	}
	xc.Reject = func(typeURL string, rs map[string]proto.Message) error {
		if typeURL == resource.RouteType && rs[routeName] != nil {
			return fmt.Errorf("Error adding/updating route(s) %s: test rejects it", routeName)
		}
		return nil
	}
	eventually(t, "the proxy rejected its routes", func() bool {
		for _, p := range cp.Server.Proxies() {
			if p.NodeID == node && p.State(resource.RouteType) == "NACKED" && p.State(resource.ClusterType) == "SYNCED" && p.Identity != "" {
				return true
			}
		}
		return false
	})
	var bundle corev1.ConfigMap
	eventually(t, "trust bundle in the control plane's namespace", func() bool {
		return env.Client.Get(ctx, client.ObjectKey{Namespace: o.Namespace, Name: controller.RootCAConfigMap}, &bundle) == nil
	})

	// The rejection is on the object that caused it (the route's parent
	// status), until the proxy accepts a later version.
	routeProgrammed := func() *metav1.Condition {
		var r gwv1.HTTPRoute
		if err := env.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: "reviews-canary"}, &r); err != nil || len(r.Status.Parents) != 1 {
			return nil
		}
		return meta.FindStatusCondition(r.Status.Parents[0].Conditions, "Programmed")
	}
	eventually(t, "HTTPRoute Programmed=False RejectedByProxy", func() bool {
		c := routeProgrammed()
		return c != nil && c.Status == metav1.ConditionFalse && c.Reason == "RejectedByProxy" &&
			strings.Contains(c.Message, "1 proxy ("+ns+"/frontend-1) rejected RouteConfiguration "+routeName) && strings.Contains(c.Message, "test rejects it")
	})
	defer func() {
		// The proxy accepts the next version: the condition goes.
		xc.Reject = nil
		var r gwv1.HTTPRoute
		if err := env.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: "reviews-canary"}, &r); err != nil {
			t.Fatal(err)
		}
		r.Spec.Rules[0].Timeouts = &gwv1.HTTPRouteTimeouts{Request: ptr.To(gwv1.Duration("5s"))}
		if err := env.Client.Update(ctx, &r); err != nil {
			t.Fatal(err)
		}
		eventually(t, "Programmed removed once the proxy accepts the route", func() bool { return routeProgrammed() == nil })
	}()

	admin := kubeconfig(t, envtest.User{Name: "debug-admin", Groups: []string{"system:masters"}})
	debug := func(kc string, args ...string) (string, string, int) {
		t.Helper()
		var out, errOut strings.Builder
		code := run(append(args, "--kubeconfig", kc, "--controller-address", metricsAddr, "--trellis-namespace", o.Namespace), nil, &out, &errOut)
		return out.String(), errOut.String(), code
	}

	// Administrator, client certificate: the table and the NACK's cause.
	out, errOut, code := debug(admin, "proxy-status")
	if code != 0 {
		t.Fatalf("proxy-status: exit %d: %s%s", code, out, errOut)
	}
	t.Logf("trellisctl proxy-status:\n%s", out)
	wantLines(t, out,
		"NAMESPACE",
		"✘ "+ns+"/frontend-1 rejected RDS version",
		"Error adding/updating route(s) "+routeName+": test rejects it",
		"resources: "+routeName,
		"caused by Service/"+ns+"/reviews → kubectl describe -n "+ns+" service reviews",
		"caused by HTTPRoute/"+ns+"/reviews-canary → kubectl describe -n "+ns+" httproute reviews-canary",
	)
	if re := regexp.MustCompile(regexp.QuoteMeta(ns) + `\s+frontend-1\s+sotw\s+SYNCED\s+SYNCED\s+SYNCED\s+NACKED\s+SYNCED\s+in \S+\s+` + regexp.QuoteMeta(metricsAddr)); !re.MatchString(out) {
		t.Errorf("no row with CDS/LDS/EDS SYNCED, RDS NACKED, SDS SYNCED, the expiry and the replica:\n%s", out)
	}
	out, _, code = debug(admin, "proxy-status", "-n", ns, "frontend-1")
	if code != 0 {
		t.Fatalf("proxy-status POD: exit %d: %s", code, out)
	}
	t.Logf("trellisctl proxy-status POD:\n%s", out)
	wantLines(t, out, "Identity:", "spiffe://cluster.local/ns/"+ns+"/sa/frontend", "Last rejection (RDS version", "still in force")
	if !regexp.MustCompile(`RDS\s+NACKED`).MatchString(out) {
		t.Errorf("detail lacks RDS NACKED:\n%s", out)
	}
	out, _, code = debug(admin, "proxy-status", "-o", "json", "-n", ns)
	var rep statusReport
	if err := yaml.Unmarshal([]byte(out), &rep); code != 0 || err != nil || len(rep.Proxies) != 1 || rep.Proxies[0].States["RDS"] != "NACKED" {
		t.Errorf("proxy-status -o json: exit %d, %v: %s", code, err, out)
	}

	// config-dump: what is served, keys never.
	out, _, code = debug(admin, "config-dump", "-n", ns, "frontend-1")
	if code != 0 {
		t.Fatalf("config-dump: exit %d: %s", code, out)
	}
	var dump map[string]any
	if err := yaml.Unmarshal([]byte(out), &dump); err != nil {
		t.Fatalf("config-dump is not YAML: %v", err)
	}
	if got := slices.Sorted(maps.Keys(dump)); !slices.Equal(got, []string{"class", "clusters", "endpoints", "listeners", "nodeID", "routes", "secrets"}) {
		t.Errorf("config-dump keys %v", got)
	}
	wantLines(t, out, "name: "+routeName, "route_config:", "spiffe://cluster.local/ns/"+ns+"/sa/frontend", "privateKey: true")
	if strings.Contains(out, "PRIVATE KEY") || strings.Contains(out, "inlineBytes") {
		t.Errorf("config-dump shows key material:\n%s", out)
	}
	out, _, code = debug(admin, "config-dump", "-n", ns, "frontend-1", "--type", "routes")
	dump = nil
	if err := yaml.Unmarshal([]byte(out), &dump); code != 0 || err != nil || len(dump) != 3 || dump["routes"] == nil {
		t.Errorf("config-dump --type routes: exit %d: %s", code, out)
	}
	if _, errOut, code := debug(admin, "config-dump", "-n", ns, "nobody-1"); code != 1 || !strings.Contains(errOut, "no proxy of pod "+ns+"/nobody-1 is connected") {
		t.Errorf("config-dump of an unknown pod: exit %d: %s", code, errOut)
	}

	// A user without rights is told what to bind; once bound, reads.
	user := kubeconfig(t, envtest.User{Name: "debug-user"})
	if _, errOut, code := debug(user, "proxy-status"); code != 1 || !strings.Contains(errOut, "bind the Role trellis-debug-reader in "+o.Namespace) {
		t.Errorf("proxy-status without rights to the trust bundle: exit %d: %s", code, errOut)
	}
	// --controller-ca-file instead of the ConfigMap: the handshake verifies
	// and the controller itself answers (Forbidden: no ClusterRole yet).
	caFile := filepath.Join(t.TempDir(), "roots.pem")
	if err := os.WriteFile(caFile, []byte(bundle.Data[controller.RootCAKey]), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, errOut, code := debug(user, "proxy-status", "--controller-ca-file", caFile); code != 1 || !strings.Contains(errOut, `Forbidden: user "debug-user" may not get /debug/proxies`) {
		t.Errorf("proxy-status with --controller-ca-file: exit %d: %s", code, errOut)
	}
	// The chart's namespaced Role: the trust bundle (and pods, port-forward).
	mustCreate(t,
		&rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Namespace: o.Namespace, Name: "debug-" + ns}, Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{controller.RootCAConfigMap}, Verbs: []string{"get"}}}},
		&rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Namespace: o.Namespace, Name: "debug-" + ns}, RoleRef: rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "debug-" + ns},
			Subjects: []rbacv1.Subject{{Kind: "User", Name: "debug-user"}, {Kind: "ServiceAccount", Namespace: ns, Name: "ci"}}},
	)
	eventually(t, "the trust bundle readable", func() bool {
		_, errOut, _ := debug(user, "proxy-status")
		return !strings.Contains(errOut, "trust bundle")
	})
	if _, errOut, code := debug(user, "proxy-status"); code != 1 || !strings.Contains(errOut, `Forbidden: user "debug-user" may not get /debug/proxies`) || !strings.Contains(errOut, "bind the ClusterRole trellis-debug-reader") {
		t.Errorf("proxy-status without rights: exit %d: %s", code, errOut)
	}
	// Reading the trust bundle needs the namespaced Role's part.
	mustCreate(t,
		&rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "trellis-debug-reader-" + ns}, Rules: []rbacv1.PolicyRule{{NonResourceURLs: []string{xds.DebugProxiesPath, xds.DebugConfigDumpPath}, Verbs: []string{"get"}}}},
		&rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "trellis-debug-reader-" + ns}, RoleRef: rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "trellis-debug-reader-" + ns},
			Subjects: []rbacv1.Subject{{Kind: "User", Name: "debug-user"}}},
	)
	eventually(t, "the bound user reads the debug API", func() bool {
		out, _, code := debug(user, "proxy-status", "-n", ns)
		return code == 0 && strings.Contains(out, "frontend-1")
	})

	// A bearer token (a ServiceAccount's) authenticates too; without the
	// role it is refused after authentication, not before.
	mustCreate(t, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "ci"}})
	tr, err := kubernetes.NewForConfigOrDie(env.Config).CoreV1().ServiceAccounts(ns).CreateToken(ctx, "ci", &authnv1.TokenRequest{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tokenKC := filepath.Join(t.TempDir(), "token.kubeconfig")
	if err := chartinstall.TokenKubeconfig(env.Config, tr.Status.Token, tokenKC); err != nil {
		t.Fatal(err)
	}
	if _, errOut, code := debug(tokenKC, "proxy-status"); code != 1 || !strings.Contains(errOut, `user "system:serviceaccount:`+ns+`:ci" may not get /debug/proxies`) {
		t.Errorf("proxy-status with an unbound token: exit %d: %s", code, errOut)
	}
}

func mustCreate(t *testing.T, objs ...client.Object) {
	t.Helper()
	for _, o := range objs {
		if err := env.Client.Create(context.Background(), o); err != nil {
			t.Fatalf("create %T %s: %v", o, o.GetName(), err)
		}
	}
}

func eventually(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// podToken is a token for the pod's ServiceAccount bound to the pod, as
// the kubelet projects it into a sidecar.
func podToken(t *testing.T, pod *corev1.Pod, sa string) string {
	t.Helper()
	var fresh corev1.Pod
	if err := env.Client.Get(context.Background(), client.ObjectKeyFromObject(pod), &fresh); err != nil {
		t.Fatal(err)
	}
	tr, err := kubernetes.NewForConfigOrDie(env.Config).CoreV1().ServiceAccounts(pod.Namespace).CreateToken(context.Background(), sa, &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
		Audiences: []string{"trellis"}, ExpirationSeconds: ptr.To(int64(600)),
		BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: fresh.Name, UID: fresh.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}

// TestProxyCheckResults: check's proxy lines fail on rejections, proxies
// not connected and certificates about to expire, and pass otherwise.
func TestProxyCheckResults(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	soon, later := now.Add(2*time.Minute), now.Add(12*time.Hour)
	healthy := proxyRow{ProxyStatus: xds.ProxyStatus{Namespace: "shop", Pod: "a", CertificateExpiry: &later}, States: map[string]string{"CDS": "SYNCED", "RDS": "SYNCED"}}
	var out strings.Builder
	if printChecks(&out, proxyResults(&statusReport{Proxies: []proxyRow{healthy}}, now)) {
		t.Errorf("a healthy proxy fails:\n%s", out.String())
	}
	wantLines(t, out.String(), "✔ proxies: 1 connected", "✔ no proxy rejected its configuration")
	sick := proxyRow{ProxyStatus: xds.ProxyStatus{Namespace: "shop", Pod: "b", CertificateExpiry: &soon}, States: map[string]string{"CDS": "SYNCED", "RDS": "NACKED"}}
	out.Reset()
	if !printChecks(&out, proxyResults(&statusReport{Proxies: []proxyRow{healthy, sick}, NotConnected: []string{"shop/c"}}, now)) {
		t.Errorf("a rejection, an unconnected pod and an expiring certificate pass:\n%s", out.String())
	}
	wantLines(t, out.String(), "✘ 1 injected pod connected to no controller replica: shop/c", "✘ 1 proxy rejections: shop/b (RDS)", "✘ 1 proxies' certificates expire within 5 minutes: shop/b")
}
