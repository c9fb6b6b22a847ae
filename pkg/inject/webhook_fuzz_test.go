package inject_test

import (
	"context"
	"encoding/json"
	"net/http"
	"testing"

	jsonpatch "github.com/evanphx/json-patch/v5"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/trellis-mesh/trellis/pkg/inject"
)

// FuzzWebhook feeds arbitrary request bodies to the injection webhook's
// decoder and handler: it never panics; what it cannot decode is a 400;
// what it admits carries a JSON patch that applies to the pod it was sent
// and yields a Pod, and the webhook run again on that Pod (the apiserver
// reinvokes it, reinvocationPolicy IfNeeded) changes nothing.
func FuzzWebhook(f *testing.F) {
	for _, seed := range []string{
		`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"app","image":"app","ports":[{"containerPort":8080}],"readinessProbe":{"httpGet":{"path":"/ready","port":8080}}}]}}`,
		`{"metadata":{"name":"p","annotations":{"trellis.dev/proxy":"grpc"}},"spec":{"containers":[{"name":"app","image":"app"}]}}`,
		`{"metadata":{"annotations":{"trellis.dev/inject":"disabled"}},"spec":{}}`,
		`{"metadata":{"annotations":{"trellis.dev/exclude-inbound-ports":"x,-1","trellis.dev/proxy-cpu":"lots"}},"spec":{"containers":[]}}`,
		`{}`, `null`, `[]`, `{"spec":{"containers":"app"}}`, "\x00garbage",
	} {
		f.Add([]byte(seed))
	}
	w := &inject.Webhook{Decoder: admission.NewDecoder(scheme.Scheme), Config: func() inject.Config { return cfg }}
	handle := func(raw []byte) admission.Response {
		return w.Handle(context.Background(), admission.Request{AdmissionRequest: admissionv1.AdmissionRequest{
			UID: "u", Kind: metav1.GroupVersionKind{Version: "v1", Kind: "Pod"}, Namespace: "ns",
			Operation: admissionv1.Create, Object: runtime.RawExtension{Raw: raw},
		}})
	}
	apply := func(t *testing.T, raw []byte, resp admission.Response) []byte {
		t.Helper()
		ops, err := json.Marshal(resp.Patches)
		if err != nil {
			t.Fatal(err)
		}
		p, err := jsonpatch.DecodePatch(ops)
		if err != nil {
			t.Fatalf("the webhook's patch does not decode: %v\n%s", err, ops)
		}
		out, err := p.Apply(raw)
		if err != nil {
			t.Fatalf("the webhook's patch does not apply to the pod it was sent: %v\npod: %q\npatch: %s", err, raw, ops)
		}
		return out
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		resp := handle(raw)
		if !resp.Allowed {
			if resp.Result == nil || resp.Result.Code != http.StatusBadRequest {
				t.Fatalf("refused with %+v; only an undecodable pod may be refused (400)", resp.Result)
			}
			return
		}
		once := apply(t, raw, resp)
		var pod corev1.Pod
		if err := json.Unmarshal(once, &pod); err != nil {
			t.Fatalf("the injected pod is no Pod: %v", err)
		}
		again := handle(once)
		if !again.Allowed {
			t.Fatalf("the injected pod is refused when the webhook runs again: %+v", again.Result)
		}
		var twice corev1.Pod
		if err := json.Unmarshal(apply(t, once, again), &twice); err != nil {
			t.Fatal(err)
		}
		if !equality.Semantic.DeepEqual(pod, twice) {
			t.Fatal("running the webhook again changed the injected pod")
		}
	})
}
