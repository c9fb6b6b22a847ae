package controlplane_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

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
