package chart_test

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"helm.sh/helm/v4/pkg/action"
	"helm.sh/helm/v4/pkg/chart/v2/lint/support"
	"helm.sh/helm/v4/pkg/kube"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/trellis-mesh/trellis/internal/localcluster"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

var valueSets = []struct{ name, file string }{
	{"default", ""},
	{"all-on", "ci/all-on-values.yaml"},
}

func valuesOf(t testing.TB, file string) map[string]any {
	if file == "" {
		return readValues(t, "")
	}
	return readValues(t, filepath.Join(chartDir(), file))
}

func TestLint(t *testing.T) {
	for _, vs := range valueSets {
		t.Run(vs.name, func(t *testing.T) {
			l := action.NewLint()
			l.Strict = true
			l.Namespace = goldenNamespace
			res := l.Run([]string{chartDir()}, valuesOf(t, vs.file))
			for _, m := range res.Messages {
				if m.Severity > support.InfoSev {
					t.Errorf("lint: %s", m)
				}
			}
			for _, err := range res.Errors {
				t.Errorf("lint: %v", err)
			}
			if res.TotalChartsLinted != 1 {
				t.Errorf("linted %d charts", res.TotalChartsLinted)
			}
		})
	}
}

// TestTemplateGolden renders the chart like `helm template trellis
// charts/trellis -n trellis-system [-f ci/all-on-values.yaml]` and compares
// with testdata/<name>.yaml; -update rewrites them.
func TestTemplateGolden(t *testing.T) {
	for _, vs := range valueSets {
		t.Run(vs.name, func(t *testing.T) {
			rel, err := render(t, valuesOf(t, vs.file), goldenNamespace)
			if err != nil {
				t.Fatal(err)
			}
			golden(t, vs.name+".yaml", []byte(rel.Manifest+"\n---\n# NOTES.txt\n"+commentOut(rel.Info.Notes)))
		})
	}
}

func commentOut(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString(strings.TrimRight("# "+l, " ") + "\n")
	}
	return b.String()
}

// TestRenderedProperties checks what the design requires of the rendered
// objects, beyond "it is what it was" (the goldens).
func TestRenderedProperties(t *testing.T) {
	for _, vs := range valueSets {
		t.Run(vs.name, func(t *testing.T) {
			vals := valuesOf(t, vs.file)
			rel, err := render(t, vals, "mesh-control")
			if err != nil {
				t.Fatal(err)
			}
			objs := objects(t, rel.Manifest)
			for _, u := range objs {
				// One exception: reading the cluster's client CA is granted
				// where the apiserver publishes it (the built-in Role).
				if u.GetKind() == "RoleBinding" && u.GetName() == "trellis-controller-client-ca" && u.GetNamespace() == "kube-system" {
					continue
				}
				if ns := u.GetNamespace(); ns != "" && ns != "mesh-control" {
					t.Errorf("%s %s in namespace %q, want the release namespace", u.GetKind(), u.GetName(), ns)
				}
			}

			// Least privilege: no wildcard anywhere in the chart's RBAC.
			for _, u := range objs {
				if u.GetKind() != "ClusterRole" && u.GetKind() != "Role" {
					continue
				}
				var r rbacv1.ClusterRole
				if err := runtimeConvert(u, &r); err != nil {
					t.Fatal(err)
				}
				for _, rule := range r.Rules {
					for _, list := range [][]string{rule.APIGroups, rule.Resources, rule.Verbs, rule.NonResourceURLs} {
						if slices.Contains(list, "*") {
							t.Errorf("%s %s grants a wildcard: %+v", u.GetKind(), u.GetName(), rule)
						}
					}
				}
			}

			var d appsv1.Deployment
			find(t, objs, "Deployment", "trellis-controller", &d)
			pod := d.Spec.Template.Spec
			if sc := pod.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
				t.Errorf("pod securityContext %+v is not restricted", sc)
			}
			c := pod.Containers[0]
			if sc := c.SecurityContext; sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
				sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
				t.Errorf("container securityContext %+v is not restricted", sc)
			}
			if c.LivenessProbe == nil || c.ReadinessProbe == nil || c.Resources.Requests.Memory().IsZero() {
				t.Error("controller container lacks probes or resource requests")
			}
			if !slices.Contains(c.Args, "--leader-elect=true") {
				t.Errorf("leader election off: %v", c.Args)
			}
			if len(pod.TopologySpreadConstraints) != 1 {
				t.Errorf("topology spread constraints %v", pod.TopologySpreadConstraints)
			}
			if d.Spec.Template.Labels["trellis.dev/inject"] != "disabled" {
				t.Error("the control plane's pods are not opted out of injection")
			}
			if *d.Spec.Replicas > 1 {
				var pdb policyv1.PodDisruptionBudget
				find(t, objs, "PodDisruptionBudget", "trellis-controller", &pdb)
				if pdb.Spec.Selector.MatchLabels["app.kubernetes.io/component"] != "controller" {
					t.Errorf("PDB selector %v", pdb.Spec.Selector)
				}
			}

			excluded := func(sel *metav1.LabelSelector) []string {
				for _, e := range sel.MatchExpressions {
					if e.Key == "kubernetes.io/metadata.name" && e.Operator == "NotIn" {
						return e.Values
					}
				}
				return nil
			}
			var m admissionv1.MutatingWebhookConfiguration
			find(t, objs, "MutatingWebhookConfiguration", "trellis-injection", &m)
			var v admissionv1.ValidatingWebhookConfiguration
			find(t, objs, "ValidatingWebhookConfiguration", "trellis-validation", &v)
			for _, sel := range []*metav1.LabelSelector{m.Webhooks[0].NamespaceSelector, v.Webhooks[0].NamespaceSelector} {
				ex := excluded(sel)
				if !slices.Contains(ex, "mesh-control") || !slices.Contains(ex, "kube-system") {
					t.Errorf("webhook namespaceSelector excludes %v, want the release namespace and kube-system", ex)
				}
			}
			if m.Webhooks[0].NamespaceSelector.MatchLabels["trellis.dev/inject"] != "enabled" {
				t.Errorf("injection selects namespaces %v", m.Webhooks[0].NamespaceSelector)
			}
			wantPolicy := admissionv1.Fail
			if vs.name == "all-on" {
				wantPolicy = admissionv1.Ignore
			}
			if *m.Webhooks[0].FailurePolicy != wantPolicy {
				t.Errorf("injection failurePolicy %s, want %s", *m.Webhooks[0].FailurePolicy, wantPolicy)
			}
			for _, svc := range []*admissionv1.ServiceReference{m.Webhooks[0].ClientConfig.Service, v.Webhooks[0].ClientConfig.Service} {
				if svc == nil || svc.Name != "trellis-webhook" || svc.Namespace != "mesh-control" {
					t.Errorf("webhook service %+v", svc)
				}
			}
			certManager := vs.name == "all-on"
			if got := m.Annotations["cert-manager.io/inject-ca-from"] != ""; got != certManager {
				t.Errorf("CA injector annotation present = %v, want %v", got, certManager)
			}
			if got := slices.Contains(c.Args, "--webhook-cert-dir=/etc/trellis/webhook-tls"); got != certManager {
				t.Errorf("--webhook-cert-dir passed = %v, want %v", got, certManager)
			}

			var mc meshv1alpha1.MeshConfig
			find(t, objs, "MeshConfig", "default", &mc)
			if mc.Annotations["helm.sh/resource-policy"] != "keep" {
				t.Error("MeshConfig is not kept on uninstall")
			}
			if certManager && (mc.Spec.Issuer.Type != meshv1alpha1.IssuerCertManager || mc.Spec.Issuer.CertManager == nil || mc.Spec.Issuer.CertManager.IssuerRef.Name != "mesh-ca") {
				t.Errorf("cert-manager workload issuer not set: %+v", mc.Spec.Issuer)
			}
			var svc corev1.Service
			find(t, objs, "Service", "trellis-xds", &svc)
			if svc.Spec.Ports[0].TargetPort.StrVal != "grpc-xds" {
				t.Errorf("xDS Service targets %v", svc.Spec.Ports[0].TargetPort)
			}
			if !slices.Contains(c.Args, "--xds-service-host=trellis-xds.mesh-control.svc") {
				t.Errorf("proxies are not pointed at the xDS Service: %v", c.Args)
			}

			// Every listener binds an explicit address (#19 item 9): the pod
			// IP for what Services and probes reach; metrics on the pod's
			// interfaces (loopback is what kubectl port-forward dials).
			podIP := slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool {
				return e.Name == "POD_IP" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.podIP"
			})
			if !podIP {
				t.Errorf("POD_IP is not the pod's status.podIP: %v", c.Env)
			}
			for _, flag := range []string{"--xds-address", "--webhook-bind-address", "--health-probe-bind-address"} {
				if !slices.ContainsFunc(c.Args, func(a string) bool { return strings.HasPrefix(a, flag+"=[$(POD_IP)]:") }) {
					t.Errorf("%s does not bind the pod IP: %v", flag, c.Args)
				}
			}
		})
	}
}

// TestSchemaRejectsBadValues: a wrong type or an unknown key fails before
// anything is rendered, with the field's path in the message.
// TestWebhookURL: with webhooks.url (a controller outside the cluster, as
// make demo runs it) every webhook calls the URL with its own path and none
// names the Service (the apiserver refuses a clientConfig with both).
func TestWebhookURL(t *testing.T) {
	rel, err := render(t, map[string]any{"webhooks": map[string]any{"url": "https://127.0.0.1:19443/"}}, goldenNamespace)
	if err != nil {
		t.Fatal(err)
	}
	objs := objects(t, rel.Manifest)
	var m admissionv1.MutatingWebhookConfiguration
	find(t, objs, "MutatingWebhookConfiguration", "trellis-injection", &m)
	var v admissionv1.ValidatingWebhookConfiguration
	find(t, objs, "ValidatingWebhookConfiguration", "trellis-validation", &v)
	var got []string
	for _, w := range m.Webhooks {
		if w.ClientConfig.Service != nil || w.ClientConfig.URL == nil {
			t.Fatalf("webhook %s clientConfig %+v, want a URL only", w.Name, w.ClientConfig)
		}
		got = append(got, *w.ClientConfig.URL)
	}
	for _, w := range v.Webhooks {
		if w.ClientConfig.Service != nil || w.ClientConfig.URL == nil {
			t.Fatalf("webhook %s clientConfig %+v, want a URL only", w.Name, w.ClientConfig)
		}
		got = append(got, *w.ClientConfig.URL)
	}
	want := []string{"https://127.0.0.1:19443/inject", "https://127.0.0.1:19443/validate", "https://127.0.0.1:19443/validate"} // routes share the validating path
	if !slices.Equal(got, want) {
		t.Errorf("webhook URLs %q, want %q", got, want)
	}
}

func TestSchemaRejectsBadValues(t *testing.T) {
	for _, tc := range []struct {
		name string
		vals map[string]any
		want []string
	}{
		{"wrong type", map[string]any{"controller": map[string]any{"replicas": "two"}}, []string{"/controller/replicas", "want integer"}},
		{"unknown key", map[string]any{"controller": map[string]any{"replicaCount": 3}}, []string{"/controller", "replicaCount", "not allowed"}},
		{"unknown top-level key", map[string]any{"replicas": 3}, []string{"replicas", "not allowed"}},
		{"bad enum", map[string]any{"webhooks": map[string]any{"injection": map[string]any{"failurePolicy": "Never"}}}, []string{"/webhooks/injection/failurePolicy", "Fail", "Ignore"}},
		{"bad duration", map[string]any{"xds": map[string]any{"maxConnectionAge": "30 minutes"}}, []string{"/xds/maxConnectionAge"}},
		{"port out of range", map[string]any{"metrics": map[string]any{"port": 70000}}, []string{"/metrics/port"}},
		{"webhook URL with a path", map[string]any{"webhooks": map[string]any{"url": "https://10.0.0.1:9443/inject"}}, []string{"/webhooks/url"}},
		{"plain-HTTP webhook URL", map[string]any{"webhooks": map[string]any{"url": "http://10.0.0.1:9443"}}, []string{"/webhooks/url"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := render(t, tc.vals, goldenNamespace)
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
	// Cross-field rules the schema cannot express fail in the templates.
	_, err := render(t, map[string]any{"certManager": map[string]any{"enabled": true, "workloads": map[string]any{"issuerRef": map[string]any{"name": "ca"}}}, "meshConfig": map[string]any{"create": false}}, goldenNamespace)
	if err == nil || !strings.Contains(err.Error(), "meshConfig.create") {
		t.Errorf("cert-manager workloads without a rendered MeshConfig: %v", err)
	}
}

// apply server-side-applies objs as the chart's field manager.
func apply(ctx context.Context, objs []*unstructured.Unstructured, dryRun bool) error {
	for _, u := range objs {
		opts := []client.ApplyOption{client.FieldOwner("trellis-chart-test"), client.ForceOwnership}
		if dryRun {
			opts = append(opts, client.DryRunAll)
		}
		if err := env.Client.Apply(ctx, client.ApplyConfigurationFromUnstructured(u.DeepCopy()), opts...); err != nil {
			return fmt.Errorf("%s %s: %w", u.GetKind(), u.GetName(), err)
		}
	}
	return nil
}

// chartCRDs are the chart's crds/ directory, as Helm installs it first.
func chartCRDs(t testing.TB) []*unstructured.Unstructured {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(chartDir(), "crds", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("chart CRDs: %v (%d files)", err, len(files))
	}
	var objs []*unstructured.Unstructured
	for _, f := range files {
		o, err := localcluster.ReadManifests(f)
		if err != nil {
			t.Fatal(err)
		}
		objs = append(objs, o...)
	}
	return objs
}

func established(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		eventually(t, "CRD "+n+" established", func() (bool, error) {
			var crd apiextensionsv1.CustomResourceDefinition
			if err := env.Client.Get(context.Background(), client.ObjectKey{Name: n}, &crd); err != nil {
				return false, err
			}
			for _, c := range crd.Status.Conditions {
				if c.Type == apiextensionsv1.Established && c.Status == apiextensionsv1.ConditionTrue {
					return true, nil
				}
			}
			return false, nil
		})
	}
}

// testRenderedManifestsApply: Kubernetes itself validates every rendered
// object — server-side dry run first, then for real (TestOnTheAPIServer).
func testRenderedManifestsApply(t *testing.T) {
	ctx := context.Background()
	crds := chartCRDs(t)
	if err := apply(ctx, crds, false); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range crds {
		names = append(names, c.GetName())
	}
	established(t, names...)
	for _, vs := range valueSets {
		t.Run(vs.name, func(t *testing.T) {
			ns := "apply-" + vs.name
			namespace(t, ns, nil)
			rel, err := render(t, valuesOf(t, vs.file), ns)
			if err != nil {
				t.Fatal(err)
			}
			objs := objects(t, rel.Manifest)
			if err := apply(ctx, objs, true); err != nil {
				t.Fatalf("server-side dry run: %v", err)
			}
			// The dry run stored nothing.
			var d appsv1.Deployment
			if err := env.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: "trellis-controller"}, &d); !apierrors.IsNotFound(err) {
				t.Fatalf("dry run created the Deployment: %v", err)
			}
			if err := apply(ctx, objs, false); err != nil {
				t.Fatalf("apply: %v", err)
			}
			t.Cleanup(func() { deleteAll(t, objs) })
			for _, u := range objs {
				got := &unstructured.Unstructured{}
				got.SetGroupVersionKind(u.GroupVersionKind())
				if err := env.Client.Get(ctx, client.ObjectKeyFromObject(u), got); err != nil {
					t.Errorf("%s %s not stored: %v", u.GetKind(), u.GetName(), err)
				}
			}
			if err := env.Client.Get(ctx, client.ObjectKey{Namespace: ns, Name: "trellis-controller"}, &d); err != nil {
				t.Fatal(err)
			}
			want := map[string]int32{"default": 2, "all-on": 3}[vs.name]
			if *d.Spec.Replicas != want {
				t.Errorf("replicas %d, want %d", *d.Spec.Replicas, want)
			}
		})
	}
}

// deleteAll deletes objects and waits for them to go (cluster-scoped names
// are shared by the tests).
func deleteAll(t testing.TB, objs []*unstructured.Unstructured) {
	for _, u := range objs {
		if err := env.Client.Delete(context.Background(), u); err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete %s %s: %v", u.GetKind(), u.GetName(), err)
		}
	}
	for _, u := range objs {
		gone(t, u.DeepCopy())
	}
}

var _ = kube.HookOnlyStrategy
