package controller

import (
	"context"
	"net/http"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admission/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"
)

// FuzzValidator feeds arbitrary bodies of each kind the validating webhook
// serves to its decoder and handler, against a real apiserver holding a
// BackendPolicy and an ExternalService to conflict with: it never panics
// and never answers 500; what it cannot decode is a 400, and what it denies
// is a 403 whose message names the field at fault.
func FuzzValidator(f *testing.F) {
	// The ExternalService is created in another namespace: hosts conflict mesh-wide.
	ns, v := validatorFixture(f, &meshv1alpha1.ExternalService{ObjectMeta: metav1.ObjectMeta{Namespace: env.Namespace(f, nil), Name: "api"}, Spec: meshv1alpha1.ExternalServiceSpec{
		Hosts: []string{"api.example.com"}, Ports: []meshv1alpha1.ExternalPort{{Number: 443, Protocol: "TLS"}}}})
	kinds := []string{"BackendPolicy", "AccessPolicy", "ExternalService", "HTTPRoute", "GRPCRoute", "Pod"}
	for _, seed := range []struct {
		kind uint8
		body string
	}{
		{0, `{"apiVersion":"mesh.trellis.dev/v1alpha1","kind":"BackendPolicy","metadata":{"name":"second"},"spec":{"targetRefs":[{"name":"ratings"},{"name":"reviews"}]}}`},
		{0, `{"metadata":{"name":"x","namespace":"elsewhere"},"spec":{"targetRefs":[{"name":"reviews"}]}}`},
		{1, `{"metadata":{"name":"a"},"spec":{"action":"Deny","targetRefs":[{"name":"reviews"}],"rules":[{"from":[{"namespace":"*"}]}]}}`},
		{2, `{"metadata":{"name":"dup"},"spec":{"hosts":["api.example.com"],"ports":[{"number":443,"protocol":"TLS"}]}}`},
		{3, `{"metadata":{"name":"r"},"spec":{"parentRefs":[{"kind":"Service","name":"reviews"}]}}`},
		{4, `{"metadata":{"name":"g"},"spec":{"parentRefs":[{"group":"gateway.networking.k8s.io","kind":"Service","name":"reviews"}]}}`},
		{0, `{"spec":{"targetRefs":"reviews"}}`}, {1, `[]`}, {2, `null`}, {3, "\x00"}, {5, `{}`},
	} {
		f.Add(seed.kind, []byte(seed.body))
	}
	f.Fuzz(func(t *testing.T, kind uint8, raw []byte) {
		k := kinds[int(kind)%len(kinds)]
		resp := v.Handle(context.Background(), admission.Request{AdmissionRequest: admissionv1.AdmissionRequest{
			UID: "u", Kind: metav1.GroupVersionKind{Group: "mesh.trellis.dev", Version: "v1alpha1", Kind: k}, Namespace: ns,
			Operation: admissionv1.Create, Object: runtime.RawExtension{Raw: raw},
		}})
		if resp.Allowed {
			return
		}
		switch code := resp.Result.Code; {
		case code == http.StatusBadRequest:
		case code == http.StatusForbidden && strings.HasPrefix(resp.Result.Message, "spec."):
		default:
			t.Fatalf("%s %q: refused with %d %q; want 400 (undecodable) or 403 naming a spec field", k, raw, code, resp.Result.Message)
		}
	})
}
