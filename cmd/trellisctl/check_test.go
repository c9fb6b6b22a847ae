package main

import (
	"context"
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
	"k8s.io/client-go/rest"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/trellis-mesh/trellis/internal/testenv"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/controller"
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
	// Webhooks that never match anything here (and would be ignored).
	never := &metav1.LabelSelector{MatchLabels: map[string]string{"never": "matches"}}
	cc := admissionregistrationv1.WebhookClientConfig{URL: ptr.To("https://127.0.0.1:1/x"), CABundle: root.RootPEM()}
	mwc := &admissionregistrationv1.MutatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: "trellis-injection"}, Webhooks: []admissionregistrationv1.MutatingWebhook{{
		Name: "inject.trellis.dev", ClientConfig: cc, NamespaceSelector: never, FailurePolicy: ptr.To(admissionregistrationv1.Ignore),
		SideEffects: ptr.To(admissionregistrationv1.SideEffectClassNone), AdmissionReviewVersions: []string{"v1"},
	}}}
	vwc := &admissionregistrationv1.ValidatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: "trellis-validation"}, Webhooks: []admissionregistrationv1.ValidatingWebhook{{
		Name: "validate.trellis.dev", ClientConfig: cc, NamespaceSelector: never, FailurePolicy: ptr.To(admissionregistrationv1.Ignore),
		SideEffects: ptr.To(admissionregistrationv1.SideEffectClassNone), AdmissionReviewVersions: []string{"v1"},
	}}}
	must(t, c.Create(ctx, mwc))
	must(t, c.Create(ctx, vwc))
	t.Cleanup(func() { _ = c.Delete(ctx, mwc); _ = c.Delete(ctx, vwc) })
	meshed := env.Namespace(t, map[string]string{"trellis.dev/inject": "enabled"})
	must(t, c.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: meshed, Name: controller.RootCAConfigMap}, Data: bundle}))
	must(t, c.Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: meshed, Name: "old"}, Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app"}}}}))
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
		"! 1 Trellis object reports a problem: AccessPolicy "+meshed+"/p: Service gone does not exist", "! proxies: cannot read the controller's debug API: no running controller pod with a metrics port in "+ns, "all 13 checks passed, 3 with a warning")

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
