package chart_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	appsv1 "k8s.io/api/apps/v1"
	authnv1 "k8s.io/api/authentication/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/clock"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	admissionv1 "k8s.io/api/admissionregistration/v1"

	"github.com/trellis-mesh/trellis/internal/chartinstall"
	"github.com/trellis-mesh/trellis/internal/testgen"
	"github.com/trellis-mesh/trellis/internal/xdsclient"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/controller"
	"github.com/trellis-mesh/trellis/pkg/xds"
)

// syncBuffer collects the controller's output.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func saToken(t testing.TB, ns, sa string, audiences []string, pod *corev1.Pod) string {
	t.Helper()
	cs := kubernetes.NewForConfigOrDie(env.Config)
	spec := authnv1.TokenRequestSpec{Audiences: audiences, ExpirationSeconds: new(int64(3600))}
	if pod != nil {
		spec.BoundObjectRef = &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), sa, &authnv1.TokenRequest{Spec: spec}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest for %s/%s: %v", ns, sa, err)
	}
	return tr.Status.Token
}

// buildController builds cmd/trellis-controller.
func buildController(t testing.TB) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "trellis-controller")
	cmd := exec.Command("go", "build", "-o", out, "./cmd/trellis-controller")
	cmd.Dir = env.Root
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	return out
}

// controllerRun is trellis-controller running as the chart's ServiceAccount
// with the chart's arguments.
type controllerRun struct {
	ports  map[string]int
	logs   *syncBuffer
	exited chan error
}

// startController runs bin with the container arguments of the chart
// installed in ns — listeners moved to free loopback ports (several test
// processes share this host), plus extra — authenticated only by a
// TokenRequest token of the chart's ServiceAccount, and waits until it is
// ready. It is stopped when the test ends.
func startController(t *testing.T, bin, ns string, extra map[string]string) *controllerRun {
	t.Helper()
	ctx := context.Background()
	c := &controllerRun{ports: map[string]int{}, logs: &syncBuffer{}, exited: make(chan error, 1)}
	overrides := map[string]string{}
	for _, flag := range []string{"--xds-address", "--webhook-bind-address", "--metrics-bind-address", "--health-probe-bind-address"} {
		c.ports[flag] = freePort(t)
		overrides[flag] = fmt.Sprintf("127.0.0.1:%d", c.ports[flag])
	}
	maps.Copy(overrides, extra)
	args, err := chartinstall.ControllerArgs(ctx, env.Config, ns, overrides)
	must(t, err)
	token, err := chartinstall.ServiceAccountToken(ctx, env.Config, ns, chartinstall.ServiceAccount, time.Hour)
	must(t, err)
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+kubeconfig(t, token), "POD_NAMESPACE="+ns)
	cmd.Stdout, cmd.Stderr = c.logs, c.logs
	must(t, cmd.Start())
	go func() { c.exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.exited:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-c.exited
		}
		if t.Failed() {
			t.Logf("controller output:\n%s", c.logs.String())
		}
	})
	eventually(t, "the controller to be ready", func() (bool, error) {
		if err := c.alive(); err != nil {
			t.Fatal(err)
		}
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", c.ports["--health-probe-bind-address"]))
		if err != nil {
			return false, err
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, fmt.Errorf("readyz %d", resp.StatusCode)
	})
	return c
}

func (c *controllerRun) alive() error {
	select {
	case err := <-c.exited:
		c.exited <- err
		return fmt.Errorf("controller exited: %v", err)
	default:
		return nil
	}
}

// check fails the test if the controller exited or was refused anything.
func (c *controllerRun) check(t *testing.T) {
	t.Helper()
	if err := c.alive(); err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(c.logs.String(), "\n") {
		if strings.Contains(l, "forbidden") {
			t.Errorf("the controller was refused something: %s", l)
		}
	}
}

// installForController installs the chart with values into a new namespace
// ns (uninstalled, with its MeshConfig, when the test ends) and returns the
// controller binary to run under it.
func installForController(t *testing.T, ns string, values map[string]any) string {
	t.Helper()
	namespace(t, ns, nil)
	bin := buildController(t)
	cfg := helmConfig(t, ns)
	if _, err := installer(t, cfg, ns).Run(loadChart(t), values); err != nil {
		t.Fatalf("install: %v", err)
	}
	t.Cleanup(func() {
		uninstall(t, cfg)
		_ = env.Client.Delete(context.Background(), &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: meshv1alpha1.MeshConfigName}})
	})
	return bin
}

// waitLeader waits until a controller holds the Lease in ns.
func waitLeader(t *testing.T, ns string) {
	t.Helper()
	eventually(t, "the leader election Lease", func() (bool, error) {
		var l coordinationv1.Lease
		err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: "trellis-controller.mesh.trellis.dev"}, &l)
		return err == nil && l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity != "", err
	})
}

// testControllerRunsWithTheChartsRBAC is the RBAC proof: the controller
// process runs with the token of the chart's ServiceAccount and nothing else,
// with the chart's arguments, and does its whole job — leader election,
// root CA, webhook caBundles, status on routes and policies, the root-CA
// ConfigMap, authenticated xDS with SDS certificates, authorized metrics. A
// missing permission fails a step, and any "forbidden" the controller logs
// fails the test. (Run by TestOnTheAPIServer.)
func testControllerRunsWithTheChartsRBAC(t *testing.T) {
	ctx := context.Background()
	const ns = "trellis-rbac"
	bin := installForController(t, ns, map[string]any{})
	rootCA := filepath.Join(t.TempDir(), "root.pem")

	// The workloads, created before their namespace is meshed (nothing
	// serves the chart's injection webhook in this test).
	app := "rbac-app"
	namespace(t, app, nil)
	frontend := testgen.Pod(app, "frontend-1", testgen.WithServiceAccount("frontend"), testgen.WithIP("127.0.8.10"))
	reviews := testgen.Pod(app, "reviews-1", testgen.WithServiceAccount("reviews"), testgen.WithIP("10.244.8.21"))
	for _, sa := range []string{"frontend", "reviews"} {
		must(t, env.Client.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: app, Name: sa}}))
	}
	for _, p := range []*corev1.Pod{frontend, reviews} {
		status := p.Status
		must(t, env.Client.Create(ctx, p))
		p.Status = status
		must(t, env.Client.Status().Update(ctx, p))
	}
	must(t, env.Client.Create(ctx, testgen.Service(app, "reviews", "", testgen.Port("http", 9080, 8080))))
	must(t, env.Client.Create(ctx, testgen.EndpointSlice(app, "reviews", "reviews-a", "http", 8080, testgen.Endpoint{IP: "10.244.8.21", Pod: "reviews-1"})))
	kind := gwv1.Kind("Service")
	route := &gwv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Namespace: app, Name: "reviews"},
		Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: new(gwv1.Group("")), Kind: &kind, Name: "reviews"}}},
			Rules:           []gwv1.HTTPRouteRule{{BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: "reviews", Port: new(gwv1.PortNumber(9080))}}}}}},
		},
	}
	must(t, env.Client.Create(ctx, route))
	policy := &meshv1alpha1.AccessPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: app, Name: "reviews"},
		Spec: meshv1alpha1.AccessPolicySpec{
			TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: "reviews"}},
			Rules:      []meshv1alpha1.AccessRule{{From: []meshv1alpha1.AccessSource{{ServiceAccount: &meshv1alpha1.ServiceAccountReference{Name: "frontend"}}}}},
		},
	}
	must(t, env.Client.Create(ctx, policy))

	c := startController(t, bin, ns, map[string]string{"--xds-root-ca-out": rootCA})
	ports := c.ports

	waitLeader(t, ns)
	get(t, &corev1.Secret{}, ns, ca.RootSecretName)
	eventually(t, "the webhooks' caBundle", func() (bool, error) {
		var m admissionv1.MutatingWebhookConfiguration
		var v admissionv1.ValidatingWebhookConfiguration
		if err := env.Client.Get(ctx, client.ObjectKey{Name: "trellis-injection"}, &m); err != nil {
			return false, err
		}
		if err := env.Client.Get(ctx, client.ObjectKey{Name: "trellis-validation"}, &v); err != nil {
			return false, err
		}
		return len(m.Webhooks[0].ClientConfig.CABundle) > 0 && len(v.Webhooks[0].ClientConfig.CABundle) > 0, nil
	})
	eventually(t, "the HTTPRoute's status", func() (bool, error) {
		var r gwv1.HTTPRoute
		err := env.Client.Get(ctx, client.ObjectKeyFromObject(route), &r)
		return err == nil && len(r.Status.Parents) == 1 && meta.IsStatusConditionTrue(r.Status.Parents[0].Conditions, "Accepted"), err
	})
	eventually(t, "the AccessPolicy's status", func() (bool, error) {
		var p meshv1alpha1.AccessPolicy
		err := env.Client.Get(ctx, client.ObjectKeyFromObject(policy), &p)
		return err == nil && meta.IsStatusConditionTrue(p.Status.Conditions, "Accepted"), err
	})

	// Meshing the namespace publishes the root certificate there.
	var appNS corev1.Namespace
	must(t, env.Client.Get(ctx, client.ObjectKey{Name: app}, &appNS))
	appNS.Labels["trellis.dev/inject"] = "enabled"
	must(t, env.Client.Update(ctx, &appNS))
	eventually(t, "the trellis-root-ca ConfigMap", func() (bool, error) {
		var cm corev1.ConfigMap
		err := env.Client.Get(ctx, client.ObjectKey{Namespace: app, Name: controller.RootCAConfigMap}, &cm)
		return err == nil && cm.Data["root-cert.pem"] != "", err
	})

	// A proxy authenticates (TokenReview, Pod lookup), gets its config and
	// its certificate (the CA signs with the root from the Secret).
	rootPEM, err := os.ReadFile(rootCA)
	must(t, err)
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(rootPEM) {
		t.Fatal("no root certificate written")
	}
	must(t, env.Client.Get(ctx, client.ObjectKeyFromObject(frontend), frontend))
	conn, err := xdsclient.Dial(fmt.Sprintf("127.0.0.1:%d", ports["--xds-address"]), &tls.Config{RootCAs: pool, ServerName: "localhost"},
		saToken(t, app, "frontend", []string{"trellis"}, frontend), frontend.Status.PodIP)
	must(t, err)
	defer conn.Close()
	xctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	node := xds.NodeID{Type: "sidecar", IP: frontend.Status.PodIP, Pod: frontend.Name, Namespace: app}.String()
	xc, err := xdsclient.Start(xctx, conn, node, false)
	must(t, err)
	cluster := "outbound|9080||reviews." + app + ".svc.cluster.local"
	if err := xc.WaitFor(xctx, func(res map[string]map[string]proto.Message, _ map[string]int) bool {
		return res[resource.ClusterType][cluster] != nil && res[resource.EndpointType][cluster] != nil && len(res[resource.SecretType]) == 2
	}); err != nil {
		t.Fatalf("proxy config and certificates: %v", err)
	}

	// Secure metrics: a token bound to trellis-metrics-reader reads them
	// (TokenReview + SubjectAccessReview by the controller); others may not.
	for _, sa := range []string{"scraper", "stranger"} {
		must(t, env.Client.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: sa}}))
	}
	crb := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "trellis-rbac-test-scraper"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "trellis-metrics-reader"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: ns, Name: "scraper"}},
	}
	must(t, env.Client.Create(ctx, crb))
	t.Cleanup(func() { _ = env.Client.Delete(context.Background(), crb) })
	scrape := func(tok string) int {
		req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("https://127.0.0.1:%d/metrics", ports["--metrics-bind-address"]), nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		// The metrics endpoint's certificate is self-signed.
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}, Timeout: 10 * time.Second}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("scrape: %v", err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	scraper, stranger := saToken(t, ns, "scraper", nil, nil), saToken(t, ns, "stranger", nil, nil)
	eventually(t, "an authorized scrape", func() (bool, error) { return scrape(scraper) == http.StatusOK, nil })
	if code := scrape(stranger); code != http.StatusForbidden {
		t.Errorf("scrape without trellis-metrics-reader: %d, want 403", code)
	}

	// cert-manager as the workload issuer: the controller creates
	// CertificateRequests in its namespace, reads them back and deletes them
	// (the test plays cert-manager's approver and a CA issuer).
	issuer, err := ca.NewSelfSigned("cluster.local", time.Hour, clock.RealClock{})
	must(t, err)
	ictx, icancel := context.WithCancel(ctx)
	defer icancel()
	go testgen.PlayCertManagerIssuer(ictx, env.Client, ns, "mesh-ca", issuer)
	mc := get(t, &meshv1alpha1.MeshConfig{}, "", meshv1alpha1.MeshConfigName)
	mc.Spec.Issuer = meshv1alpha1.Issuer{Type: meshv1alpha1.IssuerCertManager, CertManager: &meshv1alpha1.CertManagerIssuer{IssuerRef: meshv1alpha1.IssuerReference{Name: "mesh-ca", Kind: "ClusterIssuer"}}}
	must(t, env.Client.Update(ctx, mc))
	// The namespace is meshed now and nothing serves the chart's webhook
	// here: the pod opts out of injection (the webhook's objectSelector).
	frontend2 := testgen.Pod(app, "frontend-2", testgen.WithServiceAccount("frontend"), testgen.WithIP("127.0.8.11"), testgen.WithLabel("trellis.dev/inject", "disabled"))
	status := frontend2.Status
	must(t, env.Client.Create(ctx, frontend2))
	frontend2.Status = status
	must(t, env.Client.Status().Update(ctx, frontend2))
	issuerPool := x509.NewCertPool()
	issuerPool.AddCert(issuer.Root())
	eventually(t, "an SVID signed through cert-manager", func() (bool, error) {
		conn, err := xdsclient.Dial(fmt.Sprintf("127.0.0.1:%d", ports["--xds-address"]), &tls.Config{RootCAs: pool, ServerName: "localhost"},
			saToken(t, app, "frontend", []string{"trellis"}, frontend2), frontend2.Status.PodIP)
		if err != nil {
			return false, err
		}
		defer conn.Close()
		cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		node := xds.NodeID{Type: "sidecar", IP: frontend2.Status.PodIP, Pod: frontend2.Name, Namespace: app}.String()
		c, err := xdsclient.Start(cctx, conn, node, false)
		if err != nil {
			return false, err
		}
		var leaf *x509.Certificate
		err = c.WaitFor(cctx, func(res map[string]map[string]proto.Message, _ map[string]int) bool {
			sec, ok := res[resource.SecretType]["default"].(*tlsv3.Secret)
			if !ok {
				return false
			}
			block, _ := pem.Decode(sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
			if block == nil {
				return false
			}
			leaf, _ = x509.ParseCertificate(block.Bytes)
			return leaf != nil
		})
		if err != nil {
			return false, err
		}
		_, err = leaf.Verify(x509.VerifyOptions{Roots: issuerPool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
		return err == nil, err
	})
	eventually(t, "the CertificateRequests to be cleaned up", func() (bool, error) {
		var crs cmapi.CertificateRequestList
		err := env.Client.List(ctx, &crs, client.InNamespace(ns))
		return err == nil && len(crs.Items) == 0, err
	})

	c.check(t)
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// testCertManagerServesTheWebhooks: with certManager.enabled the controller
// serves the webhooks with the certificate cert-manager writes into the
// Secret the chart mounts, and leaves caBundle to cert-manager's CA
// injector. The test plays both: it signs the chart Certificate's names with
// its own CA into the directory that stands in for the mount, and writes that
// CA into the configurations the injector annotation names. (Run by
// TestOnTheAPIServer.)
func testCertManagerServesTheWebhooks(t *testing.T) {
	ctx := context.Background()
	const ns = "trellis-certmanager"
	bin := installForController(t, ns, map[string]any{"certManager": map[string]any{"enabled": true}})

	// The Deployment mounts the Certificate's Secret where --webhook-cert-dir points.
	cert := get(t, &cmapi.Certificate{}, ns, "trellis-webhook")
	d := get(t, &appsv1.Deployment{}, ns, chartinstall.Deployment)
	var certDir string
	for _, a := range d.Spec.Template.Spec.Containers[0].Args {
		if v, ok := strings.CutPrefix(a, "--webhook-cert-dir="); ok {
			certDir = v
		}
	}
	mounted := false
	for _, vol := range d.Spec.Template.Spec.Volumes {
		if vol.Secret != nil && vol.Secret.SecretName == cert.Spec.SecretName {
			for _, m := range d.Spec.Template.Spec.Containers[0].VolumeMounts {
				mounted = mounted || (m.Name == vol.Name && m.MountPath == certDir)
			}
		}
	}
	if certDir == "" || !mounted {
		t.Fatalf("the controller is not given the Secret %s as --webhook-cert-dir (%q)", cert.Spec.SecretName, certDir)
	}

	// cert-manager's part.
	issuer, err := ca.NewSelfSigned("cluster.local", time.Hour, clock.RealClock{})
	must(t, err)
	issued, err := issuer.IssueServing(cert.Spec.DNSNames, time.Hour)
	must(t, err)
	dir := t.TempDir()
	must(t, os.WriteFile(filepath.Join(dir, "tls.crt"), issued.CertPEM, 0o600))
	must(t, os.WriteFile(filepath.Join(dir, "tls.key"), issued.KeyPEM, 0o600))
	// The CA injector's part.
	var m admissionv1.MutatingWebhookConfiguration
	var v admissionv1.ValidatingWebhookConfiguration
	must(t, env.Client.Get(ctx, client.ObjectKey{Name: "trellis-injection"}, &m))
	must(t, env.Client.Get(ctx, client.ObjectKey{Name: "trellis-validation"}, &v))
	for _, a := range []map[string]string{m.Annotations, v.Annotations} {
		if a["cert-manager.io/inject-ca-from"] != ns+"/trellis-webhook" {
			t.Fatalf("inject-ca-from = %q, want %s/trellis-webhook", a["cert-manager.io/inject-ca-from"], ns)
		}
	}
	m.Webhooks[0].ClientConfig.CABundle = issuer.RootPEM()
	v.Webhooks[0].ClientConfig.CABundle = issuer.RootPEM()
	must(t, env.Client.Update(ctx, &m, client.FieldOwner("cert-manager-cainjector")))
	must(t, env.Client.Update(ctx, &v, client.FieldOwner("cert-manager-cainjector")))

	c := startController(t, bin, ns, map[string]string{"--webhook-cert-dir": dir})
	pool := x509.NewCertPool()
	pool.AddCert(issuer.Root())
	conn, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", c.ports["--webhook-bind-address"]), &tls.Config{RootCAs: pool, ServerName: "trellis-webhook." + ns + ".svc"})
	if err != nil {
		t.Fatalf("the webhook does not serve the cert-manager certificate: %v", err)
	}
	conn.Close()

	// The leader would sync caBundle at once; after it leads, the injector's
	// CA must still be there.
	waitLeader(t, ns)
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		must(t, env.Client.Get(ctx, client.ObjectKey{Name: "trellis-injection"}, &m))
		must(t, env.Client.Get(ctx, client.ObjectKey{Name: "trellis-validation"}, &v))
		if !bytes.Equal(m.Webhooks[0].ClientConfig.CABundle, issuer.RootPEM()) || !bytes.Equal(v.Webhooks[0].ClientConfig.CABundle, issuer.RootPEM()) {
			t.Fatal("the controller replaced the caBundle cert-manager's CA injector owns")
		}
	}
	c.check(t)
}
