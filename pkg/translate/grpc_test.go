package translate_test

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	"google.golang.org/grpc/xds"
	"k8s.io/utils/clock"

	"github.com/trellis-mesh/trellis/internal/manifest"
	"github.com/trellis-mesh/trellis/pkg/ca"
	"github.com/trellis-mesh/trellis/pkg/model"
	txds "github.com/trellis-mesh/trellis/pkg/xds"

	"github.com/trellis-mesh/trellis/internal/spawn"
)

// serverListenerPrefix is how gRPC names an xDS server's listener
// (the bootstrap's server_listener_resource_name_template).
const serverListenerPrefix = "grpc/server?xds.resource.listening_address="

// TestGRPCAcceptsProxylessGoldens is TestEnvoyAcceptsEveryGolden for the
// proxyless cases: each one's resources are served from a real ADS server
// (Trellis's cache behind go-control-plane's server, state of the world as
// gRPC speaks it) to gRPC-Go's own xDS client, in a process of its own with
// the case's bootstrap: a channel per API listener, an xDS server per
// server listener. gRPC must NACK nothing, ask for every resource the case
// has (it walks listener → route → cluster → endpoints itself) and
// acknowledge the last version of each type. This is what proxyless users
// run; ValidateAll does not know gRPC's rules (e.g. it NACKs num_retries 0).
func TestGRPCAcceptsProxylessGoldens(t *testing.T) {
	inputs, err := filepath.Glob("testdata/*.in.yaml")
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no golden inputs: %v", err)
	}
	dir, err := os.MkdirTemp("", "trellis-grpc-golden")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	srv := startSotwADS(t, dir)
	authority, err := ca.NewSelfSigned("cluster.local", time.Hour, clock.RealClock{})
	if err != nil {
		t.Fatal(err)
	}
	issued, err := authority.IssueWorkload("spiffe://cluster.local/ns/test/sa/golden", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{"tls.crt": issued.CertPEM, "tls.key": issued.KeyPEM, "ca.crt": authority.RootPEM()}
	for f, b := range files {
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cases := 0
	for _, in := range inputs {
		name := strings.TrimSuffix(filepath.Base(in), ".in.yaml")
		res, _, mesh := translateCase(t, in)
		_, h, err := manifest.ReadFile(in)
		if err != nil {
			t.Fatal(err)
		}
		ns, pod, _ := strings.Cut(h.Proxy, "/")
		if mesh.Workload(ns, pod).Mode != model.ProxyGRPC {
			continue
		}
		cases++
		t.Run(name, func(t *testing.T) {
			class, err := txds.ClassFrom(res)
			if err != nil {
				t.Fatal(err)
			}
			node := "grpc~golden~" + name
			srv.cache.SetClass(node, class)
			srv.cache.BindNode(node, node)
			listeners := names(res.Listeners, getName)
			cmd := exec.Command(os.Args[0])
			cmd.Env = append(os.Environ(),
				"TRELLIS_GRPC_HELPER="+strings.Join(listeners, "\n"),
				"GRPC_XDS_BOOTSTRAP_CONFIG="+grpcBootstrap(node, srv.socket, dir))
			out, err := os.Create(filepath.Join(dir, name+".log"))
			if err != nil {
				t.Fatal(err)
			}
			defer out.Close()
			cmd.Stdout, cmd.Stderr = out, out
			// Its own network namespace: server listeners bind fixed ports
			// (0.0.0.0:50051); the ADS server is reached by its Unix socket.
			cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
			if os.Geteuid() != 0 {
				cmd.SysProcAttr.Cloneflags |= syscall.CLONE_NEWUSER
				cmd.SysProcAttr.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Geteuid(), Size: 1}}
				cmd.SysProcAttr.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getegid(), Size: 1}}
			}
			if err := spawn.Start(cmd); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })

			want := map[string][]string{}
			for typeURL, rs := range class {
				if len(rs) > 0 {
					want[typeURL] = slices.Sorted(maps.Keys(rs))
				}
			}
			deadline := time.Now().Add(30 * time.Second)
			var last string
			for {
				if nack := srv.nack(node); nack != "" {
					t.Fatalf("gRPC NACKed: %s", nack)
				}
				if last = srv.accepted(node, want); last == "" {
					t.Logf("gRPC-Go acknowledged %d listeners, %d route configurations, %d clusters, %d endpoint sets",
						len(want[resource.ListenerType]), len(want[resource.RouteType]), len(want[resource.ClusterType]), len(want[resource.EndpointType]))
					return
				}
				if time.Now().After(deadline) {
					b, _ := os.ReadFile(out.Name())
					t.Fatalf("after 30 s: %s\ngRPC client log:\n%s", last, tail(string(b), 30))
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
	if cases == 0 {
		t.Fatal("no proxyless golden case")
	}
}

// TestMain runs the gRPC side of TestGRPCAcceptsProxylessGoldens when the
// test binary is started as its helper process (the xDS bootstrap is per
// process), and the tests otherwise.
func TestMain(m *testing.M) {
	if listeners := os.Getenv("TRELLIS_GRPC_HELPER"); listeners != "" {
		if err := grpcHelper(listeners); err != nil {
			fmt.Fprintln(os.Stderr, "grpc helper:", err)
			os.Exit(1)
		}
		select {} // until the test kills it
	}
	os.Exit(m.Run())
}

// grpcHelper opens a channel per API listener and an xDS server per
// server listener, with gRPC's xDS credentials.
func grpcHelper(listeners string) error {
	clientCreds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		return err
	}
	serverCreds, err := xdscreds.NewServerCredentials(xdscreds.ServerOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		return err
	}
	for _, l := range strings.Split(listeners, "\n") {
		if addr, ok := strings.CutPrefix(l, serverListenerPrefix); ok {
			network := "tcp4"
			if strings.HasPrefix(addr, "[") {
				network = "tcp6"
			}
			lis, err := net.Listen(network, addr)
			if err != nil {
				return fmt.Errorf("listen %s: %w", addr, err)
			}
			s, err := xds.NewGRPCServer(grpc.Creds(serverCreds))
			if err != nil {
				return err
			}
			go func() { _ = s.Serve(lis) }()
			continue
		}
		conn, err := grpc.NewClient("xds:///"+l, grpc.WithTransportCredentials(clientCreds))
		if err != nil {
			return err
		}
		conn.Connect()
	}
	return nil
}

// grpcBootstrap is a proxyless workload's bootstrap (as pkg/inject writes
// it) pointing at the test's ADS socket, without credentials, with the
// certificate-provider instance the resources name.
func grpcBootstrap(node, socket, dir string) string {
	b, _ := json.Marshal(map[string]any{
		"xds_servers": []any{map[string]any{
			"server_uri":      "unix://" + socket,
			"channel_creds":   []any{map[string]any{"type": "insecure"}},
			"server_features": []string{"xds_v3"},
		}},
		"node": map[string]any{"id": node, "locality": map[string]any{}},
		"certificate_providers": map[string]any{"default": map[string]any{"plugin_name": "file_watcher", "config": map[string]any{
			"certificate_file": filepath.Join(dir, "tls.crt"), "private_key_file": filepath.Join(dir, "tls.key"),
			"ca_certificate_file": filepath.Join(dir, "ca.crt"), "refresh_interval": "600s",
		}}},
		"server_listener_resource_name_template": serverListenerPrefix + "%s",
	})
	return string(b)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// sotwADS serves Trellis's cache over state-of-the-world ADS on a Unix
// socket and records, per stream and type, what the client asked for, the
// last version sent and the last version it acknowledged, and NACKs per
// node. gRPC-Go opens one xDS client, so one stream, per channel target:
// a node has several streams.
type sotwADS struct {
	cache   *txds.Cache
	socket  string
	mu      sync.Mutex
	nodes   map[int64]string
	streams map[int64]map[string]*typeState
	nacks   map[string]string
}

type typeState struct {
	asked       []string
	sent, acked string
}

func (s *sotwADS) state(id int64, typeURL string) *typeState {
	if s.streams[id] == nil {
		s.streams[id] = map[string]*typeState{}
	}
	if s.streams[id][typeURL] == nil {
		s.streams[id][typeURL] = &typeState{}
	}
	return s.streams[id][typeURL]
}

func (s *sotwADS) nack(node string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.nacks[node]
}

// accepted says what the node's streams have not yet asked for or
// acknowledged of want (names by type), or "" when they hold all of it.
func (s *sotwADS) accepted(node string, want map[string][]string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var missing []string
	for typeURL, ns := range want {
		short := typeURL[strings.LastIndex(typeURL, ".")+1:]
		var asked []string
		sent := false
		for id, types := range s.streams {
			st := types[typeURL]
			if s.nodes[id] != node || st == nil {
				continue
			}
			asked = append(asked, st.asked...)
			if st.sent != "" {
				sent = true
				if st.acked != st.sent {
					missing = append(missing, fmt.Sprintf("%s version %q sent on stream %d, %q acknowledged", short, st.sent, id, st.acked))
				}
			}
		}
		for _, n := range ns {
			if !slices.Contains(asked, n) {
				missing = append(missing, fmt.Sprintf("%s %q not asked for (asked %v)", short, n, asked))
			}
		}
		if !sent {
			missing = append(missing, short+" never sent")
		}
	}
	slices.Sort(missing)
	return strings.Join(missing, "; ")
}

func startSotwADS(t *testing.T, dir string) *sotwADS {
	t.Helper()
	s := &sotwADS{cache: txds.NewCache(), nodes: map[int64]string{}, streams: map[int64]map[string]*typeState{}, nacks: map[string]string{}}
	s.socket = serveCache(t, dir, s.cache, serverv3.CallbackFuncs{
		StreamRequestFunc: func(id int64, r *discovery.DiscoveryRequest) error {
			s.mu.Lock()
			defer s.mu.Unlock()
			if n := r.GetNode().GetId(); n != "" {
				s.nodes[id] = n
			}
			node := s.nodes[id]
			st := s.state(id, r.GetTypeUrl())
			st.asked = slices.Clone(r.GetResourceNames())
			if e := r.GetErrorDetail(); e != nil {
				s.nacks[node] += fmt.Sprintf("[%s] %s; ", r.GetTypeUrl(), e.GetMessage())
			} else if r.GetResponseNonce() != "" {
				st.acked = r.GetVersionInfo()
			}
			return nil
		},
		StreamResponseFunc: func(_ context.Context, id int64, _ *discovery.DiscoveryRequest, r *discovery.DiscoveryResponse) {
			s.mu.Lock()
			defer s.mu.Unlock()
			s.state(id, r.GetTypeUrl()).sent = r.GetVersionInfo()
		},
		StreamClosedFunc: func(id int64, _ *corev3.Node) {
			s.mu.Lock()
			defer s.mu.Unlock()
			delete(s.nodes, id)
			delete(s.streams, id)
		},
	})
	return s
}
