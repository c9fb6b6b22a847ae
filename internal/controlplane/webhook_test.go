package controlplane_test

import (
	"context"
	"testing"

	corev1 "k8s.io/api/core/v1"

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
