package controller

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// validatorFixture is a new namespace with Service reviews and BackendPolicy
// first on it, and a Validator reading the apiserver.
func validatorFixture(t testing.TB, more ...client.Object) (string, *Validator) {
	t.Helper()
	ns := env.Namespace(t, nil)
	create(t, append([]client.Object{
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "reviews"}, Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}}},
		&meshv1alpha1.BackendPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "first"}, Spec: meshv1alpha1.BackendPolicySpec{
			TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: "reviews"}}, Timeout: ptr.To(meshv1alpha1.Duration("5s"))}},
	}, more...)...)
	return ns, &Validator{Client: env.Client, Decoder: admission.NewDecoder(env.Scheme)}
}

func admissionRequest(t *testing.T, kind string, obj runtime.Object) admission.Request {
	t.Helper()
	raw, err := json.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	return admission.Request{AdmissionRequest: admissionv1.AdmissionRequest{
		Kind: metav1.GroupVersionKind{Kind: kind}, Operation: admissionv1.Create, Object: runtime.RawExtension{Raw: raw},
	}}
}

// TestValidatorAgainstTheAPIServer: what the validator decides from the
// objects a real apiserver holds — a second BackendPolicy for a Service is
// denied naming the first, a target that does not exist is admitted with
// a warning, a mis-grouped Service parentRef gets the GAMMA warning.
func TestValidatorAgainstTheAPIServer(t *testing.T) {
	ns, v := validatorFixture(t)
	ctx := context.Background()

	second := &meshv1alpha1.BackendPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "second"}, Spec: meshv1alpha1.BackendPolicySpec{
		TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: "ratings"}, {Name: "reviews"}}, Timeout: ptr.To(meshv1alpha1.Duration("1s"))}}
	resp := v.Handle(ctx, admissionRequest(t, "BackendPolicy", second))
	if resp.Allowed || !strings.Contains(resp.Result.Message, "spec.targetRefs[1]") || !strings.Contains(resp.Result.Message, "first") {
		t.Errorf("second BackendPolicy for reviews: allowed=%v message %q; want denied on spec.targetRefs[1] naming first", resp.Allowed, resp.Result.Message)
	}

	elsewhere := second.DeepCopy()
	elsewhere.Spec.TargetRefs = []meshv1alpha1.PolicyTargetReference{{Name: "ratings"}}
	resp = v.Handle(ctx, admissionRequest(t, "BackendPolicy", elsewhere))
	if !resp.Allowed || len(resp.Warnings) != 1 || !strings.Contains(resp.Warnings[0], "ratings") {
		t.Errorf("BackendPolicy for a missing Service: allowed=%v warnings %q; want allowed with one warning naming ratings", resp.Allowed, resp.Warnings)
	}

	route := &gwv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "r"}, Spec: gwv1.HTTPRouteSpec{
		CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Kind: ptr.To(gwv1.Kind("Service")), Name: "reviews"}}}}}
	resp = v.Handle(ctx, admissionRequest(t, "HTTPRoute", route))
	if !resp.Allowed || len(resp.Warnings) != 1 || !strings.Contains(resp.Warnings[0], `group: ""`) {
		t.Errorf("mis-grouped parentRef: allowed=%v warnings %q; want allowed with the group warning", resp.Allowed, resp.Warnings)
	}
}
