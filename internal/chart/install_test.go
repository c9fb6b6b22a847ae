package chart_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"helm.sh/helm/v4/pkg/action"
	"helm.sh/helm/v4/pkg/kube"
	releasecommon "helm.sh/helm/v4/pkg/release/common"
	releasev1 "helm.sh/helm/v4/pkg/release/v1"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

var trellisCRDs = []string{
	"accesspolicies.mesh.trellis.dev", "backendpolicies.mesh.trellis.dev",
	"externalservices.mesh.trellis.dev", "meshconfigs.mesh.trellis.dev",
}

func installer(t testing.TB, cfg *action.Configuration, ns string) *action.Install {
	inst := action.NewInstall(cfg)
	inst.Namespace, inst.ReleaseName = ns, "trellis"
	// Nothing runs pods here: do not wait for the Deployment to be ready.
	inst.WaitStrategy, inst.Timeout = kube.HookOnlyStrategy, 2*time.Minute
	return inst
}

func upgrader(cfg *action.Configuration, ns string) *action.Upgrade {
	up := action.NewUpgrade(cfg)
	up.Namespace = ns
	up.WaitStrategy, up.Timeout = kube.HookOnlyStrategy, 2*time.Minute
	return up
}

func uninstall(t testing.TB, cfg *action.Configuration) string {
	t.Helper()
	un := action.NewUninstall(cfg)
	un.WaitStrategy, un.Timeout = kube.HookOnlyStrategy, 2*time.Minute
	res, err := un.Run("trellis")
	if err != nil {
		t.Fatalf("uninstall: %v", err)
	}
	return res.Info
}

func get[T client.Object](t testing.TB, obj T, ns, name string) T {
	t.Helper()
	if err := env.Client.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, obj); err != nil {
		t.Fatalf("get %T %s: %v", obj, name, err)
	}
	return obj
}

// TestOnTheAPIServer runs the steps that change the apiserver in a fixed
// order. The install comes first because it must be Helm that creates the
// Trellis CRDs: this package's apiserver starts without them, and no step
// deletes CRDs (slow, and it stalled under load in CI).
func TestOnTheAPIServer(t *testing.T) {
	t.Run("InstallUpgradeUninstall", testInstallUpgradeUninstall)
	t.Run("RenderedManifestsApply", testRenderedManifestsApply)
	t.Run("ControllerRunsWithTheChartsRBAC", testControllerRunsWithTheChartsRBAC)
	t.Run("CertManagerServesTheWebhooks", testCertManagerServesTheWebhooks)
}

// testInstallUpgradeUninstall drives the chart through Helm's SDK against the
// real apiserver, as `helm install/upgrade/uninstall` would.
func testInstallUpgradeUninstall(t *testing.T) {
	ctx := context.Background()
	const ns = "trellis-helm"
	namespace(t, ns, nil)
	for _, n := range trellisCRDs {
		err := env.Client.Get(ctx, client.ObjectKey{Name: n}, &apiextensionsv1.CustomResourceDefinition{})
		if !apierrors.IsNotFound(err) {
			t.Fatalf("CRD %s exists before the install (%v): run this step first, on a fresh apiserver", n, err)
		}
	}
	cfg := helmConfig(t, ns)
	ch := loadChart(t)

	// Install with the default values.
	r, err := installer(t, cfg, ns).Run(ch, map[string]any{})
	if err != nil {
		t.Fatalf("install: %v", err)
	}
	rel := r.(*releasev1.Release)
	if rel.Info.Status != releasecommon.StatusDeployed || rel.Version != 1 {
		t.Fatalf("release %s revision %d", rel.Info.Status, rel.Version)
	}
	established(t, trellisCRDs...)
	if d := get(t, &appsv1.Deployment{}, ns, "trellis-controller"); *d.Spec.Replicas != 2 {
		t.Errorf("replicas %d, want 2", *d.Spec.Replicas)
	}
	m := get(t, &admissionv1.MutatingWebhookConfiguration{}, "", "trellis-injection")
	if *m.Webhooks[0].FailurePolicy != admissionv1.Fail {
		t.Errorf("injection failurePolicy %s, want Fail", *m.Webhooks[0].FailurePolicy)
	}
	get(t, &admissionv1.ValidatingWebhookConfiguration{}, "", "trellis-validation")
	get(t, &corev1.ServiceAccount{}, ns, "trellis-controller")
	get(t, &rbacv1.ClusterRoleBinding{}, "", "trellis-controller")
	get(t, &rbacv1.RoleBinding{}, ns, "trellis-controller")
	for _, s := range []string{"trellis-xds", "trellis-webhook", "trellis-metrics"} {
		get(t, &corev1.Service{}, ns, s)
	}
	get(t, &meshv1alpha1.MeshConfig{}, "", meshv1alpha1.MeshConfigName)

	// The controller keeps the webhooks' caBundle current; an upgrade must not
	// wipe it. Write one as the controller would.
	m.Webhooks[0].ClientConfig.CABundle = []byte("bundle written by the controller")
	if err := env.Client.Update(ctx, m, client.FieldOwner("trellis-controller")); err != nil {
		t.Fatal(err)
	}

	// Upgrade with a different failure policy and replica count.
	r, err = upgrader(cfg, ns).Run("trellis", ch, map[string]any{
		"controller": map[string]any{"replicas": 3},
		"webhooks":   map[string]any{"injection": map[string]any{"failurePolicy": "Ignore"}},
	})
	if err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	if rel = r.(*releasev1.Release); rel.Version != 2 || rel.Info.Status != releasecommon.StatusDeployed {
		t.Fatalf("after upgrade: release %s revision %d", rel.Info.Status, rel.Version)
	}
	if d := get(t, &appsv1.Deployment{}, ns, "trellis-controller"); *d.Spec.Replicas != 3 {
		t.Errorf("replicas after upgrade %d, want 3", *d.Spec.Replicas)
	}
	m = get(t, &admissionv1.MutatingWebhookConfiguration{}, "", "trellis-injection")
	if *m.Webhooks[0].FailurePolicy != admissionv1.Ignore {
		t.Errorf("injection failurePolicy after upgrade %s, want Ignore", *m.Webhooks[0].FailurePolicy)
	}
	if string(m.Webhooks[0].ClientConfig.CABundle) != "bundle written by the controller" {
		t.Errorf("upgrade replaced the caBundle with %q", m.Webhooks[0].ClientConfig.CABundle)
	}

	// A bad value is refused before anything changes.
	if _, err := upgrader(cfg, ns).Run("trellis", ch, map[string]any{"controller": map[string]any{"replicas": "3"}}); err == nil || !strings.Contains(err.Error(), "/controller/replicas") {
		t.Errorf("upgrade with replicas: \"3\" = %v, want a schema error naming /controller/replicas", err)
	}
	if d := get(t, &appsv1.Deployment{}, ns, "trellis-controller"); *d.Spec.Replicas != 3 {
		t.Errorf("a refused upgrade changed replicas to %d", *d.Spec.Replicas)
	}

	// Uninstall: everything goes but the CRDs and the MeshConfig.
	info := uninstall(t, cfg)
	for _, obj := range []client.Object{
		&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "trellis-controller"}},
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "trellis-controller"}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "trellis-xds"}},
		&rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "trellis-controller"}},
		&rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "trellis-controller"}},
		&admissionv1.MutatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: "trellis-injection"}},
		&admissionv1.ValidatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: "trellis-validation"}},
	} {
		gone(t, obj)
	}
	for _, n := range trellisCRDs {
		get(t, &apiextensionsv1.CustomResourceDefinition{}, "", n)
	}
	get(t, &meshv1alpha1.MeshConfig{}, "", meshv1alpha1.MeshConfigName)
	if !strings.Contains(info, "MeshConfig") {
		t.Errorf("uninstall does not report the kept MeshConfig: %q", info)
	}

	// Installing again adopts the kept MeshConfig.
	if _, err := installer(t, cfg, ns).Run(ch, map[string]any{"meshConfig": map[string]any{"spec": map[string]any{"mtls": map[string]any{"mode": "Permissive"}}}}); err != nil {
		t.Fatalf("install after uninstall: %v", err)
	}
	if mc := get(t, &meshv1alpha1.MeshConfig{}, "", meshv1alpha1.MeshConfigName); mc.Spec.MTLS.Mode != meshv1alpha1.MTLSPermissive {
		t.Errorf("reinstall did not update the kept MeshConfig: %+v", mc.Spec.MTLS)
	}
	uninstall(t, cfg)
	mc := &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: meshv1alpha1.MeshConfigName}}
	if err := env.Client.Delete(ctx, mc); err != nil {
		t.Fatal(err)
	}
	gone(t, mc)
}
