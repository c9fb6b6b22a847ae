package controlplane_test

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/trellis-mesh/trellis/internal/controlplane"
	meshv1alpha1 "github.com/trellis-mesh/trellis/pkg/apis/mesh/v1alpha1"

	"github.com/trellis-mesh/trellis/internal/testgen"
)

// TestInjectionWebhook has the real apiserver call the control plane's
// webhook: pods in labelled namespaces come back with the data plane,
// others and opted-out pods unchanged.
func TestInjectionWebhook(t *testing.T) {
	startPlane(t, nil)
	meshed := env.Namespace(t, map[string]string{"trellis.dev/inject": "enabled"})
	plain := env.Namespace(t, nil)
	names := func(cs []corev1.Container) []string {
		var out []string
		for _, c := range cs {
			out = append(out, c.Name)
		}
		return out
	}
	for _, tt := range []struct {
		name     string
		pod      *corev1.Pod
		injected bool
	}{
		{"a pod in a labelled namespace is injected", testgen.Pod(meshed, "app-1", testgen.WithProxy("")), true},
		{"a pod in an unlabelled namespace is not", testgen.Pod(plain, "app-2", testgen.WithProxy("")), false},
		{"a pod labelled trellis.dev/inject=disabled is not", testgen.Pod(meshed, "app-3", testgen.WithProxy(""), testgen.WithLabel("trellis.dev/inject", "disabled")), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if err := env.Client.Create(context.Background(), tt.pod); err != nil {
				t.Fatalf("create: %v", err)
			}
			got := names(tt.pod.Spec.InitContainers)
			if tt.injected {
				if len(got) != 2 || got[0] != "trellis-init" || got[1] != "trellis-proxy" {
					t.Errorf("init containers %v, want [trellis-init trellis-proxy]", got)
				}
				if tt.pod.Annotations["trellis.dev/status"] != "injected" || tt.pod.Annotations["trellis.dev/proxy"] != "envoy" {
					t.Errorf("annotations %v", tt.pod.Annotations)
				}
				if tt.pod.Spec.InitContainers[1].RestartPolicy == nil || *tt.pod.Spec.InitContainers[1].RestartPolicy != corev1.ContainerRestartPolicyAlways {
					t.Error("the proxy is not a native sidecar")
				}
			} else if len(got) != 0 || tt.pod.Annotations["trellis.dev/status"] != "" {
				t.Errorf("pod was injected: %v %v", got, tt.pod.Annotations)
			}
		})
	}
	t.Run("the fallback without native sidecars is accepted by the apiserver", func(t *testing.T) {
		pod := testgen.Pod(meshed, "app-5", testgen.WithProxy(""))
		pod.Annotations = map[string]string{"trellis.dev/native-sidecar": "false"}
		if err := env.Client.Create(context.Background(), pod); err != nil {
			t.Fatalf("create: %v", err)
		}
		if got := names(pod.Spec.InitContainers); len(got) != 1 || got[0] != "trellis-init" {
			t.Errorf("init containers %v, want [trellis-init]", got)
		}
		if c := pod.Spec.Containers[0]; c.Name != "trellis-proxy" || c.Lifecycle == nil || c.Lifecycle.PostStart == nil {
			t.Errorf("first container %s, lifecycle %+v: want trellis-proxy with a postStart hook", c.Name, c.Lifecycle)
		}
	})
	t.Run("an HTTP probe is moved onto the stats port and accepted by the apiserver", func(t *testing.T) {
		pod := testgen.Pod(meshed, "app-4", testgen.WithProxy(""))
		pod.Spec.Containers[0].LivenessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromInt32(8080)}}}
		if err := env.Client.Create(context.Background(), pod); err != nil {
			t.Fatalf("create: %v", err)
		}
		lp := pod.Spec.Containers[0].LivenessProbe
		if lp.HTTPGet == nil || lp.HTTPGet.Port.IntValue() != 15020 || lp.HTTPGet.Path != "/app-health/"+pod.Spec.Containers[0].Name+"/livez" {
			t.Errorf("liveness probe %+v", lp.ProbeHandler)
		}
		if want := `"httpGet":{"path":"/healthz","port":8080,`; !strings.Contains(pod.Annotations["trellis.dev/probes"], want) {
			t.Errorf("probes annotation %q lacks %s", pod.Annotations["trellis.dev/probes"], want)
		}
	})
}

// TestWebhookCABundleFollowsRootRotation runs the webhook with the
// certificate the control plane issues itself: it writes its trust bundle
// into the MutatingWebhookConfiguration, and pods keep being admitted and
// injected through a root rotation, after which only the new root is in the
// caBundle.
func TestWebhookCABundleFollowsRootRotation(t *testing.T) {
	wh := env.Environment().WebhookInstallOptions
	const name = "mutating-webhook-configuration"
	t.Cleanup(func() {
		// Give the webhook back to envtest's certificate for the other tests.
		var mwc admissionv1.MutatingWebhookConfiguration
		if err := env.Client.Get(context.Background(), client.ObjectKey{Name: name}, &mwc); err == nil {
			for i := range mwc.Webhooks {
				mwc.Webhooks[i].ClientConfig.CABundle = wh.LocalServingCAData
			}
			_ = env.Client.Update(context.Background(), &mwc)
		}
		_ = env.Client.Delete(context.Background(), &meshv1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: meshv1alpha1.MeshConfigName}})
	})
	p := startPlane(t, nil, func(o *controlplane.Options) {
		o.WebhookCertDir = ""
		o.WebhookDNSNames = []string{wh.LocalServingHost}
		o.WebhookConfiguration = name
		o.RootRotationOverlap = 2 * time.Second
		o.RootRotationTick = 100 * time.Millisecond
	})
	meshed := env.Namespace(t, map[string]string{"trellis.dev/inject": "enabled"})
	bundleIs := func(want []byte) {
		t.Helper()
		deadline := time.Now().Add(wait)
		for {
			var mwc admissionv1.MutatingWebhookConfiguration
			if err := env.Client.Get(context.Background(), client.ObjectKey{Name: name}, &mwc); err != nil {
				t.Fatal(err)
			}
			if bytes.Equal(mwc.Webhooks[0].ClientConfig.CABundle, want) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("caBundle never became the expected bundle")
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	admitted := 0
	admit := func() {
		t.Helper()
		pod := testgen.Pod(meshed, fmt.Sprintf("app-%d", admitted), testgen.WithProxy(""))
		if err := env.Client.Create(context.Background(), pod); err != nil {
			t.Fatalf("pod %d not admitted: %v", admitted, err)
		}
		if len(pod.Spec.InitContainers) != 2 {
			t.Fatalf("pod %d not injected", admitted)
		}
		admitted++
	}
	bundleIs(p.Authority.RootPEM())
	admit()

	certPEM, keyPEM := selfSignedRoot(t)
	create(t, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: "trellis-system", Name: "trellis-ca-next"},
		Type:       corev1.SecretTypeTLS,
		Data:       map[string][]byte{corev1.TLSCertKey: certPEM, corev1.TLSPrivateKeyKey: keyPEM},
	})
	// Admit pods all through the rotation, until the bundle is the new root alone.
	deadline := time.Now().Add(wait)
	for {
		admit()
		var mwc admissionv1.MutatingWebhookConfiguration
		if err := env.Client.Get(context.Background(), client.ObjectKey{Name: name}, &mwc); err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(mwc.Webhooks[0].ClientConfig.CABundle, certPEM) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("rotation did not reach the webhook's caBundle")
		}
		time.Sleep(200 * time.Millisecond)
	}
	admit()
	t.Logf("%d pods admitted and injected across the rotation", admitted)
}

type warnings struct{ got []string }

func (w *warnings) HandleWarningHeader(_ int, _ string, text string) { w.got = append(w.got, text) }

// warningClient is a client of the test apiserver that records the
// warnings it is sent.
func warningClient(t *testing.T) (client.Client, *warnings) {
	t.Helper()
	cfg := rest.CopyConfig(env.Config)
	w := &warnings{}
	cfg.WarningHandler = w
	c, err := client.New(cfg, client.Options{Scheme: env.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	return c, w
}

// TestValidatingWebhook has the apiserver ask the control plane about
// Trellis objects: cross-object conflicts are rejected with a message
// naming the field, a missing target Service is only a warning.
func TestValidatingWebhook(t *testing.T) {
	startPlane(t, nil)
	ns := env.Namespace(t, nil)
	create(t, testgen.Service(ns, "reviews", "", testgen.Port("http", 9080, 8080)))
	c, w := warningClient(t)
	ctx := context.Background()
	bp := func(name, target string) *meshv1alpha1.BackendPolicy {
		return &meshv1alpha1.BackendPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: meshv1alpha1.BackendPolicySpec{
			TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: target}}, Timeout: new(meshv1alpha1.Duration("3s")),
		}}
	}
	// The webhook is served once the manager runs; retry until it answers.
	deadline := time.Now().Add(wait)
	for {
		err := c.Create(ctx, bp("first", "reviews"))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for {
		err := c.Create(ctx, bp("second", "reviews"))
		if err != nil && strings.Contains(err.Error(), "already has BackendPolicy first") {
			if !strings.Contains(err.Error(), "spec.targetRefs[0]") {
				t.Errorf("the rejection does not name the field: %v", err)
			}
			break
		}
		if err == nil {
			// The webhook fails open: it was not serving yet. Try again.
			_ = c.Delete(ctx, bp("second", "reviews"))
		}
		if time.Now().After(deadline) {
			t.Fatalf("second BackendPolicy on one Service not rejected: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	w.got = nil
	if err := c.Create(ctx, bp("ghost", "ghost")); err != nil {
		t.Fatalf("a policy for a missing Service must be accepted: %v", err)
	}
	if len(w.got) != 1 || !strings.Contains(w.got[0], "ghost does not exist") {
		t.Errorf("warnings %q", w.got)
	}
	rule := []meshv1alpha1.AccessRule{{From: []meshv1alpha1.AccessSource{{Namespace: new("shop")}}}}
	allow := &meshv1alpha1.AccessPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "allow"}, Spec: meshv1alpha1.AccessPolicySpec{
		TargetRefs: []meshv1alpha1.PolicyTargetReference{{Name: "reviews"}}, Action: meshv1alpha1.AccessAllow, Rules: rule}}
	deny := allow.DeepCopy()
	deny.Name, deny.Spec.Action = "deny", meshv1alpha1.AccessDeny
	if err := c.Create(ctx, allow); err != nil {
		t.Fatal(err)
	}
	// Deny wins: a Deny repeating an Allow's rule is admitted, with a
	// warning — once the webhook's cache has the Allow (retry until then).
	for deadline := time.Now().Add(wait); ; time.Sleep(100 * time.Millisecond) {
		w.got = nil
		if err := c.Create(ctx, deny); err != nil {
			t.Fatalf("a Deny repeating an Allow's rule was refused: %v", err)
		}
		if len(w.got) == 1 && strings.Contains(w.got[0], "Allow AccessPolicy allow rule 0") && strings.Contains(w.got[0], "Deny wins") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("warnings %q, want one saying Deny wins over AccessPolicy allow", w.got)
		}
		if err := c.Delete(ctx, deny); err != nil {
			t.Fatal(err)
		}
		deny = deny.DeepCopy()
		deny.ResourceVersion = ""
	}
	es := func(name string) *meshv1alpha1.ExternalService {
		return &meshv1alpha1.ExternalService{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: meshv1alpha1.ExternalServiceSpec{
			Hosts: []string{"api.example.com"}, Ports: []meshv1alpha1.ExternalPort{{Number: 443, Protocol: meshv1alpha1.ExternalTLS}}}}
	}
	if err := c.Create(ctx, es("a")); err != nil {
		t.Fatal(err)
	}
	// Rejected once the webhook's cache has "a" (retry until then).
	for deadline := time.Now().Add(wait); ; time.Sleep(100 * time.Millisecond) {
		err := c.Create(ctx, es("b"))
		if err != nil && strings.Contains(err.Error(), "already declared by ExternalService") {
			break
		}
		if err == nil {
			_ = c.Delete(ctx, es("b"))
		}
		if time.Now().After(deadline) {
			t.Fatalf("a duplicate ExternalService was not rejected: %v", err)
		}
	}
}

// TestRouteParentRefWarning: an HTTPRoute or GRPCRoute whose parentRef says
// kind Service without group: "" (defaulted to Gateway API's group, so no
// mesh programs it) is admitted with a warning saying what to write; a
// correct GAMMA parentRef gets none.
func TestRouteParentRefWarning(t *testing.T) {
	startPlane(t, nil)
	ns := env.Namespace(t, nil)
	c, w := warningClient(t)
	ctx := context.Background()
	route := func(name string, group *gwv1.Group) *gwv1.HTTPRoute {
		return &gwv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Group: group, Kind: new(gwv1.Kind("Service")), Name: "reviews"}}},
		}}
	}
	// The webhook fails open until the manager serves it: retry.
	deadline := time.Now().Add(wait)
	for i := 0; ; i++ {
		w.got = nil
		if err := c.Create(ctx, route(fmt.Sprint("no-group-", i), nil)); err != nil {
			t.Fatal(err)
		}
		if len(w.got) == 1 && strings.Contains(w.got[0], `spec.parentRefs[0]`) && strings.Contains(w.got[0], `write group: ""`) {
			t.Logf("warning: %s", w.got[0])
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no parentRef warning: %q", w.got)
		}
		time.Sleep(100 * time.Millisecond)
	}
	w.got = nil
	if err := c.Create(ctx, route("gamma", new(gwv1.Group("")))); err != nil {
		t.Fatal(err)
	}
	if len(w.got) != 0 {
		t.Errorf("a correct GAMMA parentRef got warnings %q", w.got)
	}
	w.got = nil
	g := &gwv1.GRPCRoute{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "grpc-no-group"}, Spec: gwv1.GRPCRouteSpec{
		CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Kind: new(gwv1.Kind("Service")), Name: "echo"}}},
	}}
	if err := c.Create(ctx, g); err != nil {
		t.Fatal(err)
	}
	if len(w.got) != 1 || !strings.Contains(w.got[0], "Service echo") {
		t.Errorf("GRPCRoute warnings %q", w.got)
	}
}
