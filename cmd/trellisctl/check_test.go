package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/trellis-mesh/trellis/internal/testenv"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/controller"
	"github.com/trellis-mesh/trellis/pkg/inject"
)

var env *testenv.Env

func TestMain(m *testing.M) { testenv.Main(m, &env) }

// kubeconfig writes a kubeconfig for a user of the test apiserver.
func kubeconfig(t *testing.T, user envtest.User) string {
	t.Helper()
	u, err := env.Environment().AddUser(user, &rest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := u.KubeConfig()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func wantLines(t *testing.T, out string, lines ...string) {
	t.Helper()
	for _, l := range lines {
		if !strings.Contains(out, l) {
			t.Errorf("output lacks %q:\n%s", l, out)
		}
	}
}

// TestCheckPre runs check --pre against a real apiserver as an
// administrator and as a user who may create nothing.
func TestCheckPre(t *testing.T) {
	admin := kubeconfig(t, envtest.User{Name: "admin", Groups: []string{"system:masters"}})
	code, out, errOut := trellisctl(t, "", "check", "--pre", "--kubeconfig", admin)
	if code != 0 {
		t.Errorf("as an administrator: exit %d\n%s%s", code, out, errOut)
	}
	t.Logf("trellisctl check --pre:\n%s", out)
	wantLines(t, out, "✔ Kubernetes 1.", "native sidecars", "✔ admission webhooks", "✔ Gateway API CRD httproutes installed (standard channel",
		"✔ you may create customresourcedefinitions.apiextensions.k8s.io", "all 11 checks passed")

	nobody := kubeconfig(t, envtest.User{Name: "nobody"})
	code, out, _ = trellisctl(t, "", "check", "--pre", "--kubeconfig", nobody)
	if code != 1 {
		t.Errorf("as a user without permissions: exit %d, want 1\n%s", code, out)
	}
	wantLines(t, out, "✘ you may not create clusterroles.rbac.authorization.k8s.io", "→ the chart creates them")
}

// TestCheckInstalled runs check against an installation made by hand:
// first missing pieces fail, then a healthy one passes with the warnings
// it should have.
func TestCheckInstalled(t *testing.T) {
	ctx := context.Background()
	admin := kubeconfig(t, envtest.User{Name: "admin", Groups: []string{"system:masters"}})
	ns := env.Namespace(t, nil)
	code, out, _ := trellisctl(t, "", "check", "--kubeconfig", admin, "-n", ns)
	if code != 1 {
		t.Errorf("nothing installed: exit %d, want 1", code)
	}
	wantLines(t, out, "✔ CRD meshconfigs.mesh.trellis.dev (stored: v1alpha1)", "✘ controller Deployment "+ns+"/trellis-controller", "✘ mesh root certificate", "✘ webhook configuration trellis-injection")

	c := env.Client
	dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "trellis-controller"}, Spec: appsv1.DeploymentSpec{
		Replicas: ptr.To[int32](2),
		Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "c"}},
		Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "c"}}, Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Image: "c"}}}},
	}}
	must(t, c.Create(ctx, dep))
	dep.Status = appsv1.DeploymentStatus{Replicas: 2, ReadyReplicas: 2}
	must(t, c.Status().Update(ctx, dep))
	must(t, c.Create(ctx, &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "trellis-controller.mesh.trellis.dev"}, Spec: coordinationv1.LeaseSpec{
		HolderIdentity: ptr.To("trellis-controller-abc_1"), LeaseDurationSeconds: ptr.To[int32](15), RenewTime: &metav1.MicroTime{Time: time.Now()},
	}}))
	root, err := ca.NewSelfSigned("cluster.local", 365*24*time.Hour, clock.RealClock{})
	if err != nil {
		t.Fatal(err)
	}
	bundle := map[string]string{controller.RootCAKey: string(root.RootPEM())}
	must(t, c.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: controller.RootCAConfigMap}, Data: bundle}))
	meshed := env.Namespace(t, map[string]string{"trellis.dev/inject": "enabled"})
	must(t, c.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: meshed, Name: controller.RootCAConfigMap}, Data: bundle}))
	// Created before the injection webhook is registered: no sidecar.
	must(t, c.Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: meshed, Name: "old"}, Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app"}}}}))
	// The injection webhook is the real handler (pkg/inject) on a
	// certificate of the root; the validating one never matches here.
	injector := injectionServer(t, root)
	cc := admissionregistrationv1.WebhookClientConfig{URL: ptr.To(injector.URL + inject.WebhookPath), CABundle: root.RootPEM()}
	mwc := &admissionregistrationv1.MutatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: "trellis-injection"}, Webhooks: []admissionregistrationv1.MutatingWebhook{{
		Name: "inject.trellis.dev", ClientConfig: cc, FailurePolicy: ptr.To(admissionregistrationv1.Fail),
		NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"trellis.dev/inject": "enabled"}},
		Rules: []admissionregistrationv1.RuleWithOperations{{Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Create},
			Rule: admissionregistrationv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"pods"}}}},
		SideEffects: ptr.To(admissionregistrationv1.SideEffectClassNone), AdmissionReviewVersions: []string{"v1"},
	}}}
	never := &metav1.LabelSelector{MatchLabels: map[string]string{"never": "matches"}}
	vwc := &admissionregistrationv1.ValidatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: "trellis-validation"}, Webhooks: []admissionregistrationv1.ValidatingWebhook{{
		Name: "validate.trellis.dev", ClientConfig: cc, NamespaceSelector: never, FailurePolicy: ptr.To(admissionregistrationv1.Ignore),
		SideEffects: ptr.To(admissionregistrationv1.SideEffectClassNone), AdmissionReviewVersions: []string{"v1"},
	}}}
	must(t, c.Create(ctx, mwc))
	must(t, c.Create(ctx, vwc))
	t.Cleanup(func() { _ = c.Delete(ctx, mwc); _ = c.Delete(ctx, vwc) })
	ap := &meshv1alpha1.AccessPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: meshed, Name: "p"}, Spec: meshv1alpha1.AccessPolicySpec{
		TargetRefs: []meshv1alpha1.PolicyTargetReference{{Kind: "Service", Name: "gone"}}, Action: meshv1alpha1.AccessAllow,
		Rules: []meshv1alpha1.AccessRule{{From: []meshv1alpha1.AccessSource{{Namespace: ptr.To("*")}}}},
	}}
	must(t, c.Create(ctx, ap))
	ap.Status.Conditions = []metav1.Condition{{Type: meshv1alpha1.ConditionResolvedRefs, Status: metav1.ConditionFalse, Reason: meshv1alpha1.ReasonTargetNotFound, Message: "Service gone does not exist", LastTransitionTime: metav1.Now()}}
	must(t, c.Status().Update(ctx, ap))

	code, out, _ = trellisctl(t, "", "check", "--kubeconfig", admin, "-n", ns)
	if code != 0 {
		t.Errorf("healthy installation: exit %d, want 0\n%s", code, out)
	}
	t.Logf("trellisctl check on a healthy installation:\n%s", out)
	wantLines(t, out, "✔ controller: 2 of 2 replicas ready", "✔ leader: trellis-controller-abc_1", "✔ mesh root certificate", "expires in 364 days",
		"✔ webhook trellis-injection: caBundle set and valid", "✔ webhook trellis-validation: caBundle set and valid",
		"! 1 pod in meshed namespaces has no sidecar: "+meshed+"/old", "kubectl rollout restart",
		"! 1 Trellis object reports a problem: AccessPolicy "+meshed+"/p: Service gone does not exist", "✔ injection webhook answers: a dry-run pod in "+meshed+" gets its sidecar",
		"! proxies: cannot read the controller's debug API: no running controller pod with a metrics port in "+ns, "all 14 checks passed, 3 with a warning")
	if n := len(podsIn(t, meshed)); n != 1 {
		t.Errorf("the dry run left a pod: %d pods", n)
	}

	code, out, _ = trellisctl(t, "", "check", "--kubeconfig", admin, "-n", ns, "-o", "json")
	var structured struct {
		Checks []structuredCheck `json:"checks"`
	}
	if err := json.Unmarshal([]byte(out), &structured); code != 0 || err != nil || len(structured.Checks) != 14 || structured.Checks[0].Status != "ok" {
		t.Errorf("check -o json: exit %d, %v:\n%s", code, err, out)
	}

	// The webhook stops answering: pods in meshed namespaces cannot be created.
	injector.Close()
	code, out, _ = trellisctl(t, "", "check", "--kubeconfig", admin, "-n", ns)
	if code != 1 {
		t.Errorf("webhook down: exit %d, want 1", code)
	}
	wantLines(t, out, "✘ injection webhook does not answer: ", "failed calling webhook", "failurePolicy Fail")

	// A stale Lease and a lost replica.
	dep.Status.ReadyReplicas = 0
	must(t, c.Status().Update(ctx, dep))
	code, out, _ = trellisctl(t, "", "check", "--kubeconfig", admin, "-n", ns)
	if code != 1 {
		t.Errorf("no replica ready: exit %d, want 1", code)
	}
	wantLines(t, out, "✘ controller: 0 of 2 replicas ready", "injection fails closed")
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// injectionServer serves the injection webhook's real handler over TLS
// with a certificate of root for 127.0.0.1.
func injectionServer(t *testing.T, root *ca.Authority) *httptest.Server {
	t.Helper()
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	cert := &ca.ServingCertificate{Names: []string{"127.0.0.1"}, Lifetime: time.Hour, Signer: func() *ca.Authority { return root }}
	if _, err := cert.IssueNow(); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(&webhook.Admission{Handler: &inject.Webhook{
		Decoder: admission.NewDecoder(scheme),
		Config: func() inject.Config {
			return inject.Config{InitImage: "trellis-init", XDSHost: "trellis-xds.trellis-system.svc", XDSPort: 15012}
		},
	}})
	// httptest adds its own certificate unless one is set, and serves it
	// to clients that send no SNI (the apiserver calling an IP).
	c, err := cert.GetCertificate(&tls.ClientHelloInfo{})
	if err != nil {
		t.Fatal(err)
	}
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{*c}, MinVersion: tls.VersionTLS12}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

func podsIn(t *testing.T, ns string) []corev1.Pod {
	t.Helper()
	var pods corev1.PodList
	if err := env.Client.List(context.Background(), &pods, client.InNamespace(ns)); err != nil {
		t.Fatal(err)
	}
	return pods.Items
}
