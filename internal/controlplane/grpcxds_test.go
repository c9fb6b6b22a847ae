package controlplane_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trellis-mesh/trellis/internal/controlplane"
	"github.com/trellis-mesh/trellis/internal/testgen"
	"github.com/trellis-mesh/trellis/pkg/xds"
)

// buildOnce builds a command of the module once per test process.
type buildOnce struct {
	pkg  string
	once sync.Once
	path string
	err  error
}

func (b *buildOnce) get(t testing.TB) string {
	b.once.Do(func() {
		dir, err := os.MkdirTemp("", "trellis-test-bin")
		if err != nil {
			b.err = err
			return
		}
		b.path = filepath.Join(dir, filepath.Base(b.pkg))
		cmd := exec.Command("go", "build", "-o", b.path, b.pkg)
		cmd.Dir = env.Root
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("build %s: %v\n%s", b.pkg, err, out)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

var echoBuild = &buildOnce{pkg: "./e2e/apps/echo"}

func echoApp(t testing.TB) string { return echoBuild.get(t) }

// hostIPv4 is a non-loopback address of this machine: EndpointSlices may not
// hold loopback addresses, and a connection to it comes from it, so a
// proxyless client can be a pod with this IP.
func hostIPv4() string {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return ""
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.IsLoopback() && !n.IP.IsLinkLocalUnicast() {
			return n.IP.String()
		}
	}
	return ""
}

// TestGRPCXDSClientConsumesTrellis has gRPC-Go's own xDS client (an xDS
// implementation independent of Trellis and go-control-plane) resolve a
// Service through Trellis — API listener, routes, cluster, endpoints — over
// TLS with its pod's projected token sent as JWT call credentials, and make
// RPCs that reach the endpoint Trellis gave it.
func TestGRPCXDSClientConsumesTrellis(t *testing.T) {
	ip := hostIPv4()
	if ip == "" {
		t.Skip("SKIP: no non-loopback IPv4 address on this machine; the gRPC xDS client test runs on machines with one (CI has one)")
	}
	p := startPlane(t, nil, func(o *controlplane.Options) {
		o.XDSAddr = ip + ":0"
		o.XDSDNSNames = []string{ip, "localhost"}
	})
	ns := env.Namespace(t, nil)
	dir := t.TempDir()

	// The echo server: a plain gRPC server (the workload behind the Service).
	srv := exec.Command(echoApp(t), "server", "--address", ip+":0", "--pod", "echo-1")
	out, err := srv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	srv.Stderr = os.Stderr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Process.Kill(); _ = srv.Wait() })
	sc := bufio.NewScanner(out)
	if !sc.Scan() || !strings.HasPrefix(sc.Text(), "LISTENING ") {
		t.Fatalf("echo server: %q", sc.Text())
	}
	_, portStr, _ := net.SplitHostPort(strings.TrimPrefix(sc.Text(), "LISTENING "))
	var port int32
	fmt.Sscanf(portStr, "%d", &port)

	create(t, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "client"}})
	client := testgen.Pod(ns, "client-1", testgen.WithServiceAccount("client"), testgen.WithIP(ip), testgen.WithProxy("grpc"))
	echo := testgen.Pod(ns, "echo-1", testgen.WithIP(ip), testgen.WithProxy(""))
	create(t, client, echo,
		testgen.Service(ns, "echo", "", testgen.Port("grpc", 50051, port)),
		testgen.EndpointSlice(ns, "echo", "echo-a", "grpc", port, testgen.Endpoint{IP: ip, Pod: "echo-1"}))

	ca := filepath.Join(dir, "ca.pem")
	tok := filepath.Join(dir, "token")
	if err := os.WriteFile(ca, p.Authority.RootPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tok, []byte(token(t, client, "client")), 0o600); err != nil {
		t.Fatal(err)
	}
	_, xdsPort, _ := net.SplitHostPort(p.XDSAddr)
	node := xds.NodeID{Type: "grpc", IP: ip, Pod: "client-1", Namespace: ns}.String()
	bootstrap, _ := json.Marshal(map[string]any{
		"xds_servers": []any{map[string]any{
			"server_uri":      net.JoinHostPort(ip, xdsPort),
			"channel_creds":   []any{map[string]any{"type": "tls", "config": map[string]any{"ca_certificate_file": ca}}},
			"call_creds":      []any{map[string]any{"type": "jwt_token_file", "config": map[string]any{"jwt_token_file": tok}}},
			"server_features": []string{"xds_v3"},
		}},
		"node": map[string]any{"id": node},
	})
	bootstrapFile := filepath.Join(dir, "bootstrap.json")
	if err := os.WriteFile(bootstrapFile, bootstrap, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	cli := exec.CommandContext(ctx, echoApp(t), "client", "--target", fmt.Sprintf("xds:///echo.%s.svc.cluster.local:50051", ns), "--n", "3")
	cli.Env = append(os.Environ(), "GRPC_XDS_BOOTSTRAP="+bootstrapFile, "GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS=true")
	cli.Stderr = os.Stderr
	got, err := cli.Output()
	if err != nil {
		t.Fatalf("echo client: %v\n%s", err, got)
	}
	lines := strings.Split(strings.TrimSpace(string(got)), "\n")
	if len(lines) != 3 {
		t.Fatalf("want 3 results, got %q", got)
	}
	for _, l := range lines {
		var r map[string]any
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatal(err)
		}
		if r["pod"] != "echo-1" {
			t.Errorf("call result %v, want an answer from echo-1", r)
		}
	}
	for _, typ := range []string{"Listener", "RouteConfiguration", "Cluster", "ClusterLoadAssignment"} {
		if n := testutil.ToFloat64(p.Metrics.NACKs.WithLabelValues(typ)); n != 0 {
			t.Errorf("gRPC rejected %v %s responses", n, typ)
		}
		if n := testutil.ToFloat64(p.Metrics.Pushes.WithLabelValues(typ)); n == 0 {
			t.Errorf("no %s response was sent to the gRPC client", typ)
		}
	}
}
