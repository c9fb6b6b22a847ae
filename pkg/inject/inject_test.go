package inject_test

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/encoding/protojson"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/pkg/inject"
)

var update = flag.Bool("update", false, "rewrite testdata/*.injected.yaml")

var cfg = inject.Config{InitImage: "ghcr.io/trellis-mesh/trellis-init:v0.1.0", XDSHost: "trellis-xds.trellis-system.svc", XDSPort: 15012}

type golden struct {
	Warnings []string    `json:"warnings,omitempty"`
	Pod      *corev1.Pod `json:"pod"`
}

// TestInjectionGolden injects every testdata/<case>.yaml pod and compares
// with <case>.injected.yaml; injecting the result again changes nothing.
func TestInjectionGolden(t *testing.T) {
	inputs, _ := filepath.Glob("testdata/*.yaml")
	n := 0
	for _, in := range inputs {
		if strings.HasSuffix(in, ".injected.yaml") {
			continue
		}
		n++
		name := strings.TrimSuffix(filepath.Base(in), ".yaml")
		t.Run(name, func(t *testing.T) {
			b, err := os.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			var pod corev1.Pod
			if err := yaml.UnmarshalStrict(b, &pod); err != nil {
				t.Fatal(err)
			}
			got, warnings := inject.Pod(&pod, cfg)
			again, _ := inject.Pod(got, cfg)
			if !equality.Semantic.DeepEqual(got, again) {
				t.Error("injecting an injected pod changed it")
			}
			out, err := yaml.Marshal(golden{Warnings: warnings, Pod: got})
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", name+".injected.yaml")
			if *update {
				if err := os.WriteFile(path, out, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./pkg/inject -update)", err)
			}
			if diff := cmp.Diff(string(want), string(out)); diff != "" {
				t.Errorf("%s differs (-want +got):\n%s", path, diff)
			}
		})
	}
	if n < 6 {
		t.Errorf("only %d injection cases", n)
	}
}

// TestBootstrapIsValidEnvoyConfig parses the injected --config-yaml back into
// Envoy's Bootstrap (unknown fields rejected) and validates it.
func TestBootstrapIsValidEnvoyConfig(t *testing.T) {
	y, err := inject.EnvoyBootstrap(cfg)
	if err != nil {
		t.Fatal(err)
	}
	j, err := yaml.YAMLToJSON([]byte(y))
	if err != nil {
		t.Fatal(err)
	}
	var b bootstrapv3.Bootstrap
	if err := protojson.Unmarshal(j, &b); err != nil {
		t.Fatalf("not an Envoy bootstrap: %v", err)
	}
	if err := b.ValidateAll(); err != nil {
		t.Fatal(err)
	}
	if a := b.GetAdmin().GetAddress().GetSocketAddress(); a.GetAddress() != "127.0.0.1" || a.GetPortValue() != 15000 {
		t.Errorf("admin listens on %v", a)
	}
	if !strings.HasPrefix(b.GetNode().GetId(), "sidecar~$(POD_IP)~$(POD_NAME).$(POD_NAMESPACE)~") {
		t.Errorf("node id %q", b.GetNode().GetId())
	}
}

// FuzzAnnotations feeds arbitrary values to every trellis.dev annotation:
// injection never panics, stays idempotent, and only passes values to
// trellis-init that its flags accept.
func FuzzAnnotations(f *testing.F) {
	f.Add("250m", "256Mi", "debug", "9090,9091", "5432", "10.0.0.0/8", "grpc")
	f.Add("", "x", "loud", "http", "-1", "10.0.0.0/33", "envoy")
	f.Fuzz(func(t *testing.T, cpu, mem, level, in, out, cidrs, proxy string) {
		pod := &corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app"}}}}
		pod.Name, pod.Namespace = "p", "ns"
		pod.Annotations = map[string]string{
			"trellis.dev/proxy-cpu": cpu, "trellis.dev/proxy-memory": mem, "trellis.dev/log-level": level,
			"trellis.dev/exclude-inbound-ports": in, "trellis.dev/exclude-outbound-ports": out,
			"trellis.dev/exclude-outbound-cidrs": cidrs, "trellis.dev/proxy": proxy,
		}
		got, _ := inject.Pod(pod, cfg)
		again, _ := inject.Pod(got, cfg)
		if !equality.Semantic.DeepEqual(got, again) {
			t.Fatal("not idempotent")
		}
		for _, c := range got.Spec.InitContainers {
			if c.Name != inject.InitContainer {
				continue
			}
			for _, a := range c.Args {
				k, v, _ := strings.Cut(a, "=")
				switch k {
				case "--exclude-inbound-ports", "--exclude-outbound-ports":
					for _, p := range strings.Split(v, ",") {
						if p == "" || strings.ContainsAny(p, " -") {
							t.Fatalf("bad port list passed on: %q", a)
						}
					}
				case "--exclude-outbound-cidrs":
					if strings.Contains(v, " ") {
						t.Fatalf("bad CIDR list passed on: %q", a)
					}
				}
			}
		}
	})
}
