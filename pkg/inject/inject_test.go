package inject_test

import (
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	healthcheckv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/health_check/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/encoding/protojson"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/clock"
	"sigs.k8s.io/yaml"

	"github.com/trellis-mesh/trellis/internal/envoy"
	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/inject"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/translate"
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

// TestRewrittenProbesAreAnswered is the contract between the injector and
// the translator: every probe the injector points at the stats port is
// answered there by the sidecar's configuration — an HTTP probe by a route
// forwarding to the original port and path, a TCP or gRPC probe by a
// health_check filter watching a health-checked cluster of that port.
func TestRewrittenProbesAreAnswered(t *testing.T) {
	for _, name := range []string{"probes-http", "probes-tcp-grpc"} {
		t.Run(name, func(t *testing.T) {
			b, err := os.ReadFile("testdata/" + name + ".yaml")
			if err != nil {
				t.Fatal(err)
			}
			var pod corev1.Pod
			if err := yaml.UnmarshalStrict(b, &pod); err != nil {
				t.Fatal(err)
			}
			got, _ := inject.Pod(&pod, cfg)
			got.Status.PodIP = "10.1.0.9"
			mesh, problems := model.Build(model.Input{Pods: []*corev1.Pod{got}})
			if len(problems) > 0 {
				t.Fatalf("the injector wrote probes the model rejects: %v", problems)
			}
			res, _ := translate.ForWorkload(mesh, mesh.Workload(got.Namespace, got.Name))
			routes, checks := statsPaths(t, res)
			clusters := map[string]*clusterv3.Cluster{}
			for _, c := range res.Clusters {
				clusters[c.Name] = c
			}
			n := 0
			for _, c := range got.Spec.Containers {
				orig := containerOf(&pod, c.Name)
				for kind, pr := range map[string][2]*corev1.Probe{
					"livez": {c.LivenessProbe, orig.LivenessProbe}, "readyz": {c.ReadinessProbe, orig.ReadinessProbe}, "startupz": {c.StartupProbe, orig.StartupProbe},
				} {
					now, before := pr[0], pr[1]
					if now == nil || now.HTTPGet == nil || now.HTTPGet.Port.IntValue() != 15020 {
						continue
					}
					n++
					path := now.HTTPGet.Path
					if path != model.ProbePath(c.Name, kind) {
						t.Errorf("%s %s probe rewritten to %q", c.Name, kind, path)
					}
					switch {
					case before.HTTPGet != nil:
						r, ok := routes[path]
						if !ok {
							t.Errorf("no route answers %s", path)
							continue
						}
						addr := clusters[r.GetRoute().GetCluster()].GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
						if want := int32(resolvePort(orig, before.HTTPGet.Port)); addr.GetAddress() != "127.0.0.1" || int32(addr.GetPortValue()) != want {
							t.Errorf("%s forwards to %v, want 127.0.0.1:%d", path, addr, want)
						}
						if r.GetRoute().GetPrefixRewrite() != before.HTTPGet.Path {
							t.Errorf("%s rewrites to %q, want %q", path, r.GetRoute().GetPrefixRewrite(), before.HTTPGet.Path)
						}
					default:
						cluster, ok := checks[path]
						if !ok {
							t.Errorf("no health_check filter answers %s", path)
							continue
						}
						c := clusters[cluster]
						if len(c.GetHealthChecks()) != 1 {
							t.Errorf("%s: cluster %s is not health-checked", path, cluster)
							continue
						}
						hc := c.GetHealthChecks()[0]
						if before.GRPC != nil && hc.GetGrpcHealthCheck() == nil || before.TCPSocket != nil && hc.GetTcpHealthCheck() == nil {
							t.Errorf("%s: cluster %s checks %v", path, cluster, hc.GetHealthChecker())
						}
					}
				}
			}
			if n == 0 {
				t.Fatal("no probe was rewritten; the test proves nothing")
			}
		})
	}
}

func containerOf(p *corev1.Pod, name string) *corev1.Container {
	for i := range p.Spec.Containers {
		if p.Spec.Containers[i].Name == name {
			return &p.Spec.Containers[i]
		}
	}
	return nil
}

func resolvePort(c *corev1.Container, port intstr.IntOrString) int {
	if port.Type == intstr.Int {
		return port.IntValue()
	}
	for _, p := range c.Ports {
		if p.Name == port.StrVal {
			return int(p.ContainerPort)
		}
	}
	return -1
}

// statsPaths returns the routes of the stats listener by exact path, and the
// cluster each health_check filter watches by the path it answers.
func statsPaths(t *testing.T, res *translate.Resources) (map[string]*routev3.Route, map[string]string) {
	t.Helper()
	routes, checks := map[string]*routev3.Route{}, map[string]string{}
	for _, l := range res.Listeners {
		if l.Name != translate.StatsListenerName {
			continue
		}
		var h hcmv3.HttpConnectionManager
		if err := l.FilterChains[0].Filters[0].GetTypedConfig().UnmarshalTo(&h); err != nil {
			t.Fatal(err)
		}
		for _, r := range h.GetRouteConfig().GetVirtualHosts()[0].GetRoutes() {
			routes[r.GetMatch().GetPath()] = r
		}
		for _, f := range h.HttpFilters {
			var hc healthcheckv3.HealthCheck
			if f.GetTypedConfig().UnmarshalTo(&hc) != nil {
				continue
			}
			for cluster := range hc.ClusterMinHealthyPercentages {
				checks[hc.Headers[0].GetStringMatch().GetExact()] = cluster
			}
		}
		return routes, checks
	}
	t.Fatal("no stats listener")
	return nil, nil
}

// TestEnvoyValidatesTheBootstrap runs stock Envoy's own config validation
// (--mode validate: the bootstrap is parsed, every extension resolved and
// instantiated, nothing served) on the bootstrap the injector writes, with
// the pod facts filled in as Kubernetes would.
func TestEnvoyValidatesTheBootstrap(t *testing.T) {
	bin, err := envoy.Binary()
	if err != nil {
		t.Fatal(err)
	}
	b, err := inject.EnvoyBootstrap(inject.Config{XDSHost: "trellis-xds.trellis-system.svc", XDSPort: 15012})
	if err != nil {
		t.Fatal(err)
	}
	// The files the pod's volumes provide: the mesh root and the token.
	dir := t.TempDir()
	authority, err := ca.NewSelfSigned("cluster.local", time.Hour, clock.RealClock{})
	if err != nil {
		t.Fatal(err)
	}
	root, token := filepath.Join(dir, "root-cert.pem"), filepath.Join(dir, "token")
	if err := os.WriteFile(root, authority.RootPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(token, []byte("a.b.c"), 0o644); err != nil {
		t.Fatal(err)
	}
	b = strings.NewReplacer("$(POD_IP)", "10.1.0.10", "$(POD_NAME)", "app-1", "$(POD_NAMESPACE)", "shop", "$(SERVICE_ACCOUNT)", "app",
		inject.RootCAPath, root, inject.TokenPath, token).Replace(b)
	out, err := exec.Command(bin, "--mode", "validate", "--config-yaml", b, "--disable-hot-restart").CombinedOutput()
	if err != nil {
		t.Fatalf("envoy --mode validate: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "OK") {
		t.Fatalf("envoy did not report the configuration OK:\n%s", out)
	}
}
