package translate_test

import (
	"context"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"k8s.io/utils/clock"

	"github.com/trellis-mesh/trellis/internal/envoy"
	"github.com/trellis-mesh/trellis/internal/manifest"
	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/model"
	"github.com/trellis-mesh/trellis/pkg/xds"
)

// TestEnvoyAcceptsEveryGolden serves each golden case's resources, with a
// certificate and trust bundle under the SDS names they reference, from a
// real ADS server (Trellis's cache behind go-control-plane's server, delta
// xDS as the injected bootstrap asks) to a stock Envoy, and asserts that
// Envoy NACKs nothing and ends up holding exactly what was served, every
// listener and cluster active (not warming: their RDS, EDS and SDS
// dependencies resolved). It catches what ValidateAll cannot: extensions
// Envoy does not know, field combinations it refuses, broken SDS/EDS
// wiring. Every new golden case is covered without touching this test.
//
// Proxyless cases are for gRPC: their API listeners are not LDS resources
// Envoy takes, so only their clusters and endpoints are served.
func TestEnvoyAcceptsEveryGolden(t *testing.T) {
	if _, err := envoy.Binary(); err != nil {
		t.Fatal(err)
	}
	inputs, err := filepath.Glob("testdata/*.in.yaml")
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no golden inputs: %v", err)
	}
	// Not t.TempDir: its long path would exceed the Unix socket limit.
	dir, err := os.MkdirTemp("", "trellis-envoy-golden")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	srv := startADS(t, dir)
	authority, err := ca.NewSelfSigned("cluster.local", time.Hour, clock.RealClock{})
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range inputs {
		name := strings.TrimSuffix(filepath.Base(in), ".in.yaml")
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			res, _, mesh := translateCase(t, in)
			_, h, err := manifest.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			ns, pod, _ := strings.Cut(h.Proxy, "/")
			if mesh.Workload(ns, pod).Mode == model.ProxyGRPC {
				// gRPC's resource shapes (API listeners, certificate-provider
				// TLS) are not Envoy's; the proxyless e2e suite proves them.
				t.Logf("proxyless case: consumed by gRPC's xDS client, not Envoy")
				return
			}
			class, err := xds.ClassFrom(res)
			if err != nil {
				t.Fatal(err)
			}
			issued, err := authority.IssueWorkload("spiffe://cluster.local/ns/test/sa/"+name, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			secrets, err := xds.SecretResources(issued, authority.RootPEM())
			if err != nil {
				t.Fatal(err)
			}
			node := "golden~" + name
			srv.cache.SetClass(node, class)
			srv.cache.SetNodeResources(node, resource.SecretType, secrets)
			srv.cache.BindNode(node, node)

			admin, err := envoy.SocketPath(dir, name+".admin")
			if err != nil {
				t.Fatal(err)
			}
			p, err := envoy.Start(t.Context(), envoy.Options{
				Bootstrap:   goldenBootstrap(node, srv.socket, admin),
				AdminSocket: admin,
				Log:         filepath.Join(dir, name+".log"),
				Isolated:    true,
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(p.Stop)

			want := map[string][]string{
				"listeners": names(res.Listeners, getName),
				"routes":    names(res.Routes, getName),
				"clusters":  names(res.Clusters, getName),
				"endpoints": names(res.Endpoints, (*endpointv3.ClusterLoadAssignment).GetClusterName),
				"secrets":   slices.Sorted(maps.Keys(secrets)),
			}
			var last string
			deadline := time.Now().Add(30 * time.Second)
			for {
				if nack := srv.nack(node); nack != "" {
					t.Fatalf("Envoy NACKed: %s", nack)
				}
				a, err := p.Accepted(t.Context())
				if err == nil {
					got := map[string]map[string]envoy.State{"listeners": a.Listeners, "routes": a.Routes, "clusters": a.Clusters, "endpoints": a.Endpoints, "secrets": a.Secrets}
					if last = compareAccepted(want, got); last == "" {
						t.Logf("Envoy holds %d listeners, %d route configurations, %d clusters, %d endpoint sets, %d secrets, all active",
							len(a.Listeners), len(a.Routes), len(a.Clusters), len(a.Endpoints), len(a.Secrets))
						return
					}
				} else {
					last = err.Error()
				}
				select {
				case <-p.Done():
					t.Fatalf("Envoy exited: %s", p.Tail(30))
				case <-time.After(100 * time.Millisecond):
				}
				if time.Now().After(deadline) {
					t.Fatalf("after 30 s Envoy does not hold what was served: %s\nEnvoy log:\n%s", last, p.Tail(30))
				}
			}
		})
	}
}

func names[T any](xs []T, name func(T) string) []string {
	out := make([]string, 0, len(xs))
	for _, x := range xs {
		out = append(out, name(x))
	}
	slices.Sort(out)
	return out
}

func getName[T interface{ GetName() string }](x T) string { return x.GetName() }

// compareAccepted says how what Envoy holds differs from what was served,
// or "" when it holds exactly that, all active.
func compareAccepted(want map[string][]string, got map[string]map[string]envoy.State) string {
	var diffs []string
	for _, kind := range slices.Sorted(maps.Keys(want)) {
		for _, n := range want[kind] {
			s, ok := got[kind][n]
			switch {
			case !ok && kind == "secrets":
				// Envoy asks only for the secrets its resources reference; a
				// referenced one not served keeps a listener or cluster warming.
			case !ok:
				diffs = append(diffs, fmt.Sprintf("%s %q missing", kind, n))
			case s.Phase != "active":
				diffs = append(diffs, fmt.Sprintf("%s %q %s %s", kind, n, s.Phase, s.Error))
			}
		}
		for n := range got[kind] {
			// Envoy lists the load assignment of every cluster, EDS or not.
			if kind != "endpoints" && !slices.Contains(want[kind], n) {
				diffs = append(diffs, fmt.Sprintf("%s %q held but not served", kind, n))
			}
		}
	}
	return strings.Join(diffs, "; ")
}

// goldenBootstrap points Envoy at the test's ADS socket, admin on a socket.
func goldenBootstrap(node, ads, admin string) string {
	return fmt.Sprintf(`node: {id: %q, cluster: golden}
admin: {address: {pipe: {path: %q}}}
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services: [{envoy_grpc: {cluster_name: xds}}]
  cds_config: {ads: {}, resource_api_version: V3}
  lds_config: {ads: {}, resource_api_version: V3}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: xds
      endpoints: [{lb_endpoints: [{endpoint: {address: {pipe: {path: %q}}}}]}]
`, node, admin, ads)
}

type adsServer struct {
	cache  *xds.Cache
	socket string
	mu     sync.Mutex
	nodes  map[int64]string
	nacks  map[string]string
}

func (s *adsServer) nack(node string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.nacks[node]
}

// startADS serves Trellis's cache over ADS on a Unix socket in dir and
// records NACKs per node.
func startADS(t *testing.T, dir string) *adsServer {
	t.Helper()
	s := &adsServer{cache: xds.NewCache(), nodes: map[int64]string{}, nacks: map[string]string{}}
	s.socket = serveCache(t, dir, s.cache, serverv3.CallbackFuncs{
		StreamDeltaRequestFunc: func(id int64, r *discovery.DeltaDiscoveryRequest) error {
			s.mu.Lock()
			defer s.mu.Unlock()
			if n := r.GetNode().GetId(); n != "" {
				s.nodes[id] = n
			}
			if e := r.GetErrorDetail(); e != nil {
				s.nacks[s.nodes[id]] += fmt.Sprintf("[%s] %s; ", r.GetTypeUrl(), e.GetMessage())
			}
			return nil
		},
		DeltaStreamClosedFunc: func(id int64, _ *corev3.Node) {
			s.mu.Lock()
			defer s.mu.Unlock()
			delete(s.nodes, id)
		},
	})
	return s
}

// serveCache serves a cache over ADS (go-control-plane's server with cb) on
// a Unix socket in dir, until the test ends; it returns the socket's path.
func serveCache(t *testing.T, dir string, cache *xds.Cache, cb serverv3.CallbackFuncs) string {
	t.Helper()
	socket, err := envoy.SocketPath(dir, "ads.sock")
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	g := grpc.NewServer()
	discovery.RegisterAggregatedDiscoveryServiceServer(g, serverv3.NewServer(ctx, cache, cb))
	go func() { _ = g.Serve(l) }()
	t.Cleanup(func() { cancel(); g.Stop() })
	return socket
}
