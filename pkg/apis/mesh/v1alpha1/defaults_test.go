package v1alpha1_test

import (
	"context"
	"testing"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
	"github.com/trellis-mesh/trellis/pkg/model"
)

// TestDefaultsAreTheCRDs: the model's defaulting (applied to objects that
// never met an apiserver: goldens, trellisctl analyze) gives, field by
// field, what the real apiserver stores for the same object from the CRDs'
// +kubebuilder:default markers. Each object sets every optional struct
// (empty) so that every nested default applies.
func TestDefaultsAreTheCRDs(t *testing.T) {
	ctx := context.Background()
	ns := env.Namespace(t, nil)
	stored := func(t *testing.T, obj client.Object, into client.Object) {
		t.Helper()
		if err := env.Client.Create(ctx, obj); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = env.Client.Delete(ctx, obj) })
		if err := env.Client.Get(ctx, client.ObjectKeyFromObject(obj), into); err != nil {
			t.Fatal(err)
		}
	}
	t.Run("BackendPolicy", func(t *testing.T) {
		spec := meshv1alpha1.BackendPolicySpec{
			TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: "reviews"}},
			// attempts has no omitempty: the one default the model cannot apply.
			Retries:          &meshv1alpha1.Retries{Attempts: 2},
			OutlierDetection: &meshv1alpha1.OutlierDetection{},
			LoadBalancer:     &meshv1alpha1.LoadBalancer{},
			RateLimit:        &meshv1alpha1.LocalRateLimit{Requests: 10},
		}
		var got meshv1alpha1.BackendPolicy
		stored(t, &meshv1alpha1.BackendPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "defaults"}, Spec: *spec.DeepCopy()}, &got)
		if d := cmp.Diff(got.Spec, model.BackendPolicyDefaults(spec)); d != "" {
			t.Errorf("model.BackendPolicyDefaults differs from the apiserver's defaults (-apiserver +model):\n%s", d)
		}
	})
	t.Run("AccessPolicy", func(t *testing.T) {
		spec := meshv1alpha1.AccessPolicySpec{
			TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: "reviews"}},
			Rules: []meshv1alpha1.AccessRule{{
				From: []meshv1alpha1.AccessSource{{Namespace: ptr.To("demo")}},
				To:   []meshv1alpha1.AccessOperation{{Paths: []meshv1alpha1.PathMatch{{Value: "/api"}}}},
			}},
		}
		var got meshv1alpha1.AccessPolicy
		stored(t, &meshv1alpha1.AccessPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "defaults"}, Spec: *spec.DeepCopy()}, &got)
		if d := cmp.Diff(got.Spec, model.AccessPolicyDefaults(spec)); d != "" {
			t.Errorf("model.AccessPolicyDefaults differs from the apiserver's defaults (-apiserver +model):\n%s", d)
		}
	})
	for _, tc := range []struct {
		name string
		spec meshv1alpha1.MeshConfigSpec
	}{
		{"MeshConfig", meshv1alpha1.MeshConfigSpec{AccessLog: &meshv1alpha1.AccessLog{}, Tracing: &meshv1alpha1.Tracing{Collector: "otel.observability:4317"}}},
		{"MeshConfig with cert-manager", meshv1alpha1.MeshConfigSpec{Issuer: meshv1alpha1.Issuer{Type: meshv1alpha1.IssuerCertManager, CertManager: &meshv1alpha1.CertManagerIssuer{IssuerRef: meshv1alpha1.IssuerReference{Name: "ca"}}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got meshv1alpha1.MeshConfig
			mc := &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: meshv1alpha1.MeshConfigName}, Spec: *tc.spec.DeepCopy()}
			stored(t, mc, &got)
			if d := cmp.Diff(got.Spec, model.Defaults(tc.spec)); d != "" {
				t.Errorf("model.Defaults differs from the apiserver's defaults (-apiserver +model):\n%s", d)
			}
			if err := env.Client.Delete(ctx, mc); err != nil {
				t.Fatal(err)
			}
		})
	}
}
